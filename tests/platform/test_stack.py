"""The local stack command end to end: up, healthy, data in, down, up again with the data still there, down.

Runs SeaweedFS + MLflow + a Ray head from a temporary state directory on moved ports (no clash with a developer's
stack or the session's S3 fixture).
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


pytestmark = [pytest.mark.stack, pytest.mark.heavy]


def _python(code: str, env: dict[str, str], timeout: float = 180) -> str:
    """Run client code in a fresh interpreter with the stack's client environment (keeps Ray/MLflow state out of
    the test process)."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"client code failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _http_status(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


PUT_AND_LOG = """
    import os, tempfile, mlflow
    from ssn_platform.storage import make_client, put_bytes
    put_bytes(make_client(), "ssn", "probe/hello.txt", b"hello stack")
    # the MLflow client holds no bucket keys: artifacts go through the tracking server
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "SSN_S3_ENDPOINT"):
        os.environ.pop(k, None)
    mlflow.set_experiment("stack-probe")
    with mlflow.start_run(run_name="probe") as run:
        mlflow.log_param("p", 1)
        path = os.path.join(tempfile.mkdtemp(), "note.txt")
        open(path, "w").write("artifact through the proxy")
        mlflow.log_artifact(path)
    print(run.info.run_id)
"""

CHECK_AFTER_RESTART = """
    import os, sys, mlflow
    from ssn_platform.storage import make_client, get_bytes
    assert get_bytes(make_client(), "ssn", "probe/hello.txt") == b"hello stack"
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "SSN_S3_ENDPOINT"):
        os.environ.pop(k, None)
    exp = mlflow.get_experiment_by_name("stack-probe")
    assert exp is not None, "experiment lost"
    run_id = os.environ["PROBE_RUN"]
    run = mlflow.get_run(run_id)
    assert run.data.params == {"p": "1"}
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="note.txt")
    assert open(local).read() == "artifact through the proxy"
    print("ok")
"""

MLFLOW_AUTH = """
    import os, requests, mlflow
    from mlflow import MlflowClient
    from ssn_platform.mlflow_auth import read_credentials
    api = os.environ["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow"
    user, password = read_credentials(os.environ["SSN_MLFLOW_CREDENTIALS_FILE"])
    assert user == "ssn-jobs"
    # the jobs user (MLFLOW_TRACKING_AUTH=ssn-credentials-file) registers a model and moves its alias
    client = MlflowClient()
    run_id = client.create_run(mlflow.set_experiment("stack-probe").experiment_id).info.run_id
    client.create_registered_model("ssn-auth-probe")
    version = client.create_model_version("ssn-auth-probe", f"runs:/{run_id}/model", run_id=run_id).version
    client.set_registered_model_alias("ssn-auth-probe", "champion", version)
    alias = {"name": "ssn-auth-probe", "alias": "champion", "version": version}
    # without credentials, or with a wrong password, nothing is written: no run, no experiment, no alias move
    assert requests.post(f"{api}/registered-models/alias", json=alias).status_code == 401
    assert requests.post(f"{api}/registered-models/alias", json=alias, auth=(user, "x" * 24)).status_code == 401
    assert requests.post(f"{api}/experiments/create", json={"name": "anonymous"}).status_code == 401
    assert requests.get(f"{api}/experiments/search?max_results=1").status_code == 401
    # least privilege: the jobs user cannot make users or change permissions
    made = requests.post(f"{api}/users/create", json={"username": "intruder", "password": "y" * 24},
                         auth=(user, password))
    assert made.status_code == 403, made.text
    assert requests.get(os.environ["MLFLOW_TRACKING_URI"] + "/health").status_code == 200  # probes stay open
    print("ok")
"""

RAY_JOB = """
    import os, time
    from ray.job_submission import JobSubmissionClient, JobStatus
    client = JobSubmissionClient()  # RAY_API_SERVER_ADDRESS
    # no secrets in runtime_env: the stack's Ray processes carry the S3 settings (Ray logs runtime_env env_vars)
    job = client.submit_job(
        entrypoint="python jobs/ingest.py --smoke-test --no-progress",
        runtime_env={"working_dir": os.environ["REPO"],
                     "excludes": [".venv", ".stack", ".git", "bench_results", "runs"]},
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, (status, logs[-3000:])
    uri = [l for l in logs.splitlines() if l.startswith("s3://ssn/datasets/smoke/")]
    assert uri, logs[-3000:]
    print(uri[-1])
"""


def test_stack_up_status_down_up_keeps_data(tmp_path: Path, make_stack) -> None:
    home_token = Path.home() / ".ray" / "auth_token"
    home_token_existed = home_token.exists()
    ray_tmp = Path(tempfile.mkdtemp(prefix="ssnray", dir="/tmp"))  # short: Ray's socket paths are limited
    stack = make_stack(tmp_path / "state", {"SSN_RAY_TEMP_DIR": str(ray_tmp)})
    try:
        up = stack.start(timeout=400)
        assert "healthy" in up.stderr
        status = stack.run("status")
        assert [line.split()[1] for line in status.stdout.splitlines()] == ["healthy"] * 3

        # credentials: generated, owner-only, and usable through `env`
        cred = stack.state_dir / "credentials.env"
        token_file = stack.state_dir / "ray_auth_token"
        key_file, keys_file = stack.state_dir / "serve_api_key", stack.state_dir / "serve_keys.yaml"
        mlflow_admin, mlflow_jobs = stack.state_dir / "mlflow_admin_credentials", stack.state_dir / "mlflow_credentials"
        for f in (
            cred,
            token_file,
            stack.state_dir / "s3.json",
            key_file,
            keys_file,
            mlflow_admin,
            mlflow_jobs,
            stack.state_dir / "mlflow" / "basic_auth.ini",
            stack.state_dir / "mlflow" / "flask_secret_key",
        ):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        env = stack.client_env()
        # MLflow: clients name the jobs user's credentials file; no password in any environment
        assert env["MLFLOW_TRACKING_AUTH"] == "ssn-credentials-file"
        assert env["SSN_MLFLOW_CREDENTIALS_FILE"] == str(mlflow_jobs)
        assert not any(k.startswith("MLFLOW_TRACKING_PASSWORD") for k in env)
        mlflow_passwords = [
            line.split("=", 1)[1].strip().encode()
            for f in (mlflow_admin, mlflow_jobs)
            for line in f.read_text().splitlines()
            if line.startswith("mlflow_tracking_password")
        ]
        assert len(mlflow_passwords) == 2 and all(len(p) >= 24 for p in mlflow_passwords)
        # the endpoint's API key: the client's file holds the key, the endpoint's file only its digest
        assert env["SSN_SERVE_API_KEY_FILE"] == str(key_file) and env["SSN_SERVE_KEYS_FILE"] == str(keys_file)
        api_key = key_file.read_text().strip()
        assert len(api_key) >= 40 and api_key not in keys_file.read_text()
        assert hashlib.sha256(api_key.encode()).hexdigest() in keys_file.read_text()
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(token_file)
        assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and env["RAY_USAGE_STATS_ENABLED"] == "0"
        assert env["SSN_S3_ENDPOINT"] == f"http://127.0.0.1:{stack.port_base}"
        secret, token = env["AWS_SECRET_ACCESS_KEY"], token_file.read_text().strip()

        # Ray's dashboard / job API answers only with the token
        assert env["RAY_ADDRESS"] == f"127.0.0.1:{stack.port_base + 11}"  # GCS, for ray.init()
        dash = env["RAY_API_SERVER_ADDRESS"]  # dashboard / job API
        assert _http_status(f"{dash}/api/version") == 401
        assert _http_status(f"{dash}/api/version", token) == 200
        assert _http_status(f"{dash}/api/version", "0" * 64) in (401, 403)

        # `up` again is a no-op
        again = stack.run("up", timeout=120)
        assert again.stderr.count("already running") == 3

        run_id = _python(PUT_AND_LOG, env).strip().splitlines()[-1]
        assert _python(MLFLOW_AUTH, env).strip().splitlines()[-1] == "ok"
        for name in ("s3", "mlflow", "ray"):  # the passwords are in no environment of the stack's processes
            for pid in stack.session_pids(stack.pid(name)):
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:  # exited meanwhile
                    continue
                assert not any(p in environ for p in mlflow_passwords), f"an MLflow password in {name}'s pid {pid}"
        job_uri = _python(RAY_JOB, {**env, "REPO": str(REPO)}, timeout=300).strip()
        assert job_uri.endswith("/manifest.json")

        sids = {name: stack.pid(name) for name in ("s3", "mlflow", "ray")}
        assert all(sids.values())
        stack.run("down", timeout=200)
        for name, sid in sids.items():
            assert not stack.session_pids(sid), f"{name} left processes behind: {stack.session_pids(sid)}"
        assert stack.run("status", check=False).returncode != 0
        assert not (stack.state_dir / "run" / "s3.pid").exists()

        stack.run("up", timeout=400)
        assert stack.run("status").returncode == 0
        assert stack.client_env()["AWS_SECRET_ACCESS_KEY"] == secret  # credentials kept
        assert _python(CHECK_AFTER_RESTART, {**env, "PROBE_RUN": run_id}).strip() == "ok"
        _python(
            f"""
            from ssn_platform.datasets import DatasetReader
            r = DatasetReader({job_uri!r}, cache_dir={str(tmp_path / "cache")!r})
            root, samples = r.materialize()
            assert len(samples) == 8, samples
            """,
            env,
        )
        stack.run("down", timeout=200)

        # the cluster and its clients used the stack's token file, never ~/.ray/auth_token
        assert home_token.exists() == home_token_existed

        # no secret in any log (stack logs and Ray's session logs)
        for folder in (stack.state_dir / "logs", ray_tmp):
            for path in folder.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    data = path.read_bytes()
                    assert secret.encode() not in data, f"S3 secret in {path}"
                    assert token.encode() not in data, f"Ray token in {path}"
                    assert api_key.encode() not in data, f"the endpoint's API key in {path}"
                    assert not any(p in data for p in mlflow_passwords), f"an MLflow password in {path}"
    finally:
        stack.run("down", check=False, timeout=200)
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)


def test_env_requires_a_started_stack(tmp_path: Path, make_stack) -> None:
    stack = make_stack(tmp_path / "empty")
    proc = stack.run("env", check=False)
    assert proc.returncode != 0 and "run 'infra/local/stack up' first" in proc.stderr
    assert stack.run("status", check=False).returncode != 0


def test_purge_stops_everything_and_deletes_only_a_stack_state(tmp_path: Path, make_stack) -> None:
    # a folder that `up` did not make is never deleted, whatever SSN_STACK_DIR says
    precious = tmp_path / "not-a-stack"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    refused = make_stack(precious).run("purge", check=False)
    assert refused.returncode != 0 and "holds no stack state" in refused.stderr
    assert (precious / "keep.txt").read_text() == "mine"

    stack = make_stack(tmp_path / "state")
    try:
        stack.start("s3", "mlflow", timeout=300)
        env = stack.client_env()
        _python(
            """
            from ssn_platform.storage import S3Settings, make_client, put_bytes
            put_bytes(make_client(S3Settings.from_env()), "ssn", "probe.txt", b"data")
            """,
            env,
        )
        sids = {name: stack.pid(name) for name in ("s3", "mlflow")}
        purged = stack.run("purge", timeout=200)
        assert "deleted" in purged.stderr
        for name, sid in sids.items():
            assert not stack.session_pids(sid), f"{name} left processes behind: {stack.session_pids(sid)}"
        assert not stack.state_dir.exists()
        again = stack.run("purge")  # nothing left: still fine
        assert "nothing to delete" in again.stderr and not stack.state_dir.exists()

        # a new `up` starts empty: new credentials, no object
        stack.start("s3", timeout=120)
        fresh = stack.client_env()
        assert fresh["AWS_SECRET_ACCESS_KEY"] != env["AWS_SECRET_ACCESS_KEY"]
        assert (
            _python(
                """
            from ssn_platform.storage import S3Settings, make_client, object_exists
            print(object_exists(make_client(S3Settings.from_env()), "ssn", "probe.txt"))
            """,
                fresh,
            ).strip()
            == "False"
        )
    finally:
        stack.run("down", check=False, timeout=200)
