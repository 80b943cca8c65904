"""What a training worker reads and builds before it trains: the job's samples, its training and validation sets,
and the clock of its start-up steps.

Every Ray Train worker (train jobs, search trials, evaluation seeds) runs these in `training.train_loop_per_worker`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from supersimplenet.backbones import get_preset
from supersimplenet.loading import DefectDataset
from supersimplenet.supervision import apply_supervision
from supersimplenet.synthetic import SyntheticDefectDataset
from ssn_platform.datasets import DatasetReader
from ssn_platform.jobconfig import JobConfig
from ssn_platform.services import PlatformError

log = logging.getLogger(__name__)


def load_job_data(job: JobConfig) -> tuple[Path, list, list, list]:
    """(root, train, val, test) samples of the job's dataset, via the node-local S3 cache."""
    root, samples = DatasetReader(job.dataset).materialize()
    samples = apply_supervision(samples, job.train.supervision, mask_ratio=job.train.mask_ratio, seed=job.train.seed)
    splits = {name: [s for s in samples if s.split == name] for name in ("train", "val", "test")}
    if not splits["train"]:
        raise PlatformError(f"{job.dataset}: no training samples for supervision {job.train.supervision!r}")
    return root, splits["train"], splits["val"], splits["test"]


def build_validation_set(job: JobConfig, root: Path, val_samples: list):
    """The per-epoch validation set of `job.validation`, or None. Never overlaps the test split."""
    if job.validation == "none":
        return None
    if not val_samples:
        raise PlatformError(
            f"{job.dataset}: validation={job.validation!r} needs a val split (ingest with a split file)"
        )
    preset = get_preset(job.model.backbone)
    common = dict(root=root, image_size=job.model.image_size, mean=preset.mean, std=preset.std)
    if job.validation == "split":
        labels = {s.label for s in val_samples}
        if labels != {0, 1}:
            raise PlatformError(f"{job.dataset}: validation='split' needs normal and defective val images")
        return DefectDataset(samples=val_samples, **common)
    normal = [s for s in val_samples if s.label == 0]
    if len(normal) < 2:
        raise PlatformError(f"{job.dataset}: validation='synthetic' needs at least 2 normal val images")
    return SyntheticDefectDataset(samples=normal, seed=job.train.seed, recipe=job.synthetic_recipe, **common)


def build_train_set(job: JobConfig, root: Path, train_samples: list) -> DefectDataset:
    """The worker's training set: the job's train samples at its image size, normalised for its backbone, flipped
    as the train section resolves it."""
    preset = get_preset(job.model.backbone)
    return DefectDataset(
        root=root,
        samples=train_samples,
        image_size=job.model.image_size,
        mean=preset.mean,
        std=preset.std,
        flips=job.train.resolved_flips,
    )


class StartupClock:
    """Seconds each start-up step of a worker took, what every run (and every search trial) pays before its first
    epoch: `process` is the worker process's life before the train loop (Ray's actor start and the imports), then
    the steps `mark` names. Rank 0 logs them once as MLflow metrics ``startup_<step>_seconds``."""

    def __init__(self) -> None:
        self.last = time.time()
        self.seconds = {"process": _process_age()}

    def mark(self, step: str) -> None:
        now = time.time()
        self.seconds[step], self.last = now - self.last, now

    def metrics(self) -> dict[str, float]:
        log.info("worker start-up: %s", ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return {f"startup_{step}_seconds": seconds for step, seconds in self.seconds.items()}


def _process_age() -> float:
    """Seconds since this process started (Linux ``/proc``; NaN elsewhere)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
            return float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")
