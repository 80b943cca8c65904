"""Anomaly-map overlays as plain RGB images (Pillow + numpy only)."""

from __future__ import annotations

import numpy as np
from PIL import Image

# A perceptually ordered dark-blue -> cyan -> yellow -> red ramp (5 anchors, linearly interpolated).
_ANCHORS = np.array([[0, 0, 96], [0, 96, 255], [0, 224, 224], [255, 224, 0], [224, 0, 0]], dtype=np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """Maps values in [0, 1] to RGB uint8 with the ramp above."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0, 1) * (len(_ANCHORS) - 1)
    low = np.floor(v).astype(int).clip(0, len(_ANCHORS) - 2)
    t = (v - low)[..., None]
    return ((1 - t) * _ANCHORS[low] + t * _ANCHORS[low + 1]).astype(np.uint8)


def overlay(
    image: Image.Image, anomaly_map: np.ndarray, *, alpha: float = 0.5, mask: np.ndarray | None = None
) -> Image.Image:
    """Blends the coloured map over the image (resized to the map's size); outlines `mask` in white if given."""
    height, width = anomaly_map.shape
    base = np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR), dtype=np.float32)
    heat = colorize(anomaly_map).astype(np.float32)
    out = (1 - alpha) * base + alpha * heat
    if mask is not None:
        m = np.asarray(mask) > 0
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = 255
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def mask_png(mask: np.ndarray) -> Image.Image:
    """A binary mask as an 8-bit PNG-ready image (0 / 255)."""
    return Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
