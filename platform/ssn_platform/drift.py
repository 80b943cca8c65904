"""Drift watch: do a product's recent scores still look like the scores its champion was calibrated on?

`check_drift` compares a **window** of recent scores with a **reference** distribution of the same version:

* window: rows of the batch job's table (`ssn_platform.scoring`, ``status=ok``, this version) whose ``image`` starts
  with ``window_prefix`` (e.g. the day's input prefix) and/or scored at or after ``since``;
* reference: either such rows too (``reference_prefix``: a period the line was known to be fine), or, by default,
  the scores of the **normal** images the version was calibrated on (``calibration/v<version>/scores.json`` on the
  version's run, written by `jobs/calibrate.py`).

Two statistics, because each fails alone: the population stability index over 10 bins at the reference's deciles
(``PSI = sum((w - r) * ln(w / r))``, shares floored at 1e-4; a rule of thumb: < 0.1 stable, 0.1-0.25 moderate,
> 0.25 a shift) is blind to its own sampling noise on small windows, and the two-sample Kolmogorov-Smirnov test
(`scipy.stats.ks_2samp`) calls a negligible shift significant on large ones. The product is **drifting** when both
agree: ``psi >= psi_limit`` (default 0.25) **and** ``ks p-value < ks_alpha`` (default 0.01). The anomalous rate of
the window (scores >= the threshold) is reported beside them.

The result is logged as a run of the MLflow experiment ``ssn-<product>-drift`` and stored as the registered
model's tags ``ssn.drift.*`` (status, psi, ks p-value, window size, time, run id), which the endpoint's
``GET /v1/products`` shows as ``drift``. Both writes go through MLflow's authentication like every registry write.
Windows below ``min_window`` scores (default 30) are not judged (status ``insufficient``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from ssn_platform.names import registered_model_name
from ssn_platform.s3keys import parse_s3_uri
from ssn_platform.scoring import pin_version
from ssn_platform.services import PlatformError, check_mlflow, experiment_id, storage_filesystem

DRIFT_TAG = "ssn.drift"  # registered-model tags ssn.drift.status, .psi, .ks_pvalue, .window, .checked_at, .run_id
STATUSES = ("stable", "drifting", "insufficient")


@dataclasses.dataclass(frozen=True)
class DriftResult:
    product: str
    version: str
    status: str
    psi: float
    ks_statistic: float
    ks_pvalue: float
    window_size: int
    reference_size: int
    reference: str
    window_mean: float
    reference_mean: float
    window_anomalous_rate: float
    threshold: float
    psi_limit: float
    ks_alpha: float
    checked_at: str
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def population_stability_index(
    reference: np.ndarray, window: np.ndarray, *, bins: int = 10, floor: float = 1e-4
) -> float:
    """PSI of `window` against `reference` over `bins` bins at the reference's quantiles (module docstring)."""
    edges = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    ref = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1) / len(reference)
    win = np.bincount(np.searchsorted(edges, window, side="right"), minlength=len(edges) + 1) / len(window)
    ref, win = np.maximum(ref, floor), np.maximum(win, floor)
    return float(np.sum((win - ref) * np.log(win / ref)))


def table_scores(
    table_uri: str, version: str, *, image_prefix: str | None = None, since: str | None = None
) -> np.ndarray:
    """Scores of the batch job's table rows of `version` (status ok), filtered by image prefix and time."""
    import pyarrow.dataset as pads  # noqa: PLC0415 (pyarrow.dataset: kept off the Serve app's import)

    bucket, key = parse_s3_uri(table_uri)
    path = f"{bucket}/{key.rstrip('/')}/status=ok"
    try:
        dataset = pads.dataset(path, filesystem=storage_filesystem(), format="parquet")
    except FileNotFoundError:
        raise PlatformError(f"{table_uri} has no scored rows (no status=ok partition); run jobs/score.py") from None
    condition = pads.field("model_version") == str(version)
    if since:
        condition = condition & (pads.field("scored_at") >= since)
    table = dataset.to_table(columns=["image", "score"], filter=condition)
    if image_prefix:
        table = table.filter(pc.starts_with(table.column("image"), image_prefix))
    return np.asarray(table.column("score").to_numpy(zero_copy_only=False), dtype=np.float64)


def calibration_scores(product: str, version: str) -> np.ndarray:
    """Scores of the normal images the version was calibrated on (its run's calibration/v<version>/scores.json)."""
    from mlflow import MlflowClient  # noqa: PLC0415 (MLflow: kept off the Serve app's import)

    client = MlflowClient()
    run_id = client.get_model_version(registered_model_name(product), str(version)).run_id
    if not run_id:
        raise PlatformError(
            f"{registered_model_name(product)} version {version} has no run holding calibration "
            "scores; pass a reference prefix"
        )
    with tempfile.TemporaryDirectory() as directory:
        try:
            local = client.download_artifacts(run_id, f"calibration/v{version}/scores.json", directory)
        except Exception as error:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            raise PlatformError(
                f"{registered_model_name(product)} version {version} has no calibration scores "
                f"({type(error).__name__}); run jobs/calibrate.py or pass a reference prefix"
            ) from None
        record = json.loads(Path(local).read_text())
    labels, scores = np.asarray(record["labels"]), np.asarray(record["scores"], dtype=np.float64)
    return scores[labels == 0]


def judge(
    reference: np.ndarray, window: np.ndarray, *, psi_limit: float, ks_alpha: float, min_window: int
) -> tuple[str, float, float, float]:
    """(status, psi, ks statistic, ks p-value) of a window against its reference."""
    from scipy.stats import ks_2samp  # noqa: PLC0415 (scipy: kept off the Serve app's import)

    if len(window) < min_window or len(reference) < min_window:
        return "insufficient", float("nan"), float("nan"), float("nan")
    psi = population_stability_index(reference, window)
    ks = ks_2samp(reference, window)
    drifting = psi >= psi_limit and ks.pvalue < ks_alpha
    return ("drifting" if drifting else "stable"), psi, float(ks.statistic), float(ks.pvalue)


def check_drift(
    product: str,
    table_uri: str,
    *,
    version: str | None = None,
    window_prefix: str | None = None,
    since: str | None = None,
    reference_prefix: str | None = None,
    psi_limit: float = 0.25,
    ks_alpha: float = 0.01,
    min_window: int = 30,
    record: bool = True,
) -> DriftResult:
    """Compares the window with the reference (module docstring); records the result unless `record` is False."""

    if not (0 < ks_alpha < 1) or psi_limit <= 0 or min_window < 2:
        raise PlatformError(
            f"drift limits: need psi_limit > 0, 0 < ks_alpha < 1, min_window >= 2; got "
            f"{psi_limit}, {ks_alpha}, {min_window}"
        )
    check_mlflow()
    _, version, _, threshold = pin_version(product, version)
    window = table_scores(table_uri, version, image_prefix=window_prefix, since=since)
    if reference_prefix:
        reference, source = table_scores(table_uri, version, image_prefix=reference_prefix), reference_prefix
    else:
        reference, source = calibration_scores(product, version), f"calibration/v{version} (normal images)"
    status, psi, ks_statistic, ks_pvalue = judge(
        reference, window, psi_limit=psi_limit, ks_alpha=ks_alpha, min_window=min_window
    )
    result = DriftResult(
        product=product,
        version=version,
        status=status,
        psi=psi,
        ks_statistic=ks_statistic,
        ks_pvalue=ks_pvalue,
        window_size=len(window),
        reference_size=len(reference),
        reference=source,
        window_mean=float(window.mean()) if len(window) else float("nan"),
        reference_mean=float(reference.mean()) if len(reference) else float("nan"),
        window_anomalous_rate=float((window >= threshold).mean()) if len(window) else float("nan"),
        threshold=threshold,
        psi_limit=psi_limit,
        ks_alpha=ks_alpha,
        checked_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    return _record(result, table_uri, window_prefix, since) if record else result


def _record(result: DriftResult, table_uri: str, window_prefix: str | None, since: str | None) -> DriftResult:
    """A run in ``ssn-<product>-drift`` and the registered model's ``ssn.drift.*`` tags (written last)."""
    from mlflow import MlflowClient  # noqa: PLC0415 (MLflow: kept off the Serve app's import)
    from mlflow.entities import Metric, Param  # noqa: PLC0415 (MLflow: kept off the Serve app's import)

    client = MlflowClient()
    name = registered_model_name(result.product)
    run = client.create_run(
        experiment_id(client, f"{name}-drift"),
        run_name=f"drift-v{result.version}",
        tags={f"{DRIFT_TAG}.status": result.status, "ssn.product": result.product},
    )
    now = int(time.time() * 1000)
    metrics = {
        k: getattr(result, k)
        for k in (
            "psi",
            "ks_statistic",
            "ks_pvalue",
            "window_size",
            "reference_size",
            "window_mean",
            "reference_mean",
            "window_anomalous_rate",
        )
    }
    params = {
        "version": result.version,
        "table": table_uri,
        "window_prefix": window_prefix or "",
        "since": since or "",
        "reference": result.reference,
        "psi_limit": result.psi_limit,
        "ks_alpha": result.ks_alpha,
    }
    client.log_batch(
        run.info.run_id,
        params=[Param(k, str(v)[:6000]) for k, v in params.items()],
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if np.isfinite(v)],
    )
    client.set_terminated(run.info.run_id)
    result = dataclasses.replace(result, mlflow_run_id=run.info.run_id)
    for key, value in {
        "psi": result.psi,
        "ks_pvalue": result.ks_pvalue,
        "window": result.window_size,
        "version": result.version,
        "checked_at": result.checked_at,
        "run_id": run.info.run_id,
        "status": result.status,
    }.items():
        client.set_registered_model_tag(name, f"{DRIFT_TAG}.{key}", str(value))
    return result


def drift_of(tags: dict[str, str]) -> dict[str, Any] | None:
    """The last drift check recorded on a registered model's tags (for GET /v1/products), or None."""
    status = (tags or {}).get(f"{DRIFT_TAG}.status")
    if status is None:
        return None

    def number(key: str) -> float | None:
        try:
            return float(tags[f"{DRIFT_TAG}.{key}"])
        except (KeyError, ValueError):
            return None

    return {
        "status": status,
        "psi": number("psi"),
        "ks_pvalue": number("ks_pvalue"),
        "version": tags.get(f"{DRIFT_TAG}.version"),
        "checked_at": tags.get(f"{DRIFT_TAG}.checked_at"),
    }


__all__ = [
    "DRIFT_TAG",
    "DriftResult",
    "calibration_scores",
    "check_drift",
    "drift_of",
    "judge",
    "population_stability_index",
    "table_scores",
]
