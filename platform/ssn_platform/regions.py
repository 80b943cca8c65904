"""What an inspection reports beyond the score: the anomaly map at the image's own size, and its defect regions.

The model scores an image resized to its input size (e.g. 256x128), so its anomaly map has that size. Operators
want the map over their own image and a list of defects they can draw, as other inspection APIs return them:

* `map_at(anomaly_map, width, height)`: the map resampled bilinearly (Pillow, float32) to the image's size; a map
  that already has it is returned as is.
* `defect_regions(anomaly_map, threshold, width, height)`: the connected components (8-neighbourhood,
  `scipy.ndimage.label`) of ``map >= threshold``, each with its bounding box in the image's pixel coordinates
  (``x0, y0`` inclusive, ``x1, y1`` exclusive), its area in image pixels and in percent of the image, and its
  maximum and mean score; largest maximum first, at most `max_regions` (the total is reported beside). On a map at
  the model's size the boxes are scaled to the image and the areas multiplied by the pixel ratio, so they are as
  exact as the map; on a map at the image's size (``map_resolution=original``) they are exact to the pixel.

Used by the endpoint and the batch job alike (`ssn_platform.serving.versions.decision`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

MAX_REGIONS = 32
RESOLUTIONS = ("model", "original")


def map_at(anomaly_map: np.ndarray, width: int, height: int) -> np.ndarray:
    """`anomaly_map` [h, w] resampled to [height, width] (bilinear, float32)."""
    if anomaly_map.shape == (height, width):
        return anomaly_map
    resized = Image.fromarray(np.ascontiguousarray(anomaly_map, dtype=np.float32), mode="F").resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def defect_regions(
    anomaly_map: np.ndarray, threshold: float, width: int, height: int, *, max_regions: int = MAX_REGIONS
) -> tuple[list[dict[str, Any]], int]:
    """(regions, total number of regions) of ``anomaly_map >= threshold`` in image coordinates (module docstring)."""
    from scipy import ndimage  # noqa: PLC0415 (scipy: kept off the Serve app's import)

    map_height, map_width = anomaly_map.shape
    labels, count = ndimage.label(anomaly_map >= threshold, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return [], 0
    index = np.arange(1, count + 1)
    maxima = ndimage.maximum(anomaly_map, labels, index)
    means = ndimage.mean(anomaly_map, labels, index)
    areas = ndimage.sum_labels(np.ones_like(anomaly_map, dtype=np.float64), labels, index)
    boxes = ndimage.find_objects(labels)
    sx, sy = width / map_width, height / map_height
    regions = []
    for i in np.argsort(-np.asarray(maxima), kind="stable")[:max_regions]:
        rows, cols = boxes[i]
        area = float(areas[i]) * sx * sy
        regions.append(
            {
                "x0": int(np.floor(cols.start * sx)),
                "y0": int(np.floor(rows.start * sy)),
                "x1": min(width, int(np.ceil(cols.stop * sx))),
                "y1": min(height, int(np.ceil(rows.stop * sy))),
                "area_pixels": round(area, 2),
                "area_percent": round(100.0 * area / (width * height), 4),
                "max_score": float(maxima[i]),
                "mean_score": float(means[i]),
            }
        )
    return regions, int(count)


__all__ = ["MAX_REGIONS", "RESOLUTIONS", "defect_regions", "map_at"]
