"""Evaluation metrics for SuperSimpleNet (docs/design.md §7).

Image level (one score per image):

* :func:`image_auroc` -- I-AUROC (``sklearn.metrics.roc_auc_score``).
* :func:`ap_det` -- AP-det (``sklearn.metrics.average_precision_score``).
* :func:`f1_max` -- best F1 over all thresholds and the threshold achieving it.

Pixel level (one anomaly map per image, compared to binary GT masks; all pixels
of all images are pooled):

* :func:`pixel_auroc` -- P-AUROC.
* :func:`ap_loc` -- AP-loc.
* :func:`aupro` -- area under the per-region-overlap curve up to an FPR limit
  (anomalib 0.7 ``AUPRO(fpr_limit=0.3)`` semantics, computed exactly).

:func:`compute_metrics` bundles them in a dict.

Inputs
    ``scores`` ``[N]`` float, ``labels`` ``[N]`` in {0, 1}, ``maps`` ``[N, H, W]``
    float, ``masks`` ``[N, H, W]`` in {0, 1}.  NumPy arrays, torch tensors (any
    device; converted with ``detach().cpu()``) or anything ``np.asarray``
    accepts.  ``maps``/``masks`` may also be ``[N, 1, H, W]`` (the singleton
    channel axis is dropped).  Boolean labels/masks are fine.

Validation
    Wrong rank, mismatched shapes, empty inputs, non-finite values (NaN/inf) in
    ``scores``/``maps`` and labels/masks outside {0, 1} raise ``ValueError``
    whose message starts with the name of the offending argument.  (The official
    code replaces NaN by 0 before scoring; here that is the caller's decision.)

Undefined metrics
    Never raise: they return ``float("nan")``.

    * AUROC (image or pixel) is undefined unless both classes are present.
    * AP and F1 are undefined when there is no positive (no defective image /
      no defect pixel).  With only positives they are defined (and trivially
      1.0: every threshold has precision 1).
    * AUPRO is undefined when there is no defect region or no background pixel.
    * :func:`f1_max` returns ``(nan, nan)`` when undefined.

    :func:`compute_metrics` always returns every key.

Monotone transforms of the scores/maps (sigmoid, min-max normalisation, ...)
leave every metric unchanged except the reported F1 threshold, which is
expressed in the units of the given scores.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
)

from supersimplenet.config import IMAGE_SCORES, top_count

__all__ = [
    "image_auroc",
    "ap_det",
    "pixel_auroc",
    "ap_loc",
    "aupro",
    "f1_max",
    "compute_metrics",
    "IMAGE_SCORES",
    "image_scores",
]

_NAN = float("nan")

# 8-connectivity for the connected components of the GT masks.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------
def _to_numpy(x: Any, name: str) -> np.ndarray:
    if x is None:
        raise ValueError(f"{name}: must not be None")
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        try:
            x = x.numpy()
        except TypeError:  # dtypes numpy lacks (bfloat16, ...)
            x = x.float().numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name}: cannot convert to an array ({exc})") from exc
    if arr.dtype == object:
        raise ValueError(f"{name}: must be a numeric array, got dtype object")
    return arr


def _check_values(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.size == 0:
        raise ValueError(f"{name}: must not be empty")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name}: must be a real-valued float array, got dtype {arr.dtype}")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(np.isinf(arr).sum())
        raise ValueError(f"{name}: contains non-finite values ({n_nan} NaN, {n_inf} inf)")
    return arr


def _check_binary(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.size == 0:
        raise ValueError(f"{name}: must not be empty")
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name}: must be binary (0/1), got dtype {arr.dtype}")
    bad = ~((arr == 0) | (arr == 1))
    if np.any(bad):
        vals = np.unique(arr[bad])[:5]
        raise ValueError(f"{name}: must contain only 0 and 1, found e.g. {vals.tolist()}")
    return arr.astype(bool)


def _image_inputs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _to_numpy(scores, "scores")
    y = _to_numpy(labels, "labels")
    if s.ndim != 1:
        raise ValueError(f"scores: expected shape [N], got {tuple(s.shape)}")
    if y.ndim != 1:
        raise ValueError(f"labels: expected shape [N], got {tuple(y.shape)}")
    if y.shape != s.shape:
        raise ValueError(f"labels: shape {tuple(y.shape)} does not match scores shape {tuple(s.shape)}")
    return _check_values(s, "scores"), _check_binary(y, "labels")


def _as_nhw(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected shape [N, H, W] (or [N, 1, H, W]), got {tuple(arr.shape)}")
    return arr


def _pixel_inputs(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    m = _as_nhw(_to_numpy(maps, "maps"), "maps")
    g = _as_nhw(_to_numpy(masks, "masks"), "masks")
    if g.shape != m.shape:
        raise ValueError(f"masks: shape {tuple(g.shape)} does not match maps shape {tuple(m.shape)}")
    return _check_values(m, "maps"), _check_binary(g, "masks")


# --------------------------------------------------------------------------
# shared binary-classification helpers (flat arrays, already validated)
# --------------------------------------------------------------------------
def _auroc(s: np.ndarray, y: np.ndarray) -> float:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return _NAN
    return float(roc_auc_score(y, s))


def _ap(s: np.ndarray, y: np.ndarray) -> float:
    if not y.any():
        return _NAN
    return float(average_precision_score(y, s))


def _f1_max(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if not y.any():
        return _NAN, _NAN
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision=1, recall=0) point has no threshold; drop it.
    p, r = precision[:-1], recall[:-1]
    denom = p + r
    f1 = np.divide(2.0 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    # thresholds are ascending: on ties the lowest threshold wins.
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


# --------------------------------------------------------------------------
# public metrics
# --------------------------------------------------------------------------
def image_auroc(scores: Any, labels: Any) -> float:
    """Image-level AUROC; nan unless both classes are present."""
    s, y = _image_inputs(scores, labels)
    return _auroc(s, y)


def ap_det(scores: Any, labels: Any) -> float:
    """Image-level average precision (AP-det); nan when there is no positive."""
    s, y = _image_inputs(scores, labels)
    return _ap(s, y)


def f1_max(scores: Any, labels: Any) -> tuple[float, float]:
    """Best F1 over all thresholds ``score >= t`` and the threshold ``t`` achieving it.

    ``t`` is one of the given scores; among thresholds with equal best F1 the
    lowest is returned.  ``(nan, nan)`` when there is no positive.
    """
    s, y = _image_inputs(scores, labels)
    return _f1_max(s, y)


def pixel_auroc(maps: Any, masks: Any) -> float:
    """AUROC over all pixels of all images; nan unless both classes are present."""
    m, g = _pixel_inputs(maps, masks)
    return _auroc(m.ravel(), g.ravel())


def ap_loc(maps: Any, masks: Any) -> float:
    """Average precision over all pixels of all images (AP-loc); nan without defect pixels."""
    m, g = _pixel_inputs(maps, masks)
    return _ap(m.ravel(), g.ravel())


def _label_regions(g: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components per image, labels unique across the batch (0 = background)."""
    regions = np.zeros(g.shape, dtype=np.int64)
    n_total = 0
    for i in range(g.shape[0]):
        lab, n = ndimage.label(g[i], structure=_EIGHT_CONNECTED)
        if n:
            regions[i] = np.where(lab > 0, lab + n_total, 0)
            n_total += n
    return regions, n_total


def aupro(
    maps: Any,
    masks: Any,
    *,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit``.

    Definition (anomalib 0.7 ``AUPRO`` / MVTec AD):

    * Defect regions are the 8-connected components of each GT mask.
    * For a threshold ``t`` (a pixel is predicted defective when ``map >= t``):
      ``TPR_k(t)`` is the fraction of region ``k`` predicted defective and
      ``FPR(t)`` the fraction of *all* background pixels (mask 0, over all
      images) predicted defective.
    * PRO(t) = mean over regions of ``TPR_k(t)``.
    * The curve (FPR, PRO) runs from (0, 0) to (1, 1); it is cut at
      ``fpr_limit`` (linearly interpolating the point exactly at the limit),
      integrated with the trapezoid rule and divided by ``fpr_limit``.

    By default every distinct map value is a threshold, so the result is exact.
    (anomalib instead resamples each region's ROC onto a common index grid
    before averaging; the two agree closely but not bit-for-bit.)  The curve is
    built in one pass: PRO(t) is a sum over defect pixels with ``map >= t`` of
    ``1 / (K * |region|)``, so it is a cumulative sum over pixels sorted by
    score, like the background count.

    ``num_thresholds`` (>= 2) evaluates the curve only at that many thresholds
    evenly spaced between the map's min and max (binned, no full sort: faster
    on huge inputs, slightly approximate; the thresholds include min and max).

    Returns nan when there is no defect region or no background pixel.
    """
    fpr_limit = _check_aupro_args(fpr_limit, num_thresholds)
    m, g = _pixel_inputs(maps, masks)
    regions, n_regions = _label_regions(g)
    n_background = int(g.size - g.sum())
    if n_regions == 0 or n_background == 0:
        return _NAN

    flat_regions = regions.ravel()
    region_sizes = np.bincount(flat_regions, minlength=n_regions + 1).astype(np.float64)
    # per-pixel weight: 1 / (K * |region|) for defect pixels, 0 for background.
    inv = np.zeros(n_regions + 1, dtype=np.float64)
    inv[1:] = 1.0 / (n_regions * region_sizes[1:])

    values = m.ravel()
    if num_thresholds is not None:
        fpr, pro = _binned_pro_curve(values, flat_regions, inv, n_background, num_thresholds)
        return _truncated_area(fpr, pro, fpr_limit) / fpr_limit

    # Exact curve: descending by value; the order within ties is irrelevant
    # because the curve is only read at the end of each run of equal values.
    order = np.argsort(values)[::-1]
    v_desc = values[order]
    r_desc = flat_regions[order]
    # cumulative over the top-j pixels, with a leading 0 for "nothing selected".
    pro_cum = np.concatenate(([0.0], np.cumsum(inv[r_desc])))
    fp_cum = np.concatenate(([0], np.cumsum(r_desc == 0)))
    # number of pixels with value >= each distinct value (end of each run)
    counts = np.r_[np.flatnonzero(v_desc[1:] != v_desc[:-1]) + 1, v_desc.size]
    idx = np.concatenate(([0], counts))
    fpr = fp_cum[idx] / n_background
    pro = pro_cum[idx]
    # the last threshold is the minimum (every pixel selected) -> exactly (1, 1)
    fpr[-1] = 1.0
    pro[-1] = 1.0

    return _truncated_area(fpr, pro, fpr_limit) / fpr_limit


def _check_aupro_args(fpr_limit: Any, num_thresholds: Any) -> float:
    """`fpr_limit` as a float in (0, 1]; ValueError naming the argument otherwise (and for `num_thresholds`)."""
    if isinstance(fpr_limit, bool) or not isinstance(fpr_limit, (int, float, np.floating, np.integer)):
        raise ValueError(f"fpr_limit: must be a number in (0, 1], got {fpr_limit!r}")
    if not (0.0 < float(fpr_limit) <= 1.0):
        raise ValueError(f"fpr_limit: must be in (0, 1], got {float(fpr_limit)}")
    if num_thresholds is not None:
        if isinstance(num_thresholds, bool) or not isinstance(num_thresholds, (int, np.integer)):
            raise ValueError(f"num_thresholds: must be an int >= 2 or None, got {num_thresholds!r}")
        if num_thresholds < 2:
            raise ValueError(f"num_thresholds: must be >= 2, got {num_thresholds}")
    return float(fpr_limit)


def _binned_pro_curve(
    values: np.ndarray, flat_regions: np.ndarray, inv: np.ndarray, n_background: int, num_thresholds: int
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at `num_thresholds` evenly spaced thresholds, no full sort: pixel i is selected at threshold
    t_j (ascending, t_0 = min, t_{T-1} = max) iff its bin >= j."""
    thresholds = np.linspace(float(values.min()), float(values.max()), num_thresholds)
    bins = np.searchsorted(thresholds, values, side="right") - 1
    w_bin = np.bincount(bins, weights=inv[flat_regions], minlength=num_thresholds)
    fp_bin = np.bincount(bins, weights=flat_regions == 0, minlength=num_thresholds)
    # thresholds descending: cumulative from the highest bin; leading 0 = nothing selected
    pro = np.concatenate(([0.0], np.cumsum(w_bin[::-1])))
    fpr = np.concatenate(([0.0], np.cumsum(fp_bin[::-1]))) / n_background
    fpr[-1] = 1.0
    pro[-1] = 1.0
    return fpr, pro


def _truncated_area(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area of the piecewise-linear curve (x non-decreasing) on [x[0], limit]."""
    k = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit: [0, k)
    xs, ys = x[:k], y[:k]
    if k < x.size and xs[-1] < limit:
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        xs = np.append(xs, limit)
        ys = np.append(ys, y_lim)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) * 0.5))


def image_scores(head_scores: Any, maps: Any) -> dict[str, np.ndarray]:
    """The image scores evaluation compares, each in [0, 1] for sigmoid outputs.

    * ``head``: the classification head's score (the paper's image score);
    * ``map_max``: the maximum of the blurred anomaly map (the authors' code reports these "seg-" metrics too);
    * ``combined``: the mean of the two, which needs no calibration of one against the other because both are
      probabilities of the same model;
    * ``map_top1``: the mean of the map's highest 1 % of pixels (`supersimplenet.config.top_count`).
    """
    head = _check_values(_to_numpy(head_scores, "scores").astype(np.float64).reshape(-1), "scores")
    m = _check_values(_as_nhw(_to_numpy(maps, "maps").astype(np.float64), "maps"), "maps")
    if m.shape[0] != head.shape[0]:
        raise ValueError(f"maps: {m.shape[0]} images but scores has {head.shape[0]} entries")
    flat = m.reshape(m.shape[0], -1)
    map_max = flat.max(axis=1)
    k = top_count(flat.shape[1])
    top = np.partition(flat, flat.shape[1] - k, axis=1)[:, flat.shape[1] - k :].mean(axis=1)
    return {"head": head, "map_max": map_max, "combined": 0.5 * (head + map_max), "map_top1": top}


def compute_metrics(
    *,
    scores: Any,
    labels: Any,
    maps: Any = None,
    masks: Any = None,
) -> dict[str, float]:
    """All metrics in one dict of plain floats.

    Keys: ``image_auroc``, ``ap_det``, ``f1_max``, ``f1_threshold``; and when
    ``maps`` and ``masks`` are given also ``pixel_auroc``, ``ap_loc``,
    ``aupro`` (fpr_limit 0.3, exact) and ``pixel_f1_max``.  Undefined metrics
    are ``nan`` (see the module docstring); the key is always present.
    Giving only one of ``maps``/``masks``, or maps for a different number of
    images than ``scores``, raises ``ValueError``.
    """
    s, y = _image_inputs(scores, labels)
    out: dict[str, float] = {}
    out["image_auroc"] = _auroc(s, y)
    out["ap_det"] = _ap(s, y)
    out["f1_max"], out["f1_threshold"] = _f1_max(s, y)

    if maps is None and masks is None:
        return out
    if maps is None:
        raise ValueError("maps: required when masks is given")
    if masks is None:
        raise ValueError("masks: required when maps is given")
    m, g = _pixel_inputs(maps, masks)
    if m.shape[0] != s.shape[0]:
        raise ValueError(f"maps: {m.shape[0]} images but scores has {s.shape[0]} entries")

    flat_m, flat_g = m.ravel(), g.ravel()
    out["pixel_auroc"] = _auroc(flat_m, flat_g)
    out["ap_loc"] = _ap(flat_m, flat_g)
    out["aupro"] = aupro(m, g, fpr_limit=0.3)
    out["pixel_f1_max"] = _f1_max(flat_m, flat_g)[0]
    return out
