"""Credentials never leave their place (issue 15, item 1).

S3 clients take their credentials from the process environment or the SDKs' default chains, never as constructor
arguments: what our code builds (the pyarrow filesystem Ray Train and Tune pickle into their run state, the boto3
settings) pickles without a secret, and Ray Tune hands the driver's keys to no trial. On the live stack, after a
search run directly (its driver holds the keys) and a training job submitted with `ray job submit`, no object in any
bucket (MLflow's artifacts included), no MLflow database row, no stack log and nothing in Ray's session folder (job
logs included) holds the S3 secret key, the Ray token or the MLflow password.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SECRET = "probe-secret-0123456789abcdefghij"
KEY_ID = "PROBEKEYID0123"


@pytest.fixture
def probe_env(monkeypatch, tmp_path):
    """A process environment holding S3 keys (as the stack's `env` gives clients), no profile files of the user."""
    monkeypatch.setenv("SSN_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SECRET + "-session")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def _assert_no_secret(blob: bytes, what: str) -> None:
    for secret in (SECRET, KEY_ID):
        assert secret.encode() not in blob, f"{what} holds {secret!r}"


def test_the_run_storage_filesystem_pickles_without_credentials(probe_env):
    from ssn_platform.services import storage_filesystem

    filesystem = storage_filesystem()
    blob = pickle.dumps(filesystem)
    _assert_no_secret(blob, "the pickled pyarrow S3FileSystem")
    _assert_no_secret(repr(filesystem.__reduce__()).encode(), "the S3FileSystem's reduce state")
    again = pickle.loads(blob)  # what a Ray worker gets: the same endpoint, credentials from its own environment
    assert again.__reduce__()[1][0]["endpoint_override"] == "127.0.0.1:9"
    assert again.__reduce__()[1][0]["access_key"] is None


def test_the_boto3_settings_and_client_hold_no_credentials_of_the_process_environment(probe_env):
    from ssn_platform.storage import S3Settings, make_client
    from ssn_platform.services import worker_env

    settings = S3Settings.from_env()
    assert settings.endpoint_url == "http://127.0.0.1:9"
    for blob, what in (
        (pickle.dumps(settings), "pickled S3Settings"),
        (repr(settings).encode(), "repr"),
        (json.dumps(settings.client_env()).encode(), "client_env()"),
    ):
        _assert_no_secret(blob, what)
    client = make_client()
    _assert_no_secret(pickle.dumps(client.ssn_settings), "the client's settings")
    # boto3 still finds the keys: its default chain reads the environment itself
    credentials = client._request_signer._credentials.get_frozen_credentials()
    assert (credentials.access_key, credentials.secret_key) == (KEY_ID, SECRET)
    # and nothing secret is handed to Ray workers through runtime_env
    _assert_no_secret(json.dumps(worker_env()).encode(), "worker_env()")


def test_explicit_credentials_are_used_but_never_pickled(probe_env):
    """A mapping other than the process environment (a private test store, a benchmark) gives explicit keys: they
    sign requests, but a settings object holding them refuses to be pickled instead of carrying them along."""
    from ssn_platform.storage import S3Settings, make_client

    settings = S3Settings.from_env(
        {
            "SSN_S3_ENDPOINT": "http://127.0.0.1:9",
            "AWS_ACCESS_KEY_ID": "EXPLICITKEY",
            "AWS_SECRET_ACCESS_KEY": "explicit-secret",
        }
    )
    credentials = make_client(settings)._request_signer._credentials.get_frozen_credentials()
    assert (credentials.access_key, credentials.secret_key) == ("EXPLICITKEY", "explicit-secret")
    with pytest.raises(TypeError, match="credentials"):
        pickle.dumps(settings)
    assert "explicit-secret" not in repr(settings) and "explicit-secret" not in json.dumps(settings.client_env())


TUNE_SCRIPT = """
import json, os
os.environ.update(AWS_ACCESS_KEY_ID="PROBEKEYID0123", AWS_SECRET_ACCESS_KEY="probe-secret-0123456789abcdefghij",
                  AWS_SESSION_TOKEN="probe-session-token-0123456789")
import ray
from ray.tune.execution.class_cache import _ActorClassCache
from ssn_platform.services import connect_ray

class Before: pass
class After: pass
before = _ActorClassCache().get(Before)._default_options["runtime_env"]["env_vars"]
ray.is_initialized = lambda: True  # connect_ray as in a driver already connected: no cluster needed
connect_ray()
after = _ActorClassCache().get(After)._default_options["runtime_env"]["env_vars"]
print(json.dumps({"before": sorted(before), "after": sorted(after)}))
"""


def test_ray_tune_hands_the_drivers_credentials_to_no_trial():
    """Ray Tune copies the driver's AWS keys into each trial's runtime_env, which Ray logs; connect_ray (which every
    job calls before Tune or Train) stops that.
    In a subprocess: Ray must not be imported in the test process (see tests/conftest.py)."""
    proc = subprocess.run(
        [sys.executable, "-c", TUNE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "AWS_SECRET_ACCESS_KEY" in result["before"]  # what Ray does on its own (else this test proves nothing)
    assert not [name for name in result["after"] if name.startswith("AWS_")], result["after"]


@pytest.mark.stack
@pytest.mark.parametrize("source", ["environment", "credentials file"])
def test_keyless_clients_reach_s3_with_credentials_from_the_environment_or_a_credentials_file(
    source, s3_stack, monkeypatch, tmp_path
):
    """What the stack's Ray and MLflow processes rely on: boto3 and pyarrow built by our code find the keys in the
    process environment, or in a 0600 file named by AWS_SHARED_CREDENTIALS_FILE."""
    from ssn_platform.storage import S3Settings, make_client, put_bytes
    from ssn_platform.services import storage_filesystem

    env = s3_stack.client_env()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("SSN_S3_ENDPOINT", env["SSN_S3_ENDPOINT"])
    if source == "environment":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", env["AWS_ACCESS_KEY_ID"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env["AWS_SECRET_ACCESS_KEY"])
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    else:
        path = tmp_path / "aws_credentials"
        path.write_text(
            f"[default]\naws_access_key_id = {env['AWS_ACCESS_KEY_ID']}\n"
            f"aws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}\n"
        )
        path.chmod(0o600)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(path))
    put_bytes(make_client(S3Settings.from_env()), "ssn", f"probe/{source}.txt", b"written with boto3")
    filesystem = pickle.loads(pickle.dumps(storage_filesystem()))
    assert env["AWS_SECRET_ACCESS_KEY"].encode() not in pickle.dumps(filesystem)
    with filesystem.open_input_stream(f"ssn/probe/{source}.txt") as stream:
        assert stream.read() == b"written with boto3"
    with filesystem.open_output_stream(f"ssn/probe/{source}-arrow.txt") as stream:
        stream.write(b"written with pyarrow")


# ---------------------------------------------------------------------------------------------------------
# On the live stack: search + training through `ray job submit`, then scan everything they could have written
# ---------------------------------------------------------------------------------------------------------
def _stack_secrets(live_stack) -> dict[str, bytes]:
    env = live_stack.client_env()
    secrets = {
        "the S3 secret key": env["AWS_SECRET_ACCESS_KEY"],
        "the Ray token": Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip(),
    }
    from ssn_platform.mlflow_auth import read_credentials

    secrets["the MLflow password"] = read_credentials(env["SSN_MLFLOW_CREDENTIALS_FILE"])[1]
    assert all(len(value) >= 16 for value in secrets.values()), "a secret too short to search for"
    return {name: value.encode() for name, value in secrets.items()}


def _found(data: bytes, secrets: dict[str, bytes], depth: int = 0) -> set[str]:
    """Names of the secrets in `data`, also inside gzip and zip containers (torch checkpoints, packages)."""
    hits = {name for name, secret in secrets.items() if secret in data}
    if depth < 2 and data[:2] == b"\x1f\x8b":
        try:
            hits |= _found(gzip.decompress(data), secrets, depth + 1)
        except (OSError, EOFError):
            pass
    elif depth < 2 and data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for member in archive.namelist():
                    hits |= _found(archive.read(member), secrets, depth + 1)
        except (zipfile.BadZipFile, OSError, EOFError):
            pass
    return hits


def _scan_buckets(secrets: dict[str, bytes]) -> tuple[dict[str, set[str]], list[str]]:
    from ssn_platform.storage import make_client

    client = make_client()
    hits: dict[str, set[str]] = {}
    scanned: list[str] = []
    for bucket in (b["Name"] for b in client.list_buckets()["Buckets"]):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                uri = f"s3://{bucket}/{obj['Key']}"
                scanned.append(uri)
                # every key as stored, directory markers (`runs/`) included: no key validation here
                found = _found(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read(), secrets)
                if found:
                    hits[uri] = found
    return hits, scanned


def _context(data: bytes, secrets: dict[str, bytes], width: int = 160) -> str:
    """Where a secret sits in readable `data`, with every secret masked (for the failure message)."""
    for secret in secrets.values():
        at = data.find(secret)
        if at >= 0:
            text = data[max(0, at - width) : at + len(secret) + width]
            for other, value in secrets.items():
                text = text.replace(value, f"<{other}>".encode())
            return text.decode("utf-8", "replace")
    return ""


def _scan_files(root: Path, secrets: dict[str, bytes]) -> tuple[dict[str, set[str]], list[Path]]:
    hits: dict[str, set[str]] = {}
    scanned: list[Path] = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue  # sockets, FIFOs, links (session_latest)
        try:
            data = path.read_bytes()
        except OSError:
            continue  # a file a live process removed meanwhile
        scanned.append(path)
        found = _found(data, secrets)
        if found:
            hits[f"{path} [{_context(data, secrets)!r}]"] = found
    return hits, scanned


def _run(*command: str) -> str:
    proc = subprocess.run(
        command, cwd=REPO, env={**os.environ, "SSN_GIT_SHA": "test"}, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.stack
@pytest.mark.heavy
def test_no_secret_in_buckets_mlflow_or_ray_session_after_a_search_and_a_training_job(live_stack, tmp_path):
    secrets = _stack_secrets(live_stack)
    outputs = {
        # a driver that holds the keys in its environment (a shell after `eval "$(infra/local/stack env)"`)
        "`python jobs/tune.py`": _run(
            sys.executable, "jobs/tune.py", "--smoke-test", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"
        ),
        # a driver inside the cluster, with the Ray head's environment
        "`ray job submit -- python jobs/train.py`": _run(
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "job",
            "submit",
            "--working-dir",
            str(REPO),
            "--",
            "python",
            "jobs/train.py",
            "--smoke-test",
        ),
    }

    leaks: dict[str, set[str]] = {}
    bucket_hits, objects = _scan_buckets(secrets)
    leaks.update(bucket_hits)
    # the scan saw what the jobs wrote: Tune's and Train's run state, MLflow's artifacts (proxied into the bucket)
    assert any("/runs/tune/" in uri and uri.endswith("tuner.pkl") for uri in objects), objects[:50]
    assert any(uri.startswith("s3://mlflow/artifacts/") for uri in objects), objects[:50]
    # MLflow's database (params, tags, registered versions) and the stack's service logs
    for folder in (live_stack.state_dir / "mlflow", live_stack.state_dir / "logs"):
        hits, files = _scan_files(folder, secrets)
        assert files, f"nothing to scan in {folder}"
        leaks.update(hits)
    # Ray's session folders: every log (job drivers', workers', runtime_env agent's), the unpacked working dirs
    ray_temp = Path((live_stack.state_dir / "run" / "ray.tempdir").read_text().strip())
    hits, files = _scan_files(ray_temp, secrets)
    assert any(p.name.startswith("job-driver-") for p in files), f"no job logs under {ray_temp}"
    leaks.update(hits)
    for command, output in outputs.items():
        if found := _found(output.encode(), secrets):
            leaks[f"the output of {command}"] = found
    # the stack's MLflow and Ray processes (workers and job drivers too: they carry the service marker) reach the
    # bucket through the 0600 credentials file; the keys are in none of their environments, which a job can print
    credentials_file = live_stack.state_dir / "aws_credentials"
    environments = _service_environments(live_stack.state_dir)
    for pid, variables in environments.items():
        if found := _found(b"\n".join(variables), secrets):
            leaks[f"the environment of pid {pid}"] = found

    assert not leaks, "secrets found:\n" + "\n".join(
        f"{where}: {', '.join(sorted(what))}" for where, what in sorted(leaks.items())
    )
    assert stat.S_IMODE(credentials_file.stat().st_mode) == 0o600
    # Ray's Python workers set their process title (setproctitle), which overwrites the start of the memory that
    # /proc/<pid>/environ shows (empty entries); what is left was scanned above, but the file's variable can be among
    # the overwritten part, so only intact environments (Ray's own binaries, MLflow) must show it.
    intact = {pid: variables for pid, variables in environments.items() if b"" not in variables[:-1]}
    assert len(intact) >= 2, f"no intact environment of an MLflow or Ray process of the stack among {len(environments)}"
    for pid, variables in intact.items():
        assert f"AWS_SHARED_CREDENTIALS_FILE={credentials_file}".encode() in variables, pid


def _service_environments(state_dir: Path) -> dict[str, list[bytes]]:
    """The environment variables of every live process of the stack's MLflow and Ray services, by pid."""
    markers = {f"SSN_STACK_SERVICE={name}:{state_dir}".encode() for name in ("ray", "mlflow")}
    out: dict[str, list[bytes]] = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            variables = environ.read_bytes().split(b"\0")
        except OSError:
            continue  # gone, or not ours
        if markers & set(variables):
            out[environ.parent.name] = variables
    return out
