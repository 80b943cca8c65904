"""Decision thresholds: the methods on hand-made cases, and calibration of a registered version on the real stack."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest

from ssn_platform.thresholds import (
    Threshold,
    ThresholdError,
    TooFewImagesWarning,
    calibrate,
    false_alarm_threshold,
    images_needed,
    rate_interval,
    rates_at,
    recall_threshold,
    threshold_from_tags,
)

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------------------
def test_false_alarm_is_the_conservative_quantile_of_normal_scores():
    normal = np.arange(1, 11) / 10.0  # 0.1 .. 1.0
    # 10% of 10 normals: one may be flagged, the highest
    assert false_alarm_threshold(normal, 0.1) == pytest.approx(1.0)
    assert false_alarm_threshold(normal, 0.2) == pytest.approx(0.9)
    assert false_alarm_threshold(normal, 0.25) == pytest.approx(0.9)  # floor(2.5) = 2 flagged at most
    # fewer normals than 1/far: none may be flagged, so the threshold lies just above the highest score
    strict = false_alarm_threshold(normal, 0.01)
    assert strict > 1.0 and strict == np.nextafter(1.0, 2.0)
    # ties: 3 equal scores may not all be flagged when only 2 may
    tied = false_alarm_threshold([0.5, 0.9, 0.9, 0.9], 0.5)
    assert tied > 0.9 and rates_at(tied, [0.5, 0.9, 0.9, 0.9], [0, 0, 0, 0])["false_alarm_rate"] == 0.0
    with pytest.raises(ThresholdError):
        false_alarm_threshold([], 0.1)
    with pytest.raises(ThresholdError):
        false_alarm_threshold([0.1], 1.5)


@pytest.mark.parametrize("far", [0.01, 0.05, 0.1, 0.3])
def test_false_alarm_rate_holds_on_the_calibration_scores(far):
    rng = np.random.default_rng(7)
    normal = rng.beta(2, 5, size=400)
    result = calibrate(normal, np.zeros(400), method="false_alarm", false_alarm_rate=far)
    flagged = np.mean(normal >= result.value)
    assert flagged <= far + 1e-12
    lower = normal[normal < result.value].max()  # the next observed score down would flag too many
    assert np.mean(normal >= lower) > far
    assert result.method == "false_alarm" and result.n_normal == 400 and result.n_defective == 0
    assert result.achieved["false_alarm_rate"] == pytest.approx(flagged)


def test_f1_method_uses_the_f1_optimal_threshold():
    scores = [0.1, 0.2, 0.3, 0.8, 0.9]
    labels = [0, 0, 1, 1, 1]
    result = calibrate(scores, labels, method="f1")
    assert result.value == pytest.approx(0.3)
    assert result.achieved["f1"] == pytest.approx(1.0) and result.achieved["false_alarm_rate"] == 0.0
    overlapping = calibrate([0.1, 0.4, 0.35, 0.8, 0.2, 0.7], [0, 0, 1, 1, 0, 1], method="f1")
    assert overlapping.value == pytest.approx(0.35)  # flags 0.35, 0.4, 0.7, 0.8: P 3/4, R 1, F1 6/7
    assert overlapping.achieved["f1"] == pytest.approx(6 / 7)


@pytest.mark.filterwarnings("ignore::ssn_platform.thresholds.TooFewImagesWarning")  # tiny data on purpose
def test_recall_method_is_the_highest_threshold_reaching_the_target():
    scores = [0.9, 0.8, 0.7, 0.6, 0.1, 0.2]
    labels = [1, 1, 1, 1, 0, 0]
    assert calibrate(scores, labels, method="recall", target_recall=0.75).value == pytest.approx(0.7)
    assert calibrate(scores, labels, method="recall", target_recall=1.0).value == pytest.approx(0.6)
    assert calibrate(scores, labels, method="recall", target_recall=0.95).value == pytest.approx(0.6)
    assert calibrate(scores, labels, method="recall", target_recall=0.25).value == pytest.approx(0.9)
    assert recall_threshold([0.5, 0.5, 0.4], 0.5) == pytest.approx(0.5)
    result = calibrate(scores, labels, method="recall", target_recall=0.75)
    assert result.achieved["recall"] >= 0.75 and result.parameters["target_recall"] == 0.75


@pytest.mark.filterwarnings("ignore::ssn_platform.thresholds.TooFewImagesWarning")  # tiny data on purpose
def test_auto_picks_f1_with_labelled_defects_and_false_alarm_without():
    assert calibrate([0.1, 0.9], [0, 1]).method == "f1"
    normal_only = calibrate([0.1, 0.2, 0.3], [0, 0, 0])
    assert normal_only.method == "false_alarm" and normal_only.parameters["requested_method"] == "auto"


def test_impossible_calibrations_are_refused_with_a_reason():
    with pytest.raises(ThresholdError, match="normal and defective"):
        calibrate([0.1, 0.2], [0, 0], method="f1")
    with pytest.raises(ThresholdError, match="defective"):
        calibrate([0.1, 0.2], [0, 0], method="recall")
    with pytest.raises(ThresholdError, match="normal"):
        calibrate([0.1, 0.2], [1, 1], method="false_alarm")
    with pytest.raises(ThresholdError, match="no calibration images"):
        calibrate([], [], method="auto")
    with pytest.raises(ThresholdError, match="NaN"):
        calibrate([0.1, math.nan], [0, 1])
    with pytest.raises(ThresholdError, match="method"):
        calibrate([0.1], [0], method="median")


def test_threshold_tags_round_trip_exactly():
    value = float(np.float32(0.123456789))
    threshold = Threshold(
        value=value,
        method="f1",
        parameters={"requested_method": "auto"},
        n_normal=3,
        n_defective=2,
        split="val",
        dataset="s3://ssn/datasets/x/latest",
        dataset_version="ab" * 8,
    )
    tags = threshold.tags()
    assert float(tags["threshold"]) == value and threshold_from_tags(tags) == value
    assert tags["threshold_method"] == "f1" and tags["threshold_split"] == "val"
    assert json.loads(tags["threshold_params"])["n_defective"] == 2
    assert threshold_from_tags({}) is None and threshold_from_tags({"threshold": "nan"}) is None
    assert Threshold.from_dict(threshold.to_dict()) == threshold


# ---------------------------------------------------------------------------------------------------------
# How sure: confidence intervals and the rule of three
# ---------------------------------------------------------------------------------------------------------
def _quietly(*args, **kwargs) -> Threshold:
    """`calibrate`, failing the test on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return calibrate(*args, **kwargs)


def test_rate_interval_is_the_exact_clopper_pearson_interval():
    from scipy.stats import beta

    low, high = rate_interval(0, 50)
    assert low == 0.0 and high == pytest.approx(0.071122, abs=1e-6)  # 1 - 0.025**(1/50)
    assert high == pytest.approx(1 - 0.025 ** (1 / 50), rel=1e-9)
    # the rule of three is the one-sided 95 % bound, i.e. the upper end of the two-sided 90 % interval
    assert rate_interval(0, 50, confidence=0.90)[1] == pytest.approx(0.058155, abs=1e-6)
    low, high = rate_interval(1, 100)
    assert low == pytest.approx(0.000253, abs=1e-6) and high == pytest.approx(0.054459, abs=1e-6)
    assert (low, high) == pytest.approx((beta.ppf(0.025, 1, 100), beta.ppf(0.975, 2, 99)), rel=1e-9)
    low, high = rate_interval(50, 50)
    assert low == pytest.approx(0.928878, abs=1e-6) and high == 1.0


def test_images_needed_follows_the_rule_of_three():
    assert images_needed(0.01) == 300 and images_needed(0.05) == 60 and images_needed(0.1) == 30
    assert images_needed(1 - 0.95) == 60  # a target recall of 0.95 allows a miss rate of 0.05
    assert images_needed(0.0) is None  # a rate of 0 is never shown
    # with that many images and no errors, the exact one-sided 95 % bound is indeed at most the rate
    for rate in (0.3, 0.05, 0.01, 0.001):
        assert rate_interval(0, images_needed(rate), confidence=0.90)[1] <= rate


def test_a_false_alarm_threshold_from_50_normals_warns_that_1_percent_needs_300():
    with pytest.warns(TooFewImagesWarning, match="needs at least 300 normal images") as caught:
        result = calibrate(np.linspace(0, 1, 50), np.zeros(50), method="false_alarm", false_alarm_rate=0.01)
    assert result.warning == str(caught[0].message)
    assert result.warning.startswith("50 normal images cannot show a false-alarm rate of 0.01")
    assert "3/50 = 0.06" in result.warning
    # no normal image may be flagged, and 0 of 50 still allows up to 7.1 % false alarms
    assert result.confidence == 0.95
    assert result.intervals == {
        "false_alarm_rate": {"k": 0, "n": 50, "low": 0.0, "high": pytest.approx(0.071122, abs=1e-6)}
    }
    assert result.interval_text() == "false_alarm_rate 0/50, 95% CI [0, 0.0711]"


def test_enough_normals_calibrate_without_a_warning_and_record_the_interval():
    result = _quietly(np.linspace(0, 1, 400), np.zeros(400), method="false_alarm", false_alarm_rate=0.01)
    assert result.warning is None
    interval = result.intervals["false_alarm_rate"]
    assert (interval["k"], interval["n"]) == (4, 400) and result.achieved["false_alarm_rate"] == 0.01
    assert (interval["low"], interval["high"]) == pytest.approx((0.002731, 0.025405), abs=1e-6)
    assert _quietly(np.linspace(0, 1, 300), np.zeros(300), method="false_alarm", false_alarm_rate=0.01).warning is None
    with pytest.warns(TooFewImagesWarning):
        calibrate(np.linspace(0, 1, 299), np.zeros(299), method="false_alarm", false_alarm_rate=0.01)
    with pytest.warns(TooFewImagesWarning, match="no number of images can show 0"):
        calibrate(np.linspace(0, 1, 400), np.zeros(400), method="false_alarm", false_alarm_rate=0.0)


def test_a_recall_threshold_records_the_recall_interval_and_warns_with_too_few_defectives():
    scores = np.r_[np.linspace(0.5, 1, 20), np.linspace(0, 0.4, 10)]
    labels = np.r_[np.ones(20), np.zeros(10)]
    with pytest.warns(TooFewImagesWarning, match="needs at least 60 defective images"):
        result = calibrate(scores, labels, method="recall", target_recall=0.95)
    assert result.warning.startswith("20 defective images cannot show a recall of 0.95")
    recall = result.intervals["recall"]
    assert (recall["k"], recall["n"]) == (19, 20)
    assert (recall["low"], recall["high"]) == pytest.approx(rate_interval(19, 20), rel=1e-12)
    assert recall["low"] == pytest.approx(0.751267, abs=1e-6)  # 19 of 20 only shows recall >= 0.75
    assert result.intervals["false_alarm_rate"] == {
        "k": 0,
        "n": 10,
        "low": 0.0,
        "high": pytest.approx(rate_interval(0, 10)[1]),
    }
    enough = _quietly(np.linspace(0.5, 1, 60), np.ones(60), method="recall", target_recall=0.95)
    assert enough.warning is None and enough.intervals["recall"]["k"] == 57
    assert _quietly([0.1, 0.9], [0, 1], method="f1").warning is None  # f1 requests no rate


def test_intervals_and_warning_round_trip_through_dict_and_tags():
    scores, labels = np.r_[np.linspace(0, 0.5, 50), [0.9, 0.95]], np.r_[np.zeros(50), [1, 1]]  # no NaN rates
    with pytest.warns(TooFewImagesWarning):
        result = calibrate(scores, labels, method="false_alarm", false_alarm_rate=0.01, split="val")
    assert Threshold.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    tags = result.tags()
    assert tags["threshold_warning"] == result.warning
    assert json.loads(tags["threshold_intervals"]) == {
        "confidence": 0.95,
        "false_alarm_rate": {"k": 0, "n": 50, "low": 0.0, "high": pytest.approx(0.071122, abs=1e-6)},
        "recall": {"k": 2, "n": 2, "low": pytest.approx(0.158114, abs=1e-6), "high": 1.0},  # 0.025**(1/2)
    }
    quiet = _quietly(np.linspace(0, 1, 400), np.zeros(400), method="false_alarm", false_alarm_rate=0.01)
    assert quiet.tags()["threshold_warning"] == ""  # set even when empty: a recalibration clears the old warning
    # a record from before intervals were recorded still loads, with none
    old = {k: v for k, v in result.to_dict().items() if k not in ("confidence", "intervals", "warning")}
    loaded = Threshold.from_dict(old)
    assert (loaded.confidence, loaded.intervals, loaded.warning) == (None, {}, None)
    assert loaded.tags()["threshold_intervals"] == "" and loaded.tags()["threshold_warning"] == ""
    assert loaded.interval_text() == "" and loaded.value == result.value


# ---------------------------------------------------------------------------------------------------------
# On the stack: calibrate a registered version
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def registered(weld_val_dataset, random_head_model, register_version) -> tuple[str, str]:
    product = f"weld-cal-{uuid.uuid4().hex[:6]}"
    return product, register_version(product, weld_val_dataset, random_head_model(1), {"image_auroc": 0.5})


@pytest.mark.stack
@pytest.mark.heavy
def test_calibrate_version_stores_tags_and_artifact(registered, weld_val_dataset):
    from mlflow import MlflowClient
    from PIL import Image

    from supersimplenet.inference import predict_images
    from ssn_platform.datasets import DatasetReader
    from ssn_platform.registry import load_model
    from ssn_platform.thresholds import calibrate_version

    product, version = registered
    name = f"ssn-{product}"
    threshold = calibrate_version(product, version)  # auto on the val split of the version's dataset
    assert threshold.method == "f1" and threshold.split == "val"
    assert (threshold.n_normal, threshold.n_defective) == (12, 25)
    assert threshold.dataset == weld_val_dataset and threshold.dataset_version

    client = MlflowClient()
    tags = client.get_model_version(name, version).tags
    assert float(tags["threshold"]) == threshold.value
    assert tags["threshold_method"] == "f1" and tags["threshold_split"] == "val"
    assert json.loads(tags["threshold_params"])["requested_method"] == "auto"
    run_id = client.get_model_version(name, version).run_id
    listed = {a.path for a in client.list_artifacts(run_id, f"calibration/v{version}")}
    assert f"calibration/v{version}/threshold.json" in listed and f"calibration/v{version}/scores.json" in listed
    import mlflow

    stored = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/calibration/v{version}/threshold.json"))
    assert stored["value"] == threshold.value and stored["version"] == version

    # the same threshold from offline scores of the val images (the serving path: PIL decode + predict_images)
    root, samples = DatasetReader(weld_val_dataset).materialize()
    val = [s for s in samples if s.split == "val"]
    model, _ = load_model(f"models:/{name}/{version}")
    scores, _ = predict_images(model, [Image.open(root / s.image) for s in val])
    again = calibrate(scores, [s.label for s in val], method="f1")
    assert again.value == pytest.approx(threshold.value, abs=1e-6)

    # recalibration with another method replaces the tags
    strict = calibrate_version(product, version, method="false_alarm", false_alarm_rate=0.05)
    tags = client.get_model_version(name, version).tags
    assert tags["threshold_method"] == "false_alarm" and float(tags["threshold"]) == strict.value
    assert strict.n_normal == 12 and strict.achieved["false_alarm_rate"] <= 0.05


@pytest.mark.stack
@pytest.mark.heavy
def test_calibration_never_falls_back_to_the_test_split(registered, weld_root):
    from mlflow import MlflowClient

    from ssn_platform.ingest import ingest
    from ssn_platform.thresholds import calibrate_version
    from ssn_platform.services import PlatformError

    product, version = registered
    as_shipped = ingest(weld_root, product="battery-weld", bucket="ssn", progress=False, update_latest=False).uri
    before = MlflowClient().get_model_version(f"ssn-{product}", version).tags.get("threshold")
    with pytest.raises(PlatformError, match="has no 'val' split"):
        calibrate_version(product, version, data_uri=as_shipped)  # the weld data as shipped: train + test only
    assert MlflowClient().get_model_version(f"ssn-{product}", version).tags.get("threshold") == before


@pytest.mark.stack
@pytest.mark.heavy
def test_calibrate_job_recalibrates_without_retraining(registered, weld_val_dataset):
    import os

    from mlflow import MlflowClient

    product, version = registered
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "calibrate.py"),
            "--product",
            product,
            "--version",
            version,
            "--data",
            weld_val_dataset,
            "--method",
            "recall",
            "--target-recall",
            "0.9",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=os.environ.copy(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["method"] == "recall" and summary["achieved"]["recall"] >= 0.9
    tags = MlflowClient().get_model_version(f"ssn-{product}", version).tags
    assert tags["threshold_method"] == "recall" and float(tags["threshold"]) == summary["value"]

    missing = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "calibrate.py"), "--product", product, "--version", "999"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=os.environ.copy(),
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
