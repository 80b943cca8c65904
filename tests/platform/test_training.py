"""The main job on the real local stack: Ray Train DDP over S3 data, MLflow tracking and registration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from supersimplenet.metrics import compute_metrics
from supersimplenet.train import eval_loader, predict

pytestmark = [pytest.mark.stack, pytest.mark.heavy]

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "battery_weld.yaml"


def _job(dataset: str, **extra: str):
    from ssn_platform.jobconfig import load_job_config

    overrides = {
        "dataset": dataset, "run_name": f"t-{uuid.uuid4().hex[:10]}", "train.epochs": "3", "train.batch_size": "8",
        "model.image_size": "[160,80]", "scaling.num_workers": "2", "checkpoint_every": "1", "overlays": "2",
        "product": f"weld-{uuid.uuid4().hex[:6]}",
    }
    overrides.update(extra)
    return load_job_config(CONFIG, [f"{k}={v}" for k, v in overrides.items()])


def test_two_worker_job_registers_a_model_that_reproduces_its_metric(live_stack, weld_dataset):
    from mlflow import MlflowClient

    from ssn_platform.registry import load_model
    from ssn_platform.training import load_job_data, run_training

    job = _job(weld_dataset)
    result = run_training(job)
    assert result.model_version == "1"
    client = MlflowClient()
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["scaling.num_workers"] == "2"
    assert run.data.tags["ssn.dataset.version"] and run.data.tags["ssn.git_sha"]
    assert len(client.get_metric_history(result.mlflow_run_id, "loss")) == 3
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id, "evaluation")}
    assert {"evaluation/roc_curve.png", "evaluation/pr_curve.png", "evaluation/overlays"} <= artifacts
    version = client.get_model_version(job.registered_model_name, "1")
    assert version.tags["backbone"] == "efficientnet_lite0" and "test_image_auroc" in version.tags
    assert not client.get_registered_model(job.registered_model_name).aliases  # training sets no alias

    model, metadata = load_model(f"models:/{job.registered_model_name}/1")
    assert type(model).__name__ == "SuperSimpleNet" and not model.training
    root, _, _, test = load_job_data(job)
    from supersimplenet.backbones import get_preset
    from supersimplenet.data import DefectDataset

    preset = get_preset(job.model.backbone)
    dataset = DefectDataset(root=root, samples=test, image_size=job.model.image_size, mean=preset.mean, std=preset.std)
    import torch

    predictions = predict(model, eval_loader(dataset, batch_size=8), device=torch.device("cpu"))
    again = compute_metrics(scores=predictions.scores, labels=predictions.labels, maps=predictions.maps,
                            masks=predictions.masks)
    assert again["image_auroc"] == pytest.approx(result.metrics["image_auroc"], abs=1e-6)
    assert again["aupro"] == pytest.approx(result.metrics["aupro"], abs=1e-6)


def _train_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors if a.pid]


def test_killed_worker_resumes_from_last_checkpoint(live_stack, weld_dataset):
    from mlflow import MlflowClient

    from ssn_platform.training import run_training

    job = _job(weld_dataset, **{"train.epochs": "6"})
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = run_training(job)
        except BaseException as error:  # surfaced by the assertion below
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    client = MlflowClient()
    killed = None
    deadline = time.monotonic() + 600
    while thread.is_alive() and time.monotonic() < deadline and killed is None:
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments(filter_string=f"name = '{job.experiment_name}'")],
            filter_string=f"tags.`ssn.run_name` = '{job.run_name}'",
        )
        # two epochs done means at least one checkpoint exists (checkpoint_every=1)
        if runs and len(client.get_metric_history(runs[0].info.run_id, "loss")) >= 2:
            pids = _train_worker_pids()
            if pids:
                killed = pids[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.5)
    thread.join(timeout=900)
    assert killed is not None, "the run finished before a worker could be killed"
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    run = client.get_run(result.mlflow_run_id)
    assert int(run.data.tags["ssn.resumed_from_epoch"]) > 0
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(result.mlflow_run_id, "test_image_auroc")) == 1
    assert result.model_version is not None


def test_ray_job_submit_smoke(live_stack):
    env = {**os.environ, "SSN_GIT_SHA": "test"}
    proc = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--working-dir", str(REPO), "--",
         "python", "jobs/train.py", "--smoke-test"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{\"run_name\"")]
    assert lines, proc.stdout[-4000:]
    summary = json.loads(lines[-1])
    assert summary["model_version"] and "image_auroc" in summary["test_metrics"]
