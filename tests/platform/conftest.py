"""Fixtures for the platform tests: private stacks started through infra/local/stack.

* ``s3_stack`` / ``s3_settings`` / ``s3_client`` / ``bucket``: a private SeaweedFS only (S3 tests; each test gets
  its own bucket).
* ``live_stack``: the whole stack (SeaweedFS + MLflow + Ray head with token auth) with its client environment
  applied to ``os.environ`` for the session; ``weld_dataset``: battery_weld/denoised ingested into it (manifest URI).
* ``make_stack``: a factory for tests of the stack command itself.

Every stack runs from a temporary state directory on free, non-default ports (every SeaweedFS port is moved, the
gRPC ones included; Ray's too), so it never collides with a developer's running stack, and it is stopped at the
end of the session.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "infra" / "local" / "stack"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(count: int, *, low: int = 30000, high: int = 31900) -> int:
    """First port of ``count`` consecutive free ports on 127.0.0.1 (and of base + 10004, see below).

    The range sits below Linux's ephemeral ports (32768+) and outside Ray's worker ports of the default stack
    (20002-29999) and of the test stack (moved), so neither outgoing connections nor workers take them. SeaweedFS's
    admin gRPC port is always its admin port (base + 4) + 10000, so that one must be free too.
    """
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        base = rng.randrange(low, high - count)
        if all(_port_free(base + i) for i in range(count)) and _port_free(base + 4 + 10000):
            return base
    raise RuntimeError(f"no {count} consecutive free ports between {low} and {high}")


def stack_port_env(base: int) -> dict[str, str]:
    """Environment moving every port of the stack into [base, base + 16)."""
    return {
        "SSN_S3_PORT": str(base),
        "SSN_WEED_MASTER_PORT": str(base + 1),
        "SSN_WEED_VOLUME_PORT": str(base + 2),
        "SSN_WEED_FILER_PORT": str(base + 3),
        "SSN_WEED_ADMIN_PORT": str(base + 4),
        "SSN_WEED_GRPC_OFFSET": "5",  # gRPC ports base+5 .. base+8; admin gRPC: base+4+10000
        "SSN_MLFLOW_PORT": str(base + 10),
        "SSN_RAY_PORT": str(base + 11),
        "SSN_RAY_DASHBOARD_PORT": str(base + 12),
        "SSN_RAY_CLIENT_PORT": str(base + 13),
        "SSN_RAY_AGENT_PORT": str(base + 14),
        "SSN_SERVE_PORT": str(base + 15),
        # below the ephemeral range and away from the default stack's workers (20002-29999)
        "SSN_RAY_MIN_WORKER_PORT": "31900",
        "SSN_RAY_MAX_WORKER_PORT": "32700",
    }


def pid_alive(pid: int) -> bool:
    """Running and not a zombie (a killed process stays visible until its parent reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


class StackProcess:
    """A stack started by infra/local/stack from a private state directory."""

    def __init__(self, state_dir: Path, port_base: int, extra_env: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.port_base = port_base
        self.env = {
            **os.environ,
            **stack_port_env(port_base),
            "SSN_STACK_DIR": str(state_dir),
            **(extra_env or {}),
        }

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(STACK), *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"stack {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def move_ports(self, port_base: int) -> None:
        self.port_base = port_base
        self.env.update(stack_port_env(port_base))

    def start(self, *services: str, attempts: int = 3, timeout: float = 400) -> subprocess.CompletedProcess[str]:
        """``up`` on fresh ports, retried on other ports when one was taken meanwhile (e.g. by an outgoing
        connection's ephemeral port: SeaweedFS's admin gRPC port is always admin port + 10000)."""
        for attempt in range(attempts):
            proc = self.run("up", *services, check=False, timeout=timeout)
            if proc.returncode == 0:
                return proc
            logs = (
                "".join(f.read_text(errors="replace")[-4000:] for f in (self.state_dir / "logs").glob("*.log"))
                if (self.state_dir / "logs").is_dir()
                else ""
            )
            port_clash = any(
                text in proc.stderr + logs
                for text in ("already in use", "not available", "address already in use", "Port allocation failed")
            )
            if not port_clash or attempt == attempts - 1:
                raise AssertionError(f"stack up exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
            self.run("down", check=False, timeout=timeout)
            for log in (self.state_dir / "logs").glob("*.log"):
                log.unlink()
            self.move_ports(free_port_block(16))
        raise AssertionError("unreachable")

    def processes(self) -> set[int]:
        """Every process of the stack: the daemons of its PID files (run/*.pid) and all their descendants (Ray's
        GCS, raylet, agents, workers, Serve's proxy and replicas)."""
        from listeners import descendants

        pids: set[int] = set()
        for pidfile in (self.state_dir / "run").glob("*.pid"):
            pid = int(pidfile.read_text().split()[0])
            if pid_alive(pid):
                pids |= descendants(pid)
        return pids

    def client_env(self) -> dict[str, str]:
        out = self.run("env").stdout
        env: dict[str, str] = {}
        for line in out.splitlines():
            assert line.startswith("export "), line
            name, _, value = line[len("export ") :].partition("=")
            env[name] = value  # generated values need no shell quoting
        return env

    def pid(self, service: str) -> int | None:
        """The service's session id (= pid of its session leader); the PID file holds "<sid> <start time>"."""
        f = self.state_dir / "run" / f"{service}.pid"
        return int(f.read_text().split()[0]) if f.exists() else None

    @staticmethod
    def session_pids(sid: int) -> list[int]:
        """Live (non-zombie) processes of session `sid`: what a stopped service must not leave behind."""
        out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout
        pids = [int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid]
        return [p for p in pids if pid_alive(p)]

    def kill_s3(self) -> None:
        """SIGKILL the SeaweedFS server (a crash, not a clean stop) and wait until it is gone."""
        pid = self.pid("s3")
        assert pid is not None, "s3 is not running"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.05)
        raise AssertionError(f"SeaweedFS pid {pid} survived SIGKILL")


@pytest.fixture
def make_stack():
    """Factory for a StackProcess on fresh free ports: ``make_stack(state_dir, extra_env=None)``."""

    def _make(state_dir: Path, extra_env: dict[str, str] | None = None) -> StackProcess:
        return StackProcess(state_dir, free_port_block(16), extra_env)

    return _make


@pytest.fixture(scope="session")
def s3_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    """A private SeaweedFS (S3 only) for the whole session."""
    stack = StackProcess(tmp_path_factory.mktemp("s3stack"), free_port_block(16))
    stack.start("s3", timeout=120)
    try:
        yield stack
    finally:
        stack.run("down", check=False, timeout=120)


@pytest.fixture(scope="session")
def s3_settings(s3_stack: StackProcess):
    from ssn_platform.storage import S3Settings

    return S3Settings.from_env(s3_stack.client_env())


@pytest.fixture
def s3_client(s3_settings):
    from ssn_platform.storage import make_client

    return make_client(s3_settings)


@pytest.fixture
def bucket(s3_client) -> Iterator[str]:
    """A fresh bucket for one test, emptied and deleted afterwards: SeaweedFS gives every bucket a volume of its
    own and frees it only with the bucket."""
    from ssn_platform.storage import ensure_bucket

    name = f"t-{uuid.uuid4().hex[:16]}"
    ensure_bucket(s3_client, name)
    yield name
    delete_bucket(s3_client, name)


@pytest.fixture
def drop_bucket(s3_client):
    """``drop_bucket(name)``: empty and delete a bucket of the session's SeaweedFS."""
    return lambda name: delete_bucket(s3_client, name)


def delete_bucket(client, name: str) -> None:
    """Delete every object of bucket ``name``, then the bucket (a bucket a test already deleted is fine)."""
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=name)
    except client.exceptions.NoSuchBucket:
        pass


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    """SeaweedFS + MLflow + Ray head for the session; ``os.environ`` holds its client environment meanwhile
    (SSN_S3_ENDPOINT, AWS keys, MLFLOW_TRACKING_URI, RAY_ADDRESS, RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH, ...)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ssnray", dir="/tmp"))  # short: Ray's unix socket paths are limited
    stack = StackProcess(tmp_path_factory.mktemp("livestack"), free_port_block(16), {"SSN_RAY_TEMP_DIR": str(ray_tmp)})
    saved = dict(os.environ)
    try:
        stack.start(timeout=400)
        os.environ.update(stack.client_env())
        yield stack
    finally:
        if "ray" in sys.modules:
            try:
                sys.modules["ray"].shutdown()
            except Exception:  # noqa: BLE001 - best effort before the cluster goes away
                pass
        os.environ.clear()
        os.environ.update(saved)
        stack.run("down", check=False, timeout=200)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def weld_dataset(live_stack: StackProcess, weld_root: Path) -> str:
    """battery_weld/denoised ingested into the live stack's ``ssn`` bucket as product ``battery-weld``: its
    manifest URI."""
    from ssn_platform.ingest import ingest

    return ingest(weld_root, product="battery-weld", bucket="ssn", progress=False).uri


# ---------------------------------------------------------------------------------------------------------
# Registry fixtures shared by the calibration, promotion and serving tests
# ---------------------------------------------------------------------------------------------------------
WELD_SPLIT = REPO / "jobs" / "splits" / "battery_weld.txt"  # val: 12 normal, 25 defective
REGISTRY_IMAGE_SIZE = (128, 72)  # small models: the registry tests are about the platform, not accuracy


@pytest.fixture(scope="session")
def weld_val_dataset(live_stack: StackProcess, weld_root: Path) -> str:
    """battery_weld/denoised with the project's fixed val split (jobs/splits/battery_weld.txt), ingested without
    moving the product's ``latest`` pointer: its manifest URI."""
    from ssn_platform.ingest import ingest

    return ingest(
        weld_root,
        product="battery-weld",
        bucket="ssn",
        options={"split_file": str(WELD_SPLIT)},
        progress=False,
        update_latest=False,
    ).uri


def _random_head_model(seed: int, *, head_scale: float | None = 0.05):
    """EfficientNet-Lite0 with its ImageNet weights and seeded random heads: a model of fixed, reproducible quality.

    With `head_scale` the final linear layer is scaled (and its bias zeroed) so that scores spread instead of
    saturating; None keeps the initialisation as is."""
    import torch

    from supersimplenet.backbones import load_backbone_weights
    from supersimplenet.config import ModelConfig
    from supersimplenet.model import build_model

    config = ModelConfig(
        backbone="efficientnet_lite0",
        image_size=REGISTRY_IMAGE_SIZE,
        noise_std=1.0,
        noise_std_mode="relative",
        image_score="head",
    )
    torch.manual_seed(seed)
    model = build_model(config)
    load_backbone_weights(model.feature_extractor.backbone, config.backbone, "default")
    if head_scale is not None:
        with torch.no_grad():
            model.classification_head.fc.weight.mul_(head_scale)
            model.classification_head.fc.bias.zero_()
    return model.eval()


def _register(product: str, dataset_uri: str, model, metrics: dict[str, float]) -> str:
    """Logs `model` to a fresh run and registers it as a new version of ``ssn-<product>`` (the training job's
    `log_and_register`); returns the version."""
    from mlflow import MlflowClient

    from supersimplenet.config import to_dict
    from ssn_platform.jobconfig import build_job_config
    from ssn_platform.registry import log_and_register

    job = build_job_config(
        {
            "product": product,
            "dataset": dataset_uri,
            "model": to_dict(model.config),
            "train": {"epochs": 1, "batch_size": 8},
            "scaling": {"num_workers": 1},
        }
    )
    client = MlflowClient()
    experiment = client.get_experiment_by_name(job.experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(job.experiment_name)
    run = client.create_run(experiment_id, run_name=f"test-{uuid.uuid4().hex[:6]}")
    version = log_and_register(job, model, run_id=run.info.run_id, metrics=metrics, provenance="test")
    client.set_terminated(run.info.run_id)
    return version


@pytest.fixture(scope="session")
def random_head_model():
    """`random_head_model(seed, *, head_scale=0.05)` -> an eval-mode SuperSimpleNet (see `_random_head_model`)."""
    return _random_head_model


@pytest.fixture(scope="session")
def register_version(live_stack: StackProcess):
    """`register_version(product, dataset_uri, model, metrics)` -> the new registered version (a string)."""
    return _register


@contextlib.contextmanager
def served_champion(live_stack, dataset_uri: str, model, prefix: str, settings: dict[str, Any]):
    """A new product `<prefix>-<hex>` whose champion is `model` (registered, calibrated on the dataset's val split,
    promoted), served by the inspection app with `settings` until the block ends. Yields (product, version, base
    URL, samples in the dataset)."""
    from ray import serve

    from ssn_platform.datasets import DatasetReader
    from ssn_platform.promotion import evaluate_model, promote
    from ssn_platform.serving.deployment import deploy, wait_ready
    from ssn_platform.thresholds import calibrate_version
    from test_serving import ray_address  # tests/platform/test_serving.py

    root, samples = DatasetReader(dataset_uri).materialize()
    product = f"{prefix}-{uuid.uuid4().hex[:6]}"
    version = _register(
        product, dataset_uri, model, evaluate_model(model, root, [s for s in samples if s.split == "test"])
    )
    calibrate_version(product, version)
    assert promote(product, version, margin=1.0, floor=0.0).promoted
    base = deploy(settings, address=ray_address(live_stack), port=int(os.environ["SSN_SERVE_PORT"]))
    try:
        wait_ready(base, timeout=180)
        yield product, version, base, len(samples)
    finally:
        serve.shutdown()


@pytest.fixture(scope="session")
def serve_champion():
    """`serve_champion(live_stack, dataset_uri, model, prefix, settings)`: the context manager `served_champion`."""
    return served_champion
