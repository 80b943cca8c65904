"""Whether a search may change the job's settings: the baseline trial and the keep-the-defaults rule.

A search scores its trials on a small val split, and the best of several noisy scores is biased upwards: on a
held-out product an 8-trial search once chose relative sigma 1.40 / Perlin threshold 0.51, and the detector trained
with them reached test image AUROC 0.50 where the job's defaults gave 0.70. So (`tuning.run_search`):

* Baseline. Every search evaluates the job's own values of the searched keys (with the space's `fixed` overrides,
  as every trial) as one trial, first, whenever the study holds no COMPLETE baseline trial for those values and
  this max_t (a new study, a study made before this rule, or changed defaults). The Optuna trial carries the user
  attribute `ssn.baseline`, its MLflow child run the tag `ssn.tune.baseline=true`. ASHA records the baseline's
  per-epoch values in its rungs (other trials are judged against them) but never stops it before max_t
  (`baseline_protecting_asha`), so the baseline value is the one at the full schedule, like the best COMPLETE
  trial's: both are compared at the last epoch. `run_search(baseline=False)` (jobs/tune.py --no-baseline) runs
  no baseline; a matching one already in the study is still used.
* Rule (`decide`). improvement = best - baseline (baseline - best for a minimised metric);
  margin = max(min_margin, noise); the tuned settings are the best trial's only when improvement > margin,
  otherwise the document keeps the job's values (its overrides are the baseline's) with `decision: kept_defaults`.
* min_margin: jobs/tune.py --min-margin, default 0.02, in the metric's own units (AUROC by default; set it for any
  other metric). It is a floor chosen by judgement, not a measured quantity.
* noise (`near_identical_spread`): the largest |value difference| between two COMPLETE trials (same max_t) whose
  settings are nearly identical: every searched parameter within 5 % of its searched range (on the log scale for
  log_uniform; categorical: equal). Such trials would score the same if the objective were smooth and exact, so
  their difference is an observed sample of the noise (training trajectories that diverge, a small val split). It
  is only used when the study holds such a pair, and only to widen the margin. What it cannot see: all trials
  train with the same train.seed, so seed-to-seed variation is not measured, and nothing here corrects the upward
  bias of a maximum over many trials; min_margin is the guard for both.
* Missing baseline. `decide` refuses a missing baseline value (ValueError). `judge` handles it before: with the
  baseline disabled and none in the study the best trial is written (`decision: tuned`, the reason says it was not
  compared); when a baseline was run but did not complete (failed, or cut by the time budget) the defaults are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

BASELINE_ATTR = "ssn.baseline"  # Optuna user attribute of the baseline trial
BASELINE_KEY = "_baseline"  # added to the baseline trial's Tune config (read by the scheduler and the trial driver)
DEFAULT_MIN_MARGIN = 0.02
NEAR_FRACTION = 0.05  # "nearly identical": every searched parameter within this fraction of its range
TUNED = "tuned"
KEPT_DEFAULTS = "kept_defaults"


@dataclass(frozen=True)
class Decision:
    decision: str  # TUNED or KEPT_DEFAULTS
    best_value: float | None
    baseline_value: float | None
    margin: float
    reason: str
    min_margin: float
    noise: float | None = None  # largest spread between nearly identical trials; None: no such pair
    noise_pairs: int = 0
    best_trial: int | None = None
    baseline_trial: int | None = None

    @property
    def tuned(self) -> bool:
        return self.decision == TUNED

    def document_fields(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "baseline_value": self.baseline_value,
            "best_value": self.best_value,
            "margin": self.margin,
            "min_margin": self.min_margin,
            "noise": self.noise,
            "noise_pairs": self.noise_pairs,
            "baseline_trial": self.baseline_trial,
            "best_trial": self.best_trial,
            "reason": self.reason,
        }

    def tags(self) -> dict[str, str]:
        def text(value: Any) -> str:
            return "none" if value is None else f"{value:.6f}" if isinstance(value, float) else str(value)

        return {
            "ssn.tuned.decision": self.decision,
            "ssn.tuned.baseline_value": text(self.baseline_value),
            "ssn.tuned.best_value": text(self.best_value),
            "ssn.tuned.margin": text(self.margin),
            "ssn.tuned.baseline_trial": text(self.baseline_trial),
            "ssn.tuned.best_trial": text(self.best_trial),
            "ssn.tuned.reason": self.reason,
        }


def decide(
    best_value: float,
    baseline_value: float | None,
    *,
    mode: str,
    min_margin: float = DEFAULT_MIN_MARGIN,
    noise: float | None = None,
    noise_pairs: int = 0,
    best_trial: int | None = None,
    baseline_trial: int | None = None,
) -> Decision:
    """The keep-the-defaults rule (module doc). Raises ValueError without a baseline value or on non-finite input."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if baseline_value is None:
        raise ValueError("no baseline value: the best trial cannot be compared with the job's defaults")
    for name, value in (("best", best_value), ("baseline", baseline_value), ("min_margin", min_margin)):
        if value is None or not math.isfinite(value):
            raise ValueError(f"{name} value must be a finite number, got {value!r}")
    if min_margin < 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin}")
    margin = max(float(min_margin), float(noise)) if noise is not None else float(min_margin)
    improvement = best_value - baseline_value if mode == "max" else baseline_value - best_value
    tuned = improvement - margin > 1e-9  # exactly the margin (up to float error) does not clear it
    how = (
        "--min-margin"
        if noise is None or noise <= min_margin
        else f"largest spread of {noise_pairs} nearly identical trial pair{'s' * (noise_pairs != 1)}"
    )
    reason = (
        f"best {best_value:.3f} vs defaults {baseline_value:.3f}: {best_value - baseline_value:+.3f}"
        f"{' (lower is better)' if mode == 'min' else ''} {'clears' if tuned else 'does not clear'} the margin "
        f"{margin:.3f} ({how}); " + ("using the best trial's settings" if tuned else "keeping the defaults")
    )
    return Decision(
        TUNED if tuned else KEPT_DEFAULTS,
        float(best_value),
        float(baseline_value),
        margin,
        reason,
        float(min_margin),
        None if noise is None else float(noise),
        noise_pairs,
        best_trial,
        baseline_trial,
    )


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def find_baseline(trials: Sequence[Any], point: Mapping[str, Any], *, max_t: int, complete_only: bool = False):
    """The study's baseline trial for these values and max_t: the last COMPLETE one, else the last one (any state)."""
    found = [
        t
        for t in trials
        if t.user_attrs.get(BASELINE_ATTR)
        and t.user_attrs.get("max_t") == max_t
        and set(t.params) == set(point)
        and all(_same_value(t.params[k], v) for k, v in point.items())
    ]
    complete = [t for t in found if t.state.name == "COMPLETE"]
    return (complete or ([] if complete_only else found) or [None])[-1]


def near_identical_spread(
    trials: Sequence[Any], params: Sequence[Any], *, fraction: float = NEAR_FRACTION
) -> tuple[float | None, int]:
    """(largest |value difference|, number of pairs) over pairs of trials whose every searched parameter (ParamSpec)
    lies within `fraction` of its range (log scale for log_uniform; categorical: equal); (None, 0) without a pair."""

    def close(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
        for spec in params:
            x, y = a.get(spec.key), b.get(spec.key)
            if x is None or y is None:
                return False
            if spec.distribution == "categorical":
                if x != y:
                    return False
                continue
            low, high, x, y = float(spec.low), float(spec.high), float(x), float(y)
            if spec.distribution == "log_uniform":
                if min(x, y) <= 0:
                    return False
                low, high, x, y = math.log(low), math.log(high), math.log(x), math.log(y)
            if abs(x - y) > fraction * (high - low):
                return False
        return True

    spreads = [
        abs(a.value - b.value) for i, a in enumerate(trials) for b in trials[i + 1 :] if close(a.params, b.params)
    ]
    return (max(spreads), len(spreads)) if spreads else (None, 0)


@dataclass(frozen=True)
class Chosen:
    """The settings a search writes: the best trial's, or the baseline's (the job's own values)."""

    params: dict[str, Any]
    value: float | None
    number: int | None


def judge(
    study,
    params: Sequence[Any],
    best,
    point: Mapping[str, Any],
    *,
    max_t: int,
    mode: str,
    min_margin: float,
    baseline_requested: bool,
) -> tuple[Decision, Chosen]:
    """The decision for a finished search and the settings to write (module doc: Missing baseline)."""
    trials = study.get_trials(deepcopy=False)
    complete = [
        t
        for t in trials
        if t.state.name == "COMPLETE"
        and t.user_attrs.get("max_t") == max_t
        and t.value is not None
        and math.isfinite(t.value)
    ]
    noise, pairs = near_identical_spread(complete, params)
    baseline = find_baseline(trials, point, max_t=max_t)
    best_chosen = Chosen(dict(best.params), float(best.value), best.number)
    common = dict(min_margin=float(min_margin), noise=noise, noise_pairs=pairs, best_trial=best.number)
    if baseline is not None and baseline.state.name == "COMPLETE":
        decision = decide(best.value, baseline.value, mode=mode, baseline_trial=baseline.number, **common)
        return decision, best_chosen if decision.tuned else Chosen(
            dict(baseline.params), baseline.value, baseline.number
        )
    margin = max(float(min_margin), noise or 0.0)
    if baseline is None and not baseline_requested:
        reason = (
            f"best {best.value:.3f}; no baseline trial for the job's settings in the study (baseline "
            "disabled): using the best trial's settings without a comparison with the defaults"
        )
        return Decision(TUNED, float(best.value), None, margin, reason, **common), best_chosen
    state = "did not run" if baseline is None else f"ended {baseline.state.name}"
    reason = (
        f"best {best.value:.3f}; the baseline trial {state} before the full schedule, so the search cannot "
        "show that it beats the defaults; keeping the defaults"
    )
    number = None if baseline is None else baseline.number
    return (
        Decision(KEPT_DEFAULTS, float(best.value), None, margin, reason, baseline_trial=number, **common),
        Chosen(dict(point), None, number),
    )


def baseline_protecting_asha(**kwargs: Any):
    """ASHAScheduler(**kwargs) that records the baseline trial's results in its rungs but never stops it before
    max_t (the trial's Tune config carries BASELINE_KEY)."""
    from ray.tune.schedulers import (  # noqa: PLC0415 (Ray reads its settings on first import)
        ASHAScheduler,
        TrialScheduler,
    )

    class BaselineProtectingASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            action = super().on_trial_result(tune_controller, trial, result)
            if (
                action == TrialScheduler.STOP
                and (trial.config or {}).get(BASELINE_KEY)
                and int(result.get(self._time_attr) or 0) < self._max_t
            ):
                self._num_stopped -= 1
                return TrialScheduler.CONTINUE
            return action

    return BaselineProtectingASHA(**kwargs)


__all__ = [
    "BASELINE_ATTR",
    "BASELINE_KEY",
    "Chosen",
    "DEFAULT_MIN_MARGIN",
    "Decision",
    "KEPT_DEFAULTS",
    "TUNED",
    "baseline_protecting_asha",
    "decide",
    "find_baseline",
    "judge",
    "near_identical_spread",
]
