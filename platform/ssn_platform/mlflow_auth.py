"""MLflow credentials kept in a file, and the users of the local stack's MLflow basic-auth server.

Every write to the tracking server and the registry (runs, models, alias moves) needs a user once the server runs
MLflow's basic-auth app (`mlflow server --app-name basic-auth`): the local stack (infra/local/stack) and the
Kubernetes manifests (infra/k8s/base/mlflow.yaml) both run it. Two users exist: the admin (manages users and
permissions; nothing of ours runs as it) and ``ssn-jobs``, the least-privileged user every job, worker and Serve
replica runs as. Its default permission is READ; what it creates (experiments, registered models) it manages.

How a client authenticates without the password in any environment: MLflow's REST client asks the request-auth
provider named by ``MLFLOW_TRACKING_AUTH`` for a `requests` auth object on every request (the
``mlflow.request_auth_provider`` entry point; pyproject.toml registers ``ssn-credentials-file`` =
`CredentialsFileAuthProvider`). Ours reads the user and password from the file named by
``SSN_MLFLOW_CREDENTIALS_FILE`` on each request, in the INI format of MLflow's own ``~/.mlflow/credentials``
(section ``[mlflow]``, keys ``mlflow_tracking_username`` and ``mlflow_tracking_password``), so the password sits in
one 0600 file, never in a process environment, a Ray runtime_env or a log, and a rotated password applies at the
next request. On Kubernetes the same file is mounted from a Secret at ``~/.mlflow/credentials``, which MLflow
reads by itself. A missing or incomplete file is a loud error naming the file.

Command line (used by the local stack; no Ray here):

    python -m ssn_platform.mlflow_auth new-credentials --user ssn-jobs --out FILE
    python -m ssn_platform.mlflow_auth server-config --admin FILE --database URI --out INI
    python -m ssn_platform.mlflow_auth ensure-user --uri URI --admin FILE --user FILE
"""

from __future__ import annotations

import argparse
import configparser
import os
import secrets
import sys
from pathlib import Path

import requests

CREDENTIALS_FILE_ENV = "SSN_MLFLOW_CREDENTIALS_FILE"
PROVIDER_NAME = "ssn-credentials-file"  # the value of MLFLOW_TRACKING_AUTH that selects the provider below
JOBS_USER = "ssn-jobs"
_SECTION = "mlflow"
_USER_KEY, _PASSWORD_KEY = "mlflow_tracking_username", "mlflow_tracking_password"


class CredentialsError(RuntimeError):
    """A credentials file that is missing, unreadable or incomplete (the message names it)."""


def read_credentials(path: str | os.PathLike) -> tuple[str, str]:
    """(user, password) from a credentials file in the INI format of ``~/.mlflow/credentials``."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise CredentialsError(f"MLflow credentials file {path}: {error.strerror or error}") from None
    try:
        parser.read_string(text)
        user, password = parser[_SECTION][_USER_KEY].strip(), parser[_SECTION][_PASSWORD_KEY].strip()
    except (configparser.Error, KeyError):
        raise CredentialsError(
            f"MLflow credentials file {path}: needs a [{_SECTION}] section with {_USER_KEY} and {_PASSWORD_KEY}"
        ) from None
    if not user or not password:
        raise CredentialsError(f"MLflow credentials file {path}: {_USER_KEY} and {_PASSWORD_KEY} must not be empty")
    return user, password


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600, atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def credentials_text(user: str, password: str) -> str:
    return f"[{_SECTION}]\n{_USER_KEY} = {user}\n{_PASSWORD_KEY} = {password}\n"


class CredentialsFileAuthProvider:
    """MLflow request-auth provider (``MLFLOW_TRACKING_AUTH=ssn-credentials-file``): HTTP basic auth with the user
    and password of the file named by ``SSN_MLFLOW_CREDENTIALS_FILE``, read at every request."""

    def get_name(self) -> str:
        return PROVIDER_NAME

    def get_auth(self) -> requests.auth.HTTPBasicAuth:
        path = os.environ.get(CREDENTIALS_FILE_ENV)
        if not path:
            raise CredentialsError(
                f"MLFLOW_TRACKING_AUTH={PROVIDER_NAME} needs {CREDENTIALS_FILE_ENV}, the path of "
                "an MLflow credentials file"
            )
        return requests.auth.HTTPBasicAuth(*read_credentials(path))


def server_config(*, admin_file: Path, database_uri: str) -> str:
    """The basic-auth app's INI (``MLFLOW_AUTH_CONFIG_PATH``): users default to READ, the admin from `admin_file`
    (used only when the user store is created), verified passwords cached for 60 s (one worker: no staleness
    between workers; PBKDF2 on every request would cost more than the request)."""
    user, password = read_credentials(admin_file)
    return (
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {database_uri}\nadmin_username = {user}\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n"
    )


def ensure_user(uri: str, *, admin_file: Path, user_file: Path, timeout: float = 30.0) -> str:
    """Create the user of `user_file` on the server as the admin, or set its password to the file's when it exists.
    Returns "created" or "updated"."""
    admin = read_credentials(admin_file)
    user, password = read_credentials(user_file)
    base = uri.rstrip("/") + "/api/2.0/mlflow/users"
    response = requests.post(
        f"{base}/create", json={"username": user, "password": password}, auth=admin, timeout=timeout
    )
    if response.ok:
        return "created"
    if response.status_code == 400 and "RESOURCE_ALREADY_EXISTS" in response.text:
        response = requests.patch(
            f"{base}/update-password", json={"username": user, "password": password}, auth=admin, timeout=timeout
        )
        if response.ok:
            return "updated"
    raise CredentialsError(
        f"could not create or update MLflow user {user!r} on {uri}: HTTP {response.status_code} {response.text[:200]}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssn_platform.mlflow_auth", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new-credentials", help="write a credentials file with a new random password (0600)")
    new.add_argument("--user", required=True)
    new.add_argument("--out", type=Path, required=True)
    config = commands.add_parser("server-config", help="write the basic-auth app's INI (0600)")
    config.add_argument("--admin", type=Path, required=True)
    config.add_argument("--database", required=True, help="SQLAlchemy URI of the user store")
    config.add_argument("--out", type=Path, required=True)
    ensure = commands.add_parser("ensure-user", help="create (or re-password) the user of --user as the admin")
    ensure.add_argument("--uri", required=True)
    ensure.add_argument("--admin", type=Path, required=True)
    ensure.add_argument("--user", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "new-credentials":
            write_private(args.out, credentials_text(args.user, secrets.token_urlsafe(24)))
        elif args.command == "server-config":
            write_private(args.out, server_config(admin_file=args.admin, database_uri=args.database))
        else:
            print(
                f"MLflow user {read_credentials(args.user)[0]}: "
                f"{ensure_user(args.uri, admin_file=args.admin, user_file=args.user)}"
            )
    except (CredentialsError, requests.RequestException) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
