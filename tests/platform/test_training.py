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

from listeners import ListenerWatch  # tests/platform/listeners.py
from supersimplenet.metrics import compute_metrics
from supersimplenet.train import eval_loader, predict

pytestmark = [pytest.mark.stack, pytest.mark.heavy]

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "battery_weld.yaml"


def _job(dataset: str, **extra: str):
    from ssn_platform.jobconfig import load_job_config

    overrides = {
        "dataset": dataset,
        "run_name": f"t-{uuid.uuid4().hex[:10]}",
        "train.epochs": "3",
        "train.batch_size": "8",
        "model.image_size": "[160,80]",
        "scaling.num_workers": "2",
        "checkpoint_every": "1",
        "overlays": "2",
        "product": f"weld-{uuid.uuid4().hex[:6]}",
    }
    overrides.update(extra)
    return load_job_config(CONFIG, [f"{k}={v}" for k, v in overrides.items()])


def test_two_worker_job_registers_a_model_that_reproduces_its_metric_and_listens_on_loopback_only(
    live_stack, weld_dataset
):
    from mlflow import MlflowClient

    from ssn_platform.registry import load_model
    from ssn_platform.training import run_training
    from ssn_platform.worker_data import load_job_data

    job = _job(weld_dataset)
    with ListenerWatch(live_stack.processes) as watch:
        result = run_training(job)
    # every socket of the stack listened on 127.0.0.1 throughout, the DDP rendezvous (TCPStore) and Gloo's pairs
    # included: seen from both train workers, and none on all interfaces
    workers = watch.pids_titled("RayTrainWorker")
    assert watch.samples > 0 and len(workers) >= 2, f"no train worker was sampled: {sorted(watch.titles.items())}"
    assert not [str(listener) for listener in watch.seen if listener.address != "127.0.0.1"]
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
    from supersimplenet.loading import DefectDataset

    preset = get_preset(job.model.backbone)
    dataset = DefectDataset(root=root, samples=test, image_size=job.model.image_size, mean=preset.mean, std=preset.std)
    import torch

    predictions = predict(model, eval_loader(dataset, batch_size=8), device=torch.device("cpu"))
    again = compute_metrics(
        scores=predictions.scores, labels=predictions.labels, maps=predictions.maps, masks=predictions.masks
    )
    assert again["image_auroc"] == pytest.approx(result.metrics["image_auroc"], abs=1e-6)
    assert again["aupro"] == pytest.approx(result.metrics["aupro"], abs=1e-6)


def _train_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors if a.pid]


RESUME_EPOCHS = 6


def _resume_job(weld_dataset: str, product: str, **extra: str):
    return _job(weld_dataset, **{"train.epochs": str(RESUME_EPOCHS), "product": product, **extra})


def _state_dict(job, version: str) -> dict:
    from ssn_platform.registry import load_model

    model, _ = load_model(f"models:/{job.registered_model_name}/{version}")
    return model.state_dict()


@pytest.fixture(scope="module")
def uninterrupted_weights(live_stack, weld_dataset) -> dict:
    """The weights an uninterrupted run of the resume tests' job registers."""
    from ssn_platform.training import run_training

    job = _resume_job(weld_dataset, f"weld-ref-{uuid.uuid4().hex[:6]}")
    result = run_training(job)
    return _state_dict(job, result.model_version)


def _kill_a_worker_after_a_stored_checkpoint(job, running: threading.Thread, *, min_epoch: int = 1) -> int:
    """Waits until the run's storage holds a complete checkpoint of `min_epoch` or later, then SIGKILLs a Ray
    Train worker at once, inside the window in which the controller may not yet have registered that checkpoint.
    Returns the newest complete epoch seen just before the kill."""
    from ssn_platform import resume
    from ssn_platform.services import storage_filesystem

    fs, run_dir = storage_filesystem(), f"{job.storage[len('s3://') :].rstrip('/')}/{job.run_name}"
    deadline = time.monotonic() + 600
    while running.is_alive() and time.monotonic() < deadline:
        candidates = [c for c in resume.stored_checkpoints(fs, run_dir) if c.epoch >= min_epoch]
        if candidates and resume.load_verified(fs, candidates[0].path) is not None:
            pids = _train_worker_pids()
            assert pids, "a checkpoint was stored but no Ray Train worker is alive"
            os.kill(pids[-1], signal.SIGKILL)
            return candidates[0].epoch
        time.sleep(0.1)
    raise AssertionError("the run ended (or timed out) before a checkpoint was stored")


def _run_in_thread(job) -> tuple[threading.Thread, dict]:
    from ssn_platform.training import run_training

    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = run_training(job)
        except BaseException as error:  # noqa: BLE001 - surfaced by the caller's assertions
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def _assert_resumed_without_retraining(run_id: str, stored_epoch: int) -> int:
    """The run resumed after `stored_epoch` and retrained at most the one epoch whose checkpoint the crash cut."""
    from mlflow import MlflowClient

    client = MlflowClient()
    resumed_from = int(client.get_run(run_id).data.tags["ssn.resumed_from_epoch"])
    assert resumed_from >= stored_epoch + 1
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(set(steps)) == list(range(RESUME_EPOCHS))
    retrained = {step for step in steps if steps.count(step) > 1}
    assert retrained <= {resumed_from}, f"epochs trained twice: {sorted(retrained)} (resumed from {resumed_from})"
    return resumed_from


def _assert_same_weights(weights: dict, reference: dict) -> None:
    import torch

    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        if value.is_floating_point():
            assert torch.allclose(weights[name], value, rtol=1e-4, atol=1e-5), name
        else:
            assert torch.equal(weights[name], value), name


def test_killed_worker_resumes_from_the_checkpoint_stored_just_before_and_ends_as_an_uninterrupted_run(
    live_stack, weld_dataset, uninterrupted_weights
):
    from mlflow import MlflowClient

    job = _resume_job(weld_dataset, f"weld-{uuid.uuid4().hex[:6]}")
    thread, outcome = _run_in_thread(job)
    stored_epoch = _kill_a_worker_after_a_stored_checkpoint(job, thread)
    thread.join(timeout=900)
    assert not thread.is_alive(), "the run did not finish after the kill"
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    run = MlflowClient().get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and result.resumed
    _assert_resumed_without_retraining(result.mlflow_run_id, stored_epoch)
    assert len(MlflowClient().get_metric_history(result.mlflow_run_id, "test_image_auroc")) == 1
    _assert_same_weights(_state_dict(job, result.model_version), uninterrupted_weights)


def test_resubmitting_a_failed_run_name_continues_from_its_last_stored_checkpoint(
    live_stack, weld_dataset, uninterrupted_weights
):
    from mlflow import MlflowClient

    from ssn_platform.training import run_training

    job = _resume_job(weld_dataset, f"weld-{uuid.uuid4().hex[:6]}", max_failures="0")
    thread, outcome = _run_in_thread(job)
    stored_epoch = _kill_a_worker_after_a_stored_checkpoint(job, thread, min_epoch=2)
    thread.join(timeout=900)
    assert "error" in outcome, "with max_failures=0 a killed worker must fail the run"
    first = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name(job.experiment_name).experiment_id],
        filter_string=f"tags.`ssn.run_name` = '{job.run_name}'",
    )
    assert [r.info.status for r in first] == ["FAILED"]

    result = run_training(job)  # the same run_name, submitted again
    assert result.mlflow_run_id == first[0].info.run_id and result.resumed
    assert MlflowClient().get_run(result.mlflow_run_id).info.status == "FINISHED"
    _assert_resumed_without_retraining(result.mlflow_run_id, stored_epoch)
    _assert_same_weights(_state_dict(job, result.model_version), uninterrupted_weights)


def test_ray_job_submit_smoke(live_stack):
    env = {**os.environ, "SSN_GIT_SHA": "test"}
    proc = subprocess.run(
        [
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
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"run_name"')]
    assert lines, proc.stdout[-4000:]
    summary = json.loads(lines[-1])
    assert summary["model_version"] and "image_auroc" in summary["test_metrics"]
