"""One search session's plan: what `ssn_platform.tuning.run_search` settles before any trial runs.

* Arguments (`plan_session`): trials >= 1, grace period >= 1 (default `default_grace_period`, a quarter of the
  epochs, at most the epochs), reduction factor >= 2, a finite margin >= 0, and the space against the job: every
  searched key exists in the job and every corner of the space (each parameter's bounds or choices, with the
  space's `fixed` overrides) builds a valid job, so a bad space fails before a cluster is touched. Corners are
  checked one parameter at a time, not in every combination. The baseline point is the job's own values of the
  searched keys; a warning says when the space's `fixed` values differ from the job's (the baseline applies them).
* Objective (`resolve_validation`, `resolve_metric`): the job's validation mode, or for ``none`` real labelled val
  images when the val split holds both classes, else synthetic defects (at least two normal val images); the
  ``auto`` metric is the mode's objective (`OBJECTIVES`, see the search's module docstring). The mode (``min`` or
  ``max``) follows the metric's name unless given: ``min`` for a loss.
* Concurrency (`trials_per_cluster`): the cluster's CPUs (or GPUs) now / what one trial's workers need, between 1
  and the number of trials; an autoscaler's future nodes are not counted.
* Study (`open_study`): created or loaded (`ssn_platform.study`); whether this session runs the baseline trial (the
  study holds no COMPLETE one for these values and epochs) and the session's name ``tune-<product>-<time>-<hex>``.

`SearchSession` carries all of it, and the run's later steps (its parent run, experiment) fill in the rest.
Ray is imported inside `trials_per_cluster` only: it reads its settings when first imported.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from supersimplenet.config import MEMORY_SCORE, ConfigError
from ssn_platform.datasets import DatasetReader
from ssn_platform.jobconfig import JobConfig
from ssn_platform.search_space import SearchSpace, _value_of, apply_params
from ssn_platform.services import PlatformError
from ssn_platform.study import _prepare_study, backbone_label, default_storage_url, default_study_name
from ssn_platform.tuned import find_baseline

log = logging.getLogger(__name__)

AUTO_METRIC = "auto"
# The objective of an ``auto`` search per validation mode (ssn_platform.tuning's docstring; measured by
# bench/bench_objective.py).
OBJECTIVES = {"split": "val_image_auroc", "synthetic": "val_image_auroc_combined"}


def default_grace_period(epochs: int) -> int:
    """ASHA's first rung: a quarter of the trial's epochs (at least 1). Measured (QUALITY.md, "Does a short trial
    rank settings like the full run?"): the combined synthetic objective after a quarter of the epochs ranked the
    full runs' test AUROC at 0.84 (weld, 4 of 15) and 0.76 (MPDD, 2 of 8); earlier rungs were not measured, and the
    map score's objective after 2 of 8 MPDD epochs ranked them backwards (-0.33)."""
    return max(1, epochs // 4)


# A "memory" model's reported score comes from its patch memory, which the searched head settings (sigma, Perlin
# threshold) do not change: with labelled val images its ``auto`` objective is the heads' best image score instead.
MEMORY_SPLIT_OBJECTIVE = "val_image_auroc_map_top1"


def resolve_metric(metric: str, validation: str, image_score: str | None = None) -> str:
    """The metric a search optimises: `metric` itself, or for ``auto`` the objective of the validation mode; for a
    model reporting the patch memory's score (`image_score` "memory") and real labelled val images,
    `MEMORY_SPLIT_OBJECTIVE`, the heads' map score (the synthetic objective already scores the heads). Limit: a
    space that searches the backbone or the feature levels changes the memory too, which this objective ignores."""
    if metric != AUTO_METRIC:
        return metric
    if validation == "split" and image_score == MEMORY_SCORE:
        return MEMORY_SPLIT_OBJECTIVE
    return OBJECTIVES[validation]


def resolve_validation(job: JobConfig) -> str:
    """The job's own validation mode, or ("none") "split" when the val split holds both classes, else
    "synthetic" when it holds at least two normal images."""
    if job.validation != "none":
        return job.validation
    val = [s for s in DatasetReader(job.dataset).samples if s.split == "val"]
    labels = {s.label for s in val}
    if labels == {0, 1}:
        return "split"
    if sum(s.label == 0 for s in val) >= 2:
        return "synthetic"
    raise PlatformError(
        f"{job.dataset}: the search needs a val split that never overlaps test (normal images at least, for "
        "synthetic defects); ingest with --split-file (e.g. jobs/splits/<product>.txt)"
    )


def trials_per_cluster(job: JobConfig, num_trials: int) -> int:
    """How many trials the cluster's resources run at once: CPUs (or GPUs) / what one trial's workers need."""
    import ray  # noqa: PLC0415 (Ray reads its settings on first import)

    resources = ray.cluster_resources()
    if job.scaling.use_gpu:
        fit = int(resources.get("GPU", 0) // job.scaling.num_workers)
    else:
        fit = int(resources.get("CPU", 0) // (job.scaling.num_workers * job.scaling.cpus_per_worker))
    return max(1, min(num_trials, fit))


def _mode_for(metric: str) -> str:
    return "min" if "loss" in metric else "max"


@dataclass
class SearchSession:
    """One search session: the job and space, and what `run_search` settles before any trial runs (its steps share
    it). `existing` counts the study's trials before this session."""

    job: JobConfig
    space: SearchSpace
    metric: str
    mode: str
    num_trials: int
    grace_period: int
    reduction_factor: int
    min_margin: float
    study_name: str
    storage_url: str
    baseline_point: dict[str, Any]
    validation: str = ""
    concurrency: int = 0
    existing: int = 0
    run_baseline: bool = False
    search_name: str = ""
    experiment_id: str = ""
    parent_id: str = ""

    @property
    def epochs(self) -> int:
        return self.job.train.epochs


def plan_session(
    job: JobConfig,
    space: Mapping[str, Any] | SearchSpace | str | Path,
    *,
    num_trials: int,
    study_name: str | None,
    storage: str | None,
    metric: str,
    mode: str | None,
    grace_period: int | None,
    reduction_factor: int,
    min_margin: float,
    baseline: bool,
) -> SearchSession:
    """Checks the arguments, and the space against the job, before anything starts."""
    if num_trials < 1:
        raise ConfigError(f"num_trials must be >= 1, got {num_trials}")
    if grace_period is None:
        grace_period = default_grace_period(job.train.epochs)
    if grace_period < 1:
        raise ConfigError(f"grace_period must be >= 1, got {grace_period}")
    if reduction_factor < 2:
        raise ConfigError(f"reduction_factor must be >= 2, got {reduction_factor}")
    if not (min_margin >= 0 and math.isfinite(min_margin)):
        raise ConfigError(f"min_margin must be a number >= 0, got {min_margin}")
    search_space = SearchSpace.load(space)
    mode = mode or _mode_for(metric)
    epochs = job.train.epochs
    grace_period = min(grace_period, epochs)
    for p in search_space.params:  # every key exists and every corner of the space is a valid job
        _value_of(job, p.key)
        for value in p.corners():
            apply_params(job, {p.key: value}, search_space.fixed)
    baseline_point = {key: _value_of(job, key) for key in search_space.keys}
    if baseline and any(_value_of(job, k) != v for k, v in search_space.fixed.items()):
        log.warning(
            "the baseline trial applies the space's fixed %s, which differ from the job's own values",
            dict(search_space.fixed),
        )
    return SearchSession(
        job=job,
        space=search_space,
        metric=metric,
        mode=mode,
        num_trials=num_trials,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        min_margin=min_margin,
        study_name=study_name or default_study_name(job, search_space),
        storage_url=storage or default_storage_url(),
        baseline_point=baseline_point,
    )


def open_study(session: SearchSession, *, baseline: bool):
    """Creates or loads the study, decides whether this session runs the baseline trial, and names the session."""
    job, search_space = session.job, session.space
    _, study = _prepare_study(
        session.storage_url,
        session.study_name,
        job,
        metric=session.metric,
        mode=session.mode,
        backbone=backbone_label(job, search_space),
    )
    session.existing = len(study.trials)
    session.run_baseline = (
        baseline
        and find_baseline(
            study.get_trials(deepcopy=False), session.baseline_point, max_t=session.epochs, complete_only=True
        )
        is None
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    session.search_name = f"tune-{job.product}-{stamp}-{uuid.uuid4().hex[:6]}"
    return study
