"""The registered versions a replica serves: champion lookup, loading, and batched scoring.

Models: ``models:/ssn-<product>@champion`` resolved to an explicit version, loaded through `@serve.multiplexed`
with the product as model id (several products per replica, least recently used evicted). Requests are batched
with `@serve.batch`; a batch may mix products and is run per (product, version) group through
`supersimplenet.inference.predict_images`, the code of offline evaluation, so a served score equals the offline one.
"""

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ssn_platform.regions import defect_regions, map_at
from ssn_platform.serving.requests import ApiError
from ssn_platform.thresholds import threshold_from_tags
from ssn_platform.names import CHAMPION, PREVIOUS, registered_model_name


@dataclass
class LoadedVersion:
    """One registered version ready to serve (immutable once built; a switch replaces the whole object)."""

    product: str
    registered_model: str
    version: str
    model: Any
    threshold: float
    threshold_method: str | None
    loaded_at: float = field(default_factory=time.time)


class ProductModel:
    """What the multiplexed loader returns for a product: the version currently served, swapped atomically."""

    def __init__(self, product: str, current: LoadedVersion) -> None:
        self.product = product
        self.current: LoadedVersion | None = current
        self.cache: dict[str, LoadedVersion] = {current.version: current}  # recent versions: instant rollback
        self.evicted = False

    def swap(self, loaded: LoadedVersion | None, *, keep: int = 2) -> None:
        if loaded is not None:
            self.cache[loaded.version] = loaded
            while len(self.cache) > keep:
                oldest = min(self.cache.values(), key=lambda v: v.loaded_at)
                if oldest is loaded:
                    break
                self.cache.pop(oldest.version, None)
        self.current = loaded  # one attribute assignment: requests see the old or the new version

    def __del__(self) -> None:
        # Serve's multiplexer calls this on LRU eviction (in a worker thread): only mark; the event loop cleans up.
        self.evicted = True
        self.cache = {}


def _mlflow_client():
    from mlflow import MlflowClient  # noqa: PLC0415 (MLflow: kept off the Serve app's import)

    return MlflowClient()


def champion_info(product: str) -> tuple[str, str, dict[str, str]]:
    """(registered model, champion version, version tags); ApiError 404/503 when there is none or no registry."""
    from mlflow.exceptions import MlflowException  # noqa: PLC0415 (MLflow: kept off the Serve app's import)

    name = registered_model_name(product)
    client = _mlflow_client()
    try:
        registered = client.get_registered_model(name)
        version = (registered.aliases or {}).get(CHAMPION)
        if version is None:
            raise ApiError(
                404,
                "no_champion",
                f"product {product!r} has no champion version (alias '{CHAMPION}' "
                f"of {name}); promote one with jobs/promote.py",
            )
        tags = dict(client.get_model_version(name, str(version)).tags or {})
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ApiError(
                404, "unknown_product", f"unknown product {product!r} (no registered model {name})"
            ) from None
        raise ApiError(503, "registry_unavailable", f"model registry error: {error.message[:300]}") from None
    except ApiError:
        raise
    except Exception as error:  # noqa: BLE001 - connection errors and the like
        raise ApiError(503, "registry_unavailable", f"model registry unreachable: {type(error).__name__}") from None
    return name, str(version), tags


def load_version(
    product: str, name: str, version: str, tags: dict[str, str], *, device: str, precision: str = "fp32"
) -> LoadedVersion:
    """Downloads one registered version, folds it into the fast inference model, warms it up, reads its threshold.

    Like `ssn_platform.registry.load_model`, but the download goes to a temporary directory that is removed: a
    long-running replica would otherwise keep one copy of the artifacts per switch. Only the folded model is kept
    (`supersimplenet.inference.inference_model`, the path offline evaluation runs): fp32 serves the offline scores
    within 1e-5; bf16 trades that for speed (BENCHMARKS.md)."""
    import mlflow  # noqa: PLC0415 (MLflow: kept off the Serve app's import)
    import torch  # noqa: PLC0415 (torch: kept off the Serve app's import)

    from supersimplenet.checkpoint import load_checkpoint  # noqa: PLC0415 (torch: kept off the Serve app's import)
    from supersimplenet.inference import (  # noqa: PLC0415 (torch: kept off the Serve app's import)
        inference_model,
        predict_images,
    )

    threshold = threshold_from_tags(tags)
    if threshold is None:
        raise ApiError(
            409,
            "no_threshold",
            f"champion version {version} of {name} has no calibrated threshold; "
            f"run jobs/calibrate.py --product {product} --version {version}",
        )
    with tempfile.TemporaryDirectory(prefix="ssn-serve-") as directory:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=directory)
        found = sorted(Path(local).rglob("model.pt"))
        if not found:
            raise ApiError(503, "model_unavailable", f"{name} version {version} holds no SuperSimpleNet checkpoint")
        model, _ = load_checkpoint(found[0])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = inference_model(model.to(device), precision=precision)
    height, width = model.config.image_size
    predict_images(model, [np.zeros((height, width, 3), dtype=np.float32)])  # warm-up before it serves
    return LoadedVersion(
        product=product,
        registered_model=name,
        version=version,
        model=model,
        threshold=threshold,
        threshold_method=tags.get("threshold_method"),
    )


def inference_info(model: Any) -> dict[str, str]:
    """How a loaded (folded) model computes: heads layout, precision and device, for the products listing."""
    precision = {"torch.float32": "fp32", "torch.bfloat16": "bf16"}.get(str(model.dtype), str(model.dtype))
    return {
        "engine": type(model).__name__,
        "heads": model.heads,
        "precision": precision,
        "device": str(model.fc_weight.device),
    }


def decision(
    loaded: LoadedVersion, score: float, anomaly_map: np.ndarray, *, width: int, height: int, resolution: str = "model"
) -> dict[str, Any]:
    """What a score means under the version's threshold, for the endpoint and the batch job alike: is_anomalous
    (``score >= threshold``); the map (at the model's resolution, or resampled to the image's ``width x height``
    with ``resolution="original"``), its defect mask (pixels ``>= threshold``) and the mask's share in percent; the
    defect regions in image coordinates (`ssn_platform.regions`) and how many there are."""
    if resolution == "original":
        anomaly_map = map_at(anomaly_map, width, height)
    mask = anomaly_map >= loaded.threshold
    regions, total = defect_regions(anomaly_map, loaded.threshold, width, height)
    return {
        "is_anomalous": bool(score >= loaded.threshold),
        "map": anomaly_map,
        "mask": mask,
        "defect_area_percent": float(100.0 * mask.mean()),
        "regions": regions,
        "regions_total": total,
    }


def run_items(items: list[tuple[LoadedVersion, np.ndarray]]) -> list[Any]:
    """Scores and maps of a batch that may mix products and versions: one `predict_images` call per version.

    A failing group yields its exception for its own items only."""
    from supersimplenet.inference import predict_images  # noqa: PLC0415 (torch: kept off the Serve app's import)

    results: list[Any] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for index, (loaded, _) in enumerate(items):
        groups.setdefault(id(loaded), []).append(index)
    for indices in groups.values():
        loaded = items[indices[0]][0]
        try:
            scores, maps = predict_images(loaded.model, [items[i][1] for i in indices])
            for j, i in enumerate(indices):
                results[i] = (float(scores[j]), maps[j])
        except Exception as error:  # noqa: BLE001 - reported to the callers of this group
            for i in indices:
                results[i] = error
    return results


__all__ = [
    "CHAMPION",
    "PREVIOUS",
    "LoadedVersion",
    "ProductModel",
    "champion_info",
    "decision",
    "inference_info",
    "load_version",
    "run_items",
]
