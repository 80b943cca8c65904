"""Building and deploying the inspection service.

Deployment: `build_app` (``serve deploy jobs/configs/serve.yaml``, import path ``ssn_platform.serving:build_app``)
and `deploy` (``jobs/deploy.py``). Locally the replica reserves no CPU (``num_cpus: 0``) so training jobs keep both
cores; see ``infra/serve/README.md`` for GPU replicas and autoscaling.
"""

import json
import logging
import os
import time
import urllib.error
import urllib.request
from typing import Any

import ray
from ray import serve
from ray.serve.config import BackpressureConfig

from ssn_platform.services import check_mlflow, connect_ray
from ssn_platform.serving.app import inspector_deployment
from ssn_platform.serving.settings import ServeSettings

# Non-secret environment a replica needs (read when the app is built; passed through the deployment's
# runtime_env, which Ray logs: credentials come from the nodes' environment, never from here).
SERVE_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_DISABLE_TELEMETRY",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "SSN_CACHE_DIR",
    "SSN_CACHE_MAX_GB",
    "SSN_SERVE_KEYS_FILE",  # the path of the hashed API keys, not a key
)


def replica_env(settings: ServeSettings) -> dict[str, str]:
    """Environment of the replicas: what the current Ray job already passes to its workers, plus SERVE_ENV."""
    env: dict[str, str] = {}
    try:
        if ray.is_initialized():
            env.update((ray.get_runtime_context().runtime_env or {}).get("env_vars") or {})
    except Exception:  # noqa: BLE001 - outside a Ray worker or driver
        pass
    env.update({name: os.environ[name] for name in SERVE_ENV if os.environ.get(name)})
    if settings.mlflow_tracking_uri:
        env["MLFLOW_TRACKING_URI"] = settings.mlflow_tracking_uri
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return env


def build_app(args: dict[str, Any] | None = None):
    """Serve application builder (``import_path: ssn_platform.serving:build_app``); `args` are `ServeSettings`."""
    settings = ServeSettings.from_dict(args)
    runtime_env: dict[str, Any] = {}
    try:
        if ray.is_initialized():
            runtime_env = {
                k: v
                for k, v in (ray.get_runtime_context().runtime_env or {}).items()
                if k in ("working_dir", "py_modules", "pip", "uv", "conda", "env_vars")
            }
    except Exception:  # noqa: BLE001
        runtime_env = {}
    runtime_env["env_vars"] = replica_env(settings)
    actor_options: dict[str, Any] = {"num_cpus": settings.num_cpus, "runtime_env": runtime_env}
    if settings.num_gpus:
        actor_options["num_gpus"] = settings.num_gpus
    options: dict[str, Any] = {
        "ray_actor_options": actor_options,
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        "logging_config": {"enable_access_log": settings.access_log},
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=settings.retry_after_s),
    }
    if settings.num_replicas == "auto":
        options["num_replicas"] = "auto"
        options["autoscaling_config"] = {
            "min_replicas": settings.min_replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = settings.num_replicas
    return inspector_deployment(settings.max_models_per_replica).options(**options).bind(settings.to_dict())


def serve_port() -> int:
    return int(os.environ.get("SSN_SERVE_PORT") or 8000)


def deploy(
    settings: dict[str, Any] | None = None,
    *,
    address: str | None = None,
    name: str = "ssn",
    route_prefix: str = "/",
    host: str = "127.0.0.1",
    port: int | None = None,
    log_to_driver: bool = True,
) -> str:
    """Starts Serve on the cluster (HTTP on host:port, default 127.0.0.1:SSN_SERVE_PORT) and deploys the app
    without blocking. Returns the base URL. `log_to_driver=False` keeps the replicas' logs and the INFO lines of
    Ray and Serve out of this process's output (the replicas' logs: when this call makes the Ray connection)."""
    parsed = ServeSettings.from_dict(settings)
    check_mlflow(parsed.mlflow_tracking_uri)
    connect_ray(address, log_to_driver=log_to_driver)
    if not log_to_driver:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    port = port or serve_port()
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": parsed.request_timeout_s})
    serve.run(build_app(settings), name=name, route_prefix=route_prefix, blocking=False)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def wait_ready(url: str, *, timeout: float = 120.0) -> dict[str, Any]:
    """Polls ``<url>/readyz`` until it answers 200; returns its body."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            last = f"HTTP {error.code}"
        except (urllib.error.URLError, OSError) as error:
            last = str(error)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/readyz not ready after {timeout:.0f}s ({last})")


__all__ = [
    "SERVE_ENV",
    "build_app",
    "deploy",
    "replica_env",
    "serve_port",
    "wait_ready",
]
