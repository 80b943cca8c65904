"""MLflow credentials from a file (ssn_platform.mlflow_auth): the request-auth provider MLflow's client loads by
name, the files the local stack writes, and errors that name the file. The server side (401 without credentials,
the jobs user's limits) is tested on the live stack in test_stack.py."""

from __future__ import annotations

import configparser
import re
import stat
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import requests

from ssn_platform import mlflow_auth
from ssn_platform.mlflow_auth import CredentialsError, CredentialsFileAuthProvider, read_credentials


def _write(path: Path, user: str = "ssn-jobs", password: str = "p" * 32) -> Path:
    mlflow_auth.write_private(path, mlflow_auth.credentials_text(user, password))
    return path


def test_mlflow_finds_the_provider_under_the_name_the_stack_sets() -> None:
    names = {ep.name: ep.value for ep in entry_points(group="mlflow.request_auth_provider")}
    assert names.get(mlflow_auth.PROVIDER_NAME) == "ssn_platform.mlflow_auth:CredentialsFileAuthProvider"


def test_the_provider_reads_the_file_at_every_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "creds", password="first-password-0123")
    monkeypatch.setenv(mlflow_auth.CREDENTIALS_FILE_ENV, str(path))
    auth = CredentialsFileAuthProvider().get_auth()
    assert isinstance(auth, requests.auth.HTTPBasicAuth)
    assert (auth.username, auth.password) == ("ssn-jobs", "first-password-0123")
    _write(path, password="rotated-password-4567")
    assert CredentialsFileAuthProvider().get_auth().password == "rotated-password-4567"


def test_mlflow_client_sends_basic_auth_from_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking.request_auth.registry import fetch_auth  # how MLflow's REST client finds it by name

    path = _write(tmp_path / "creds", password="client-password-89ab")
    monkeypatch.setenv(mlflow_auth.CREDENTIALS_FILE_ENV, str(path))
    request = requests.Request("GET", "http://127.0.0.1:1/api", auth=fetch_auth(mlflow_auth.PROVIDER_NAME)).prepare()
    assert request.headers["Authorization"] == requests.auth._basic_auth_str("ssn-jobs", "client-password-89ab")


def test_written_credentials_are_owner_only_and_random(tmp_path: Path) -> None:
    assert mlflow_auth.main(["new-credentials", "--user", "ssn-jobs", "--out", str(tmp_path / "a")]) == 0
    assert mlflow_auth.main(["new-credentials", "--user", "ssn-jobs", "--out", str(tmp_path / "b")]) == 0
    for name in ("a", "b"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    (user_a, pw_a), (_, pw_b) = read_credentials(tmp_path / "a"), read_credentials(tmp_path / "b")
    assert user_a == "ssn-jobs" and len(pw_a) >= 24 and pw_a != pw_b


def test_server_config_defaults_users_to_read_and_names_the_admin(tmp_path: Path) -> None:
    admin = _write(tmp_path / "admin", user="admin", password="admin-password-cdef")
    out = tmp_path / "basic_auth.ini"
    assert (
        mlflow_auth.main(
            ["server-config", "--admin", str(admin), "--database", "sqlite:////x/auth.db", "--out", str(out)]
        )
        == 0
    )
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(out)
    section = parser["mlflow"]
    assert section["default_permission"] == "READ"
    assert (section["admin_username"], section["admin_password"]) == ("admin", "admin-password-cdef")
    assert section["database_uri"] == "sqlite:////x/auth.db"
    from mlflow.server.auth.config import read_auth_config  # what the server will make of it

    monkey = pytest.MonkeyPatch()
    monkey.setenv("MLFLOW_AUTH_CONFIG_PATH", str(out))
    try:
        config = read_auth_config()
    finally:
        monkey.undo()
    assert config.admin_password == "admin-password-cdef" and config.auth_cache_ttl_seconds == 60


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "No such file"),
        ("[other]\nx = 1\n", "needs a [mlflow] section"),
        ("[mlflow]\nmlflow_tracking_username = u\n", "needs a [mlflow] section"),
        ("[mlflow]\nmlflow_tracking_username = u\nmlflow_tracking_password =\n", "must not be empty"),
        ("not an ini file", "needs a [mlflow] section"),
    ],
)
def test_a_bad_credentials_file_is_named(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "creds"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CredentialsError, match=re.escape(message)) as error:
        read_credentials(path)
    assert str(path) in str(error.value)


def test_the_provider_without_a_file_variable_says_which(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(mlflow_auth.CREDENTIALS_FILE_ENV, raising=False)
    with pytest.raises(CredentialsError, match=mlflow_auth.CREDENTIALS_FILE_ENV):
        CredentialsFileAuthProvider().get_auth()
