"""Decision thresholds: the methods on hand-made cases, and calibration of a registered version on the real stack."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from ssn_platform.thresholds import (
    Threshold, ThresholdError, calibrate, false_alarm_threshold, rates_at, recall_threshold, threshold_from_tags,
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
    threshold = Threshold(value=value, method="f1", parameters={"requested_method": "auto"}, n_normal=3,
                          n_defective=2, split="val", dataset="s3://ssn/datasets/x/latest", dataset_version="ab" * 8)
    tags = threshold.tags()
    assert float(tags["threshold"]) == value and threshold_from_tags(tags) == value
    assert tags["threshold_method"] == "f1" and tags["threshold_split"] == "val"
    assert json.loads(tags["threshold_params"])["n_defective"] == 2
    assert threshold_from_tags({}) is None and threshold_from_tags({"threshold": "nan"}) is None
    assert Threshold.from_dict(threshold.to_dict()) == threshold


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

    from ssn_platform.datasets import ingest
    from ssn_platform.thresholds import calibrate_version
    from ssn_platform.training import PlatformError

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
        [sys.executable, str(REPO / "jobs" / "calibrate.py"), "--product", product, "--version", version,
         "--data", weld_val_dataset, "--method", "recall", "--target-recall", "0.9"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=os.environ.copy(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["method"] == "recall" and summary["achieved"]["recall"] >= 0.9
    tags = MlflowClient().get_model_version(f"ssn-{product}", version).tags
    assert tags["threshold_method"] == "recall" and float(tags["threshold"]) == summary["value"]

    missing = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "calibrate.py"), "--product", product, "--version", "999"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=os.environ.copy(),
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
