"""The services every platform job uses: the MLflow check, the run storage's filesystem, the environment workers
need, the Ray connection, and the platform's error type.

Kept apart from `ssn_platform.training` so that promotion, calibration, evaluation, tuning and serving reach them
without importing the training loop. Ray is imported inside `connect_ray` only: Ray reads its settings (auth mode)
when first imported, and importing this module must not do that.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ssn_platform.storage import S3Settings

# Non-secret settings that workers need, passed through runtime_env (never through the config, which is logged).
# Secrets are not among them: Ray writes runtime_env into its logs. S3 credentials reach workers from their nodes'
# environment (the local stack's Ray head: AWS_SHARED_CREDENTIALS_FILE, a 0600 file; clusters: Secrets, IAM roles).
WORKER_ENV = (
    "SSN_S3_ENDPOINT",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "SSN_S3_ADDRESSING_STYLE",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_DISABLE_TELEMETRY",
    "SSN_CACHE_DIR",
    "SSN_CACHE_MAX_GB",
    "SSN_FEATURE_STORE_MAX_GB",
    "SSN_GIT_SHA",
)


class PlatformError(RuntimeError):
    """A precondition of a platform job failed (service unreachable, bad input); the message says which."""


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise PlatformError('MLFLOW_TRACKING_URI is not set (for the local stack: eval "$(infra/local/stack env)")')
    return uri


def check_mlflow(uri: str | None = None, *, timeout: float = 5.0) -> None:
    """Raises PlatformError unless the MLflow tracking server answers its health check."""
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        raise PlatformError(f"MLflow tracking URI must be an http(s) server with a SQL backend, got {uri!r}")
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            if response.status != 200:
                raise PlatformError(f"MLflow server at {uri} is unhealthy (HTTP {response.status})")
    except (urllib.error.URLError, OSError) as error:
        raise PlatformError(f"MLflow server at {uri} is unreachable: {error}") from error


def storage_filesystem():
    """pyarrow S3 filesystem for Ray Train's and Tune's run storage, without keys: Ray pickles it into run state in the
    bucket (tuner.pkl, search_gen_state-*.json); pyarrow finds credentials through the AWS SDK chain in each process."""
    from pyarrow import fs  # noqa: PLC0415 (pyarrow: for Ray's run storage only; most importers need none)

    settings = S3Settings.from_env()
    if not settings.endpoint_url:
        return fs.S3FileSystem(region=settings.region)
    scheme, _, host = settings.endpoint_url.partition("://")  # validated: http(s)://host[:port]
    return fs.S3FileSystem(region=settings.region, endpoint_override=host, scheme=scheme)


def experiment_id(client, name: str) -> str:
    """The id of MLflow experiment `name`, created when missing (`client`: an `mlflow.MlflowClient`)."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def git_sha() -> str:
    if os.environ.get("SSN_GIT_SHA"):
        return os.environ["SSN_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def worker_env() -> dict[str, str]:
    return {name: os.environ[name] for name in WORKER_ENV if os.environ.get(name)}


def connect_ray(address: str | None = None, *, log_to_driver: bool = True) -> None:
    """Connects to the cluster: `address`, SSN_RAY_ADDRESS, or the job's own cluster under `ray job submit`.

    `log_to_driver=False` makes a quiet driver: the cluster's actor logs (Serve replicas, say) and Ray's own INFO
    lines stay out of this process's output (warnings still show).

    Every process of the job also gets RAY_ADDRESS (this cluster): when a Train controller dies abruptly (a Tune
    stop, a killed driver) Ray's detached PlacementGroupCleaner frees its CPUs, and it finds the cluster through
    the State API, which gives up when several Ray clusters run on one machine; the CPUs would stay reserved.
    """
    import ray  # noqa: PLC0415 (Ray reads its settings on first import)

    # Tune copies a driver's AWS keys into trials' runtime_env (logged)
    from ray.tune.execution import class_cache  # noqa: PLC0415 (Ray reads its settings on first import)

    class_cache.ENV_VARS_TO_PROPAGATE -= {n for n in class_cache.ENV_VARS_TO_PROPAGATE if n.startswith("AWS_")}
    if ray.is_initialized():
        return
    address = address or os.environ.get("SSN_RAY_ADDRESS")
    cluster = address if address not in (None, "auto", "local") else os.environ.get("RAY_ADDRESS")
    if address is None and os.environ.get("RAY_ADDRESS", "").startswith("http"):
        address = "auto"  # RAY_ADDRESS names the job API here; ray.init wants the cluster
    env = worker_env()
    if cluster and address != "local":
        env["RAY_ADDRESS"] = cluster
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}) or {}
    for key in job_env.get("env_vars") or {}:
        env.pop(key, None)  # ray refuses to merge a key the submitted job already sets
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
    if address == "local":
        kwargs["num_cpus"] = int(os.environ.get("SSN_LOCAL_CPUS", os.cpu_count() or 2))
    ray.init(
        address=address,
        log_to_driver=log_to_driver,
        logging_level=logging.INFO if log_to_driver else logging.WARNING,
        **kwargs,
    )
