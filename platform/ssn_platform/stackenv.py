"""Helpers around the local stack (``infra/local/stack``): client environment and health checks.

``python -m ssn_platform.stackenv check-s3 [bucket,...]`` lists buckets with the credentials from the environment and
exits 0 when the endpoint accepts them (and the named buckets exist); the stack script uses it as its S3 health check.

From Python, :func:`stack_env` returns the same variables ``infra/local/stack env`` prints, and :func:`apply_stack_env`
puts them into ``os.environ``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from ssn_platform.storage import S3Settings, StorageError, call_with_retries, make_client

__all__ = ["repo_root", "stack_script", "stack_env", "apply_stack_env", "check_s3", "main"]


def repo_root() -> Path:
    """The repository root (this file lives in ``<repo>/platform/ssn_platform/``)."""
    return Path(__file__).resolve().parents[2]


def stack_script() -> Path:
    return repo_root() / "infra" / "local" / "stack"


def stack_env(
    state_dir: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The client environment of a running (or once started) stack, parsed from ``infra/local/stack env``."""
    run_env = dict(os.environ if env is None else env)
    if state_dir is not None:
        run_env["SSN_STACK_DIR"] = str(state_dir)
    out = subprocess.run([str(stack_script()), "env"], env=run_env, check=True, capture_output=True, text=True).stdout
    result: dict[str, str] = {}
    for line in out.splitlines():
        if not line.startswith("export "):
            continue
        # printf %q quoting is bash syntax; shlex handles what %q produces for these values
        name, _, value = line[len("export ") :].partition("=")
        parts = shlex.split(value) if value else [""]
        result[name] = parts[0] if parts else ""
    return result


def apply_stack_env(
    state_dir: str | os.PathLike[str] | None = None, *, target: MutableMapping[str, str] | None = None
) -> dict[str, str]:
    values = stack_env(state_dir)
    (os.environ if target is None else target).update(values)
    return values


def check_s3(buckets: list[str] | None = None) -> str | None:
    """None when the S3 endpoint of the environment answers ListBuckets and holds ``buckets``; else the problem."""
    settings = S3Settings.from_env(max_attempts=1, connect_timeout=2.0, read_timeout=5.0)
    client = make_client(settings)
    try:
        names = {b["Name"] for b in call_with_retries(client.list_buckets, client=client, attempts=1)["Buckets"]}
    except StorageError as exc:
        return str(exc)
    missing = [b for b in (buckets or []) if b not in names]
    if missing:
        return f"missing buckets at {settings.endpoint_label}: {', '.join(missing)}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0 if argv else 2
    if argv[0] == "check-s3":
        buckets = [b for b in (argv[1].split(",") if len(argv) > 1 else []) if b]
        problem = check_s3(buckets)
        if problem:
            print(problem, file=sys.stderr)
            return 1
        print("ok")
        return 0
    print(f"unknown command {argv[0]!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
