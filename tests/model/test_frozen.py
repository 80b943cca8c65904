"""The frozen passes before training: one backbone pass with the feature cache gives the scale and memory of the
separate passes, in one process and across DDP ranks; validation from cached levels scores as from the images."""

import dataclasses
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from supersimplenet.backbones import get_preset, load_backbone_weights
from supersimplenet.config import ModelConfig, TrainConfig
from supersimplenet.feature_cache import CachedLoader
from supersimplenet.frozen import SCALE_ITEMS, run_frozen_passes
from supersimplenet.layouts import read_layout
from supersimplenet.loading import DefectDataset
from supersimplenet.model import build_model
from supersimplenet.synthetic import SyntheticDefectDataset
from supersimplenet.train import build_train_loader, eval_loader, predict, validation_loader

CONFIG = ModelConfig(image_size=(128, 128), noise_std_mode="relative", noise_std=4.0, image_score="memory")


def _dataset(weld_root, *, count, flips=False, with_defects=False):
    samples = read_layout(weld_root)
    train = [s for s in samples if s.split == "train"][:count]
    if with_defects:  # a supervised training set: its defective images must stay out of the memory
        defects = [s for s in samples if s.label == 1 and s.mask is not None][:3]
        train += [dataclasses.replace(d, split="train", segmented=True) for d in defects]
    preset = get_preset(CONFIG.backbone)
    return DefectDataset(
        root=weld_root, samples=train, image_size=CONFIG.image_size, mean=preset.mean, std=preset.std, flips=flips
    )


def _model():
    model = build_model(CONFIG)
    load_backbone_weights(model.feature_extractor.backbone, CONFIG.backbone, "default")
    return model


def _passes(dataset, *, cache_mib, rank=0, world_size=1, precision="fp32"):
    cfg = TrainConfig(batch_size=8, feature_cache_mib=cache_mib, precision=precision)
    model = _model()
    loader, sampler = build_train_loader(dataset, dataset.samples, cfg, rank=rank, world_size=world_size)
    loader = run_frozen_passes(
        model, loader, sampler, cfg, device=torch.device("cpu"), rank=rank, world_size=world_size
    )
    return model, loader


def _assert_same_frozen_state(got, want, *, rtol):
    torch.testing.assert_close(got.feature_scale, want.feature_scale, rtol=rtol, atol=0)
    torch.testing.assert_close(got.memory.center, want.memory.center, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(got.memory.spread, want.memory.spread, rtol=rtol, atol=1e-6)
    assert got.memory.bank.shape == want.memory.bank.shape
    torch.testing.assert_close(got.memory.bank.float(), want.memory.bank.float(), rtol=rtol, atol=2e-3)


@pytest.mark.parametrize(
    ("flips", "with_defects", "rtol"),
    [(False, False, 0.0), (True, True, 1e-5)],
    ids=["normal images only: bitwise", "flips and defective images: to float rounding"],
)
def test_one_cached_pass_gives_the_noise_scale_and_memory_of_the_separate_passes(weld_root, flips, with_defects, rtol):
    dataset = _dataset(weld_root, count=12, flips=flips, with_defects=with_defects)
    cached_model, cached_loader = _passes(dataset, cache_mib=4096)
    plain_model, plain_loader = _passes(dataset, cache_mib=0)
    assert isinstance(cached_loader, CachedLoader) and not isinstance(plain_loader, CachedLoader)
    assert cached_loader.cache.derived == {}  # the per-image moments and patches are dropped once used
    # 12 normal seams x a 4 x 4 grid (128 x 128 pixels, stride 4, pooled 8 x 8): the flips and defects are not in it
    assert cached_model.memory.bank.shape[0] == 192 and float(cached_model.feature_scale) > 0.1
    _assert_same_frozen_state(cached_model, plain_model, rtol=rtol)


def test_bf16_training_still_measures_the_scale_and_memory_on_float32_features(weld_root):
    dataset = _dataset(weld_root, count=6)
    half_model, half_loader = _passes(dataset, cache_mib=4096, precision="bf16")
    plain_model, _ = _passes(dataset, cache_mib=0, precision="bf16")
    assert half_loader.cache.levels[0].dtype == torch.bfloat16
    _assert_same_frozen_state(half_model, plain_model, rtol=0.0)


def test_the_scale_is_measured_on_the_first_items_only(weld_root):
    assert SCALE_ITEMS == 128  # the weld training set has 36 images: with 4 flips, 144 items, the last 16 unused
    dataset = _dataset(weld_root, count=36, flips=True)
    first = torch.utils.data.Subset(dataset, range(SCALE_ITEMS))
    model, _ = _passes(dataset, cache_mib=0)
    reference = _model()
    with torch.no_grad():
        features = torch.cat([reference.feature_extractor(first[i]["image"][None]) for i in range(SCALE_ITEMS)])
    std = features.double().transpose(0, 1).flatten(1).std(1, unbiased=False)
    assert float(model.feature_scale) == pytest.approx(float(std.median()), rel=1e-6)


def _rank(rank, world_size, port, weld_root, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        dataset = _dataset(weld_root, count=9, flips=True)  # 36 items in shares of 18
        model, _ = _passes(dataset, cache_mib=4096, rank=rank, world_size=world_size)
        memory = model.memory
        state = {"scale": model.feature_scale, "center": memory.center, "spread": memory.spread, "bank": memory.bank}
        torch.save(state, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_each_get_the_scale_and_memory_of_one_process_from_their_shares(weld_root, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank, args=(2, port, weld_root, tmp_path), nprocs=2, join=True)
    single, _ = _passes(_dataset(weld_root, count=9, flips=True), cache_mib=0)
    for rank in range(2):
        held = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        # one thread per rank against two here and other batches: float rounding through the depthwise stack
        torch.testing.assert_close(held["scale"], single.feature_scale, rtol=1e-4, atol=0)
        torch.testing.assert_close(held["center"], single.memory.center, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(held["spread"], single.memory.spread, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(held["bank"].float(), single.memory.bank.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kind", ["labelled weld seams with masks", "synthetic defects"])
def test_validation_from_cached_levels_scores_as_validation_from_the_images(weld_root, kind):
    model, _ = _passes(_dataset(weld_root, count=8), cache_mib=0)  # random heads, the memory of 8 seams
    preset = get_preset(CONFIG.backbone)
    common = dict(root=weld_root, image_size=CONFIG.image_size, mean=preset.mean, std=preset.std)
    samples = read_layout(weld_root)
    if kind == "synthetic defects":
        normal = [s for s in samples if s.split == "test" and s.label == 0][:5]
        dataset = SyntheticDefectDataset(samples=normal, seed=3, recipe="mixed", **common)
    else:
        dataset = DefectDataset(samples=[s for s in samples if s.split == "test"][::8], **common)
    device = torch.device("cpu")
    cached = validation_loader(model, dataset, device=device, batch_size=4, budget_bytes=2**30)
    assert isinstance(cached, CachedLoader)
    assert not isinstance(validation_loader(model, dataset, device=device, batch_size=4, budget_bytes=1), CachedLoader)
    got, want = predict(model, cached, device=device), predict(model, eval_loader(dataset, batch_size=4), device=device)
    assert got.masks.any() and np.array_equal(got.masks, want.masks) and np.array_equal(got.labels, want.labels)
    # the cache's levels come from the reference backbone, the images' from the fast path's (channels_last): the
    # fast path's own tolerance against the reference (tests/model/test_fast.py)
    np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=2e-5)
    np.testing.assert_allclose(got.head_scores, want.head_scores, rtol=0, atol=2e-5)
    np.testing.assert_allclose(got.maps, want.maps, rtol=0, atol=2e-5)
