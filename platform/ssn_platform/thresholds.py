"""Per-version decision thresholds: calibrated on validation data, stored with the registered model version.

A SuperSimpleNet score is in [0, 1]; an image is anomalous when ``score >= threshold``. The threshold of a
registered version is computed on the dataset's validation split (never silently on the test split) by one of:

* ``false_alarm`` (normal images suffice): the lowest observed threshold whose empirical false-alarm rate on the
  normal validation images is at most ``false_alarm_rate``, i.e. the conservative ``1 - far`` quantile of the
  normal scores (with fewer than ``1 / far`` normal images no normal image may be flagged at all).
* ``f1`` (labelled defects needed): the F1-optimal threshold (``supersimplenet.metrics.f1_max``).
* ``recall`` (labelled defects needed): the highest threshold that still flags at least ``target_recall`` of the
  defective validation images.
* ``auto``: ``f1`` when the split holds normal and defective images, else ``false_alarm``.

How sure: a rate measured on n images is itself an estimate. Every threshold records the exact (Clopper-Pearson)
two-sided 95 % confidence interval of the false-alarm rate it gives on the calibration normals (k of n flagged) and
of the recall it gives on the calibration defectives (see `rate_interval`). When there are too few images for the
requested rate to be shown at all, `calibrate` warns (`TooFewImagesWarning`) and the record keeps the message: with
zero false alarms among n normals the one-sided 95 % upper bound of the rate is still ``1 - 0.05**(1/n)``, about
``3/n`` (the rule of three), so a rate r needs at least ``ceil(3/r)`` normals (300 for 1 %), and a target recall t
at least ``ceil(3/(1-t))`` defectives.

`calibrate_version` scores the split with the model library's inference path (`predict_images`, the one the
Serve application uses), then stores the result on the model version as tags ``threshold``, ``threshold_method``,
``threshold_params`` (JSON), ``threshold_split``, ``threshold_dataset``, ``threshold_intervals`` (JSON) and
``threshold_warning`` (empty without a warning), and as an artifact
``calibration/v<version>/threshold.json`` (plus the per-image ``scores.json``) on the version's MLflow run.
Recalibrating (``jobs/calibrate.py``) overwrites the tags; the artifacts of every calibration stay on the run.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ssn_platform.datasets import materialize_split
from ssn_platform.modelcard import refresh_model_card
from ssn_platform.names import registered_model_name
from ssn_platform.services import PlatformError, check_mlflow

METHODS = ("auto", "false_alarm", "f1", "recall")
TAG_VALUE = "threshold"
TAG_METHOD = "threshold_method"
TAG_PARAMS = "threshold_params"
TAG_SPLIT = "threshold_split"
TAG_DATASET = "threshold_dataset"
TAG_INTERVALS = "threshold_intervals"
TAG_WARNING = "threshold_warning"
CONFIDENCE = 0.95  # of the recorded intervals; the rule of three (`images_needed`) is the one-sided 95 % bound


class ThresholdError(ValueError):
    """Calibration is impossible with the given data or settings; the message says why."""


class TooFewImagesWarning(UserWarning):
    """Too few calibration images to show the requested false-alarm rate (or recall); the threshold is still
    computed, but its rate on new images is uncertain far beyond the request (see `images_needed`)."""


@dataclass(frozen=True)
class Threshold:
    """A calibrated decision threshold: anomalous when ``score >= value``.

    Attributes:
        value: the threshold, in score units ([0, 1]; may exceed 1 when no normal image may be flagged and the
            highest normal score is already 1).
        method: "false_alarm", "f1" or "recall" (never "auto": the resolved method).
        parameters: the settings of the method (false_alarm_rate, target_recall, requested method).
        n_normal, n_defective: calibration images per class.
        achieved: what the threshold gives on the calibration images: precision, recall, f1, false_alarm_rate.
        computed_on: UTC time of the calibration (ISO 8601).
        split: the dataset split the scores came from.
        dataset: URI of the dataset (manifest or `latest` pointer) and dataset_version its content version.
        confidence: the level of `intervals` (0.95); None in records made before intervals were recorded.
        intervals: Clopper-Pearson intervals of the achieved rates, ``{"false_alarm_rate": {"k", "n", "low",
            "high"}, "recall": {...}}`` (k of n images flagged); a rate is present when its class has images.
        warning: why the calibration images are too few for the requested rate (`TooFewImagesWarning`), or None.
    """

    value: float
    method: str
    parameters: dict[str, Any] = field(default_factory=dict)
    n_normal: int = 0
    n_defective: int = 0
    achieved: dict[str, float] = field(default_factory=dict)
    computed_on: str = ""
    split: str | None = None
    dataset: str | None = None
    dataset_version: str | None = None
    confidence: float | None = None
    intervals: dict[str, dict[str, float]] = field(default_factory=dict)
    warning: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Threshold":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def interval_text(self) -> str:
        """The intervals on one line, e.g. ``false_alarm_rate 0/50, 95% CI [0, 0.0711]``; empty in old records."""
        return "; ".join(
            f"{rate} {i['k']}/{i['n']}, {self.confidence:.0%} CI [{i['low']:.3g}, {i['high']:.3g}]"
            for rate, i in self.intervals.items()
        )

    def tags(self) -> dict[str, str]:
        """The model-version tags of this threshold (``repr`` keeps the float exact)."""
        params = {
            **self.parameters,
            "n_normal": self.n_normal,
            "n_defective": self.n_defective,
            "achieved": self.achieved,
            "computed_on": self.computed_on,
            "dataset_version": self.dataset_version,
        }
        return {
            TAG_VALUE: repr(float(self.value)),
            TAG_METHOD: self.method,
            TAG_PARAMS: json.dumps(params, sort_keys=True, separators=(",", ":"), default=_json_default)[:4900],
            TAG_SPLIT: self.split or "",
            TAG_DATASET: self.dataset or "",
            TAG_INTERVALS: json.dumps(
                {"confidence": self.confidence, **self.intervals},
                sort_keys=True,
                separators=(",", ":"),
                default=_json_default,
            )
            if self.intervals
            else "",
            TAG_WARNING: self.warning or "",  # always set: a recalibration clears an earlier warning
        }


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ---------------------------------------------------------------------------------------------------------
# Methods (pure functions on scores)
# ---------------------------------------------------------------------------------------------------------
def _inputs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.size == 0:
        raise ThresholdError("scores: no calibration images")
    if y.shape != s.shape:
        raise ThresholdError(f"labels: {y.size} labels for {s.size} scores")
    if not np.all(np.isfinite(s)):
        raise ThresholdError("scores: contains NaN or infinite values")
    if not np.all((y == 0) | (y == 1)):
        raise ThresholdError("labels: must be 0 (normal) or 1 (defective)")
    return s, y.astype(bool)


def rates_at(value: float, scores: Any, labels: Any) -> dict[str, float]:
    """Precision, recall, F1 and false-alarm rate of ``score >= value`` (NaN where undefined)."""
    s, y = _inputs(scores, labels)
    flagged = s >= value
    tp = int(np.sum(flagged & y))
    fp = int(np.sum(flagged & ~y))
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / n_pos if n_pos else math.nan
    f1 = (
        2 * precision * recall / (precision + recall)
        if n_pos and tp + fp and (precision + recall) > 0
        else (0.0 if n_pos else math.nan)
    )
    far = fp / n_neg if n_neg else math.nan
    return {"precision": precision, "recall": recall, "f1": f1, "false_alarm_rate": far}


def false_alarm_threshold(normal_scores: Any, false_alarm_rate: float) -> float:
    """Lowest threshold (an observed score, or just above the highest) flagging at most ``floor(far * n)`` of
    the normal scores."""
    s = np.sort(np.asarray(normal_scores, dtype=np.float64).reshape(-1))[::-1]  # descending
    if s.size == 0:
        raise ThresholdError("false_alarm: needs normal calibration images, found none")
    if not 0.0 <= false_alarm_rate < 1.0:
        raise ThresholdError(f"false_alarm_rate must be in [0, 1), got {false_alarm_rate}")
    allowed = int(math.floor(false_alarm_rate * s.size + 1e-9))
    if allowed == 0:
        return float(np.nextafter(s[0], np.inf))  # nothing at or above the highest normal score
    # candidates: observed values, lowest first; the flagged count of value v is #(s >= v)
    candidate = s[allowed - 1]  # the allowed-th highest
    if np.sum(s >= candidate) <= allowed:
        return float(candidate)
    return float(np.nextafter(candidate, np.inf))  # ties at the candidate would exceed the allowance


def recall_threshold(defective_scores: Any, target_recall: float) -> float:
    """Highest threshold with recall >= target on the defective scores (an observed score)."""
    d = np.sort(np.asarray(defective_scores, dtype=np.float64).reshape(-1))[::-1]
    if d.size == 0:
        raise ThresholdError("recall: needs defective calibration images, found none")
    if not 0.0 < target_recall <= 1.0:
        raise ThresholdError(f"target_recall must be in (0, 1], got {target_recall}")
    needed = int(math.ceil(target_recall * d.size - 1e-9))
    return float(d[max(needed, 1) - 1])


def rate_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided confidence interval of a rate observed as k of n images.

    The bounds are the rates at which seeing k or more (low) or k or fewer (high) of n has probability
    ``(1 - confidence) / 2``: beta quantiles, via `scipy.stats.binomtest`. Conservative (covers at least
    `confidence`), and meaningful at k = 0: 0 of 50 gives (0, 0.0711), 1 of 100 gives (0.00025, 0.0545).
    """
    from scipy.stats import binomtest  # noqa: PLC0415 (scipy: kept off the Serve app's import)

    interval = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return float(interval.low), float(interval.high)


def images_needed(rate: float) -> int | None:
    """Fewest images that can show an error rate of at most `rate` at 95 % (one-sided), by the rule of three:
    with 0 errors among n the upper bound is ``1 - 0.05**(1/n)``, just under ``3/n``. None for rate 0 (never)."""
    return math.ceil(3.0 / rate - 1e-9) if rate > 0 else None


def _too_few(n: int, requested: float, *, recall: bool = False) -> str | None:
    """The warning text when n images cannot show the `requested` false-alarm rate (or recall), else None."""
    needed = images_needed(1.0 - requested if recall else requested)
    if needed is not None and n >= needed:
        return None
    images, what = ("defective", "recall") if recall else ("normal", "false-alarm rate")
    bound = (
        f"even with no miss the 95 % lower bound is about 1 - 3/{n} = {max(1 - 3 / n, 0):.3g}"
        if recall
        else f"even with no false alarm the 95 % upper bound is about 3/{n} = {min(3 / n, 1):.3g}"
    )
    need = (
        f"{requested:g} needs at least {needed} {images} images"
        if needed is not None
        else f"no number of images can show {requested:g}"
    )
    return f"{n} {images} images cannot show a {what} of {requested:g}: {bound} (rule of three); {need}"


def calibrate(
    scores: Any,
    labels: Any,
    *,
    method: str = "auto",
    false_alarm_rate: float = 0.01,
    target_recall: float = 0.95,
    split: str | None = None,
    dataset: str | None = None,
    dataset_version: str | None = None,
) -> Threshold:
    """A threshold for image scores (labels: 0 normal, 1 defective) by `method` (see the module docstring),
    with the confidence intervals of its rates; warns (`TooFewImagesWarning`) when the images are too few for
    the requested false-alarm rate or recall."""
    if method not in METHODS:
        raise ThresholdError(f"method must be one of {METHODS}, got {method!r}")
    s, y = _inputs(scores, labels)
    n_normal, n_defective = int((~y).sum()), int(y.sum())
    resolved = method
    if method == "auto":
        resolved = "f1" if n_defective and n_normal else "false_alarm"
    params: dict[str, Any] = {"requested_method": method}
    warning = None
    if resolved == "false_alarm":
        value = false_alarm_threshold(s[~y], false_alarm_rate)
        params["false_alarm_rate"] = float(false_alarm_rate)
        warning = _too_few(n_normal, false_alarm_rate)
    elif resolved == "f1":
        if not n_defective or not n_normal:
            raise ThresholdError(
                f"f1: needs normal and defective calibration images, found {n_normal} normal and "
                f"{n_defective} defective (use method 'false_alarm' for normal-only data)"
            )
        from supersimplenet.metrics import f1_max  # noqa: PLC0415 (sklearn, scipy: kept off the Serve app's import)

        _, value = f1_max(s, y.astype(np.int64))
        value = float(value)
    else:  # recall
        if not n_defective:
            raise ThresholdError("recall: needs defective calibration images, found none")
        value = recall_threshold(s[y], target_recall)
        params["target_recall"] = float(target_recall)
        warning = _too_few(n_defective, target_recall, recall=True)
    achieved = {k: float(v) for k, v in rates_at(value, s, y).items()}
    intervals = {}
    for rate, chosen in (("false_alarm_rate", ~y), ("recall", y)):
        if chosen.any():  # k of n images of the class flagged
            k, n = int(np.sum(s[chosen] >= value)), int(chosen.sum())
            low, high = rate_interval(k, n)
            intervals[rate] = {"k": k, "n": n, "low": low, "high": high}
    if warning:
        warnings.warn(warning, TooFewImagesWarning, stacklevel=2)
    return Threshold(
        value=float(value),
        method=resolved,
        parameters=params,
        n_normal=n_normal,
        n_defective=n_defective,
        achieved=achieved,
        computed_on=_now(),
        split=split,
        dataset=dataset,
        dataset_version=dataset_version,
        confidence=CONFIDENCE,
        intervals=intervals,
        warning=warning,
    )


# ---------------------------------------------------------------------------------------------------------
# Registry side
# ---------------------------------------------------------------------------------------------------------
def threshold_from_tags(tags: dict[str, str]) -> float | None:
    """The threshold stored on a model version (its tags), or None when it was never calibrated."""
    raw = (tags or {}).get(TAG_VALUE)
    if raw in (None, ""):
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def score_images(model, paths: Sequence[Path], *, batch_size: int = 16) -> np.ndarray:
    """Scores of image files through the serving path: decode with PIL, then `predict_images`."""
    from supersimplenet.inference import (  # noqa: PLC0415 (torch: kept off the Serve app's import)
        inference_model,
        predict_images,
    )

    model = inference_model(model)  # fold once, not per batch
    scores: list[np.ndarray] = []
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start : start + batch_size]:
            with Image.open(path) as image:
                image.load()
                images.append(image.copy())
        batch_scores, _ = predict_images(model, images)
        scores.append(np.asarray(batch_scores, dtype=np.float64))
    return np.concatenate(scores) if scores else np.zeros(0)


def record_threshold(
    product: str, version: str, threshold: Threshold, *, scores: dict[str, Any] | None = None, run_id: str | None = None
) -> None:
    """Stores `threshold` on version `version` of ``ssn-<product>``: tags plus ``calibration/v<version>``
    artifacts on the version's run (when it has one)."""
    from mlflow import MlflowClient  # noqa: PLC0415 (MLflow: kept off the Serve app's import)

    client = MlflowClient()
    name = registered_model_name(product)
    if run_id is None:
        run_id = client.get_model_version(name, str(version)).run_id or None
    if run_id:
        with tempfile.TemporaryDirectory() as directory:
            out = Path(directory)
            (out / "threshold.json").write_text(
                json.dumps(
                    {"product": product, "registered_model": name, "version": str(version), **threshold.to_dict()},
                    indent=2,
                    default=_json_default,
                )
            )
            if scores is not None:
                (out / "scores.json").write_text(json.dumps(scores, default=_json_default))
            for path in sorted(out.iterdir()):
                client.log_artifact(run_id, str(path), artifact_path=f"calibration/v{version}")
    # tags last: a version shows a threshold only once its record is complete
    for key, value in threshold.tags().items():
        client.set_model_version_tag(name, str(version), key, value)
    refresh_model_card(product, str(version))  # the card now states the threshold


def calibrate_version(
    product: str,
    version: str | int,
    *,
    data_uri: str | None = None,
    split: str = "val",
    method: str = "auto",
    false_alarm_rate: float = 0.01,
    target_recall: float = 0.95,
    batch_size: int = 16,
) -> Threshold:
    """Scores the `split` of the version's dataset (or `data_uri`) with the registered model and stores the
    calibrated threshold on the version. Never falls back to another split."""
    from mlflow import MlflowClient  # noqa: PLC0415 (MLflow: kept off the Serve app's import)
    from mlflow.exceptions import MlflowException  # noqa: PLC0415 (MLflow: kept off the Serve app's import)

    from ssn_platform.registry import load_model  # noqa: PLC0415 (torch: kept off the Serve app's import)

    if method not in METHODS:
        raise PlatformError(f"method must be one of {METHODS}, got {method!r}")
    check_mlflow()
    name, version = registered_model_name(product), str(version)
    client = MlflowClient()
    try:
        model_version = client.get_model_version(name, version)
    except MlflowException as error:
        raise PlatformError(f"{name} version {version} does not exist: {error.message}") from None
    uri = data_uri or model_version.tags.get("dataset")
    if not uri:
        raise PlatformError(f"{name} version {version} names no dataset (tag 'dataset'); pass --data s3://...")
    hint = (
        f"calibration never falls back to another split; ingest the data with a split file that assigns "
        f"'{split}' images (lines '{split} <image path>'), or pass --data with a dataset that has one"
    )
    reader, root, chosen = materialize_split(uri, split, hint, PlatformError)
    model, _ = load_model(f"models:/{name}/{version}")
    scores = score_images(model, [root / s.image for s in chosen], batch_size=batch_size)
    labels = np.asarray([s.label for s in chosen], dtype=np.int64)
    try:
        threshold = calibrate(
            scores,
            labels,
            method=method,
            false_alarm_rate=false_alarm_rate,
            target_recall=target_recall,
            split=split,
            dataset=uri,
            dataset_version=reader.version,
        )
    except ThresholdError as error:
        raise PlatformError(f"{name} version {version} on {uri} ({split}): {error}") from None
    record_threshold(
        product,
        version,
        threshold,
        run_id=model_version.run_id or None,
        scores={
            "images": [s.image for s in chosen],
            "labels": labels.tolist(),
            "scores": scores.tolist(),
        },
    )
    return threshold
