"""The feature store: a run that puts the same frozen backbone over the same items loads the cache an earlier run
built (the same levels, noise scale and memory, without running the backbone); anything that changes the items or
the backbone makes a new key; torn entries are rebuilt; the store stays within its bound."""

import dataclasses
import shutil

import torch

from supersimplenet.backbones import get_preset, load_backbone_weights
from supersimplenet.config import ModelConfig, TrainConfig
from supersimplenet.feature_cache import CachedLoader
from supersimplenet.feature_store import FeatureStore
from supersimplenet.frozen import run_frozen_passes
from supersimplenet.layouts import read_layout
from supersimplenet.loading import DefectDataset
from supersimplenet.model import build_model
from supersimplenet.synthetic import SyntheticDefectDataset
from supersimplenet.train import validation_loader

CONFIG = ModelConfig(image_size=(128, 128), noise_std_mode="relative", noise_std=4.0, image_score="memory")
CPU = torch.device("cpu")


def _dataset(root, count=8, flips=False):
    train = [s for s in read_layout(root) if s.split == "train"][:count]
    preset = get_preset(CONFIG.backbone)
    return DefectDataset(
        root=root, samples=train, image_size=CONFIG.image_size, mean=preset.mean, std=preset.std, flips=flips
    )


def _model(config=CONFIG):
    model = build_model(config)
    load_backbone_weights(model.feature_extractor.backbone, config.backbone, "default")
    return model


class _CountingLevels:
    """Counts the backbone's batches (the cache's size probe is one call of one image)."""

    def __init__(self, model):
        self.images, self.original = 0, model.feature_extractor.levels
        model.feature_extractor.levels = self

    def __call__(self, images):
        self.images += images.shape[0]
        return self.original(images)


def _passes(model, dataset, store, precision="fp32"):
    cfg = TrainConfig(batch_size=4, feature_cache_mib=4096, precision=precision)
    sampler = range(len(dataset))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler)
    counter = _CountingLevels(model)
    cached = run_frozen_passes(model, loader, sampler, cfg, device=CPU, store=store)
    assert isinstance(cached, CachedLoader)
    return cached.cache, counter.images


def test_a_second_run_loads_the_first_runs_levels_scale_and_memory_without_running_the_backbone(weld_root, tmp_path):
    store = FeatureStore(tmp_path / "store", max_bytes=2**30)
    dataset = _dataset(weld_root)
    first_model, second_model = _model(), _model(dataclasses.replace(CONFIG, noise_std=1.0, perlin_threshold=0.5))
    first, first_images = _passes(first_model, dataset, store)
    second, second_images = _passes(second_model, dataset, store)
    assert first_images == 1 + len(dataset) and second_images == 1  # the second run only probed the cache's size
    assert len(list((tmp_path / "store").glob("*.pt"))) == 1
    for got, want in zip(second.levels, first.levels, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(second.labels, first.labels) and torch.equal(second.segmented, first.segmented)
    assert torch.equal(second_model.feature_scale, first_model.feature_scale)
    assert torch.equal(second_model.memory.bank, first_model.memory.bank)
    assert second_model.memory.bank.shape[0] == 8 * 16  # 8 seams x a 4 x 4 patch grid


def test_the_key_changes_with_the_images_the_weights_the_dtype_and_flips_but_not_with_sigma(weld_root, tmp_path):
    store = FeatureStore(tmp_path / "store", max_bytes=2**30)
    model, dataset = _model(), _dataset(weld_root)
    key = store.key(model, dataset, dtype=torch.float32, device=CPU)
    assert key == store.key(
        _model(dataclasses.replace(CONFIG, noise_std=0.5)), dataset, dtype=torch.float32, device=CPU
    )
    assert key != store.key(model, dataset, dtype=torch.bfloat16, device=CPU)
    assert key != store.key(model, _dataset(weld_root, flips=True), dtype=torch.float32, device=CPU)
    assert key != store.key(model, dataset, dtype=torch.float32, device=CPU, derived_tag="memory_pool=4")

    copy = tmp_path / "copy"
    shutil.copytree(weld_root, copy)
    copied = _dataset(copy)
    assert store.key(model, copied, dtype=torch.float32, device=CPU) == key  # paths are relative: same bytes, same key
    first_image = copy / copied.samples[0].image
    first_image.write_bytes(first_image.read_bytes() + b"\0")  # the same picture, other bytes
    assert store.key(model, copied, dtype=torch.float32, device=CPU) != key

    with torch.no_grad():
        next(model.feature_extractor.backbone.parameters()).mul_(1.001)
    assert store.key(model, dataset, dtype=torch.float32, device=CPU) != key


def test_synthetic_validation_levels_are_keyed_by_seed_and_loaded_on_the_second_run(weld_root, tmp_path):
    store = FeatureStore(tmp_path / "store", max_bytes=2**30)
    normals = [s for s in read_layout(weld_root) if s.split == "train"][:4]
    preset = get_preset(CONFIG.backbone)

    def synthetic(seed):
        common = dict(root=weld_root, samples=normals, image_size=CONFIG.image_size, mean=preset.mean, std=preset.std)
        return SyntheticDefectDataset(seed=seed, **common)

    model = _model()
    assert store.key(model, synthetic(0), dtype=torch.float32, device=CPU) != store.key(
        model, synthetic(1), dtype=torch.float32, device=CPU
    )
    first = validation_loader(model, synthetic(0), device=CPU, batch_size=4, budget_bytes=2**30, store=store)
    counter = _CountingLevels(model)
    second = validation_loader(model, synthetic(0), device=CPU, batch_size=4, budget_bytes=2**30, store=store)
    assert counter.images == 1  # the size probe only
    assert torch.equal(second.cache.masks, first.cache.masks) and bool(first.cache.masks.any())
    for got, want in zip(second.cache.levels, first.cache.levels, strict=True):
        assert torch.equal(got, want)


def test_a_torn_entry_is_dropped_and_rebuilt(weld_root, tmp_path):
    store = FeatureStore(tmp_path / "store", max_bytes=2**30)
    dataset = _dataset(weld_root, count=4)
    first, _ = _passes(_model(), dataset, store)
    (entry,) = (tmp_path / "store").glob("*.pt")
    entry.write_bytes(entry.read_bytes()[:100])
    rebuilt, images = _passes(_model(), dataset, store)
    assert images == 1 + len(dataset)
    for got, want in zip(rebuilt.levels, first.levels, strict=True):
        assert torch.equal(got, want)
    assert torch.load(entry, weights_only=True)["levels"][0].shape == first.levels[0].shape  # written again, whole


def test_the_store_keeps_within_its_bound_by_dropping_the_least_recently_used_entry(weld_root, tmp_path):
    model = _model()
    store = FeatureStore(tmp_path / "store", max_bytes=2**30)
    _passes(model, _dataset(weld_root, count=2), store)
    (one,) = (tmp_path / "store").glob("*.pt")
    store.max_bytes = one.stat().st_size * 2 + 1  # room for two entries of this size
    _passes(_model(), _dataset(weld_root, count=2, flips=False), store)  # a hit: touches the entry
    _passes(_model(), _dataset(weld_root, count=2, flips=True), store)  # 4x the items: over the bound
    entries = sorted((tmp_path / "store").glob("*.pt"))
    assert len(entries) == 1 and entries[0] != one  # the older one went, the newest stays even alone over the bound
