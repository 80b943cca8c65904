"""Distributed SuperSimpleNet training on Ray Train (V2) with MLflow tracking and registration.

The driver (`run_training`) validates the job, checks that MLflow answers, pins its dataset and opens (or finds, on
resume) the job's MLflow run (`ssn_platform.lineage`: the run, what a resubmission may change, the lineage tags),
and runs a `TorchTrainer` whose workers execute `train_loop_per_worker`. Each worker reads the dataset through the
node-local S3 cache, trains its shard with DDP, and rank 0 alone writes to MLflow: per-epoch metrics, then the test
metrics, artifacts and the registered model once training is complete.

Failures: checkpoints (model, optimiser, scheduler, sampler, RNG) go to the S3 run directory every
`checkpoint_every` epochs; a dead worker restarts the group from the last one (`FailureConfig`), and submitting
the same `run_name` again resumes the same way.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from mlflow import MlflowClient
from mlflow.entities import Metric

from supersimplenet.backbones import get_preset, load_backbone_weights
from supersimplenet.checkpoint import checkpoint_dict
from supersimplenet.feature_cache import CachedLoader
from supersimplenet.frozen import run_frozen_passes
from supersimplenet.loading import DefectDataset
from supersimplenet.model import build_model
from supersimplenet.train import (
    build_optimizer,
    build_scheduler,
    build_train_loader,
    eval_loader,
    predict,
    train_epoch,
    unwrap,
    validation_loader,
)
from supersimplenet.metrics import compute_metrics, pixel_auroc
from ssn_platform import evaluation, plots, registry, resume, s3keys
from ssn_platform.cache import default_cache_dir, feature_store
from ssn_platform.jobconfig import JobConfig, build_job_config
from ssn_platform.lineage import open_mlflow_run, pin_dataset
from ssn_platform.worker_data import StartupClock, build_train_set, build_validation_set, load_job_data

# the shared services, re-exported for the modules that import them from here
from ssn_platform.services import (  # noqa: F401
    WORKER_ENV,
    PlatformError,
    check_mlflow,
    connect_ray,
    experiment_id,
    git_sha,
    storage_filesystem,
    tracking_uri,
    worker_env,
)
from ssn_platform.storage import S3Settings, download_to, make_client

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------------
def _resolve_weights(weights: str, cache_dir: Path) -> str:
    """s3:// weights are fetched once per node into the cache; other values pass through."""
    if not weights.startswith("s3://"):
        return weights
    bucket, key = s3keys.parse_s3_uri(weights)
    target = cache_dir / "weights" / bucket / key
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.part")
        download_to(make_client(S3Settings.from_env()), bucket, key, partial)
        os.replace(partial, target)  # atomic: concurrent workers never read a half-written file
    return str(target)


def _all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist()))


def _broadcast_scalar(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: one DDP rank of a SuperSimpleNet job. `config` = {"job": dict, "mlflow_run_id": str}."""
    import ray.train  # noqa: PLC0415 (Ray reads its settings on first import)
    import ray.train.torch  # noqa: PLC0415 (Ray reads its settings on first import)

    startup = StartupClock()
    job = build_job_config(config["job"])
    cfg = job.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    root, train_samples, val_samples, test_samples = load_job_data(job)
    train_set = build_train_set(job, root, train_samples)
    val_set = build_validation_set(job, root, val_samples) if rank == 0 else None
    startup.mark("data")
    model, provenance = _build_worker_model(job, device)
    loader, sampler = build_train_loader(
        train_set, train_samples, cfg, rank=rank, world_size=world_size, batch_size=job.per_worker_batch_size
    )
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    start_epoch = _restore(model, optimizer, scheduler, sampler, rank, device)
    startup.mark("model")
    store = feature_store()  # the trials of a search and the seeds of an evaluation share their backbone's passes
    fresh = start_epoch == 0
    loader = run_frozen_passes(
        model, loader, sampler, cfg, device=device, rank=rank, world_size=world_size, fresh=fresh, store=store
    )
    startup.mark("frozen_passes")
    val_loader = None
    if val_set is not None:  # rank 0 validates; its val images' levels are computed once, in what the budget leaves
        left = cfg.feature_cache_mib * 2**20 - (loader.cache.nbytes if isinstance(loader, CachedLoader) else 0)
        val_loader = validation_loader(
            model, val_set, device=device, batch_size=job.per_worker_batch_size, budget_bytes=left, store=store
        )
    _sync_head_batchnorms(model, job, world_size)
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False)
    startup.mark("validation_levels")
    tracker = _open_tracker(config.get("mlflow_run_id"), start_epoch) if rank == 0 else None
    if tracker is not None:
        tracker.log_metrics(startup.metrics(), step=start_epoch)

    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        # RNG of each epoch derives from (seed, epoch, rank): a resumed run continues exactly as it would have.
        torch.manual_seed(cfg.seed * 100_003 + epoch * 1_009 + rank)
        sampler.set_epoch(epoch)
        stats = _all_reduce_mean(train_epoch(ddp_model, loader, optimizer, cfg, device=device, progress=False), device)
        lrs = {f"lr_{group['name']}": group["lr"] for group in optimizer.param_groups}
        scheduler.step()
        metrics = {**stats, **lrs, "epoch": epoch, "epoch_seconds": time.perf_counter() - started}
        if val_loader is not None and ((epoch + 1) % job.validate_every == 0 or epoch + 1 == cfg.epochs):
            metrics.update(_validation_metrics(unwrap(ddp_model), val_loader, device))
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        if epoch + 1 == cfg.epochs or (epoch + 1) % job.checkpoint_every == 0:
            state = _checkpoint_state(ddp_model, job, optimizer, scheduler, sampler, epoch, provenance)
            _report_with_checkpoint(metrics, epoch, rank, job, state)
        else:
            ray.train.report(metrics)

    if tracker is not None:
        finalize_run(
            job,
            _plain_model(unwrap(ddp_model), job),
            root=root,
            test_samples=test_samples,
            device=device,
            tracker=tracker,
            provenance=provenance,
        )


def _sync_head_batchnorms(model, job: JobConfig, world_size: int) -> None:
    """Head BatchNorms see the global batch on GPUs (SyncBatchNorm) when there are several workers; the frozen
    backbone stays in eval mode either way."""
    if job.scaling.use_gpu and world_size > 1:
        for name in ("segmentation_head", "classification_head"):
            setattr(model, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(getattr(model, name)))


def _open_tracker(run_id: str | None, start_epoch: int) -> _RankZeroTracker:
    """Rank 0's MLflow tracker of the job's run; a resumed run is tagged and logs the epoch it resumed from."""
    tracker = _RankZeroTracker(run_id)
    if start_epoch > 0:
        tracker.set_tags({"ssn.resumed_from_epoch": str(start_epoch), "ssn.resumed": "true"})
        tracker.log_metrics({"resumed_from_epoch": start_epoch}, step=start_epoch)
    return tracker


def _checkpoint_state(
    ddp_model, job: JobConfig, optimizer, scheduler, sampler, epoch: int, provenance
) -> dict[str, Any]:
    """What a checkpoint of `epoch` holds, each value a callable that `_report_with_checkpoint` evaluates on rank 0
    only: the plain model, optimiser, scheduler, sampler and RNG state, and the backbone weights' provenance."""
    return {
        "model": lambda: checkpoint_dict(_plain_model(unwrap(ddp_model), job)),
        "optimizer": optimizer.state_dict,
        "scheduler": scheduler.state_dict,
        "sampler": lambda e=epoch: sampler.state_dict() if hasattr(sampler, "state_dict") else {"epoch": e},
        "rng": torch.get_rng_state,
        "weights_provenance": lambda: provenance,
    }


def _build_worker_model(job: JobConfig, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The job's model with its backbone's weights loaded (and their provenance), on `device`. Seeded, so every
    rank starts from identical heads (DDP also broadcasts rank 0's)."""
    torch.manual_seed(job.train.seed)
    model = build_model(job.model)
    provenance = load_backbone_weights(
        model.feature_extractor.backbone, job.model.backbone, _resolve_weights(job.weights, default_cache_dir())
    )
    return model.to(device), provenance


def _restore(model, optimizer, scheduler, sampler, rank: int, device: torch.device) -> int:
    """The epoch to start from: after the newest stored checkpoint's (model, optimizer, scheduler and sampler
    restored from it, the relative noise scale and the patch memory of a "memory" model included), or 0 for a new
    run, whose scale and memory `run_frozen_passes` computes on every rank (the same on every rank: frozen backbone,
    the same images, seeded subset; DDP does not broadcast the memory, see supersimplenet.memory)."""
    state = _resume_state(rank, device)
    if state is None:
        return 0
    model.load_state_dict(state["model"]["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if hasattr(sampler, "load_state_dict") and state.get("sampler"):
        sampler.load_state_dict(state["sampler"])
    return int(state["epoch"]) + 1


def _validation_metrics(net, val_loader, device: torch.device) -> dict[str, float]:
    """Rank 0's validation: image AUROC and AP-det of the model's score, of every image score, and pixel AUROC
    (with the image+pixel mean) when the val images have masks. The pixel AUROC is the heads' map's, what the
    search's settings move; a model that reports the memory's map also gets that one's (`val_pixel_auroc_memory`)."""
    val = predict(net, val_loader, device=device)
    scores = compute_metrics(scores=val.scores, labels=val.labels)
    metrics = {"val_image_auroc": scores["image_auroc"], "val_ap_det": scores["ap_det"]}
    metrics.update({f"val_{k}": v for k, v in val.score_metrics().items()})
    if val.masks.any():  # synthetic defects always have masks; a labelled val split where it has them
        metrics["val_pixel_auroc"] = pixel_auroc(val.heads_maps, val.masks)
        if val.head_maps is not None:
            metrics["val_pixel_auroc_memory"] = pixel_auroc(val.maps, val.masks)
        # image and pixel AUROC together: a search objective that still ranks settings whose synthetic image
        # AUROC has saturated at 1 (QUALITY.md, "Does the search's objective predict real quality")
        metrics["val_image_pixel_auroc"] = 0.5 * (scores["image_auroc"] + metrics["val_pixel_auroc"])
    return metrics


def _report_with_checkpoint(
    metrics: dict[str, Any], epoch: int, rank: int, job: JobConfig, state: dict[str, Any]
) -> None:
    """Reports the epoch with a checkpoint: rank 0 writes `state` (each value a callable, evaluated on rank 0
    only) to a temporary directory that Ray Train uploads; the other ranks report the same checkpoint name."""
    import ray.train  # noqa: PLC0415 (Ray reads its settings on first import)

    with tempfile.TemporaryDirectory() as directory:
        if rank == 0:
            resume.write_checkpoint(directory, {"epoch": epoch, **{key: make() for key, make in state.items()}})
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_dir_name=resume.checkpoint_dir_name(epoch),
            )
        else:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=resume.checkpoint_dir_name(epoch))


def _resume_state(rank: int, device: torch.device) -> dict[str, Any] | None:
    """The state of the run's newest complete checkpoint in run storage, the same on every rank; None if none.

    Ray hands a restarted (or resubmitted) group only checkpoints its controller registered, and a worker that dies
    within one controller poll of a report loses that registration (see `ssn_platform.resume`). Rank 0 therefore
    scans the run directory itself and broadcasts the epoch it chose; each rank then loads that checkpoint.
    """
    import ray.train  # noqa: PLC0415 (Ray reads its settings on first import)

    storage = ray.train.get_context().get_storage()  # DeveloperAPI: the run directory and its filesystem
    fs, run_dir = storage.storage_filesystem, storage.experiment_fs_path
    handed = ray.train.get_checkpoint()
    state, epoch = None, -1
    if rank == 0:
        found = resume.newest_complete(fs, run_dir)
        if found is not None:
            (stored, state), epoch = found, found[0].epoch
            handed_name = Path(handed.path).name if handed is not None else None
            if handed_name != Path(stored.path).name:
                log.warning(
                    "resuming from %s, the newest complete checkpoint in run storage (Ray handed %s: "
                    "a worker died before the controller registered the newer one)",
                    stored.path,
                    handed_name,
                )
    epoch = int(_broadcast_scalar(float(epoch), device))
    if epoch < 0:
        return None
    if state is None:
        state = resume.load_verified(fs, f"{run_dir.rstrip('/')}/{resume.checkpoint_dir_name(epoch)}")
        if state is None:
            raise PlatformError(
                f"rank {rank}: checkpoint {resume.checkpoint_dir_name(epoch)} of {run_dir} that rank 0 "
                "verified is incomplete here"
            )
    if int(state["epoch"]) != epoch:
        raise PlatformError(f"{run_dir}/{resume.checkpoint_dir_name(epoch)} holds epoch {state['epoch']}")
    return state


def _plain_model(net: torch.nn.Module, job: JobConfig):
    """A SuperSimpleNet without SyncBatchNorm wrappers (SyncBN -> BN keeps the same state_dict keys)."""
    if not job.scaling.use_gpu:
        return net
    plain = build_model(job.model)
    plain.load_state_dict(net.state_dict())
    return plain


# ---------------------------------------------------------------------------------------------------------
# MLflow (rank 0 only)
# ---------------------------------------------------------------------------------------------------------
class _RankZeroTracker:
    def __init__(self, run_id: str | None) -> None:
        self.client = MlflowClient()
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        if not self.run_id:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(key=k, value=float(v), timestamp=now, step=step) for k, v in metrics.items()]
        )

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)


def finalize_run(
    job: JobConfig,
    model,
    *,
    root: Path,
    test_samples: list,
    device: torch.device,
    tracker: _RankZeroTracker,
    provenance: str,
) -> dict[str, float]:
    """Test metrics, artifacts, the logged model and its registration; once per job."""
    preset = get_preset(job.model.backbone)
    metrics: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory)
        if test_samples:
            test_set = DefectDataset(
                root=root, samples=test_samples, image_size=job.model.image_size, mean=preset.mean, std=preset.std
            )
            predictions = predict(model, eval_loader(test_set, batch_size=job.per_worker_batch_size), device=device)
            metrics = compute_metrics(
                scores=predictions.scores, labels=predictions.labels, maps=predictions.maps, masks=predictions.masks
            )
            metrics.update(predictions.score_metrics())  # every image score, for evaluation and the search
            metrics.update(predictions.heads_pixel_metrics())  # the heads' map beside a reported memory map
            tracker.log_metrics({f"test_{k}": v for k, v in metrics.items()}, step=job.train.epochs)
            (out / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
            evaluation.write_breakdown(out, model, test_set, predictions)  # per image score and defect class
            plots.write_curves(predictions.scores, predictions.labels, out)
            plots.write_overlays(root, test_samples, predictions, out / "overlays", count=job.overlays)
            (out / "test_predictions.json").write_text(
                json.dumps(
                    {
                        "images": [test_samples[i].image for i in predictions.indices],
                        "scores": predictions.scores.tolist(),
                        "labels": predictions.labels.tolist(),
                    }
                )
            )
        if tracker.run_id:
            tracker.client.log_artifacts(tracker.run_id, str(out), artifact_path="evaluation")
            if job.register:
                registry.log_and_register(
                    job, model.cpu(), run_id=tracker.run_id, metrics=metrics, provenance=provenance
                )
    return metrics


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------
@dataclass
class TrainingResult:
    run_name: str
    mlflow_run_id: str
    metrics: dict[str, float]
    model_version: str | None
    resumed: bool


def run_training(job: JobConfig, *, address: str | None = None) -> TrainingResult:
    """Runs (or resumes) a training job on the Ray cluster and returns its MLflow run and test metrics."""
    from ssn_platform.trainer import build_trainer  # noqa: PLC0415 (trainer imports Ray at its top)

    check_mlflow()
    job = pin_dataset(job)
    run_name = job.run_name or f"{job.product}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_id, status = open_mlflow_run(job, run_name)
    if status == "FINISHED":
        log.info("run %s already finished (MLflow run %s); nothing to do", run_name, run_id)
        return _result_from_mlflow(run_name, run_id, resumed=True)
    connect_ray(address)
    client = MlflowClient()
    client.update_run(run_id, status="RUNNING")
    trainer = build_trainer(
        job,
        train_loop_per_worker,
        mlflow_run_id=run_id,
        name=run_name,
        storage_path=job.storage[len("s3://") :].rstrip("/"),
        num_to_keep=2,
    )
    try:
        trainer.fit()
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return _result_from_mlflow(run_name, run_id, resumed=False)


def _result_from_mlflow(run_name: str, run_id: str, *, resumed: bool) -> TrainingResult:
    run = MlflowClient().get_run(run_id)
    metrics = {k[len("test_") :]: v for k, v in run.data.metrics.items() if k.startswith("test_")}
    return TrainingResult(
        run_name=run_name,
        mlflow_run_id=run_id,
        metrics=metrics,
        model_version=run.data.tags.get("ssn.model_version"),
        resumed=resumed or run.data.tags.get("ssn.resumed") == "true",
    )
