"""Tests of the dataset modules: layout readers (supersimplenet.layouts, .readers), supervision regimes
(.supervision), loading (.loading) and balanced sampling (.sampler)."""

from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from supersimplenet.layouts import detect_layout, read_layout
from supersimplenet.loading import DefectDataset, load_image, load_mask
from supersimplenet.sampler import BalancedSampler
from supersimplenet.samples import DataError, Sample
from supersimplenet.supervision import apply_supervision
from supersimplenet.validation import validate_samples

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------------
# fixture helpers
# ---------------------------------------------------------------------------------------------------------------


def _image(path: Path, *, size=(24, 16), mode="RGB", seed=0) -> Path:
    """A random image of `size` = (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def _mask(path: Path, *, size=(24, 16), defect=True, value=255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0]), dtype=np.uint8)
    if defect:
        arr[2:6, 3:9] = value
    Image.fromarray(arr, mode="L").save(path)
    return path


def _mvtec(root: Path) -> Path:
    _image(root / "train/good/a.png")
    _image(root / "train/good/b.png", mode="L")
    _image(root / "test/good/c.png")
    for stem in ("d", "e", "f"):
        _image(root / f"test/crack/{stem}.png", mode="L")
    _mask(root / "ground_truth/crack/d_mask.png")  # MVTec naming
    _mask(root / "ground_truth/crack/e.png")  # battery-weld naming; f has no mask (weak)
    return root


MVTEC_SAMPLES = [
    Sample("train/good/a.png", None, 0, "train", True),
    Sample("train/good/b.png", None, 0, "train", True),
    Sample("test/crack/d.png", "ground_truth/crack/d_mask.png", 1, "test", True, "crack"),
    Sample("test/crack/e.png", "ground_truth/crack/e.png", 1, "test", True, "crack"),
    Sample("test/crack/f.png", None, 1, "test", False, "crack"),
    Sample("test/good/c.png", None, 0, "test", True),
]


# ---------------------------------------------------------------------------------------------------------------
# layouts on fixtures
# ---------------------------------------------------------------------------------------------------------------


def test_mvtec_layout(tmp_path):
    root = _mvtec(tmp_path / "ds")
    assert detect_layout(root) == "mvtec"
    assert read_layout(root) == MVTEC_SAMPLES
    validate_samples(root, MVTEC_SAMPLES)


def test_mvtec_category_subfolder(tmp_path):
    _mvtec(tmp_path / "bottle")
    _image(tmp_path / "cable/train/good/x.png")
    assert detect_layout(tmp_path) == "mvtec"
    with pytest.raises(DataError, match="category"):
        read_layout(tmp_path, "mvtec")
    samples = read_layout(tmp_path, "mvtec", category="bottle")
    assert [s.image for s in samples] == [f"bottle/{s.image}" for s in MVTEC_SAMPLES]


def test_mvtec_mask_without_image(tmp_path):
    root = _mvtec(tmp_path / "ds")
    orphan = _mask(root / "ground_truth/crack/zz_mask.png")
    orphan2 = _mask(root / "ground_truth/hole/q.png")  # a defect folder without test images
    with pytest.raises(DataError) as err:
        read_layout(root, "mvtec")
    assert str(orphan) in str(err.value)
    assert str(orphan2.parent) in str(err.value)


def test_visa_layout(tmp_path):
    root = tmp_path / "visa"
    _image(root / "candle/Data/Images/Normal/0000.JPG")
    _image(root / "candle/Data/Images/Normal/0001.JPG")
    _image(root / "candle/Data/Images/Anomaly/000.JPG")
    _mask(root / "candle/Data/Masks/Anomaly/000.png", value=1)  # VisA masks hold class ids, not 255
    _image(root / "candle/Data/Images/Anomaly/001.JPG")
    _image(root / "pcb1/Data/Images/Normal/0000.JPG")
    (root / "split_csv").mkdir()
    (root / "split_csv/1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/001.JPG,\n"
        "pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,\n"
    )
    assert detect_layout(root) == "visa"
    samples = read_layout(root, category="candle")
    assert samples == [
        Sample("candle/Data/Images/Normal/0000.JPG", None, 0, "train", True),
        Sample("candle/Data/Images/Normal/0001.JPG", None, 0, "test", True),
        Sample("candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png", 1, "test", True),
        Sample("candle/Data/Images/Anomaly/001.JPG", None, 1, "test", False),
    ]
    validate_samples(root, samples)
    with pytest.raises(DataError, match="several objects"):
        read_layout(root, "visa")
    with pytest.raises(DataError, match="'nope'"):
        read_layout(root, "visa", category="nope")


def test_ksdd2_layout(tmp_path):
    root = tmp_path / "ksdd2"
    _image(root / "train/10000.png", mode="L")
    _mask(root / "train/10000_GT.png", defect=False)
    _image(root / "train/10001.png", mode="L")
    _mask(root / "train/10001_GT.png")
    _image(root / "test/20000.png", mode="L")
    _mask(root / "test/20000_GT.png")
    assert detect_layout(root) == "ksdd2"
    assert read_layout(root) == [
        Sample("train/10000.png", "train/10000_GT.png", 0, "train", True),
        Sample("train/10001.png", "train/10001_GT.png", 1, "train", True),
        Sample("test/20000.png", "test/20000_GT.png", 1, "test", True),
    ]
    _image(root / "test/20001.png", mode="L")  # no _GT: no label either
    with pytest.raises(DataError, match="20001.png"):
        read_layout(root, "ksdd2")


def test_sensum_layout_folds(tmp_path):
    base = tmp_path / "sensum" / "capsule"
    for i in range(6):
        _image(base / f"negative/data/n{i}.png")
    for i in range(3):
        _image(base / f"positive/data/p{i}.png")
    _mask(base / "positive/annotation/p0.png")
    _mask(base / "positive/annotation/p1.png")  # p2 has none -> weakly labelled
    root = tmp_path / "sensum"
    assert detect_layout(root) == "sensum"
    samples = read_layout(root, "sensum", fold=1)
    neg = [
        Sample(f"capsule/negative/data/n{i}.png", None, 0, "test" if i % 3 == 1 else "train", True) for i in range(6)
    ]
    pos = [
        Sample("capsule/positive/data/p0.png", "capsule/positive/annotation/p0.png", 1, "train", True),
        Sample("capsule/positive/data/p1.png", "capsule/positive/annotation/p1.png", 1, "test", True),
        Sample("capsule/positive/data/p2.png", None, 1, "train", False),
    ]
    assert samples == neg + pos
    # The 3 folds partition every image into test exactly once.
    tests = collections.Counter(
        s.image for f in range(3) for s in read_layout(root, "sensum", fold=f) if s.split == "test"
    )
    assert len(tests) == 9 and set(tests.values()) == {1}
    # A second category makes `category` mandatory.
    _image(tmp_path / "sensum/softgel/negative/data/x.png")
    with pytest.raises(DataError, match="category"):
        read_layout(root, "sensum")
    assert read_layout(root, "sensum", category="capsule", fold=1) == samples
    with pytest.raises(DataError, match="fold"):
        read_layout(root, "sensum", category="capsule", fold=3)


def test_folder_layout_with_labels_csv(tmp_path):
    root = tmp_path / "plate"
    _image(root / "train/images/a.png")
    _mask(root / "train/masks/a.png", defect=False)
    _image(root / "train/images/b.png")
    _mask(root / "train/masks/b.png")
    _image(root / "train/images/c.png")  # no mask: label from labels.csv
    _image(root / "val/images/d.png", mode="L")
    _mask(root / "val/masks/d.png")
    _image(root / "test/images/e.png")  # test has no masks folder at all
    (root / "labels.csv").write_text("image,label\ntrain/images/c.png,1\ntest/images/e.png,0\n")
    assert detect_layout(root) == "folder"
    assert read_layout(root) == [
        Sample("train/images/a.png", "train/masks/a.png", 0, "train", True),
        Sample("train/images/b.png", "train/masks/b.png", 1, "train", True),
        Sample("train/images/c.png", None, 1, "train", False),
        Sample("val/images/d.png", "val/masks/d.png", 1, "val", True),
        Sample("test/images/e.png", None, 0, "test", True),
    ]
    (root / "labels.csv").unlink()
    with pytest.raises(DataError) as err:
        read_layout(root, "folder")
    assert str(root / "train/images/c.png") in str(err.value)
    assert str(root / "test/images/e.png") in str(err.value)


def test_split_file(tmp_path):
    root = _mvtec(tmp_path / "ds")
    split_file = tmp_path / "splits.txt"
    split_file.write_text("# fixed validation split\nval test/good/c.png\n\nval train/good/b.png\n")
    samples = read_layout(root, split_file=split_file)
    assert {s.image: s.split for s in samples} == {
        "train/good/a.png": "train",
        "train/good/b.png": "val",
        "test/crack/d.png": "test",
        "test/crack/e.png": "test",
        "test/crack/f.png": "test",
        "test/good/c.png": "val",
    }
    split_file.write_text("val test/good/missing.png\n")
    with pytest.raises(DataError, match="test/good/missing.png"):
        read_layout(root, split_file=split_file)
    split_file.write_text("holdout test/good/c.png\n")
    with pytest.raises(DataError, match="holdout"):
        read_layout(root, split_file=split_file)


def test_unknown_layout_and_options(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=str(tmp_path / "empty")):
        detect_layout(tmp_path / "empty")
    root = _mvtec(tmp_path / "ds")
    with pytest.raises(DataError, match="unknown layout"):
        read_layout(root, "coco")
    with pytest.raises(DataError, match="fold"):
        read_layout(root, "mvtec", fold=1)
    with pytest.raises(DataError, match="not a folder"):
        read_layout(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------------------
# real data (read-only)
# ---------------------------------------------------------------------------------------------------------------


def test_battery_weld_denoised(shared_data):
    root = shared_data / "battery_weld" / "denoised"
    samples = read_layout(root)
    counts = collections.Counter((s.split, s.label) for s in samples)
    assert counts == {("train", 0): 36, ("test", 0): 35, ("test", 1): 74}
    defective = [s for s in samples if s.label == 1]
    assert all(s.segmented and s.mask == f"ground_truth/defective/{Path(s.image).name}" for s in defective)
    assert {s.defect_type for s in defective} == {"defective"}
    validate_samples(root, samples)


def test_mpdd_metal_plate_folder(shared_data):
    root = shared_data / "mpdd_metal_plate" / "data_supervised" / "metal_plate"
    samples = read_layout(root, "folder")
    counts = collections.Counter((s.split, s.label) for s in samples)
    assert counts == {
        ("train", 0): 41,
        ("train", 1): 53,
        ("val", 0): 13,
        ("val", 1): 7,
        ("test", 0): 26,
        ("test", 1): 21,
    }
    assert all(s.segmented and s.mask is not None for s in samples)
    validate_samples(root, samples)


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------


def test_load_image_and_mask(tmp_path):
    gray = _image(tmp_path / "g.png", size=(40, 30), mode="L")
    img = load_image(gray, size=(256, 256))
    assert img.shape == (3, 256, 256) and img.dtype == torch.float32
    assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])
    raw = torch.from_numpy(np.asarray(Image.open(gray), dtype=np.float32) / 255.0)
    expected = F.interpolate(raw[None, None], size=(256, 256), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(img[0], expected, atol=1e-6)
    assert torch.allclose(load_image(gray, size=(30, 40))[0], raw)  # no resize at native size

    mask = load_mask(_mask(tmp_path / "m.png", size=(40, 30), value=7), size=(60, 80))
    assert mask.shape == (1, 60, 80)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(load_mask(None, size=(5, 6)), torch.zeros(1, 5, 6))
    with pytest.raises(DataError, match="nope.png"):
        load_image(tmp_path / "nope.png", size=(8, 8))


def test_defect_dataset(tmp_path):
    root = tmp_path / "ds"
    _image(root / "g.png", size=(40, 30), mode="L")
    _mask(root / "gm.png", size=(40, 30))
    _image(root / "n.png", size=(30, 20))
    samples = [Sample("g.png", "gm.png", 1, "train", True), Sample("n.png", None, 0, "train", True)]
    ds = DefectDataset(root=root, samples=samples, image_size=(256, 256), mean=MEAN, std=STD, flips=True)
    assert len(ds) == 8
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)

    base = ds[0]
    assert base["image"].shape == (3, 256, 256) and base["mask"].shape == (1, 256, 256)
    assert base["label"].dtype == torch.float32 and base["label"].shape == () and base["label"].item() == 1.0
    assert base["segmented"].dtype == torch.bool and bool(base["segmented"])
    assert base["index"] == 0
    raw = base["image"] * std + mean
    assert torch.allclose(raw, load_image(root / "g.png", size=(256, 256)), atol=1e-5)
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[0], raw[2], atol=1e-5)
    assert base["mask"].sum() > 0

    vflip, hflip, rot = ds[2], ds[4], ds[6]  # n = 2 samples: variant = index // 2
    for key in ("image", "mask"):
        assert torch.equal(vflip[key], base[key].flip(-2))
        assert torch.equal(hflip[key], base[key].flip(-1))
        assert torch.equal(rot[key], torch.rot90(base[key], 2, dims=(-2, -1)))
    normal = ds[7]
    assert normal["label"].item() == 0.0 and normal["mask"].sum() == 0 and normal["index"] == 7
    assert len(DefectDataset(root=root, samples=samples, image_size=(64, 64), mean=MEAN, std=STD)) == 2
    with pytest.raises(IndexError):
        ds[8]


# ---------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------


def test_validate_samples_reports_every_problem(tmp_path):
    root = tmp_path / "ds"
    broken = root / "broken.png"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    _image(root / "big.png", size=(24, 16))
    small_mask = _mask(root / "big_mask.png", size=(12, 8))
    orphan_mask = _mask(root / "gone_mask.png")
    samples = [
        Sample("broken.png", None, 0, "test", True),
        Sample("big.png", "big_mask.png", 1, "test", True),
        Sample("gone.png", "gone_mask.png", 1, "test", True),
    ]
    with pytest.raises(DataError) as err:
        validate_samples(root, samples)
    message = str(err.value)
    assert str(broken) in message and "unreadable image" in message
    assert str(small_mask) in message and "size" in message
    assert str(orphan_mask) in message and "mask without image" in message
    assert "empty train set" in message and str(root) in message


def test_validate_samples_label_mask_consistency(tmp_path):
    root = tmp_path / "ds"
    _image(root / "a.png")
    _mask(root / "a_mask.png", defect=False)
    with pytest.raises(DataError, match="empty mask for a defective image"):
        validate_samples(root, [Sample("a.png", "a_mask.png", 1, "train", True)])
    validate_samples(root, [Sample("a.png", "a_mask.png", 0, "train", True)])


def test_sample_rejects_inconsistent_fields():
    with pytest.raises(DataError):
        Sample("/abs/a.png", None, 0, "train", True)
    with pytest.raises(DataError):
        Sample("a.png", None, 2, "train", True)
    with pytest.raises(DataError):
        Sample("a.png", None, 0, "holdout", True)
    with pytest.raises(DataError):
        Sample("a.png", "m.png", 1, "train", False)


# ---------------------------------------------------------------------------------------------------------------
# supervision regimes
# ---------------------------------------------------------------------------------------------------------------


def _regime_samples() -> list[Sample]:
    out = [Sample(f"n{i}.png", None, 0, "train", True) for i in range(3)]
    out += [Sample(f"d{i}.png", f"d{i}_mask.png", 1, "train", True, "crack") for i in range(10)]
    out += [Sample("t0.png", "t0_mask.png", 1, "test", True), Sample("v0.png", "v0_mask.png", 1, "val", True)]
    return out


def test_apply_supervision_regimes():
    samples = _regime_samples()
    held_out = samples[-2:]

    unsup = apply_supervision(samples, "unsupervised")
    assert [s for s in unsup if s.split == "train"] == samples[:3]
    assert unsup[-2:] == held_out

    weak = apply_supervision(samples, "weak")
    assert all(s.mask is None and not s.segmented for s in weak if s.split == "train" and s.label == 1)
    assert weak[:3] == samples[:3] and weak[-2:] == held_out

    assert apply_supervision(samples, "supervised") == samples

    mixed = apply_supervision(samples, "mixed", mask_ratio=0.3, seed=1)
    kept = {s.image for s in mixed if s.split == "train" and s.label == 1 and s.segmented}
    assert len(kept) == 3 and mixed[-2:] == held_out
    assert all(s.mask is None for s in mixed if s.label == 1 and s.split == "train" and s.image not in kept)
    # Deterministic, independent of input order, nested across ratios.
    assert apply_supervision(samples[::-1], "mixed", mask_ratio=0.3, seed=1) == mixed[::-1]
    bigger = apply_supervision(samples, "mixed", mask_ratio=0.6, seed=1)
    assert kept < {s.image for s in bigger if s.split == "train" and s.label == 1 and s.segmented}
    other_seed = apply_supervision(samples, "mixed", mask_ratio=0.3, seed=2)
    assert kept != {s.image for s in other_seed if s.split == "train" and s.label == 1 and s.segmented}
    assert apply_supervision(samples, "mixed", mask_ratio=0.0) == weak

    with pytest.raises(DataError, match="only 0 of 10"):
        apply_supervision(weak, "mixed", mask_ratio=0.5)
    with pytest.raises(DataError, match="regime"):
        apply_supervision(samples, "semi")


# ---------------------------------------------------------------------------------------------------------------
# balanced sampler
# ---------------------------------------------------------------------------------------------------------------

LABELS = [0] * 30 + [1] * 4 + [0] * 10  # 4 positives, 40 negatives, positives not at the front


def test_balanced_sampler_epoch_composition():
    n, pos = len(LABELS), [i for i, v in enumerate(LABELS) if v == 1]
    sampler = BalancedSampler(labels=LABELS, flips=True, seed=3)
    epoch = list(sampler)
    assert len(epoch) == len(sampler) == 8 * len(pos)
    counts = collections.Counter(epoch)
    # Every positive appears once in each of the 4 flip variants.
    assert all(counts[p + v * n] == 1 for p in pos for v in range(4))
    negatives = [i for i in epoch if i < n and LABELS[i] == 0]
    assert len(negatives) == 4 * len(pos) and len(set(negatives)) == len(negatives)  # without replacement
    assert len(epoch) == sum(counts[p + v * n] for p in pos for v in range(4)) + len(negatives)

    no_flips = BalancedSampler(labels=LABELS, flips=False, seed=3)
    epoch = list(no_flips)
    assert len(epoch) == 4 * len(pos) and max(epoch) < n
    assert all(collections.Counter(epoch)[p] == 2 for p in pos)


def test_balanced_sampler_inverse_frequency_equalises():
    sampler = BalancedSampler(labels=LABELS, flips=True, seed=0)
    cumulative = collections.Counter()
    negatives = [i for i, v in enumerate(LABELS) if v == 0]
    for epoch in range(12):
        sampler.set_epoch(epoch)
        cumulative.update(i for i in sampler if i < len(LABELS) and LABELS[i] == 0)
        counts = [cumulative[i] for i in negatives]
        assert max(counts) - min(counts) <= 2, (epoch, counts)
    assert sum(counts) == 12 * 16


def test_balanced_sampler_with_replacement_when_few_negatives():
    labels = [1] * 5 + [0] * 3
    sampler = BalancedSampler(labels=labels, flips=True)
    negatives = [i for i in sampler if i < len(labels) and labels[i] == 0]
    assert len(negatives) == 20 and set(negatives) == {5, 6, 7}


def test_balanced_sampler_sharding_and_determinism():
    single = BalancedSampler(labels=LABELS, seed=7)
    single.set_epoch(5)
    full = list(single)
    ranks = []
    for rank in range(2):
        sampler = BalancedSampler(labels=LABELS, seed=7, rank=rank, world_size=2)
        sampler.set_epoch(5)  # computes epoch 5 directly: the history is replayed internally
        ranks.append(list(sampler))
    assert len(ranks[0]) == len(ranks[1]) == math.ceil(len(full) / 2)
    assert collections.Counter(ranks[0] + ranks[1]) == collections.Counter(full)  # 32 items: no padding
    assert ranks[0] == full[0::2] and ranks[1] == full[1::2]  # disjoint positions of one list

    three = []
    for rank in range(3):
        sampler = BalancedSampler(labels=LABELS, seed=7, rank=rank, world_size=3)
        sampler.set_epoch(5)
        three.append(list(sampler))
    assert {len(r) for r in three} == {11}  # 32 padded to 33 by wrapping
    assert collections.Counter(sum(three, [])) == collections.Counter(full + full[:1])

    again = BalancedSampler(labels=LABELS, seed=7)
    again.load_state_dict(single.state_dict())
    assert list(again) == full
    assert single.epoch_indices(4) != full and single.epoch_indices(6) != full
    assert BalancedSampler(labels=LABELS, seed=8).epoch_indices(5) != full


def test_balanced_sampler_rejects_one_class():
    with pytest.raises(DataError):
        BalancedSampler(labels=[0, 0, 0])
    with pytest.raises(DataError):
        BalancedSampler(labels=[1, 1])
