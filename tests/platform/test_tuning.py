"""The search job: Ray Tune + Optuna + ASHA over the Ray Train job, on the real local stack (and its pure parts)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from supersimplenet.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "battery_weld.yaml"
SPACE = REPO / "jobs" / "configs" / "search_space.yaml"


# ---------------------------------------------------------------------------------------------------------------
# Pure parts (no services)
# ---------------------------------------------------------------------------------------------------------------
def _base_job(**extra: str):
    from ssn_platform.jobconfig import load_job_config

    overrides = {"dataset": "s3://ssn/datasets/battery-weld/latest", **extra}
    return load_job_config(CONFIG, [f"{k}={v}" for k, v in overrides.items()])


def test_default_space_file_is_relative_sigma_and_threshold():
    from ssn_platform.search_space import SearchSpace

    space = SearchSpace.load(SPACE)
    params = {p.key: p for p in space.params}
    assert set(params) == {"model.noise_std", "model.perlin_threshold"}
    assert params["model.noise_std"].distribution == "log_uniform"
    assert params["model.noise_std"].low <= 0.5 and params["model.noise_std"].high >= 4.0
    assert (params["model.perlin_threshold"].low, params["model.perlin_threshold"].high) == (0.05, 0.9)
    assert space.fixed == {"model.noise_std_mode": "relative"}


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"params": {}}, "no parameters"),
        ({"params": {"model.noise_std": {"distribution": "gauss", "low": 0, "high": 1}}}, "distribution"),
        ({"params": {"model.noise_std": {"distribution": "log_uniform", "low": 0, "high": 1}}}, "low > 0"),
        ({"params": {"model.noise_std": {"distribution": "uniform", "low": 2, "high": 1}}}, "low < high"),
        ({"params": {"noise_std": {"distribution": "uniform", "low": 0, "high": 1}}}, "dotted"),
        ({"params": {"model.noise_std": {"distribution": "uniform", "low": 0, "high": 1, "step": 2}}}, "unknown"),
        (
            {
                "params": {"model.noise_std": {"distribution": "uniform", "low": 0, "high": 1}},
                "fixed": {"model.noise_std": 1.0},
            },
            "both searched and fixed",
        ),
        ({"space": {}}, "unknown top-level"),
    ],
)
def test_bad_search_spaces_are_rejected(raw, message):
    from ssn_platform.search_space import SearchSpace

    with pytest.raises(ConfigError, match=message):
        SearchSpace.from_dict(raw)


def test_an_auto_search_ranks_real_defects_by_the_models_score_and_synthetic_ones_by_the_combined_score():
    from supersimplenet.config import IMAGE_SCORES
    from ssn_platform.tuning import AUTO_METRIC, OBJECTIVES, resolve_metric

    assert resolve_metric(AUTO_METRIC, "split") == "val_image_auroc"
    assert resolve_metric(AUTO_METRIC, "synthetic") == "val_image_auroc_combined"
    assert resolve_metric("val_pixel_auroc", "synthetic") == "val_pixel_auroc"  # a named metric is kept
    # the patch memory's score does not move with the searched head settings: labelled val images judge the heads
    assert resolve_metric(AUTO_METRIC, "split", "memory") == "val_image_auroc_map_top1"
    assert resolve_metric(AUTO_METRIC, "synthetic", "memory") == "val_image_auroc_combined"
    # every objective is a metric the trials report (training._validation_metrics: val_image_auroc_<score>)
    reported = {"val_image_auroc"} | {f"val_image_auroc_{score}" for score in IMAGE_SCORES}
    assert set(OBJECTIVES.values()) <= reported


def test_trial_params_become_a_validated_job_and_lr_scale_moves_both_rates():
    from ssn_platform.search_space import apply_params

    base = _base_job()
    job = apply_params(
        base,
        {"model.noise_std": 2.5, "model.perlin_threshold": 0.4, "train.lr_scale": 2.0},
        {"model.noise_std_mode": "relative"},
        validation="synthetic",
        register=False,
        run_name="t-1",
    )
    assert (job.model.noise_std, job.model.perlin_threshold, job.model.noise_std_mode) == (2.5, 0.4, "relative")
    assert job.train.lr_adaptor == pytest.approx(2 * base.train.lr_adaptor)
    assert job.train.lr_heads == pytest.approx(2 * base.train.lr_heads)
    assert (job.validation, job.register, job.run_name) == ("synthetic", False, "t-1")
    with pytest.raises(ConfigError):
        apply_params(base, {"model.noise_std": -1.0})  # the job's own validation applies


def test_tuned_settings_file_gives_overrides_for_the_train_job(tmp_path):
    from ssn_platform.jobconfig import load_job_config
    from ssn_platform.tuned_settings import TUNED_SCHEMA, tuned_settings_overrides

    path = tmp_path / "tuned.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "schema": TUNED_SCHEMA,
                "product": "battery-weld",
                "backbone": "efficientnet_lite0",
                "overrides": ["model.noise_std_mode=relative", "model.noise_std=2.75", "model.perlin_threshold=0.31"],
            }
        )
    )
    overrides = tuned_settings_overrides(path, backbone="efficientnet_lite0", product="battery-weld")
    job = load_job_config(CONFIG, [*overrides, "train.epochs=3", "dataset=s3://ssn/datasets/x/latest"])
    assert (job.model.noise_std, job.model.perlin_threshold, job.train.epochs) == (2.75, 0.31, 3)
    with pytest.raises(ConfigError, match="backbone"):
        tuned_settings_overrides(path, backbone="wide_resnet50")
    (tmp_path / "other.yaml").write_text("noise_std: 1\n")
    with pytest.raises(ConfigError, match="not a tuned settings"):
        tuned_settings_overrides(tmp_path / "other.yaml")


def test_storage_url_defaults_and_redaction(monkeypatch, tmp_path):
    from ssn_platform.study import default_storage_url, redact_url

    monkeypatch.delenv("SSN_OPTUNA_STORAGE", raising=False)
    monkeypatch.setenv("SSN_STACK_DIR", str(tmp_path))
    assert default_storage_url() == f"sqlite:///{tmp_path.resolve()}/mlflow/optuna.db"
    monkeypatch.setenv("SSN_OPTUNA_STORAGE", "postgresql://ssn:secret@db:5432/optuna")
    assert default_storage_url() == "postgresql://ssn:secret@db:5432/optuna"
    assert redact_url(default_storage_url()) == "postgresql://ssn:***@db:5432/optuna"


SEARCHER_SCRIPT = r"""
import sys
import optuna
from ssn_platform.search_space import SearchSpace
from ssn_platform.study import STUDY_TRIAL_KEY, _make_searcher_class, open_storage

url, space_file = sys.argv[1], sys.argv[2]
space = SearchSpace.load(space_file)
searcher_class = _make_searcher_class()

def searcher(seed):
    return searcher_class(space=space.optuna_space(), metric="val_image_auroc", mode="max",
                          sampler=optuna.samplers.TPESampler(seed=seed), study_name="s",
                          storage=open_storage(url), max_t=3, search_name=f"search-{seed}")

first = searcher(1)
config = first.suggest("a")
assert config[STUDY_TRIAL_KEY] == 0 and set(config) == {*space.keys, STUDY_TRIAL_KEY}, config
first.on_trial_result("a", {"val_image_auroc": 0.6, "training_iteration": 1})
first.on_trial_complete("a", {"val_image_auroc": 0.55, "training_iteration": 2})  # stopped before max_t
first.suggest("b")
first.on_trial_complete("b", {"val_image_auroc": 0.8, "training_iteration": 3})  # full schedule
second = searcher(2)  # a new search on the stored study
assert second.suggest("c")[STUDY_TRIAL_KEY] == 2
study = optuna.load_study(study_name="s", storage=url)
assert [t.state.name for t in study.trials] == ["PRUNED", "COMPLETE", "RUNNING"]
assert study.trials[0].value == 0.55 and study.trials[0].intermediate_values == {1: 0.6, 2: 0.55}
assert study.trials[0].user_attrs["stopped_early"] is True
assert study.best_trial.number == 1
print("ok")
"""


def test_searcher_records_asha_stops_as_pruned_with_their_value_and_continues_numbering(tmp_path):
    """The resume mechanism at the Optuna level: a second searcher on the same stored study appends trials.

    Runs in a subprocess: Ray reads its settings (auth mode, loopback handling) when first imported, and this
    process must not import it before the live stack's environment is applied."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    proc = subprocess.run(
        [sys.executable, "-c", SEARCHER_SCRIPT, url, str(SPACE)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_study_plots_survive_a_study_too_small_for_importances(tmp_path):
    import optuna

    from ssn_platform.search_space import SearchSpace
    from ssn_platform.study import write_study_plots

    space = SearchSpace.load(SPACE)
    study = optuna.create_study(direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(
            params={"model.noise_std": 1.0, "model.perlin_threshold": 0.2},
            distributions=space.optuna_space(),
            value=0.7,
            intermediate_values={1: 0.6, 2: 0.7},
        )
    )
    written = write_study_plots(study, space, tmp_path)
    assert tmp_path / "optimization_history.png" in written
    assert all(p.stat().st_size > 0 for p in written)
    assert (tmp_path / "skipped.json").is_file() or len(written) == 4


# ---------------------------------------------------------------------------------------------------------------
# Best vs baseline: the keep-the-defaults rule (ssn_platform.tuned), no services
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "best, baseline, mode, decision, text",
    [
        (0.712, 0.621, "max", "tuned", "+0.091 clears the margin 0.020"),
        (0.632, 0.621, "max", "kept_defaults", "+0.011 does not clear the margin 0.020 (--min-margin); keeping"),
        (0.64, 0.62, "max", "kept_defaults", "+0.020 does not clear"),  # exactly the margin is not enough
        (0.50, 0.70, "max", "kept_defaults", "-0.200 does not clear"),  # the case: worse than the defaults
        (0.40, 0.45, "min", "tuned", "-0.050 (lower is better) clears"),
        (0.44, 0.45, "min", "kept_defaults", "does not clear"),
        (0.50, 0.45, "min", "kept_defaults", "+0.050 (lower is better) does not clear"),
    ],
)
def test_best_replaces_the_defaults_only_beyond_the_margin(best, baseline, mode, decision, text):
    from ssn_platform.tuned import decide

    result = decide(best, baseline, mode=mode, min_margin=0.02, best_trial=3, baseline_trial=0)
    assert result.decision == decision and result.tuned == (decision == "tuned")
    assert (result.best_value, result.baseline_value, result.margin) == (best, baseline, 0.02)
    assert text in result.reason and f"best {best:.3f} vs defaults {baseline:.3f}" in result.reason
    fields = result.document_fields()
    assert {k: fields[k] for k in ("decision", "baseline_value", "best_value", "margin", "reason")} == {
        "decision": decision,
        "baseline_value": baseline,
        "best_value": best,
        "margin": 0.02,
        "reason": result.reason,
    }
    assert result.tags()["ssn.tuned.decision"] == decision and result.tags()["ssn.tuned.margin"] == "0.020000"


def test_spread_of_nearly_identical_trials_widens_the_margin_but_never_narrows_it():
    from ssn_platform.tuned import decide

    wide = decide(0.75, 0.70, mode="max", min_margin=0.02, noise=0.06, noise_pairs=2)
    assert wide.decision == "kept_defaults" and wide.margin == 0.06
    assert "largest spread of 2 nearly identical trial pairs" in wide.reason
    narrow = decide(0.75, 0.70, mode="max", min_margin=0.02, noise=0.004, noise_pairs=1)
    assert narrow.decision == "tuned" and narrow.margin == 0.02 and "(--min-margin)" in narrow.reason


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"baseline_value": None}, "no baseline value"),
        ({"baseline_value": float("nan")}, "finite"),
        ({"min_margin": -0.01}, "min_margin"),
        ({"mode": "maximize"}, "mode"),
    ],
)
def test_decision_refuses_a_missing_baseline_and_bad_input(kwargs, message):
    from ssn_platform.tuned import decide

    arguments = {"best_value": 0.8, "baseline_value": 0.7, "mode": "max", "min_margin": 0.02, **kwargs}
    with pytest.raises(ValueError, match=message):
        decide(**arguments)


def _trial(number, sigma, threshold, value, state="COMPLETE", **attrs):
    from types import SimpleNamespace

    return SimpleNamespace(
        number=number,
        params={"model.noise_std": sigma, "model.perlin_threshold": threshold},
        value=value,
        state=SimpleNamespace(name=state),
        user_attrs={"max_t": 2, **attrs},
    )


def test_noise_is_the_largest_spread_between_trials_at_nearly_identical_settings():
    from ssn_platform.tuned import near_identical_spread
    from ssn_platform.search_space import SearchSpace

    params = SearchSpace.load(SPACE).params  # sigma log-uniform 0.1..8 (5 %: x1.245), threshold 0.05..0.9 (0.0425)
    trials = [
        _trial(0, 4.0, 0.20, 0.70),
        _trial(1, 4.4, 0.22, 0.66),
        _trial(2, 4.2, 0.21, 0.71),
        _trial(3, 1.4, 0.51, 0.90),
        _trial(4, 4.0, 0.30, 0.50),
    ]
    assert near_identical_spread(trials, params) == (pytest.approx(0.05), 3)  # pairs 0-1, 0-2, 1-2
    assert near_identical_spread(trials[3:], params) == (None, 0)


def _study_with(*trials):
    import optuna

    from ssn_platform.search_space import SearchSpace

    space = SearchSpace.load(SPACE).optuna_space()
    study = optuna.create_study(direction="maximize")
    for params, value, state, attrs in trials:
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=space,
                value=value if state == "COMPLETE" else None,
                state=getattr(optuna.trial.TrialState, state),
                user_attrs={"max_t": 2, **attrs},
            )
        )
    return study


DEFAULTS = {"model.noise_std": 4.0, "model.perlin_threshold": 0.2}
SIGMA_1_4 = {"model.noise_std": 1.4, "model.perlin_threshold": 0.51}


@pytest.mark.parametrize(
    "values, decision, written",
    [
        ((0.70, 0.71), "kept_defaults", DEFAULTS),
        ((0.70, 0.80), "tuned", SIGMA_1_4),
    ],
)
def test_judge_writes_the_best_or_the_baseline_settings(values, decision, written):
    from ssn_platform.tuned import judge
    from ssn_platform.search_space import SearchSpace
    from ssn_platform.study import _best_trial

    study = _study_with(
        (DEFAULTS, values[0], "COMPLETE", {"ssn.baseline": True}), (SIGMA_1_4, values[1], "COMPLETE", {})
    )
    result, chosen = judge(
        study,
        SearchSpace.load(SPACE).params,
        _best_trial(study),
        DEFAULTS,
        max_t=2,
        mode="max",
        min_margin=0.02,
        baseline_requested=True,
    )
    assert (result.decision, result.baseline_trial, result.best_trial) == (decision, 0, 1)
    assert result.baseline_value == values[0] and result.best_value == values[1]
    assert chosen.params == written and chosen.value == values[written is SIGMA_1_4]


def test_judge_without_a_complete_baseline():
    from ssn_platform.tuned import judge
    from ssn_platform.search_space import SearchSpace
    from ssn_platform.study import _best_trial

    params = SearchSpace.load(SPACE).params
    no_baseline = _study_with((SIGMA_1_4, 0.8, "COMPLETE", {}))
    best = _best_trial(no_baseline)
    # opted out (--no-baseline) and none in the study: the best trial, said to be uncompared
    result, chosen = judge(
        no_baseline, params, best, DEFAULTS, max_t=2, mode="max", min_margin=0.02, baseline_requested=False
    )
    assert result.decision == "tuned" and result.baseline_value is None and chosen.params == SIGMA_1_4
    assert "without a comparison" in result.reason
    # requested but it failed (or did not run): the defaults are kept, with the job's own values
    failed = _study_with((DEFAULTS, None, "FAIL", {"ssn.baseline": True}), (SIGMA_1_4, 0.8, "COMPLETE", {}))
    result, chosen = judge(
        failed, params, _best_trial(failed), DEFAULTS, max_t=2, mode="max", min_margin=0.02, baseline_requested=True
    )
    assert result.decision == "kept_defaults" and result.baseline_trial == 0 and "ended FAIL" in result.reason
    assert chosen.params == DEFAULTS and chosen.value is None
    # a baseline of other defaults (or another max_t) is not this job's baseline
    other = _study_with(
        ({"model.noise_std": 2.0, "model.perlin_threshold": 0.2}, 0.7, "COMPLETE", {"ssn.baseline": True}),
        (SIGMA_1_4, 0.8, "COMPLETE", {}),
    )
    result, _ = judge(
        other, params, _best_trial(other), DEFAULTS, max_t=2, mode="max", min_margin=0.02, baseline_requested=True
    )
    assert result.decision == "kept_defaults" and "did not run" in result.reason


def test_kept_defaults_document_gives_the_baseline_values_to_the_train_job(tmp_path):
    from ssn_platform.jobconfig import load_job_config
    from ssn_platform.tuned import Chosen, decide
    from ssn_platform.search_space import SearchSpace
    from ssn_platform.tuned_settings import tuned_settings_document, tuned_settings_overrides

    job = _base_job(**{"model.noise_std": "3.0", "model.perlin_threshold": "0.25"})
    decision = decide(0.632, 0.621, mode="max", min_margin=0.02, best_trial=5, baseline_trial=0)
    chosen = Chosen({"model.noise_std": 3.0, "model.perlin_threshold": 0.25}, 0.621, 0)
    document = tuned_settings_document(
        job,
        SearchSpace.load(SPACE),
        chosen,
        metric="val_image_auroc",
        mode="max",
        study_name="s",
        validation="split",
        search_name="tune-x",
        parent_run_id="p",
        best_run_id=None,
        decision=decision,
    )
    assert document["decision"] == "kept_defaults" and document["reason"] == decision.reason
    assert (document["value"], document["baseline_value"], document["best_value"]) == (0.621, 0.621, 0.632)
    assert (document["study_trial"], document["best_trial"], document["margin"]) == (0, 5, 0.02)
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    tuned = load_job_config(
        CONFIG, [*tuned_settings_overrides(path, backbone=job.model.backbone), f"dataset={job.dataset}"]
    )
    assert (tuned.model.noise_std, tuned.model.perlin_threshold, tuned.model.noise_std_mode) == (3.0, 0.25, "relative")


BASELINE_SCRIPT = r"""
import sys
from types import SimpleNamespace
import optuna
from ray.tune.schedulers import TrialScheduler
from ssn_platform.tuned import BASELINE_KEY, baseline_protecting_asha
from ssn_platform.search_space import SearchSpace
from ssn_platform.study import STUDY_TRIAL_KEY, _make_searcher_class, open_storage

url, space_file = sys.argv[1], sys.argv[2]
space = SearchSpace.load(space_file)
baseline = {"model.noise_std": 4.0, "model.perlin_threshold": 0.2}
point = {"model.noise_std": 1.0, "model.perlin_threshold": 0.5}
searcher = _make_searcher_class()(space=space.optuna_space(), metric="val_image_auroc", mode="max",
                                  sampler=optuna.samplers.TPESampler(seed=1), study_name="s",
                                  storage=open_storage(url), max_t=3, search_name="x", baseline=baseline,
                                  points=[point])
first, second, third = searcher.suggest("a"), searcher.suggest("b"), searcher.suggest("c")
assert first == {**baseline, STUDY_TRIAL_KEY: 0, BASELINE_KEY: True}, first
assert second == {**point, STUDY_TRIAL_KEY: 1} and BASELINE_KEY not in third, (second, third)
study = optuna.load_study(study_name="s", storage=url)
assert [t.user_attrs.get("ssn.baseline") for t in study.trials] == [True, None, None]

scheduler = baseline_protecting_asha(time_attr="training_iteration", metric="m", mode="max", grace_period=1,
                                     reduction_factor=2, max_t=3)
def trial(name, config):
    t = SimpleNamespace(trial_id=name, config=config)
    scheduler.on_trial_add(None, t)
    return t
good, base, poor = trial("good", {}), trial("base", {BASELINE_KEY: True}), trial("poor", {})
result = lambda it, m: {"training_iteration": it, "m": m}
assert scheduler.on_trial_result(None, good, result(1, 0.9)) == TrialScheduler.CONTINUE
assert scheduler.on_trial_result(None, base, result(1, 0.1)) == TrialScheduler.CONTINUE  # plain ASHA: STOP
assert scheduler.on_trial_result(None, poor, result(1, 0.05)) == TrialScheduler.STOP
assert scheduler.on_trial_result(None, base, result(2, 0.1)) == TrialScheduler.CONTINUE
assert scheduler.on_trial_result(None, base, result(3, 0.1)) == TrialScheduler.STOP  # max_t: ends as usual
assert scheduler._num_stopped == 2
print("ok")
"""


def test_baseline_trial_comes_first_is_marked_and_asha_never_stops_it(tmp_path):
    """In a subprocess for the reason given above (Ray must not be imported in the test process)."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    proc = subprocess.run(
        [sys.executable, "-c", BASELINE_SCRIPT, url, str(SPACE)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# On the live stack: a small search on the weld data, then a resumed one
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def search_setup(live_stack, weld_val_dataset, tmp_path_factory):
    product = f"weld-tune-{uuid.uuid4().hex[:6]}"
    job = _base_job(
        **{
            "dataset": weld_val_dataset,
            "product": product,
            "train.epochs": "2",
            "train.batch_size": "8",
            "model.image_size": "[128,72]",
            "scaling.num_workers": "1",
            "max_failures": "0",
            # fp32, not the weld config's bf16: first_search's scenario (which trials score low at epoch 1, so that ASHA
            # stops one) was measured in fp32; bf16 rounds this tiny 2-epoch run onto another trajectory
            "train.precision": "fp32",
        }
    )
    storage = f"sqlite:///{tmp_path_factory.mktemp('optuna') / 'optuna.db'}"
    return {"job": job, "storage": storage, "study": f"test-{product}"}


@pytest.fixture(scope="module")
def first_search(search_setup):
    from ssn_platform.tuning import run_search

    # trial 0 is the baseline (the job's relative sigma 4.0, threshold 0.2), which ASHA never stops; seed 42's
    # first TPE (random start-up) points after it are sigma 4.26 and then 0.11 and 0.53. One trial at a time, so
    # the order in which trials reach the epoch-1 rung does not depend on the machine's speed (with 2 concurrent
    # trials a fresh CI machine once let the low-sigma trial arrive first and ASHA stopped none): sigma 0.11 (val
    # AUROC ~0.47 after one epoch on this set) reaches the rung after the baseline and sigma 4.26 (~0.7) and falls
    # below ASHA's cutoff (the 75th percentile of the rung, reduction factor 4), so ASHA stops at least one.
    return run_search(
        search_setup["job"],
        space=SPACE,
        num_trials=4,
        max_concurrent=1,
        study_name=search_setup["study"],
        storage=search_setup["storage"],
        grace_period=1,
    )


@pytest.mark.stack
@pytest.mark.heavy
def test_search_finishes_and_asha_stops_a_trial(first_search):
    result = first_search
    # auto, with real defects; the weld config reports the patch memory's score, which the searched head settings
    # do not move, so the heads' map score is the objective
    assert result.validation == "split" and result.metric == "val_image_auroc_map_top1"
    assert len(result.session_trials) == 4 and len(result.trials) == 4
    assert result.stopped_early, "ASHA stopped no trial"
    stopped = [t for t in result.trials if t.number in result.stopped_early]
    assert all(t.state == "PRUNED" and t.epochs_reached == 1 and t.value is not None for t in stopped)
    complete = [t for t in result.trials if t.state == "COMPLETE"]
    assert complete and all(t.epochs_reached == 2 for t in complete)
    assert result.best_trial in {t.number for t in complete}
    assert result.best_value == max(t.value for t in complete)


@pytest.mark.stack
@pytest.mark.heavy
def test_parent_and_nested_trial_runs_are_in_mlflow(first_search, search_setup):
    from mlflow import MlflowClient

    client = MlflowClient()
    parent = client.get_run(first_search.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["ssn.tune.study"] == search_setup["study"]
    # ssn.tuned.* describe the settings written: the best trial's, or the baseline's when the defaults were kept
    assert float(parent.data.tags["ssn.tuned.value"]) == pytest.approx(first_search.tuned_settings["value"])
    assert parent.data.tags["ssn.tuned.model.noise_std"] == str(first_search.tuned_params["model.noise_std"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 4
    by_run = {t.mlflow_run_id: t for t in first_search.trials}
    max_t = search_setup["job"].train.epochs
    for child in children:
        trial = by_run[child.info.run_id]
        history = sorted(client.get_metric_history(child.info.run_id, first_search.metric), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(len(history)))
        # the epochs Tune judged are all logged, with the value Tune saw; a stopped trial's workers may have
        # finished one more epoch before the stop reached them
        assert trial.epochs_reached <= len(history) <= min(trial.epochs_reached + 1, max_t)
        assert history[trial.epochs_reached - 1].value == pytest.approx(trial.value, abs=1e-12)
        assert child.data.tags["ssn.tune.epochs_reached"] == str(trial.epochs_reached)
        if trial.stopped_early:
            assert child.data.tags["ssn.tune.stopped_early"] == "true"
            assert child.info.status == "KILLED" or (child.info.status == "FINISHED" and len(history) == max_t)
        else:
            assert child.info.status == "FINISHED" and "ssn.tune.stopped_early" not in child.data.tags
        assert child.data.params["validation"] == "split" and child.data.params["register"] == "False"
        # the weld val split has defect masks: the pixel AUROC and the image-and-pixel objective are logged too
        metrics = child.data.metrics
        assert 0.0 <= metrics["val_pixel_auroc"] <= 1.0
        assert metrics["val_image_pixel_auroc"] == pytest.approx(
            0.5 * (metrics["val_image_auroc"] + metrics["val_pixel_auroc"]), abs=1e-9
        )
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"tuned_settings.yaml", "trials.csv", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/contour_sigma_threshold.png"} <= plots


@pytest.mark.stack
@pytest.mark.heavy
def test_tuned_settings_are_written_to_s3_and_apply_to_a_train_job(first_search, search_setup):
    import mlflow
    from mlflow import MlflowClient

    from ssn_platform.jobconfig import load_job_config
    from ssn_platform.s3keys import parse_s3_uri
    from ssn_platform.storage import S3Settings, get_bytes, make_client
    from ssn_platform.tuned_settings import tuned_settings_overrides

    job = search_setup["job"]
    assert first_search.tuned_uri == f"s3://ssn/tuned/{job.product}/efficientnet_lite0.yaml"
    bucket, key = parse_s3_uri(first_search.tuned_uri)
    stored = yaml.safe_load(get_bytes(make_client(S3Settings.from_env()), bucket, key))
    artifact = yaml.safe_load(
        Path(
            mlflow.artifacts.download_artifacts(run_id=first_search.parent_run_id, artifact_path="tuned_settings.yaml")
        ).read_text()
    )
    assert stored == artifact
    for field in ("product", "backbone", "noise_std", "noise_std_mode", "perlin_threshold", "metric", "value", "study"):
        assert field in stored
    # the baseline: trial 0, the job's own settings, run to the full schedule (ASHA never stops it)
    baseline = [t for t in first_search.trials if t.baseline]
    assert [t.number for t in baseline] == [0] and first_search.decision.baseline_trial == 0
    assert baseline[0].params == {
        "model.noise_std": job.model.noise_std,
        "model.perlin_threshold": job.model.perlin_threshold,
    }
    assert baseline[0].state == "COMPLETE" and baseline[0].epochs_reached == job.train.epochs
    assert MlflowClient().get_run(baseline[0].mlflow_run_id).data.tags["ssn.tune.baseline"] == "true"
    # the written settings change the defaults only when best - baseline clears the margin
    assert stored["baseline_value"] == baseline[0].value and stored["best_value"] == first_search.best_value
    assert stored["margin"] >= 0.02
    tuned = first_search.best_value - baseline[0].value > stored["margin"] + 1e-9
    assert stored["decision"] == ("tuned" if tuned else "kept_defaults") == first_search.decision.decision
    expected = first_search.best_params if tuned else baseline[0].params
    assert first_search.tuned_params == expected
    assert stored["value"] == (first_search.best_value if tuned else baseline[0].value)
    assert stored["noise_std"] == expected["model.noise_std"]
    assert stored["noise_std_mode"] == "relative" and stored["study"] == search_setup["study"]
    overrides = tuned_settings_overrides(first_search.tuned_uri, backbone=job.model.backbone)
    tuned_job = load_job_config(CONFIG, [*overrides, f"dataset={job.dataset}"])
    assert tuned_job.model.perlin_threshold == expected["model.perlin_threshold"]
    assert tuned_job.model.noise_std == expected["model.noise_std"]
    tags = MlflowClient().get_run(first_search.parent_run_id).data.tags
    assert tags["ssn.tuned.decision"] == stored["decision"] and tags["ssn.tuned.reason"] == stored["reason"]
    assert float(tags["ssn.tuned.baseline_value"]) == pytest.approx(baseline[0].value)
    assert float(tags["ssn.tuned.margin"]) == pytest.approx(stored["margin"])


@pytest.mark.stack
@pytest.mark.heavy
def test_running_the_same_study_again_adds_trials(first_search, search_setup):
    import optuna
    from mlflow import MlflowClient

    from ssn_platform.tuning import run_search

    second = run_search(
        search_setup["job"],
        space=SPACE,
        num_trials=2,
        max_concurrent=2,
        study_name=search_setup["study"],
        storage=search_setup["storage"],
        grace_period=1,
    )
    study = optuna.load_study(study_name=search_setup["study"], storage=search_setup["storage"])
    assert len(study.trials) == 6 and len(second.trials) == 6
    assert sorted(second.session_trials) == [4, 5]
    assert [t.number for t in second.trials if t.baseline] == [0]  # the study's baseline is reused, not rerun
    assert second.parent_run_id != first_search.parent_run_id
    # the new trials were proposed afresh (the sampler seed moves with the study), not replayed
    earlier = {tuple(sorted(t.params.items())) for t in first_search.trials}
    assert all(tuple(sorted(t.params.items())) not in earlier for t in second.trials if t.number >= 4)
    # the best of the whole study, earlier trials included
    complete = [t for t in second.trials if t.state == "COMPLETE"]
    assert second.best_value == max(t.value for t in complete)
    parent = MlflowClient().get_run(second.parent_run_id)
    assert parent.data.tags["ssn.tune.trials_before"] == "4" and parent.data.tags["ssn.tune.trials_total"] == "6"
    assert int(parent.data.tags["ssn.tune.asha_seeded_values"]) >= 4
    assert study.user_attrs["ssn.sessions"] == [first_search.parent_run_id, second.parent_run_id]


def test_a_search_over_backbones_names_its_study_and_writes_settings_that_choose_the_backbone(tmp_path):
    from ssn_platform.jobconfig import load_job_config
    from ssn_platform.tuned import Chosen
    from ssn_platform.search_space import SearchSpace, apply_params
    from ssn_platform.study import backbone_label, default_study_name
    from ssn_platform.tuned_settings import tuned_settings_document, tuned_settings_overrides

    job = _base_job()
    raw = yaml.safe_load(SPACE.read_text())
    raw["params"]["model.backbone"] = {
        "distribution": "categorical",
        "choices": ["efficientnet_lite1", "efficientnet_lite0"],
    }
    space = SearchSpace.load(raw)
    assert space.backbones == ("efficientnet_lite1", "efficientnet_lite0")
    assert default_study_name(job, space) == f"ssn-{job.product}-backbones"
    assert backbone_label(job, space) == "searched:efficientnet_lite0|efficientnet_lite1"
    assert default_study_name(job, SearchSpace.load(SPACE)) == f"ssn-{job.product}-efficientnet_lite0"
    trial = apply_params(job, {"model.backbone": "efficientnet_lite1", "model.noise_std": 2.5}, space.fixed)
    assert trial.model.backbone == "efficientnet_lite1" and trial.model.noise_std_mode == "relative"
    assert trial.model.noise_std == 2.5 and trial.model.image_score == job.model.image_score

    chosen = Chosen(
        {"model.backbone": "efficientnet_lite1", "model.noise_std": 2.5, "model.perlin_threshold": 0.3}, 0.9, 4
    )
    document = tuned_settings_document(
        job,
        space,
        chosen,
        metric="val_image_auroc",
        mode="max",
        study_name="s",
        validation="synthetic",
        search_name="tune-x",
        parent_run_id="p",
        best_run_id=None,
    )
    assert document["backbone"] == "efficientnet_lite1"
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    # a job configured for Lite0 takes settings that chose Lite1: they say so themselves
    tuned = load_job_config(
        CONFIG, [*tuned_settings_overrides(path, backbone="efficientnet_lite0"), f"dataset={job.dataset}"]
    )
    assert (tuned.model.backbone, tuned.model.noise_std, tuned.model.perlin_threshold) == (
        "efficientnet_lite1",
        2.5,
        0.3,
    )
    # settings tuned for one backbone (no backbone in their overrides) are still refused for another
    single = dict(document, overrides=[o for o in document["overrides"] if not o.startswith("model.backbone=")])
    path.write_text(yaml.safe_dump(single, sort_keys=False))
    with pytest.raises(ConfigError, match="tuned for backbone 'efficientnet_lite1'"):
        tuned_settings_overrides(path, backbone="efficientnet_lite0")


def test_a_second_search_on_a_study_fails_only_the_trials_of_searches_that_stopped_renewing_their_lease(tmp_path):
    import time

    from optuna.trial import TrialState

    from ssn_platform import study as study_module
    from ssn_platform.study import LEASE_GRACE_S, SearchLease, _prepare_study

    url, job = f"sqlite:///{tmp_path / 'study.db'}", _base_job()
    _, study = _prepare_study(url, "shared", job, metric="val_image_auroc", mode="max", backbone="lite0")

    def running_trial(search: str | None) -> int:
        trial = study.ask()
        if search:
            trial.set_user_attr("search", search)
        return trial.number

    live, ended, stale, orphan = (running_trial(s) for s in ("live", "ended", "stale", None))
    with SearchLease(study, "live", interval=0.05):
        with SearchLease(study, "ended"):
            pass  # a search that finished (its lease says 0) but left a trial RUNNING
        study.set_user_attr("ssn.lease.stale", time.time() - LEASE_GRACE_S - 1)  # a search that died
        time.sleep(0.2)  # the live lease is renewed meanwhile
        assert time.time() - study.user_attrs["ssn.lease.live"] < 1.0
        _, again = _prepare_study(url, "shared", job, metric="val_image_auroc", mode="max", backbone="lite0")
        states = {t.number: t.state for t in again.get_trials(deepcopy=False)}
        assert states[live] == TrialState.RUNNING  # another live search's trial is left alone
        assert states[ended] == states[stale] == states[orphan] == TrialState.FAIL
    assert study.user_attrs["ssn.lease.live"] == 0.0  # released when the search ends
    _, last = _prepare_study(url, "shared", job, metric="val_image_auroc", mode="max", backbone="lite0")
    assert {t.number: t.state for t in last.get_trials(deepcopy=False)}[live] == TrialState.FAIL
    assert study_module.LEASE_INTERVAL_S < LEASE_GRACE_S / 3  # several beats fit in the grace period


def test_a_study_refuses_a_search_with_another_objective_and_names_the_one_it_has(tmp_path):
    from ssn_platform.study import _prepare_study

    url, job = f"sqlite:///{tmp_path / 'study.db'}", _base_job()
    _prepare_study(url, "s", job, metric="val_image_auroc", mode="max", backbone="lite0")
    with pytest.raises(ConfigError, match="ssn.metric='val_image_auroc'.*--metric val_image_auroc"):
        _prepare_study(url, "s", job, metric="val_image_auroc_combined", mode="max", backbone="lite0")
    _prepare_study(url, "s", job, metric="val_image_auroc", mode="max", backbone="lite0")  # the same one: fine


def test_validation_on_synthetic_defects_reports_the_auto_objective(weld_root):
    import torch

    from supersimplenet.backbones import load_backbone_weights
    from supersimplenet.layouts import read_layout
    from supersimplenet.model import build_model
    from supersimplenet.frozen import build_memory
    from ssn_platform.training import _validation_metrics
    from ssn_platform.worker_data import build_validation_set
    from supersimplenet.train import validation_loader
    from ssn_platform.tuning import OBJECTIVES

    job = _base_job(validation="synthetic", **{"model.image_size": "[96,96]"})
    normal = [s for s in read_layout(weld_root) if s.split == "train" and s.label == 0][:4]
    val_set = build_validation_set(job, weld_root, normal)
    torch.manual_seed(0)
    model = build_model(job.model)
    load_backbone_weights(model.feature_extractor.backbone, job.model.backbone, "default")
    build_memory(model, root=weld_root, samples=normal, device=torch.device("cpu"), seed=0)  # the weld config's
    device = torch.device("cpu")
    # the loader the training loop validates with: the val images' backbone levels computed once
    val_loader = validation_loader(model, val_set, device=device, batch_size=4, budget_bytes=2**30)
    metrics = _validation_metrics(model.eval(), val_loader, device)
    assert 0.0 <= metrics[OBJECTIVES["synthetic"]] <= 1.0
    assert {"val_image_auroc", "val_pixel_auroc", "val_image_auroc_map_top1"} <= set(metrics)
    # the weld config reports the memory's map; the heads' map, what the search moves, keeps val_pixel_auroc
    assert job.model.anomaly_map == "memory" and 0.0 <= metrics["val_pixel_auroc_memory"] <= 1.0


def test_asha_lets_a_trial_run_a_quarter_of_its_epochs_before_it_can_be_stopped():
    from ssn_platform.search_session import default_grace_period, plan_session

    assert [default_grace_period(e) for e in (1, 3, 4, 8, 15, 30)] == [1, 1, 1, 2, 3, 7]
    job = _base_job(**{"train.epochs": 8})
    assert (
        plan_session(
            job,
            SPACE,
            num_trials=2,
            study_name="s",
            storage="sqlite://",
            metric="auto",
            mode=None,
            grace_period=None,
            reduction_factor=2,
            min_margin=0.02,
            baseline=True,
        ).grace_period
        == 2
    )
    assert (
        plan_session(
            job,
            SPACE,
            num_trials=2,
            study_name="s",
            storage="sqlite://",
            metric="auto",
            mode=None,
            grace_period=1,
            reduction_factor=2,
            min_margin=0.02,
            baseline=True,
        ).grace_period
        == 1
    )
