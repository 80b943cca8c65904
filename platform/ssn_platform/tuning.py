"""Per-product, per-backbone hyperparameter search: Ray Tune + Optuna (TPE) + ASHA over the Ray Train job.

    python jobs/tune.py --config jobs/configs/battery_weld.yaml --trials 12

What one search does (`run_search`):

* Trials. Each trial is a Ray Tune function (`trial_driver`) that builds the same `TorchTrainer` as the train job
  (`training.train_loop_per_worker`, Train V2 driver pattern) with `TuneReportCallback`, so rank 0's per-epoch
  metrics reach Tune. A trial's job is the base job with the trial's parameters applied as `key=value` overrides
  (default space: relative sigma `model.noise_std` and `model.perlin_threshold`; see
  jobs/configs/search_space.yaml), `validation` set, `validate_every=1`, `register=false` and its own run name.
* Objective. `val_image_auroc` (default) on the dataset's val split, which never overlaps the test split: real
  labelled val images ("split") when the val split holds both classes, else synthetic defects pasted into the
  normal val images ("synthetic", see supersimplenet.synthetic). The test split plays no part in the search.
* Search. Seeded `OptunaSearch` (TPE) over an Optuna study persisted in a database (default: sqlite
  `optuna.db` next to the stack's MLflow database; any SQLAlchemy URL through `storage` / SSN_OPTUNA_STORAGE).
  `ASHAScheduler` on the per-epoch metric (epochs are the resource; grace period, reduction factor 2,
  max_t = epochs) stops poor trials early; such trials are recorded in the study as PRUNED with their last value.
  Concurrency: cluster CPUs (or GPUs) / what one trial's workers need; the trial driver itself holds no CPU.
* Resume. The study is loaded with `load_if_exists`, so running again with the same study name continues it: TPE
  conditions on every earlier trial and the new trials are appended (trial numbers continue). The sampler seed is
  derived from (train.seed, trials already in the study), so a resumed search does not replay the first session's
  random start-up points, and the same command on the same study state proposes the same points.
* Tracking. One MLflow parent run per search session; every trial is a child run (tag `mlflow.parentRunId`) to
  which rank 0 logs the per-epoch metrics. ASHA-stopped trials end as KILLED with `ssn.tune.stopped_early=true`.
* Baseline. The job's own values of the searched keys run as the first trial unless the study already holds one
  (`baseline=False` opts out); ASHA never stops it (see ssn_platform.tuned for the rule below).
* Result. The best COMPLETE trial of the whole study becomes the product's tuned settings for the backbone only when
  it beats the baseline by more than the margin (`decision: tuned`); otherwise the settings written are the job's
  own (`decision: kept_defaults`). Either way:
  `tuned_settings.yaml` (artifact of the parent run, tags `ssn.tuned.*` on it) and
  `s3://<dataset bucket>/tuned/<product>/<backbone>.yaml` for the train job (`tuned_settings_overrides`).
* Backbones. A space may search `model.backbone` as a categorical parameter (`BACKBONE_KEY`): each trial trains
  the backbone it draws, sigma relative to that backbone's own feature scale, the study is
  `ssn-<product>-backbones` (tag `ssn.backbone: searched:<a>|<b>`), and the tuned settings name the chosen
  backbone, set it in their overrides and are written under that backbone's name.
  Artifacts: Optuna history, intermediate values, parameter importances, sigma x threshold contour (PNG) and
  `trials.csv`. `retrain=True` trains the best configuration with the full schedule through
  `training.run_training` and registers it like any train job.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from supersimplenet.config import ConfigError
from ssn_platform.jobconfig import JobConfig, _set_dotted, build_job_config, load_job_config, parse_overrides
from ssn_platform.tuned import (BASELINE_ATTR, BASELINE_KEY, DEFAULT_MIN_MARGIN, Decision, baseline_protecting_asha,
                                find_baseline, judge)

log = logging.getLogger(__name__)

DISTRIBUTIONS = ("uniform", "log_uniform", "int", "categorical")
LR_SCALE_KEY = "train.lr_scale"  # pseudo-parameter: multiplies train.lr_adaptor and train.lr_heads together
# A search space may list backbones as a categorical parameter: each trial then trains its own backbone, with sigma
# relative to that backbone's measured feature scale (noise_std_mode: relative), and the study spans backbones.
BACKBONE_KEY = "model.backbone"
STUDY_TRIAL_KEY = "_study_trial"  # the Optuna trial number, added to each trial's config by the searcher
STARTUP_TRIALS = 6  # TPE's random start-up trials, counted over the whole study
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 1024**2}  # the trial function only launches and waits
TUNED_PREFIX = "tuned"
TUNED_SCHEMA = "ssn-tuned-settings"
SETTINGS_ARTIFACT = "tuned_settings.yaml"


# ---------------------------------------------------------------------------------------------------------
# Search space
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: a dotted JobConfig key (or `train.lr_scale`) and its distribution."""

    key: str
    distribution: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+", self.key):
            raise ConfigError(f"search space: {self.key!r} is not a dotted config key such as model.noise_std")
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(f"search space: {self.key}: distribution must be one of {DISTRIBUTIONS}, "
                              f"got {self.distribution!r}")
        if self.distribution == "categorical":
            if not self.choices:
                raise ConfigError(f"search space: {self.key}: categorical needs a non-empty `choices` list")
            return
        if self.low is None or self.high is None or not float(self.low) < float(self.high):
            raise ConfigError(f"search space: {self.key}: needs low < high, got low={self.low} high={self.high}")
        if self.distribution == "log_uniform" and float(self.low) <= 0:
            raise ConfigError(f"search space: {self.key}: log_uniform needs low > 0, got {self.low}")

    def optuna_distribution(self):
        import optuna

        if self.distribution == "uniform":
            return optuna.distributions.FloatDistribution(float(self.low), float(self.high))
        if self.distribution == "log_uniform":
            return optuna.distributions.FloatDistribution(float(self.low), float(self.high), log=True)
        if self.distribution == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high))
        return optuna.distributions.CategoricalDistribution(list(self.choices))

    def corners(self) -> list[Any]:
        """Extreme values, for validating the space against the job config before anything starts."""
        if self.distribution == "categorical":
            return list(self.choices)
        if self.distribution == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]


@dataclass(frozen=True)
class SearchSpace:
    """Searched parameters plus fixed overrides applied to every trial (e.g. `model.noise_std_mode: relative`)."""

    params: tuple[ParamSpec, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.params:
            raise ConfigError("search space: no parameters to search")
        keys = [p.key for p in self.params]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"search space: duplicate parameters in {keys}")
        clash = sorted(set(keys) & set(self.fixed))
        if clash:
            raise ConfigError(f"search space: {clash} are both searched and fixed")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SearchSpace:
        if not isinstance(raw, Mapping):
            raise ConfigError("search space must be a mapping with `params` (and optionally `fixed`)")
        unknown = sorted(set(raw) - {"params", "fixed"})
        if unknown:
            raise ConfigError(f"search space: unknown top-level key(s) {unknown}; use `params` and `fixed`")
        params = []
        for key, spec in (raw.get("params") or {}).items():
            if not isinstance(spec, Mapping):
                raise ConfigError(f"search space: {key} must be a mapping such as "
                                  "{distribution: log_uniform, low: 0.1, high: 8}")
            extra = sorted(set(spec) - {"distribution", "low", "high", "choices"})
            if extra:
                raise ConfigError(f"search space: {key}: unknown field(s) {extra}")
            params.append(ParamSpec(key=str(key), distribution=str(spec.get("distribution", "")),
                                    low=spec.get("low"), high=spec.get("high"),
                                    choices=tuple(spec.get("choices") or ())))
        fixed = dict(raw.get("fixed") or {})
        return cls(params=tuple(params), fixed=fixed)

    @classmethod
    def load(cls, source: str | Path | Mapping[str, Any] | SearchSpace) -> SearchSpace:
        if isinstance(source, SearchSpace):
            return source
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"search space file not found: {path}")
        try:
            return cls.from_dict(yaml.safe_load(path.read_text()) or {})
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        params = {}
        for p in self.params:
            entry: dict[str, Any] = {"distribution": p.distribution}
            if p.distribution == "categorical":
                entry["choices"] = list(p.choices)
            else:
                entry.update(low=p.low, high=p.high)
            params[p.key] = entry
        return {"params": params, "fixed": dict(self.fixed)}

    def optuna_space(self) -> dict[str, Any]:
        return {p.key: p.optuna_distribution() for p in self.params}

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    @property
    def backbones(self) -> tuple[str, ...]:
        """The backbones searched over (a categorical `model.backbone`), or () when the job's own is used."""
        return tuple(next((p.choices for p in self.params if p.key == BACKBONE_KEY), ()))


def apply_params(job: JobConfig, params: Mapping[str, Any], fixed: Mapping[str, Any] = (),
                 **top_level: Any) -> JobConfig:
    """The job with `fixed` and `params` applied as dotted overrides (`train.lr_scale` scales both learning
    rates), plus top-level fields (validation, run_name, ...). Validated like any job config."""
    tree = job.to_dict()
    for key, value in {**dict(fixed), **dict(params)}.items():
        if key == LR_SCALE_KEY:
            continue
        _set_dotted(tree, key, value)
    if LR_SCALE_KEY in params:
        scale = float(params[LR_SCALE_KEY])
        tree["train"]["lr_adaptor"] = job.train.lr_adaptor * scale
        tree["train"]["lr_heads"] = job.train.lr_heads * scale
    tree.update(top_level)
    return build_job_config(tree)


def _value_of(job: JobConfig, key: str) -> Any:
    if key == LR_SCALE_KEY:
        return 1.0
    node: Any = job.to_dict()
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"search space: {key!r} is not a key of the job config")
        node = node[part]
    return node


# ---------------------------------------------------------------------------------------------------------
# Study storage and the searcher
# ---------------------------------------------------------------------------------------------------------
def default_storage_url() -> str:
    """SSN_OPTUNA_STORAGE, else sqlite next to the local stack's MLflow db (SSN_STACK_DIR), else ~/.cache/ssn."""
    if os.environ.get("SSN_OPTUNA_STORAGE"):
        return os.environ["SSN_OPTUNA_STORAGE"]
    stack = os.environ.get("SSN_STACK_DIR")
    folder = Path(stack) / "mlflow" if stack else Path.home() / ".cache" / "ssn"
    return f"sqlite:///{(folder / 'optuna.db').resolve()}"


def redact_url(url: str) -> str:
    """A storage URL without its password (safe for tags and logs)."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def open_storage(url: str):
    import optuna

    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    return optuna.storages.RDBStorage(url)


def backbone_label(job: JobConfig, space: SearchSpace | None = None) -> str:
    """What a study's and search's ``ssn.backbone`` says: the job's backbone, or ``searched:<a>|<b>`` when the
    space searches over backbones."""
    if space is not None and space.backbones:
        return "searched:" + "|".join(sorted(space.backbones))
    return job.model.backbone


def default_study_name(job: JobConfig, space: SearchSpace | None = None) -> str:
    return f"ssn-{job.product}-{'backbones' if space is not None and space.backbones else job.model.backbone}"


def _make_searcher_class():
    """OptunaSearch that tags each config with its study trial number and records ASHA stops as PRUNED."""
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    class StudySearch(OptunaSearch):
        def __init__(self, *args: Any, max_t: int, search_name: str, baseline: Mapping[str, Any] | None = None,
                     points: Sequence[Mapping[str, Any]] = (), **kwargs: Any) -> None:
            self._max_t = int(max_t)
            self._search_name = search_name
            self._last_step: dict[str, int] = {}
            super().__init__(*args, **kwargs)
            if baseline:  # the baseline first, then the initial points
                self._ot_study.enqueue_trial(dict(baseline), user_attrs={BASELINE_ATTR: True})
            for point in points:
                self._ot_study.enqueue_trial(dict(point))

        def suggest(self, trial_id: str) -> dict | None:
            config = super().suggest(trial_id)
            if config is not None:
                ot_trial = self._ot_trials[trial_id]
                ot_trial.set_user_attr("tune_trial_id", trial_id)
                ot_trial.set_user_attr("search", self._search_name)
                ot_trial.set_user_attr("max_t", self._max_t)
                config = {**config, STUDY_TRIAL_KEY: ot_trial.number,
                          **({BASELINE_KEY: True} if ot_trial.user_attrs.get(BASELINE_ATTR) else {})}
            return config

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            super().on_trial_result(trial_id, result)
            self._last_step[trial_id] = int(result.get("training_iteration") or 0)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is None or trial_id in self._completed_trials:
                return super().on_trial_complete(trial_id, result=result, error=error)
            iterations = int((result or {}).get("training_iteration") or 0)
            ot_trial.set_user_attr("epochs_reached", iterations)
            value = (result or {}).get(self._metric)
            if value is not None and iterations > self._last_step.get(trial_id, 0):
                # Tune hands a result that ends the trial (ASHA stop, max_t) to on_trial_complete only; record it
                # as an intermediate value too, so pruned trials keep their value and rungs can be re-seeded.
                ot_trial.report(float(value), iterations)
            stopped = not error and result is not None and self._metric in result and iterations < self._max_t
            if not stopped:
                return super().on_trial_complete(trial_id, result=result, error=error)
            ot_trial.set_user_attr("stopped_early", True)
            try:
                # PRUNED keeps the last intermediate value as the trial's value; TPE ranks it below COMPLETE ones
                self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            except Exception as exc:  # noqa: BLE001 - as OptunaSearch does: never fail the search on bookkeeping
                log.warning("could not record trial %s as pruned: %s", trial_id, exc)
            self._completed_trials.add(trial_id)

    return StudySearch


# ---------------------------------------------------------------------------------------------------------
# Trial side (runs in a Ray Tune trial actor)
# ---------------------------------------------------------------------------------------------------------
def trial_run_name(search_name: str, number: int | None, trial_id: str) -> str:
    suffix = f"t{number:04d}" if number is not None else trial_id
    return f"{search_name[:100]}-{suffix}"


def trial_driver(config: dict[str, Any], settings: dict[str, Any]) -> None:
    """One trial: a Ray Train run of the trial's job, metrics forwarded to Tune, logged to a nested MLflow run."""
    import ray.train
    import ray.tune
    from mlflow import MlflowClient
    from mlflow.entities import Param
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from ssn_platform import training

    trial_id = ray.tune.get_context().get_trial_id()
    number = config.get(STUDY_TRIAL_KEY)
    params = {k: v for k, v in config.items() if k not in (STUDY_TRIAL_KEY, BASELINE_KEY)}
    run_name = trial_run_name(settings["search_name"], number, trial_id)
    base = build_job_config(settings["base_job"])
    job = apply_params(base, params, settings["fixed"], validation=settings["validation"], validate_every=1,
                       register=False, run_name=run_name, checkpoint_every=base.train.epochs, overlays=0)

    client = MlflowClient()
    tags = {
        "mlflow.parentRunId": settings["parent_run_id"],
        training.RUN_TAG: run_name,
        "ssn.product": job.product,
        "ssn.backbone": job.model.backbone,
        "ssn.tune.study": settings["study_name"],
        "ssn.tune.search": settings["search_name"],
        "ssn.tune.trial_id": trial_id,
        "ssn.tune.validation": job.validation,
    }
    if number is not None:
        tags["ssn.tune.study_trial"] = str(number)
    if config.get(BASELINE_KEY):
        tags["ssn.tune.baseline"] = "true"
    run = client.create_run(settings["experiment_id"], run_name=run_name, tags=tags)
    run_id = run.info.run_id
    logged = {k: ("" if v is None else str(v))[:6000] for k, v in job.flat_params().items()}
    logged.update({f"tune.{k}": str(v) for k, v in params.items()})
    client.log_batch(run_id, params=[Param(k, v) for k, v in logged.items()])

    scaling = job.scaling
    trainer = TorchTrainer(
        training.train_loop_per_worker,
        train_loop_config={"job": job.to_dict(), "mlflow_run_id": run_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=settings["train_storage_path"],
            storage_filesystem=training.storage_filesystem(),
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()],
        ),
    )
    try:
        trainer.fit()
    except BaseException as error:
        # Tune ends a trial it stops (ASHA) by ending this actor, which can surface here as an error while the
        # training is torn down; the search driver sets the final status of every child run from Tune's results.
        client.set_tag(run_id, "ssn.tune.driver_interrupted", type(error).__name__)
        raise
    client.set_terminated(run_id, status="FINISHED")


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------
@dataclass
class TrialSummary:
    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    epochs_reached: int | None
    stopped_early: bool
    search: str | None
    mlflow_run_id: str | None = None
    duration_s: float | None = None
    baseline: bool = False  # the job's own settings (ssn_platform.tuned)


@dataclass
class SearchResult:
    search_name: str
    study_name: str
    storage: str  # redacted
    parent_run_id: str
    metric: str
    mode: str
    validation: str
    best_params: dict[str, Any]
    best_value: float | None
    best_trial: int | None
    tuned_settings: dict[str, Any]
    tuned_uri: str | None
    trials: list[TrialSummary]  # the whole study, this session's and earlier ones
    session_trials: list[int]  # study trial numbers run in this session
    stopped_early: list[int]  # this session's trials that ASHA stopped
    max_concurrent: int
    wall_seconds: float
    retrain: Any = None  # training.TrainingResult when retrain=True
    decision: Decision | None = None  # best vs baseline (ssn_platform.tuned)
    tuned_params: dict[str, Any] = field(default_factory=dict)  # the searched keys' values written (best or baseline)


def resolve_validation(job: JobConfig) -> str:
    """The job's own validation mode, or ("none") "split" when the val split holds both classes, else
    "synthetic" when it holds at least two normal images."""
    from ssn_platform.training import PlatformError

    if job.validation != "none":
        return job.validation
    from ssn_platform.datasets import DatasetReader

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
    import ray

    resources = ray.cluster_resources()
    if job.scaling.use_gpu:
        fit = int(resources.get("GPU", 0) // job.scaling.num_workers)
    else:
        fit = int(resources.get("CPU", 0) // (job.scaling.num_workers * job.scaling.cpus_per_worker))
    return max(1, min(num_trials, fit))


def _mode_for(metric: str) -> str:
    return "min" if "loss" in metric else "max"


def _prepare_study(storage_url: str, study_name: str, job: JobConfig, *, metric: str, mode: str, backbone: str):
    """Creates or loads the study; refuses to mix objectives or backbones; fails trials left running by a dead
    search (one search per study at a time)."""
    import optuna
    from optuna.trial import TrialState

    storage = open_storage(storage_url)
    direction = "minimize" if mode == "min" else "maximize"
    study = optuna.create_study(storage=storage, study_name=study_name, direction=direction, load_if_exists=True)
    attrs = study.user_attrs
    expected = {"ssn.metric": metric, "ssn.backbone": backbone, "ssn.product": job.product}
    for key, value in expected.items():
        if key in attrs and attrs[key] != value:
            raise ConfigError(f"study {study_name!r} has {key}={attrs[key]!r}, this search {value!r}; "
                              "use another --study name")
        if key not in attrs:
            study.set_user_attr(key, value)
    if study.direction != getattr(optuna.study.StudyDirection, direction.upper()):
        raise ConfigError(f"study {study_name!r} has direction {study.direction.name}, this search {direction}")
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        log.warning("study %s: trial %d was left running by an earlier search; marking it FAIL",
                    study_name, trial.number)
        study.tell(trial.number, state=TrialState.FAIL)
    return storage, study


def run_search(
    job: JobConfig,
    *,
    space: Mapping[str, Any] | SearchSpace | str | Path,
    num_trials: int,
    max_concurrent: int | None = None,
    study_name: str | None = None,
    storage: str | None = None,
    metric: str = "val_image_auroc",
    mode: str | None = None,
    grace_period: int = 1,
    reduction_factor: int = 2,
    retrain: bool = False,
    initial_points: Sequence[Mapping[str, Any]] | None = None,
    time_budget_s: float | None = None,
    address: str | None = None,
    baseline: bool = True,
    min_margin: float = DEFAULT_MIN_MARGIN,
) -> SearchResult:
    """Runs (or extends) a search and records the best configuration of the whole study; see the module doc.

    `job` is the base job: every trial trains it with `job.train.epochs` epochs (the ASHA resource) and its
    scaling. `initial_points` (dicts of searched keys) are evaluated first, only when the study is still empty,
    after the baseline trial (`baseline`; ssn_platform.tuned has it and the `min_margin` rule).
    """
    import ray.train
    import ray.tune
    from mlflow import MlflowClient

    from ssn_platform import training

    started = time.perf_counter()
    if num_trials < 1:
        raise ConfigError(f"num_trials must be >= 1, got {num_trials}")
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
        log.warning("the baseline trial applies the space's fixed %s, which differ from the job's own values",
                    dict(search_space.fixed))
    study_name = study_name or default_study_name(job, search_space)
    storage_url = storage or default_storage_url()

    training.check_mlflow()
    validation = resolve_validation(job)
    training.connect_ray(address)
    concurrency = max_concurrent or trials_per_cluster(job, num_trials)

    _, study = _prepare_study(storage_url, study_name, job, metric=metric, mode=mode,
                              backbone=backbone_label(job, search_space))
    existing = len(study.trials)
    run_baseline = baseline and find_baseline(study.get_trials(deepcopy=False), baseline_point, max_t=epochs,
                                              complete_only=True) is None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    search_name = f"tune-{job.product}-{stamp}-{uuid.uuid4().hex[:6]}"

    client = MlflowClient()
    experiment = client.get_experiment_by_name(job.experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(job.experiment_name)
    parent = client.create_run(experiment_id, run_name=search_name, tags={
        training.RUN_TAG: search_name, "ssn.product": job.product, "ssn.backbone": backbone_label(job, search_space),
        "ssn.tune.study": study_name, "ssn.tune.storage": redact_url(storage_url), "ssn.tune.metric": metric,
        "ssn.tune.mode": mode, "ssn.tune.validation": validation, "ssn.tune.role": "search",
        "ssn.tune.trials_before": str(existing),
    })
    parent_id = parent.info.run_id
    sessions = list(study.user_attrs.get("ssn.sessions", []))
    study.set_user_attr("ssn.sessions", [*sessions, parent_id])
    try:
        for key, value in training.lineage_tags(job).items():
            client.set_tag(parent_id, key, value)
        from mlflow.entities import Param

        logged = {k: ("" if v is None else str(v))[:6000] for k, v in job.flat_params().items()}
        logged.update({
            "tune.num_trials": str(num_trials), "tune.max_concurrent": str(concurrency),
            "tune.grace_period": str(grace_period), "tune.reduction_factor": str(reduction_factor),
            "tune.space": json.dumps(search_space.to_dict(), sort_keys=True)[:6000],
            "tune.validation": validation, "tune.metric": metric, "tune.baseline": str(run_baseline),
            "tune.min_margin": str(min_margin),
        })
        client.log_batch(parent_id, params=[Param(k, v) for k, v in logged.items()])

        import optuna

        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        sampler_seed = (job.train.seed * 1_000_003 + existing) % (2**32)
        sampler = optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=STARTUP_TRIALS, multivariate=True)
        points = [dict(p) for p in (initial_points or [])] if existing == 0 else []
        for point in points:
            if set(point) != set(search_space.keys):
                raise ConfigError(f"initial point {point} must give exactly the searched keys {search_space.keys}")
        searcher = _make_searcher_class()(
            space=search_space.optuna_space(), metric=metric, mode=mode, sampler=sampler,
            study_name=study_name, storage=open_storage(storage_url), points=points, max_t=epochs,
            search_name=search_name, baseline=baseline_point if run_baseline else None,
        )
        scheduler = baseline_protecting_asha(time_attr="training_iteration", grace_period=grace_period,
                                             reduction_factor=reduction_factor, max_t=epochs)
        seeded = seed_asha_rungs(scheduler, study, max_t=epochs, mode=mode)
        client.set_tag(parent_id, "ssn.tune.asha_seeded_values", str(seeded))
        storage_root = job.storage[len("s3://"):].rstrip("/")
        settings = {
            "base_job": job.to_dict(), "fixed": dict(search_space.fixed), "validation": validation,
            "search_name": search_name, "study_name": study_name, "parent_run_id": parent_id,
            "experiment_id": experiment_id, "train_storage_path": f"{storage_root}/tune/{search_name}/trials",
        }
        trainable = ray.tune.with_resources(ray.tune.with_parameters(trial_driver, settings=settings),
                                            TRIAL_DRIVER_RESOURCES)
        tuner = ray.tune.Tuner(
            trainable,
            tune_config=ray.tune.TuneConfig(
                metric=metric, mode=mode, search_alg=searcher, scheduler=scheduler, num_samples=num_trials,
                max_concurrent_trials=concurrency, reuse_actors=False, time_budget_s=time_budget_s,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=ray.tune.RunConfig(
                name=search_name, storage_path=f"{storage_root}/tune",
                storage_filesystem=training.storage_filesystem(),
                failure_config=ray.tune.FailureConfig(max_failures=0),
            ),
        )
        grid = tuner.fit()
        tune_results = {}
        for result in grid:
            trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
            tune_results[trial_id] = result
        child_runs = _close_child_runs(client, experiment_id, parent_id, tune_results, max_t=epochs)

        study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
        summaries = _summaries(study, child_runs)
        session = [t.number for t in summaries if t.search == search_name]
        stopped = [t.number for t in summaries if t.search == search_name and t.stopped_early]
        if not any(t.state in ("COMPLETE", "PRUNED") for t in summaries if t.search == search_name):
            errors = [str(r.error) for r in grid if r.error is not None]
            raise training.PlatformError(f"search {search_name}: no trial finished; first error: "
                                         f"{errors[0] if errors else 'unknown'}")
        best = _best_trial(study)
        decision, chosen = judge(study, search_space.params, best, baseline_point, max_t=epochs, mode=mode,
                                 min_margin=min_margin, baseline_requested=baseline)
        log.info("search %s: %s: %s", search_name, decision.decision, decision.reason)
        settings_doc = tuned_settings_document(
            job, search_space, chosen, metric=metric, mode=mode, study_name=study_name, validation=validation,
            search_name=search_name, parent_run_id=parent_id, decision=decision,
            best_run_id=next((t.mlflow_run_id for t in summaries if t.number == chosen.number), None),
        )
        tuned_uri = write_tuned_settings(job, settings_doc)
        _log_search_artifacts(client, parent_id, study, summaries, settings_doc, search_space)
        tags = {
            "ssn.tuned.uri": tuned_uri, "ssn.tuned.value": "none" if chosen.value is None else f"{chosen.value:.6f}",
            "ssn.tuned.study_trial": str(chosen.number), "ssn.tune.trials_total": str(len(summaries)),
            "ssn.tune.trials_session": str(len(session)), "ssn.tune.stopped_early": str(len(stopped)),
            "ssn.tune.max_concurrent": str(concurrency),
        }
        tags.update({f"ssn.tuned.{k}": str(v) for k, v in chosen.params.items()})
        tags.update({f"ssn.tuned.{k}": str(v) for k, v in search_space.fixed.items()})
        tags.update(decision.tags())
        for key, value in tags.items():
            client.set_tag(parent_id, key, value)
        client.log_metric(parent_id, f"best_{metric}", float(best.value))
        if decision.baseline_value is not None:
            client.log_metric(parent_id, f"baseline_{metric}", decision.baseline_value)

        retrained = None
        if retrain:
            best_job = apply_params(job, chosen.params, search_space.fixed, validation="none",
                                    run_name=f"{search_name}-best")
            retrained = training.run_training(best_job, address=address)
            client.set_tag(parent_id, "ssn.tune.retrain_run_id", retrained.mlflow_run_id)
            if retrained.model_version:
                client.set_tag(parent_id, "ssn.tune.retrain_model_version", str(retrained.model_version))
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    client.set_terminated(parent_id, status="FINISHED")
    return SearchResult(
        search_name=search_name, study_name=study_name, storage=redact_url(storage_url), parent_run_id=parent_id,
        metric=metric, mode=mode, validation=validation, best_params=dict(best.params), best_value=best.value,
        best_trial=best.number, tuned_settings=settings_doc, tuned_uri=tuned_uri, trials=summaries,
        session_trials=session, stopped_early=stopped, max_concurrent=concurrency,
        wall_seconds=time.perf_counter() - started, retrain=retrained, decision=decision,
        tuned_params=dict(chosen.params),
    )


def seed_asha_rungs(scheduler, study, *, max_t: int, mode: str) -> int:
    """Pre-fills ASHA's rungs with the study's earlier per-epoch values (trials with the same max_t), so that a
    resumed search stops poor trials against the whole study's record, not only against its own first trials.
    Returns how many values were seeded (0 when this Ray version's ASHA internals differ: no seeding then)."""
    from optuna.trial import TrialState

    sign = 1.0 if mode == "max" else -1.0
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
              if t.user_attrs.get("max_t") == max_t]
    count = 0
    try:
        for bracket in scheduler._brackets:
            for milestone, recorded in bracket._rungs:
                for trial in trials:
                    value = trial.intermediate_values.get(int(milestone))
                    if value is not None and math.isfinite(value):
                        recorded[f"study-trial-{trial.number}"] = sign * value
                        count += 1
    except (AttributeError, TypeError, ValueError) as error:
        log.warning("ASHA rungs not seeded from the study (%s); the resumed search starts with empty rungs", error)
        return 0
    return count


def _trial_dirname(trial) -> str:
    return str(trial.trial_id)


def _close_child_runs(client, experiment_id: str, parent_id: str, results: Mapping[str, Any], *,
                      max_t: int) -> dict[str, str]:
    """Tags every child run with the epochs Tune judged (`ssn.tune.epochs_reached`) and `ssn.tune.stopped_early`
    when ASHA stopped it before max_t, and ends the runs that Tune stopped (a stop ends the trial actor, so the
    trial cannot end its own run): KILLED when stopped before max_t, FINISHED at max_t, FAILED on errors.

    The workers do not wait for the scheduler's verdict on an epoch: a stopped trial's run may hold one more epoch
    of metrics than Tune judged, and one whose last epoch finished meanwhile may have ended itself as FINISHED.
    Returns {tune trial id: MLflow run id}."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                              max_results=5000)
    out = {}
    for run in runs:
        trial_id = run.data.tags.get("ssn.tune.trial_id", "")
        out[trial_id] = run.info.run_id
        result = results.get(trial_id)
        iterations = int((result.metrics or {}).get("training_iteration") or 0) if result is not None else 0
        client.set_tag(run.info.run_id, "ssn.tune.epochs_reached", str(iterations))
        stopped = result is not None and result.error is None and 0 < iterations < max_t
        if stopped:
            client.set_tag(run.info.run_id, "ssn.tune.stopped_early", "true")
        if run.info.status == "FINISHED":
            continue
        if result is None or result.error is not None or iterations == 0:
            client.set_terminated(run.info.run_id, status="FAILED")
        elif stopped:
            client.set_terminated(run.info.run_id, status="KILLED")
        else:
            # ASHA also stops a trial at max_t, which can end the trial actor before the trial ends its own run
            client.set_terminated(run.info.run_id, status="FINISHED")
    return out


def _summaries(study, child_runs: Mapping[str, str]) -> list[TrialSummary]:
    out = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        duration = trial.duration.total_seconds() if trial.duration is not None else None
        out.append(TrialSummary(
            number=trial.number, state=trial.state.name, value=trial.value, params=dict(trial.params),
            epochs_reached=attrs.get("epochs_reached"), stopped_early=bool(attrs.get("stopped_early", False)),
            search=attrs.get("search"), mlflow_run_id=child_runs.get(attrs.get("tune_trial_id", "")),
            duration_s=duration, baseline=bool(attrs.get(BASELINE_ATTR, False)),
        ))
    return out


def _best_trial(study):
    """The best COMPLETE trial (full schedule); the best PRUNED one only when none completed."""
    from optuna.trial import TrialState

    for states in ((TrialState.COMPLETE,), (TrialState.PRUNED,)):
        trials = [t for t in study.get_trials(deepcopy=False, states=states)
                  if t.value is not None and math.isfinite(t.value)]
        if trials:
            pick = max if study.direction.name == "MAXIMIZE" else min
            return pick(trials, key=lambda t: t.value)
    raise ConfigError(f"study {study.study_name!r} has no trial with a value")


# ---------------------------------------------------------------------------------------------------------
# Tuned settings: document, S3 object, overrides for the train job
# ---------------------------------------------------------------------------------------------------------
def tuned_settings_document(job: JobConfig, space: SearchSpace, best, *, metric: str, mode: str, study_name: str,
                            validation: str, search_name: str, parent_run_id: str, best_run_id: str | None,
                            decision: Decision | None = None) -> dict[str, Any]:
    """The settings of `best` (a trial or tuned.Chosen: the best trial's or, kept_defaults, the baseline's)."""
    tuned = apply_params(job, best.params, space.fixed)
    overrides = {**{k: v for k, v in space.fixed.items()}, **dict(best.params)}
    if LR_SCALE_KEY in overrides:
        overrides.pop(LR_SCALE_KEY)
        overrides["train.lr_adaptor"] = tuned.train.lr_adaptor
        overrides["train.lr_heads"] = tuned.train.lr_heads
    return {
        "schema": TUNED_SCHEMA,
        "product": job.product,
        "backbone": tuned.model.backbone,  # the chosen trial's, when the space searched over backbones
        "noise_std": tuned.model.noise_std,
        "noise_std_mode": tuned.model.noise_std_mode,
        "perlin_threshold": tuned.model.perlin_threshold,
        "lr_adaptor": tuned.train.lr_adaptor,
        "lr_heads": tuned.train.lr_heads,
        "metric": metric,
        "mode": mode,
        "value": None if best.value is None else float(best.value),
        **(decision.document_fields() if decision is not None else {}),
        "study": study_name,
        "study_trial": best.number,
        "validation": validation,
        "epochs": job.train.epochs,
        "image_size": list(job.model.image_size),
        "seed": job.train.seed,
        "dataset": job.dataset,
        "search": search_name,
        "parent_run_id": parent_run_id,
        "trial_run_id": best_run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "overrides": [f"{k}={_yaml_scalar(v)}" for k, v in overrides.items()],
    }


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def tuned_settings_uri(job: JobConfig, backbone: str | None = None) -> str:
    from ssn_platform.storage import parse_s3_uri

    bucket, _ = parse_s3_uri(job.dataset)
    return f"s3://{bucket}/{TUNED_PREFIX}/{job.product}/{backbone or job.model.backbone}.yaml"


def write_tuned_settings(job: JobConfig, document: Mapping[str, Any]) -> str:
    """Writes the settings to s3://<bucket>/tuned/<product>/<backbone>.yaml (and a copy per search under
    <backbone>/<search>.yaml). Returns the main URI."""
    from ssn_platform.storage import S3Settings, make_client, parse_s3_uri, put_bytes

    uri = tuned_settings_uri(job, document.get("backbone"))
    bucket, key = parse_s3_uri(uri)
    body = yaml.safe_dump(dict(document), sort_keys=False).encode()
    client = make_client(S3Settings.from_env())
    put_bytes(client, bucket, key, body, content_type="application/x-yaml")
    history = key[: -len(".yaml")] + f"/{document['search']}.yaml"
    put_bytes(client, bucket, history, body, content_type="application/x-yaml")
    return uri


def read_tuned_settings(path_or_uri: str | Path) -> dict[str, Any]:
    text: str
    if str(path_or_uri).startswith("s3://"):
        from ssn_platform.storage import S3Settings, get_bytes, make_client, parse_s3_uri

        bucket, key = parse_s3_uri(str(path_or_uri))
        text = get_bytes(make_client(S3Settings.from_env()), bucket, key).decode()
    else:
        path = Path(path_or_uri)
        if not path.is_file():
            raise ConfigError(f"tuned settings file not found: {path}")
        text = path.read_text()
    document = yaml.safe_load(text)
    if not isinstance(document, Mapping) or document.get("schema") != TUNED_SCHEMA:
        raise ConfigError(f"{path_or_uri}: not a tuned settings document (schema {TUNED_SCHEMA})")
    return dict(document)


def tuned_settings_overrides(path_or_uri: str | Path, *, backbone: str | None = None,
                             product: str | None = None) -> list[str]:
    """`key=value` overrides that apply tuned settings to a train job (put user overrides after them).

    With `backbone` / `product`, refuses settings tuned for another backbone or product (sigma does not transfer
    across backbones), unless the settings choose the backbone themselves (a search over backbones: their
    overrides set `model.backbone`). Example (what `load_tuned_job_config` does):
    `load_job_config(cfg, [*tuned_settings_overrides(uri, backbone=...), *user])`.
    """
    document = read_tuned_settings(path_or_uri)
    chooses_backbone = any(str(o).startswith(f"{BACKBONE_KEY}=") for o in document.get("overrides") or [])
    if backbone is not None and document.get("backbone") != backbone and not chooses_backbone:
        raise ConfigError(f"{path_or_uri}: tuned for backbone {document.get('backbone')!r}, the job uses {backbone!r}")
    if product is not None and document.get("product") != product:
        raise ConfigError(f"{path_or_uri}: tuned for product {document.get('product')!r}, the job is {product!r}")
    overrides = [str(o) for o in document.get("overrides") or []]
    parse_overrides(overrides)  # validates the form
    return overrides


def load_tuned_job_config(config: str | Path, overrides: Sequence[str], tuned: str | Path | None) -> JobConfig:
    """The job of `config` and `overrides`, with the tuned settings `tuned` (URI or file, checked against the job's
    backbone and product) applied beneath the overrides: what `jobs/train.py --tuned` and `jobs/evaluate.py --tuned`
    train."""
    if tuned:
        base = load_job_config(config, overrides)
        overrides = [*tuned_settings_overrides(tuned, backbone=base.model.backbone, product=base.product),
                     *overrides]
    return load_job_config(config, overrides)


# ---------------------------------------------------------------------------------------------------------
# Artifacts
# ---------------------------------------------------------------------------------------------------------
def _log_search_artifacts(client, run_id: str, study, summaries: Sequence[TrialSummary],
                          settings_doc: Mapping[str, Any], space: SearchSpace) -> None:
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory)
        (out / SETTINGS_ARTIFACT).write_text(yaml.safe_dump(dict(settings_doc), sort_keys=False))
        write_trials_csv(summaries, space, out / "trials.csv")
        write_study_plots(study, space, out / "plots")
        client.log_artifacts(run_id, str(out))


def write_trials_csv(summaries: Sequence[TrialSummary], space: SearchSpace, path: Path) -> Path:
    keys = space.keys
    extra = sorted({k for t in summaries for k in t.params} - set(keys))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["number", "state", "value", *keys, *extra, "epochs_reached", "stopped_early", "duration_s",
                     "search", "mlflow_run_id", "baseline"])
    for t in summaries:
        writer.writerow([t.number, t.state, "" if t.value is None else t.value,
                         *[t.params.get(k, "") for k in [*keys, *extra]], t.epochs_reached or "",
                         t.stopped_early, "" if t.duration_s is None else f"{t.duration_s:.1f}", t.search or "",
                         t.mlflow_run_id or "", t.baseline])
    path.write_text(buffer.getvalue())
    return path


def write_study_plots(study, space: SearchSpace, out: Path) -> list[Path]:
    """Optuna's history, intermediate values, importances and the sigma x threshold contour (PNG). A plot that
    cannot be drawn (e.g. importances with fewer than 2 completed trials) is skipped with a note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    out.mkdir(parents=True, exist_ok=True)
    contour_keys = [k for k in ("model.noise_std", "model.perlin_threshold") if k in space.keys]
    if len(contour_keys) < 2:
        contour_keys = space.keys[:2]
    plots = {
        "optimization_history.png": lambda: ovm.plot_optimization_history(study),
        "intermediate_values.png": lambda: ovm.plot_intermediate_values(study),
        "param_importances.png": lambda: ovm.plot_param_importances(study),
        "contour_sigma_threshold.png": lambda: ovm.plot_contour(study, params=contour_keys),
    }
    written, skipped = [], {}
    for name, draw in plots.items():
        try:
            axes = draw()
            first = axes.flat[0] if hasattr(axes, "flat") else axes
            first.figure.savefig(out / name, dpi=100, bbox_inches="tight")
            written.append(out / name)
        except Exception as error:  # noqa: BLE001 - too few trials, a single-valued parameter, ...
            skipped[name] = f"{type(error).__name__}: {error}"
        finally:
            plt.close("all")
    if skipped:
        (out / "skipped.json").write_text(json.dumps(skipped, indent=2))
    return written


__all__ = [
    "ParamSpec", "SearchResult", "SearchSpace", "TrialSummary", "apply_params", "default_storage_url",
    "default_study_name", "read_tuned_settings", "resolve_validation", "run_search", "trial_driver",
    "tuned_settings_overrides", "tuned_settings_uri", "write_trials_csv", "write_study_plots",
]
