"""Tests for supersimplenet.metrics."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from supersimplenet.metrics import (
    ap_det,
    ap_loc,
    aupro,
    compute_metrics,
    f1_max,
    image_auroc,
    pixel_auroc,
)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _two_region_case():
    """1 image, 4x4, two 8-connected regions (A: 1 px, B: diagonal pair of 2 px).

    mask            map
    1 0 0 0         .90 .85 .10 .10
    0 0 0 0         .10 .50 .50 .10
    0 0 1 0         .10 .10 .80 .10
    0 0 0 1         .10 .10 .10 .50
    """
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[0, 0] = 1  # region A
    mask[2, 2] = mask[3, 3] = 1  # region B (diagonal neighbours -> one region under 8-connectivity)
    amap = np.full((4, 4), 0.10)
    amap[0, 0] = 0.90  # A
    amap[2, 2] = 0.80  # B
    amap[3, 3] = 0.50  # B, tied with two background pixels
    amap[0, 1] = 0.85  # background
    amap[1, 1] = amap[1, 2] = 0.50  # background
    return amap[None], mask[None]


def _reference_aupro(maps, masks, fpr_limit, structure=None):
    """Slow, obvious implementation: Python loop over thresholds and regions (8-connected unless `structure`)."""
    structure = np.ones((3, 3)) if structure is None else structure
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks).astype(bool)
    regions = []
    for i in range(maps.shape[0]):
        lab, n = ndimage.label(masks[i], structure=structure)
        for k in range(1, n + 1):
            sel = np.zeros(masks.shape, dtype=bool)
            sel[i] = lab == k
            regions.append(sel)
    background = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append((pred & background).sum() / background.sum())
        pros.append(np.mean([(pred & r).sum() / r.sum() for r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    # point at the limit by linear interpolation along the curve
    k = np.searchsorted(fprs, fpr_limit, side="right")
    xs, ys = list(fprs[:k]), list(pros[:k])
    if xs[-1] < fpr_limit:
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        xs.append(fpr_limit)
        ys.append(y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return np.trapezoid(ys, xs) / fpr_limit


def _random_case(rng, n=3, h=12, w=14, levels=8):
    masks = np.zeros((n, h, w), dtype=np.uint8)
    for i in range(n):
        for _ in range(rng.integers(0, 3)):
            y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
            masks[i, y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = 1
    masks[0, 1, 1] = 1  # at least one region
    maps = rng.integers(0, levels, size=masks.shape).astype(np.float64) + 2.0 * masks * rng.random(masks.shape)
    return np.round(maps, 1), masks


# --------------------------------------------------------------------------
# AUPRO
# --------------------------------------------------------------------------
def test_aupro_hand_case_two_regions():
    maps, masks = _two_region_case()
    # K = 2 regions, 13 background pixels. Distinct thresholds, descending
    # (pixel predicted defective when map >= t):
    #   t=.90: A 1/1, B 0/2, FP 0  -> (FPR, PRO) = (0,     (1 + 0)/2 = .50)
    #   t=.85: FP 1                -> (1/13,  .50)
    #   t=.80: B 1/2               -> (1/13,  (1 + .5)/2 = .75)
    #   t=.50: B 2/2, FP 3         -> (3/13,  1.0)   (sloped segment: tie)
    #   t=.10: FP 13               -> (1,     1.0)
    # plus the start (0, 0).
    # fpr_limit = .3 (> 3/13 = .2308): point at the limit is (.3, 1.0).
    #   area = [0,1/13] .5 * 1/13                 = .5/13
    #        + [1/13,3/13] (.75 + 1)/2 * 2/13     = 1.75/13
    #        + [3/13,.3] 1.0 * (.3 - 3/13)        = .3 - 3/13
    #        = .3 - .75/13;  / .3  ->  1 - 2.5/13 = 21/26 = 0.807692...
    # (Under 4-connectivity B would be two regions and the value 29/39.)
    assert aupro(maps, masks) == pytest.approx(21 / 26, abs=1e-9)
    assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx(21 / 26, abs=1e-9)
    # fpr_limit = 2/13 cuts the sloped segment in the middle: PRO(2/13) = .875
    #   area = .5/13 + (.75 + .875)/2 * 1/13 = 1.3125/13;  / (2/13) -> .65625
    assert aupro(maps, masks, fpr_limit=2 / 13) == pytest.approx(0.65625, abs=1e-9)
    # fpr_limit = 1/13 lands exactly on the vertical jump: area .5/13 / (1/13) = .5
    assert aupro(maps, masks, fpr_limit=1 / 13) == pytest.approx(0.5, abs=1e-9)
    assert aupro(maps, masks) == pytest.approx(_reference_aupro(maps, masks, 0.3), abs=1e-12)


def test_aupro_uses_8_connectivity():
    maps, masks = _two_region_case()
    four = _reference_aupro(maps, masks, 0.3, structure=ndimage.generate_binary_structure(2, 1))
    assert four == pytest.approx(29 / 39, abs=1e-12)  # hand value, see above
    assert aupro(maps, masks) != pytest.approx(four, abs=1e-3)


def test_aupro_fpr_limit_one_single_region():
    # mask  map         region R (2 px): .8, .4; background (2 px): .9, .6
    # 1 1   .8 .4       t=.9: (1/2, 0); t=.8: (1/2, 1/2); t=.6: (1, 1/2); t=.4: (1, 1)
    # 0 0   .9 .6       area on [0, 1] = 0 * 1/2 + 1/2 * 1/2 = .25
    masks = np.array([[[1, 1], [0, 0]]])
    maps = np.array([[[0.8, 0.4], [0.9, 0.6]]])
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.25, abs=1e-12)
    # one region, full range -> the region-vs-background ROC AUC
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_aupro_perfect_and_inverted():
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 16, 16), dtype=np.uint8)
    masks[0, 2:5, 3:9] = 1
    masks[0, 10:12, 10:15] = 1
    masks[2, 7:13, 1:4] = 1  # images 1 and 3 are defect-free
    noise = rng.random(masks.shape)
    perfect = masks + 0.5 * noise  # every defect pixel above every background pixel
    inverted = -perfect  # every background pixel above every defect pixel
    assert aupro(perfect, masks) == pytest.approx(1.0, abs=1e-12)
    assert aupro(inverted, masks) == pytest.approx(0.0, abs=1e-12)
    assert aupro(inverted, masks, fpr_limit=1.0) == pytest.approx(0.0, abs=1e-12)


def test_aupro_invariant_to_monotone_transforms():
    rng = np.random.default_rng(2)
    maps, masks = _random_case(rng, n=4, h=20, w=20, levels=12)
    base = aupro(maps, masks)
    assert 0.0 < base < 1.0
    for transformed in (3.0 * maps + 1.0, np.exp(maps), 1 / (1 + np.exp(-(maps - 3))), maps.astype(np.float32)):
        assert aupro(transformed, masks) == pytest.approx(base, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_bruteforce_reference(seed, fpr_limit):
    rng = np.random.default_rng(seed)
    maps, masks = _random_case(rng)
    assert aupro(maps, masks, fpr_limit=fpr_limit) == pytest.approx(_reference_aupro(maps, masks, fpr_limit), abs=1e-12)


def test_aupro_num_thresholds():
    rng = np.random.default_rng(3)
    maps, masks = _random_case(rng, n=4, h=20, w=20)
    # integer-valued map: linspace(0, 10, 11) hits every distinct value -> exact
    int_maps = np.floor(maps).clip(0, 10)
    int_maps[0, 0, 0], int_maps[0, 0, 1] = 0, 10
    assert aupro(int_maps, masks, num_thresholds=11) == pytest.approx(aupro(int_maps, masks), abs=1e-12)
    # continuous map: close to exact with many thresholds
    cont = rng.random(masks.shape) + masks
    assert aupro(cont, masks, num_thresholds=2000) == pytest.approx(aupro(cont, masks), abs=5e-3)
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="^num_thresholds"):
            aupro(cont, masks, num_thresholds=bad)


def test_aupro_bad_fpr_limit():
    maps, masks = _two_region_case()
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="^fpr_limit"):
            aupro(maps, masks, fpr_limit=bad)


def test_aupro_undefined_is_nan():
    maps = np.random.default_rng(0).random((2, 5, 5))
    assert math.isnan(aupro(maps, np.zeros((2, 5, 5))))  # no defect region
    assert math.isnan(aupro(maps, np.ones((2, 5, 5))))  # no background


def test_aupro_on_realistic_size_is_a_proper_fraction():
    rng = np.random.default_rng(4)
    n = 20
    masks = np.zeros((n, 256, 256), dtype=np.uint8)
    masks[::2, 50:90, 60:120] = 1
    masks[1::4, 200:210, 10:30] = 1
    maps = (rng.random(masks.shape) + 0.5 * masks).astype(np.float32)
    value = aupro(maps, masks)  # speed is measured by benchmarks, not asserted here
    assert 0.0 < value < 1.0


# --------------------------------------------------------------------------
# image-level metrics
# --------------------------------------------------------------------------
def test_image_metrics_match_sklearn():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, size=200)
    scores = rng.random(200) + 0.3 * labels
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert ap_det(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert isinstance(image_auroc(scores, labels), float)
    assert isinstance(ap_det(scores, labels), float)


def test_f1_max_hand_case():
    # scores .1 .4 .35 .8, labels 0 0 1 1; predicted positive when score >= t:
    #   t=.8 : TP1 FP0 FN1 -> P 1,   R .5 -> F1 2/3
    #   t=.4 : TP1 FP1 FN1 -> P .5,  R .5 -> F1 .5
    #   t=.35: TP2 FP1 FN0 -> P 2/3, R 1  -> F1 (4/3)/(5/3) = .8   <- best
    #   t=.1 : TP2 FP2 FN0 -> P .5,  R 1  -> F1 2/3
    f1, thr = f1_max([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert f1 == pytest.approx(0.8, abs=1e-12)
    assert thr == pytest.approx(0.35)
    # perfectly separable -> F1 = 1 at the lowest positive score
    f1, thr = f1_max(np.array([0.1, 0.2, 0.7, 0.9]), np.array([0, 0, 1, 1]))
    assert (f1, thr) == (pytest.approx(1.0), pytest.approx(0.7))


def test_pixel_metrics_tiny_case():
    # pixels (map, mask): image 0: (.9,1) (.2,0) (.4,1) (.1,0); image 1: (.3,0) (.6,0) (.05,0) (.05,0)
    # AUROC = P(defect > background) over 2 x 6 pairs: .9 beats all 6, .4 beats all but .6 -> 11/12
    # AP (descending .9+ .6- .4+ ...): recall steps at rank 1 (P = 1) and rank 3 (P = 2/3)
    #    -> .5 * 1 + .5 * 2/3 = 5/6
    maps = np.array([[[0.9, 0.2], [0.4, 0.1]], [[0.3, 0.6], [0.05, 0.05]]])
    masks = np.array([[[1, 0], [1, 0]], [[0, 0], [0, 0]]])
    assert pixel_auroc(maps, masks) == pytest.approx(11 / 12, abs=1e-12)
    assert ap_loc(maps, masks) == pytest.approx(5 / 6, abs=1e-12)
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_single_class_gives_nan_without_warnings():
    scores = np.array([0.1, 0.5, 0.9])
    maps = np.random.default_rng(0).random((3, 4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(image_auroc(scores, [0, 0, 0]))
        assert math.isnan(image_auroc(scores, [1, 1, 1]))
        assert math.isnan(ap_det(scores, [0, 0, 0]))
        assert all(math.isnan(v) for v in f1_max(scores, [0, 0, 0]))
        assert math.isnan(pixel_auroc(maps, np.zeros((3, 4, 4))))
        assert math.isnan(pixel_auroc(maps, np.ones((3, 4, 4))))
        assert math.isnan(ap_loc(maps, np.zeros((3, 4, 4))))
        out = compute_metrics(scores=scores, labels=[0, 0, 0], maps=maps, masks=np.zeros((3, 4, 4)))
    assert set(out) == {
        "image_auroc",
        "ap_det",
        "f1_max",
        "f1_threshold",
        "pixel_auroc",
        "ap_loc",
        "aupro",
        "pixel_f1_max",
    }
    assert all(math.isnan(v) for v in out.values())
    # only positives: AP / F1 are defined (trivially 1), AUROC is not
    assert ap_det(scores, [1, 1, 1]) == pytest.approx(1.0)
    assert f1_max(scores, [1, 1, 1])[0] == pytest.approx(1.0)


# --------------------------------------------------------------------------
# compute_metrics
# --------------------------------------------------------------------------
def test_compute_metrics_keys_and_values():
    rng = np.random.default_rng(6)
    labels = np.array([0, 1, 0, 1, 1, 0])
    scores = rng.random(6) + 0.5 * labels
    out = compute_metrics(scores=scores, labels=labels)
    assert set(out) == {"image_auroc", "ap_det", "f1_max", "f1_threshold"}
    maps, masks = _random_case(rng, n=6)
    out = compute_metrics(scores=scores, labels=labels, maps=maps, masks=masks)
    assert set(out) == {
        "image_auroc",
        "ap_det",
        "f1_max",
        "f1_threshold",
        "pixel_auroc",
        "ap_loc",
        "aupro",
        "pixel_f1_max",
    }
    assert all(type(v) is float for v in out.values())
    assert out["image_auroc"] == image_auroc(scores, labels)
    assert out["ap_det"] == ap_det(scores, labels)
    assert (out["f1_max"], out["f1_threshold"]) == f1_max(scores, labels)
    assert out["pixel_auroc"] == pixel_auroc(maps, masks)
    assert out["ap_loc"] == ap_loc(maps, masks)
    assert out["aupro"] == aupro(maps, masks, fpr_limit=0.3)
    assert out["pixel_f1_max"] == f1_max(maps.ravel(), masks.ravel())[0]


def test_accepts_torch_tensors_and_channel_axis():
    torch = pytest.importorskip("torch")
    maps, masks = _two_region_case()
    t_maps = torch.from_numpy(maps).float()[:, None]  # [N, 1, H, W]
    t_masks = torch.from_numpy(masks).bool()[:, None]
    assert aupro(t_maps, t_masks) == pytest.approx(21 / 26, abs=1e-6)
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    labels = torch.tensor([0, 0, 1, 1])
    assert f1_max(scores, labels)[0] == pytest.approx(0.8)
    assert image_auroc(scores, labels) == pytest.approx(0.75)


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------
def test_validation_errors_name_the_argument():
    s, y = np.array([0.1, 0.2, 0.3]), np.array([0, 1, 1])
    maps, masks = np.zeros((3, 4, 4)), np.zeros((3, 4, 4))
    with pytest.raises(ValueError, match="^labels"):
        image_auroc(s, [0, 1])
    with pytest.raises(ValueError, match="^scores"):
        ap_det(np.array([0.1, np.nan, 0.3]), y)
    with pytest.raises(ValueError, match="^scores"):
        compute_metrics(scores=np.array([0.1, np.inf, 0.3]), labels=y)
    with pytest.raises(ValueError, match="^scores"):
        f1_max(s[:, None], y)
    with pytest.raises(ValueError, match="^labels"):
        image_auroc(s, [0, 2, 1])
    with pytest.raises(ValueError, match="^masks"):
        pixel_auroc(maps, np.zeros((3, 4, 5)))
    with pytest.raises(ValueError, match="^masks"):
        ap_loc(maps, masks * 255 + 255)
    with pytest.raises(ValueError, match="^maps"):
        bad = maps.copy()
        bad[1, 2, 3] = np.nan
        aupro(bad, masks)
    with pytest.raises(ValueError, match="^maps"):
        pixel_auroc(np.zeros((3, 16)), np.zeros((3, 16)))
    with pytest.raises(ValueError, match="^maps"):
        compute_metrics(scores=s, labels=y, maps=np.zeros((2, 4, 4)), masks=np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="^masks"):
        compute_metrics(scores=s, labels=y, maps=maps)
    with pytest.raises(ValueError, match="^maps"):
        compute_metrics(scores=s, labels=y, masks=masks)
    with pytest.raises(ValueError, match="^scores"):
        image_auroc([], [])


def test_image_scores_are_the_head_the_map_maximum_and_their_mean_combined():
    from supersimplenet.metrics import image_scores

    maps = np.zeros((2, 4, 4))
    maps[0, 1, 2], maps[1, 3, 3] = 0.9, 0.2
    scores = image_scores([0.1, 0.6], maps)
    assert list(scores) == ["head", "map_max", "combined", "map_top1"]
    assert np.allclose(scores["map_max"], [0.9, 0.2]) and np.allclose(scores["combined"], [0.5, 0.4])
    assert np.allclose(scores["map_top1"], [0.9, 0.2])  # 1 % of 16 pixels rounds to one pixel
    with pytest.raises(ValueError, match="maps: 2 images but scores has 3"):
        image_scores([0.1, 0.6, 0.3], maps)


def test_map_top1_is_the_mean_of_the_highest_one_percent_of_the_pixels():
    from supersimplenet.metrics import image_scores

    rng = np.random.default_rng(0)
    maps = rng.random((3, 40, 50))  # 2,000 pixels: the top 20
    scores = image_scores(rng.random(3), maps)["map_top1"]
    expected = np.sort(maps.reshape(3, -1), axis=1)[:, -20:].mean(axis=1)
    assert np.allclose(scores, expected, atol=1e-12)
    assert np.all(scores < maps.reshape(3, -1).max(axis=1))  # one bright pixel alone no longer decides
