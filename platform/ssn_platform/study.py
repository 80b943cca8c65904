"""The Optuna study behind a search: where it is stored, how it is opened, the searcher that records trials into it.

* Storage. `default_storage_url`: SSN_OPTUNA_STORAGE, else sqlite ``optuna.db`` next to the local stack's MLflow
  database, else ``~/.cache/ssn``; any SQLAlchemy URL works. `redact_url` drops the password for tags and logs.
* Study. `default_study_name`: ``ssn-<product>-<backbone>`` (``ssn-<product>-backbones`` when the space searches
  backbones). `_prepare_study` creates or loads it, refuses to mix metrics, products or backbones in one study, and
  fails trials that a dead search left running.
* Searcher. `OptunaSearch` that adds its study trial number to each Tune config (`STUDY_TRIAL_KEY`), enqueues the
  baseline and the initial points, and records ASHA stops as PRUNED with their last value. `seed_asha_rungs`
  pre-fills ASHA's rungs with the study's earlier per-epoch values, so a resumed search judges its trials against the
  whole study's record.
* Reading back. `TrialSummary` per trial, `_best_trial`, ``trials.csv`` and Optuna's plots.

Ray (and matplotlib, whose backend is set first) is imported inside the functions that use it: Ray reads its
settings (auth mode) when first imported, and importing this module must not do that.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
from optuna.trial import TrialState

from supersimplenet.config import ConfigError
from ssn_platform.jobconfig import JobConfig
from ssn_platform.search_space import SearchSpace
from ssn_platform.tuned import BASELINE_ATTR, BASELINE_KEY

log = logging.getLogger(__name__)

# A running search keeps the study attribute ``ssn.lease.<search name>`` (epoch seconds) fresh (`SearchLease`); a
# RUNNING trial of a search whose lease is younger than LEASE_GRACE_S belongs to a live search and is left alone.
LEASE_PREFIX = "ssn.lease."
LEASE_INTERVAL_S = 30.0
LEASE_GRACE_S = 180.0
STUDY_TRIAL_KEY = "_study_trial"  # the Optuna trial number, added to each trial's config by the searcher


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
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
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


def _prepare_study(storage_url: str, study_name: str, job: JobConfig, *, metric: str, mode: str, backbone: str):
    """Creates or loads the study; refuses to mix objectives or backbones; fails trials left running by a dead
    search. Trials of a search that is still running (its `SearchLease` is fresh) are left alone, so two searches
    can share a study."""
    storage = open_storage(storage_url)
    direction = "minimize" if mode == "min" else "maximize"
    study = optuna.create_study(storage=storage, study_name=study_name, direction=direction, load_if_exists=True)
    attrs = study.user_attrs
    expected = {"ssn.metric": metric, "ssn.backbone": backbone, "ssn.product": job.product}
    for key, value in expected.items():
        if key in attrs and attrs[key] != value:
            hint = f" or --metric {attrs[key]}" if key == "ssn.metric" else ""
            raise ConfigError(
                f"study {study_name!r} has {key}={attrs[key]!r}, this search {value!r}; use another --study name{hint}"
            )
        if key not in attrs:
            study.set_user_attr(key, value)
    if study.direction != getattr(optuna.study.StudyDirection, direction.upper()):
        raise ConfigError(f"study {study_name!r} has direction {study.direction.name}, this search {direction}")
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("search")
        beat = attrs.get(f"{LEASE_PREFIX}{owner}") if owner else None
        if isinstance(beat, (int, float)) and now - beat < LEASE_GRACE_S:
            log.info(
                "study %s: trial %d belongs to search %s, which is running; left alone", study_name, trial.number, owner
            )
            continue
        log.warning(
            "study %s: trial %d was left running by an earlier search; marking it FAIL", study_name, trial.number
        )
        study.tell(trial.number, state=TrialState.FAIL)
    return storage, study


class SearchLease:
    """While a search runs, a daemon thread writes the time to the study's ``ssn.lease.<search>`` every
    `interval` seconds (and 0 when the search ends), so another search on the same study knows these RUNNING
    trials are alive (`_prepare_study`). A search that dies stops renewing; after LEASE_GRACE_S its trials count
    as abandoned."""

    def __init__(self, study, search_name: str, *, interval: float = LEASE_INTERVAL_S) -> None:
        self.study, self.key, self.interval = study, f"{LEASE_PREFIX}{search_name}", interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{search_name}", daemon=True)

    def _beat(self, value: float) -> None:
        try:
            self.study.set_user_attr(self.key, value)
        except Exception as error:  # noqa: BLE001 - a missed beat only shortens the lease; the search goes on
            log.warning("could not renew %s: %s", self.key, error)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat(time.time())

    def __enter__(self) -> "SearchLease":
        self._beat(time.time())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._beat(0.0)


def _make_searcher_class():
    """OptunaSearch that tags each config with its study trial number and records ASHA stops as PRUNED."""
    from ray.tune.search.optuna import OptunaSearch  # noqa: PLC0415 (Ray reads its settings on first import)

    class StudySearch(OptunaSearch):
        def __init__(
            self,
            *args: Any,
            max_t: int,
            search_name: str,
            baseline: Mapping[str, Any] | None = None,
            points: Sequence[Mapping[str, Any]] = (),
            **kwargs: Any,
        ) -> None:
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
                config = {
                    **config,
                    STUDY_TRIAL_KEY: ot_trial.number,
                    **({BASELINE_KEY: True} if ot_trial.user_attrs.get(BASELINE_ATTR) else {}),
                }
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


def seed_asha_rungs(scheduler, study, *, max_t: int, mode: str) -> int:
    """Pre-fills ASHA's rungs with the study's earlier per-epoch values (trials with the same max_t), so that a
    resumed search stops poor trials against the whole study's record, not only against its own first trials.
    Returns how many values were seeded (0 when this Ray version's ASHA internals differ: no seeding then)."""
    sign = 1.0 if mode == "max" else -1.0
    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if t.user_attrs.get("max_t") == max_t
    ]
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


# ---------------------------------------------------------------------------------------------------------
# Reading the study back
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


def _summaries(study, child_runs: Mapping[str, str]) -> list[TrialSummary]:
    out = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        duration = trial.duration.total_seconds() if trial.duration is not None else None
        out.append(
            TrialSummary(
                number=trial.number,
                state=trial.state.name,
                value=trial.value,
                params=dict(trial.params),
                epochs_reached=attrs.get("epochs_reached"),
                stopped_early=bool(attrs.get("stopped_early", False)),
                search=attrs.get("search"),
                mlflow_run_id=child_runs.get(attrs.get("tune_trial_id", "")),
                duration_s=duration,
                baseline=bool(attrs.get(BASELINE_ATTR, False)),
            )
        )
    return out


def _best_trial(study):
    """The best COMPLETE trial (full schedule); the best PRUNED one only when none completed."""
    for states in ((TrialState.COMPLETE,), (TrialState.PRUNED,)):
        trials = [
            t for t in study.get_trials(deepcopy=False, states=states) if t.value is not None and math.isfinite(t.value)
        ]
        if trials:
            pick = max if study.direction.name == "MAXIMIZE" else min
            return pick(trials, key=lambda t: t.value)
    raise ConfigError(f"study {study.study_name!r} has no trial with a value")


def write_trials_csv(summaries: Sequence[TrialSummary], space: SearchSpace, path: Path) -> Path:
    keys = space.keys
    extra = sorted({k for t in summaries for k in t.params} - set(keys))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "number",
            "state",
            "value",
            *keys,
            *extra,
            "epochs_reached",
            "stopped_early",
            "duration_s",
            "search",
            "mlflow_run_id",
            "baseline",
        ]
    )
    for t in summaries:
        writer.writerow(
            [
                t.number,
                t.state,
                "" if t.value is None else t.value,
                *[t.params.get(k, "") for k in [*keys, *extra]],
                t.epochs_reached or "",
                t.stopped_early,
                "" if t.duration_s is None else f"{t.duration_s:.1f}",
                t.search or "",
                t.mlflow_run_id or "",
                t.baseline,
            ]
        )
    path.write_text(buffer.getvalue())
    return path


def write_study_plots(study, space: SearchSpace, out: Path) -> list[Path]:
    """Optuna's history, intermediate values, importances and the sigma x threshold contour (PNG). A plot that
    cannot be drawn (e.g. importances with fewer than 2 completed trials) is skipped with a note."""
    import matplotlib  # noqa: PLC0415 (matplotlib.use("Agg") runs first, when plotting)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (after matplotlib.use("Agg"))
    from optuna.visualization import matplotlib as ovm  # noqa: PLC0415 (after matplotlib.use("Agg"))

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
    "STUDY_TRIAL_KEY",
    "TrialSummary",
    "backbone_label",
    "default_storage_url",
    "default_study_name",
    "open_storage",
    "redact_url",
    "seed_asha_rungs",
    "write_study_plots",
    "write_trials_csv",
]
