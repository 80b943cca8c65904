"""Per-product, per-backbone hyperparameter search: Ray Tune + Optuna (TPE) + ASHA over the Ray Train job.

    python jobs/tune.py --config jobs/configs/battery_weld.yaml --trials 12

What one search does (`run_search`):

* Trials. Each trial is a Ray Tune function (`trial_driver`, ssn_platform.trial) that builds the same
  `TorchTrainer` as the train job (`training.train_loop_per_worker`, Train V2 driver pattern) with
  `TuneReportCallback`, so rank 0's per-epoch metrics reach Tune. A trial's job is the base job with the trial's
  parameters applied as `key=value` overrides (default space: relative sigma `model.noise_std` and
  `model.perlin_threshold`; see jobs/configs/search_space.yaml and ssn_platform.search_space), `validation` set,
  `validate_every=1`, `register=false` and its own run name.
* Objective. Measured on the dataset's val split, which never overlaps the test split: real labelled val images
  ("split") when the val split holds both classes, else synthetic defects pasted into the normal val images
  ("synthetic", see supersimplenet.synthetic). The test split plays no part in the search. The default metric
  (``auto``, `OBJECTIVES`) depends on that mode: with real defects the image AUROC of the model's own score
  (`val_image_auroc`; for a model reporting the patch memory's score, which the searched head settings do not
  move, the heads' map score `val_image_auroc_map_top1`: `MEMORY_SPLIT_OBJECTIVE`); with synthetic ones the image
  AUROC of the combined score (the mean of the head's score and the map maximum, `val_image_auroc_combined`), the
  one objective whose ranking of settings agreed with the real test AUROC (Spearman >= 0.8) on every dataset
  measured, where the map's own score misled on ELPV (docs/configuration.md, QUALITY.md). Any metric a trial
  reports can be named instead.
* Search. Seeded `OptunaSearch` (TPE) over an Optuna study persisted in a database (ssn_platform.study; default:
  sqlite `optuna.db` next to the stack's MLflow database; any SQLAlchemy URL through `storage` / SSN_OPTUNA_STORAGE).
  `ASHAScheduler` on the per-epoch metric (epochs are the resource; grace period a quarter of the epochs by
  default, `default_grace_period`; reduction factor 2; max_t = epochs) stops poor trials early; such trials are
  recorded in the study as PRUNED with their last value.
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
  `s3://<dataset bucket>/tuned/<product>/<backbone>.yaml` for the train job (ssn_platform.tuned_settings).
* Backbones. A space may search `model.backbone` as a categorical parameter (`BACKBONE_KEY`): each trial trains
  the backbone it draws, sigma relative to that backbone's own feature scale, the study is
  `ssn-<product>-backbones` (tag `ssn.backbone: searched:<a>|<b>`), and the tuned settings name the chosen
  backbone, set it in their overrides and are written under that backbone's name.
  Artifacts: Optuna history, intermediate values, parameter importances, sigma x threshold contour (PNG) and
  `trials.csv`. `retrain=True` trains the best configuration with the full schedule through
  `training.run_training` and registers it like any train job.

What a session settles before any trial runs (the arguments and the space checked against the job, the objective,
the concurrency, the study and whether it runs the baseline) is ssn_platform.search_session; `OBJECTIVES`,
`default_grace_period` and the other names in `__all__` are importable from here as well.

Ray is imported inside the functions that use it: Ray reads its settings (auth mode) when first imported, and
importing this module must not do that.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
import yaml
from mlflow import MlflowClient
from mlflow.entities import Param

from supersimplenet.config import ConfigError
from ssn_platform import lineage, training
from ssn_platform.jobconfig import JobConfig
from ssn_platform.services import experiment_id
from ssn_platform.search_session import (
    AUTO_METRIC,
    OBJECTIVES,
    SearchSession,
    default_grace_period,
    open_study,
    plan_session,
    resolve_metric,
    resolve_validation,
    trials_per_cluster,
)
from ssn_platform.search_space import SearchSpace, apply_params
from ssn_platform.study import (
    SearchLease,
    TrialSummary,
    _best_trial,
    _make_searcher_class,
    _summaries,
    backbone_label,
    open_storage,
    redact_url,
    seed_asha_rungs,
    write_study_plots,
    write_trials_csv,
)
from ssn_platform.trial import _close_child_runs, trial_driver
from ssn_platform.tuned import DEFAULT_MIN_MARGIN, Decision, baseline_protecting_asha, judge
from ssn_platform.tuned_settings import tuned_settings_document, write_tuned_settings

log = logging.getLogger(__name__)

STARTUP_TRIALS = 6  # TPE's random start-up trials, counted over the whole study
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 1024**2}  # the trial function only launches and waits
SETTINGS_ARTIFACT = "tuned_settings.yaml"


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------
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


def run_search(
    job: JobConfig,
    *,
    space: Mapping[str, Any] | SearchSpace | str | Path,
    num_trials: int,
    max_concurrent: int | None = None,
    study_name: str | None = None,
    storage: str | None = None,
    metric: str = AUTO_METRIC,
    mode: str | None = None,
    grace_period: int | None = None,
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
    started = time.perf_counter()
    session = plan_session(
        job,
        space,
        num_trials=num_trials,
        study_name=study_name,
        storage=storage,
        metric=metric,
        mode=mode,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        min_margin=min_margin,
        baseline=baseline,
    )
    training.check_mlflow()
    session.job = lineage.pin_dataset(session.job)  # `latest` resolved once here: every trial trains the same data
    session.validation = resolve_validation(session.job)
    session.metric = resolve_metric(session.metric, session.validation, session.job.model.image_score)
    training.connect_ray(address)
    session.concurrency = max_concurrent or trials_per_cluster(job, num_trials)
    study = open_study(session, baseline=baseline)
    client = MlflowClient()
    with SearchLease(study, session.search_name):  # another search on this study leaves our trials alone
        _start_parent_run(client, session, study)
        try:
            _log_parent_params(client, session)
            grid = _run_trials(client, session, study, initial_points=initial_points, time_budget_s=time_budget_s)
            study, summaries = _collect_trials(client, session, grid)
            result = _record_outcome(client, session, study, summaries, baseline=baseline)
            if retrain:
                result.retrain = _retrain_best(client, session, result.tuned_params, address=address)
        except BaseException:
            client.set_terminated(session.parent_id, status="FAILED")
            raise
        client.set_terminated(session.parent_id, status="FINISHED")
    result.wall_seconds = time.perf_counter() - started
    return result


def _start_parent_run(client, session: SearchSession, study) -> None:
    """The session's MLflow parent run (every trial is a child run of it), recorded in the study's sessions."""
    job, search_space, search_name = session.job, session.space, session.search_name
    session.experiment_id = experiment_id(client, job.experiment_name)
    parent = client.create_run(
        session.experiment_id,
        run_name=search_name,
        tags={
            lineage.RUN_TAG: search_name,
            "ssn.product": job.product,
            "ssn.backbone": backbone_label(job, search_space),
            "ssn.tune.study": session.study_name,
            "ssn.tune.storage": redact_url(session.storage_url),
            "ssn.tune.metric": session.metric,
            "ssn.tune.mode": session.mode,
            "ssn.tune.validation": session.validation,
            "ssn.tune.role": "search",
            "ssn.tune.trials_before": str(session.existing),
        },
    )
    session.parent_id = parent.info.run_id
    sessions = list(study.user_attrs.get("ssn.sessions", []))
    study.set_user_attr("ssn.sessions", [*sessions, session.parent_id])


def _log_parent_params(client, session: SearchSession) -> None:
    """The parent run's lineage tags and params: the base job's, and the search's own (``tune.*``)."""
    for key, value in lineage.lineage_tags(session.job).items():
        client.set_tag(session.parent_id, key, value)
    logged = session.job.logged_params()
    logged.update(
        {
            "tune.num_trials": str(session.num_trials),
            "tune.max_concurrent": str(session.concurrency),
            "tune.grace_period": str(session.grace_period),
            "tune.reduction_factor": str(session.reduction_factor),
            "tune.space": json.dumps(session.space.to_dict(), sort_keys=True)[:6000],
            "tune.validation": session.validation,
            "tune.metric": session.metric,
            "tune.baseline": str(session.run_baseline),
            "tune.min_margin": str(session.min_margin),
        }
    )
    client.log_batch(session.parent_id, params=[Param(k, v) for k, v in logged.items()])


def _run_trials(
    client,
    session: SearchSession,
    study,
    *,
    initial_points: Sequence[Mapping[str, Any]] | None,
    time_budget_s: float | None,
):
    """Runs the session's trials on Ray Tune: the seeded TPE searcher over the study, ASHA (its rungs seeded with the
    study's record), one `trial_driver` per trial. Returns Tune's result grid."""
    import ray.train  # noqa: PLC0415 (Ray reads its settings on first import)
    import ray.tune  # noqa: PLC0415 (Ray reads its settings on first import)

    search_space, epochs, mode = session.space, session.epochs, session.mode
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sampler_seed = (session.job.train.seed * 1_000_003 + session.existing) % (2**32)
    sampler = optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=STARTUP_TRIALS, multivariate=True)
    points = [dict(p) for p in (initial_points or [])] if session.existing == 0 else []
    for point in points:
        if set(point) != set(search_space.keys):
            raise ConfigError(f"initial point {point} must give exactly the searched keys {search_space.keys}")
    searcher = _make_searcher_class()(
        space=search_space.optuna_space(),
        metric=session.metric,
        mode=mode,
        sampler=sampler,
        study_name=session.study_name,
        storage=open_storage(session.storage_url),
        points=points,
        max_t=epochs,
        search_name=session.search_name,
        baseline=session.baseline_point if session.run_baseline else None,
    )
    scheduler = baseline_protecting_asha(
        time_attr="training_iteration",
        grace_period=session.grace_period,
        reduction_factor=session.reduction_factor,
        max_t=epochs,
    )
    seeded = seed_asha_rungs(scheduler, study, max_t=epochs, mode=mode)
    client.set_tag(session.parent_id, "ssn.tune.asha_seeded_values", str(seeded))
    storage_root = session.job.storage[len("s3://") :].rstrip("/")
    settings = {
        "base_job": session.job.to_dict(),
        "fixed": dict(search_space.fixed),
        "validation": session.validation,
        "search_name": session.search_name,
        "study_name": session.study_name,
        "parent_run_id": session.parent_id,
        "experiment_id": session.experiment_id,
        "train_storage_path": f"{storage_root}/tune/{session.search_name}/trials",
    }
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(trial_driver, settings=settings), TRIAL_DRIVER_RESOURCES
    )
    tuner = ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(
            metric=session.metric,
            mode=mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=session.num_trials,
            max_concurrent_trials=session.concurrency,
            reuse_actors=False,
            time_budget_s=time_budget_s,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=ray.tune.RunConfig(
            name=session.search_name,
            storage_path=f"{storage_root}/tune",
            storage_filesystem=training.storage_filesystem(),
            failure_config=ray.tune.FailureConfig(max_failures=0),
        ),
    )
    return tuner.fit()


def _collect_trials(client, session: SearchSession, grid) -> tuple[Any, list[TrialSummary]]:
    """Ends the child runs Tune stopped and reads the whole study back: (study, summaries of all its trials).
    Fails when no trial of this session finished."""
    tune_results = {}
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        tune_results[trial_id] = result
    child_runs = _close_child_runs(client, session.experiment_id, session.parent_id, tune_results, max_t=session.epochs)

    study = optuna.load_study(study_name=session.study_name, storage=open_storage(session.storage_url))
    summaries = _summaries(study, child_runs)
    if not any(t.state in ("COMPLETE", "PRUNED") for t in summaries if t.search == session.search_name):
        errors = [str(r.error) for r in grid if r.error is not None]
        raise training.PlatformError(
            f"search {session.search_name}: no trial finished; first error: {errors[0] if errors else 'unknown'}"
        )
    return study, summaries


def _record_outcome(
    client, session: SearchSession, study, summaries: list[TrialSummary], *, baseline: bool
) -> SearchResult:
    """Judges the best trial against the baseline, writes the tuned settings (S3 and the parent run's artifacts)
    and tags the parent run. Returns the search's result (wall time and retraining still to fill in)."""
    job, search_space, metric, mode = session.job, session.space, session.metric, session.mode
    search_name, parent_id = session.search_name, session.parent_id
    best = _best_trial(study)
    decision, chosen = judge(
        study,
        search_space.params,
        best,
        session.baseline_point,
        max_t=session.epochs,
        mode=mode,
        min_margin=session.min_margin,
        baseline_requested=baseline,
    )
    log.info("search %s: %s: %s", search_name, decision.decision, decision.reason)
    settings_doc = tuned_settings_document(
        job,
        search_space,
        chosen,
        metric=metric,
        mode=mode,
        study_name=session.study_name,
        validation=session.validation,
        search_name=search_name,
        parent_run_id=parent_id,
        decision=decision,
        best_run_id=next((t.mlflow_run_id for t in summaries if t.number == chosen.number), None),
    )
    tuned_uri = write_tuned_settings(job, settings_doc)
    _log_search_artifacts(client, parent_id, study, summaries, settings_doc, search_space)
    session_trials = [t.number for t in summaries if t.search == search_name]
    stopped = [t.number for t in summaries if t.search == search_name and t.stopped_early]
    tags = {
        "ssn.tuned.uri": tuned_uri,
        "ssn.tuned.value": "none" if chosen.value is None else f"{chosen.value:.6f}",
        "ssn.tuned.study_trial": str(chosen.number),
        "ssn.tune.trials_total": str(len(summaries)),
        "ssn.tune.trials_session": str(len(session_trials)),
        "ssn.tune.stopped_early": str(len(stopped)),
        "ssn.tune.max_concurrent": str(session.concurrency),
    }
    tags.update({f"ssn.tuned.{k}": str(v) for k, v in chosen.params.items()})
    tags.update({f"ssn.tuned.{k}": str(v) for k, v in search_space.fixed.items()})
    tags.update(decision.tags())
    for key, value in tags.items():
        client.set_tag(parent_id, key, value)
    client.log_metric(parent_id, f"best_{metric}", float(best.value))
    if decision.baseline_value is not None:
        client.log_metric(parent_id, f"baseline_{metric}", decision.baseline_value)
    return SearchResult(
        search_name=search_name,
        study_name=session.study_name,
        storage=redact_url(session.storage_url),
        parent_run_id=parent_id,
        metric=metric,
        mode=mode,
        validation=session.validation,
        best_params=dict(best.params),
        best_value=best.value,
        best_trial=best.number,
        tuned_settings=settings_doc,
        tuned_uri=tuned_uri,
        trials=summaries,
        session_trials=session_trials,
        stopped_early=stopped,
        max_concurrent=session.concurrency,
        wall_seconds=0.0,
        decision=decision,
        tuned_params=dict(chosen.params),
    )


def _retrain_best(client, session: SearchSession, params: Mapping[str, Any], *, address: str | None):
    """Trains the chosen settings with the full schedule through `training.run_training`, registered like any train
    job; the parent run is tagged with its run and model version."""
    best_job = apply_params(
        session.job, params, session.space.fixed, validation="none", run_name=f"{session.search_name}-best"
    )
    retrained = training.run_training(best_job, address=address)
    client.set_tag(session.parent_id, "ssn.tune.retrain_run_id", retrained.mlflow_run_id)
    if retrained.model_version:
        client.set_tag(session.parent_id, "ssn.tune.retrain_model_version", str(retrained.model_version))
    return retrained


def _trial_dirname(trial) -> str:
    return str(trial.trial_id)


def _log_search_artifacts(
    client, run_id: str, study, summaries: Sequence[TrialSummary], settings_doc: Mapping[str, Any], space: SearchSpace
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory)
        (out / SETTINGS_ARTIFACT).write_text(yaml.safe_dump(dict(settings_doc), sort_keys=False))
        write_trials_csv(summaries, space, out / "trials.csv")
        write_study_plots(study, space, out / "plots")
        client.log_artifacts(run_id, str(out))


__all__ = [
    "AUTO_METRIC",
    "OBJECTIVES",
    "SearchResult",
    "default_grace_period",
    "resolve_metric",
    "resolve_validation",
    "run_search",
    "trials_per_cluster",
]
