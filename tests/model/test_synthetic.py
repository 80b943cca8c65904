"""Tests for supersimplenet.synthetic: image-space synthetic defects for validation without labelled defects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from supersimplenet.loading import DefectDataset
from supersimplenet.samples import Sample
from supersimplenet.synthetic import SyntheticDefectDataset, defect_region, item_generator

MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.3)
SIZE = (72, 96)  # (height, width); not powers of two on purpose


def _normal_set(root: Path, count: int = 4) -> list[Sample]:
    rng = np.random.default_rng(7)
    samples = []
    for i in range(count):
        # smooth gradients + texture: every image differs, as in a real set
        y, x = np.mgrid[0:50, 0:70]
        base = (0.3 + 0.4 * (x / 70.0) * (0.5 + 0.1 * i) + 0.1 * np.sin(y / (3 + i))) * 255
        array = np.clip(base[..., None] + rng.integers(-8, 9, (50, 70, 3)), 0, 255).astype(np.uint8)
        path = root / "good" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)
        samples.append(Sample(image=f"good/{i:03d}.png", mask=None, label=0, split="val", segmented=True))
    return samples


def _dataset(root: Path, samples, seed: int = 3) -> SyntheticDefectDataset:
    return SyntheticDefectDataset(root=root, samples=samples, image_size=SIZE, mean=MEAN, std=STD, seed=seed)


@pytest.fixture
def normal_set(tmp_path: Path) -> tuple[Path, list[Sample]]:
    return tmp_path, _normal_set(tmp_path)


def test_two_items_per_normal_image_with_consistent_labels_and_masks(normal_set):
    root, samples = normal_set
    dataset = _dataset(root, samples)
    plain = DefectDataset(root=root, samples=samples, image_size=SIZE, mean=MEAN, std=STD)
    n = len(samples)
    assert len(dataset) == 2 * n
    for i in range(2 * n):
        item = dataset[i]
        assert item["image"].shape == (3, *SIZE) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, *SIZE) and item["mask"].dtype == torch.float32
        assert item["label"].dtype == torch.float32 and item["label"].shape == ()
        assert item["segmented"].dtype == torch.bool and bool(item["segmented"])
        assert item["index"] == i
        assert set(torch.unique(item["mask"]).tolist()) <= {0.0, 1.0}
        # normalised values of an image in [0, 1]
        low = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
        high = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
        assert (item["image"] >= low.view(3, 1, 1) - 1e-5).all() and (item["image"] <= high.view(3, 1, 1) + 1e-5).all()
        normal = plain[i % n]["image"]
        if i < n:
            assert float(item["label"]) == 0.0 and not item["mask"].any()
            assert torch.equal(item["image"], normal)  # the normal half is the image as is
        else:
            assert float(item["label"]) == 1.0
            area = float(item["mask"].mean())
            assert 0.0 < area <= 0.08, area  # a few % of the image, never empty
            inside = item["mask"][0].bool()
            # outside the mask the image is untouched, inside it changed
            assert torch.equal(item["image"][:, ~inside], normal[:, ~inside])
            assert not torch.allclose(item["image"][:, inside], normal[:, inside])


def test_deterministic_for_a_seed_in_any_order_and_different_across_seeds(normal_set):
    root, samples = normal_set
    a, b = _dataset(root, samples, seed=11), _dataset(root, samples, seed=11)
    n = len(samples)
    forward = [a[i] for i in range(2 * n)]
    backward = [b[i] for i in reversed(range(2 * n))][::-1]
    for x, y in zip(forward, backward):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    other = _dataset(root, samples, seed=12)
    assert any(not torch.equal(forward[n + k]["mask"], other[n + k]["mask"]) for k in range(n))
    # negative indices address the same items
    assert torch.equal(a[-1]["image"], forward[-1]["image"])
    with pytest.raises(IndexError):
        a[2 * n]


def test_only_normal_images_are_accepted(normal_set):
    root, samples = normal_set
    bad = Sample(image=samples[0].image, mask=None, label=1, split="val", segmented=False)
    with pytest.raises(ValueError, match="normal images only"):
        _dataset(root, [*samples[1:], bad])
    with pytest.raises(ValueError, match="at least one"):
        _dataset(root, [])


def test_a_single_image_set_still_yields_a_defect(normal_set):
    root, samples = normal_set
    dataset = _dataset(root, samples[:1])
    assert len(dataset) == 2 and float(dataset[1]["label"]) == 1.0 and dataset[1]["mask"].any()


@pytest.mark.parametrize("size", [(68, 68), (256, 128), (100, 300)])
def test_regions_cover_a_few_percent_and_are_never_empty(size):
    areas = []
    for index in range(40):
        region = defect_region(size, item_generator(5, index))
        assert region.shape == size
        areas.append(float(region.mean()))
    assert min(areas) > 0.0
    assert 0.005 <= float(np.median(areas)) <= 0.07
    assert max(areas) <= 0.08


@pytest.mark.parametrize("kind", ["scratch", "holes", "stain", "warp"])
def test_each_structural_kind_changes_the_image_only_around_its_non_empty_mask(kind, normal_set):
    from supersimplenet.loading import load_image
    from supersimplenet.synthetic import structural_defect

    root, samples = normal_set
    image = load_image(root / samples[0].image, size=(128, 160))
    changed_somewhere = False
    for index in range(6):
        defective, mask = structural_defect(image, kind, item_generator(11, index))
        assert defective.shape == image.shape and mask.shape == (1, 128, 160)
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() >= 1
        assert 0.0 <= float(defective.min()) and float(defective.max()) <= 1.0
        near = torch.nn.functional.max_pool2d(mask[None], kernel_size=5, stride=1, padding=2)[0]
        assert torch.equal(defective * (1 - near), image * (1 - near))  # untouched beyond 2 px of the mask
        changed_somewhere |= bool((defective - image).abs().amax() > 0.05)
        again, again_mask = structural_defect(image, kind, item_generator(11, index))
        assert torch.equal(again, defective) and torch.equal(again_mask, mask)
    assert changed_somewhere


def test_the_mixed_recipe_is_deterministic_and_the_blend_recipe_is_the_default(normal_set):
    root, samples = normal_set
    default = _dataset(root, samples)
    blend = SyntheticDefectDataset(
        root=root, samples=samples, image_size=SIZE, mean=MEAN, std=STD, seed=3, recipe="blend"
    )
    for index in range(len(samples), 2 * len(samples)):
        assert torch.equal(default[index]["image"], blend[index]["image"])
    mixed = [
        SyntheticDefectDataset(root=root, samples=samples, image_size=SIZE, mean=MEAN, std=STD, seed=3, recipe="mixed")
        for _ in range(2)
    ]
    for index in range(len(samples), 2 * len(samples)):
        assert torch.equal(mixed[0][index]["image"], mixed[1][index]["image"])
        assert mixed[0][index]["mask"].sum() >= 1
    with pytest.raises(ValueError, match="unknown synthetic recipe 'cracks'"):
        SyntheticDefectDataset(root=root, samples=samples, image_size=SIZE, mean=MEAN, std=STD, seed=3, recipe="cracks")
