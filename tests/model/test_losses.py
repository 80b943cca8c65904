"""Loss golden numbers (docs/design.md §10.7, §10.8)."""

import math

import numpy as np
import pytest
import torch

from supersimplenet.losses import (
    dilate_masks,
    distance_weight_maps,
    distance_weights,
    focal_loss,
    supersimplenet_loss,
    truncated_l1,
)


def test_toy_case():
    logits = torch.tensor([-1.0, 0.2, 0.8, 0.3]).view(1, 1, 2, 2)
    mask = torch.tensor([0.0, 1.0, 1.0, 0.0]).view(1, 1, 2, 2)
    out = supersimplenet_loss(logits, torch.tensor([0.5]), mask, torch.tensor([1.0]))
    assert float(out["truncated_l1"]) == pytest.approx(0.55, abs=1e-7)
    assert float(out["focal_map"]) == pytest.approx(0.0306653, abs=1e-7)
    assert float(out["focal_score"]) == pytest.approx(0.0096317, abs=1e-7)
    assert float(out["loss"]) == pytest.approx(0.5902970, abs=1e-7)


def test_focal_at_zero_and_truncated_l1_all_normal():
    assert float(focal_loss(torch.zeros(3), torch.ones(3))) == pytest.approx(math.log(2) / 16, abs=1e-7)
    assert float(truncated_l1(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))) == pytest.approx(0.5)


def test_map_terms_only_over_segmented_samples():
    logits = torch.tensor([[-1.0, 0.2, 0.8, 0.3], [5.0, 5.0, 5.0, 5.0]]).view(2, 1, 2, 2)
    masks = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).view(2, 1, 2, 2)
    out = supersimplenet_loss(
        logits, torch.tensor([0.5, 0.5]), masks, torch.tensor([1.0, 1.0]), segmented=torch.tensor([True, False])
    )
    assert float(out["truncated_l1"]) == pytest.approx(0.55, abs=1e-7)
    assert float(out["focal_map"]) == pytest.approx(0.0306653, abs=1e-7)
    # the weak sample still trains the classification head
    assert float(out["focal_score"]) == pytest.approx(0.0096317, abs=1e-7)


def test_weights_scale_pixel_terms():
    logits = torch.zeros(1, 1, 2, 2)
    masks = torch.zeros(1, 1, 2, 2)
    assert float(truncated_l1(logits, masks, weights=torch.full_like(masks, 3.0))) == pytest.approx(1.5)


def test_distance_weights():
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[2:9, 2:9] = 1
    mask[12:15, 14:19] = 1
    w = distance_weights(mask)
    assert np.all(w[mask == 0] == 1)
    inside = w[mask == 1]
    assert np.all((inside > 0) & (inside <= 3))
    assert w[2:9, 2:9].max() == pytest.approx(3) and w[12:15, 14:19].max() == pytest.approx(3)
    assert np.all(distance_weights(np.zeros((5, 5))) == 1)
    maps = distance_weight_maps(torch.from_numpy(mask).float()[None, None], (10, 10))
    assert maps.shape == (1, 1, 10, 10)


def test_dilation_7x7():
    m = torch.zeros(1, 1, 15, 15)
    m[..., 7, 7] = 1
    assert int(dilate_masks(m, 7).sum()) == 49
    assert torch.equal(dilate_masks(m, 1), m)
