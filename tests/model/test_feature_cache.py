"""The training feature cache: the same batches, losses, gradients and trained model as training from the images."""

import dataclasses
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from supersimplenet.backbones import get_preset, load_backbone_weights
from supersimplenet.config import ModelConfig, TrainConfig
from supersimplenet.feature_cache import CachedLoader, build_feature_cache, cached_train_loader
from supersimplenet.layouts import read_layout
from supersimplenet.loading import DefectDataset
from supersimplenet.model import build_model
from supersimplenet.train import build_optimizer, build_train_loader, train_step

CONFIG = ModelConfig(image_size=(128, 128), noise_std_mode="relative", noise_std=0.5)


def _weld(weld_root, *, count=6, flips=False, with_defects=False):
    samples = read_layout(weld_root)
    train = [s for s in samples if s.split == "train"][:count]
    if with_defects:  # labelled, masked defects as a supervised regime trains on them
        defects = [s for s in samples if s.label == 1 and s.mask is not None][:2]
        train += [dataclasses.replace(d, split="train", segmented=True) for d in defects]
    preset = get_preset(CONFIG.backbone)
    dataset = DefectDataset(
        root=weld_root, samples=train, image_size=CONFIG.image_size, mean=preset.mean, std=preset.std, flips=flips
    )
    return dataset, train


def _model(seed=0):
    torch.manual_seed(seed)
    model = build_model(CONFIG)
    load_backbone_weights(model.feature_extractor.backbone, CONFIG.backbone, "default")
    model.feature_scale.fill_(1.0)
    return model


def test_the_cached_loader_yields_the_image_loaders_batches_in_the_same_order_every_epoch(weld_root):
    dataset, train = _weld(weld_root, flips=True, with_defects=True)
    cfg = TrainConfig(batch_size=3, supervision="supervised", seed=5)
    model = _model()
    loader, sampler = build_train_loader(dataset, train, cfg)
    cache = build_feature_cache(model, dataset, device=torch.device("cpu"), batch_size=4)
    assert cache.masks is not None and len(cache) == len(dataset) == 4 * len(train)
    cached = CachedLoader(cache, sampler, cfg.batch_size)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(loader)
        cached_batches = list(cached)
        assert len(cached) == len(batches) == len(cached_batches)
        for images, levels in zip(batches, cached_batches):
            assert torch.equal(torch.as_tensor(images["index"]), levels["index"])
            assert torch.equal(images["mask"], levels["mask"]) and images["mask"].any() == levels["mask"].any()
            assert torch.equal(images["label"], levels["label"])
            assert torch.equal(images["segmented"], levels["segmented"])
            expected = model.feature_extractor.levels(images["image"])
            for got, want in zip(levels["levels"], expected):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_step_on_cached_levels_has_the_losses_and_gradients_of_a_step_on_the_images(weld_root):
    dataset, train = _weld(weld_root)
    cfg = TrainConfig(batch_size=4, seed=1)
    cache = build_feature_cache(_model(), dataset, device=torch.device("cpu"))
    images = torch.utils.data.default_collate([dataset[i] for i in (0, 2, 4, 5)])
    levels = cache.batch([0, 2, 4, 5])
    results = []
    for batch in (images, levels):
        model = _model(seed=3)
        optimizer = build_optimizer(model, cfg)
        torch.manual_seed(11)  # the same Perlin masks and noise for both steps
        losses = train_step(model, batch, optimizer, cfg, device=torch.device("cpu"))
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((losses, grads))
    (losses_a, grads_a), (losses_b, grads_b) = results
    assert losses_a.keys() == losses_b.keys() and losses_a["loss"] > 0
    for name in losses_a:
        assert losses_b[name] == pytest.approx(losses_a[name], rel=1e-4, abs=1e-6), name
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 5
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_training_set_over_the_budget_trains_from_the_images(weld_root, caplog):
    dataset, train = _weld(weld_root)
    model = _model()
    loader, sampler = build_train_loader(dataset, train, TrainConfig(batch_size=2))
    kwargs = dict(device=torch.device("cpu"), precision="fp32")
    assert cached_train_loader(model, loader, sampler, budget_mib=0, **kwargs) is loader
    preset = get_preset(CONFIG.backbone)
    big = DefectDataset(root=weld_root, samples=train * 3, image_size=(512, 512), mean=preset.mean, std=preset.std)
    big_loader, big_sampler = build_train_loader(big, train * 3, TrainConfig(batch_size=2))
    with caplog.at_level("WARNING", logger="supersimplenet.feature_cache"):
        # 18 items at 512x512 need about 20 MiB in float32; the 6 at 128x128 about 0.4 MiB
        assert cached_train_loader(model, big_loader, big_sampler, budget_mib=1, **kwargs) is big_loader
    assert "feature cache off" in caplog.text and "feature_cache_mib=1" in caplog.text
    cached = cached_train_loader(model, loader, sampler, budget_mib=1, **kwargs)
    assert isinstance(cached, CachedLoader) and cached.cache.nbytes < 2**20


def test_bf16_training_caches_bfloat16_levels_close_to_the_float32_ones(weld_root):
    dataset, train = _weld(weld_root, count=3)
    model = _model()
    loader, sampler = build_train_loader(dataset, train, TrainConfig(batch_size=3))
    kwargs = dict(device=torch.device("cpu"), budget_mib=64)
    half = cached_train_loader(model, loader, sampler, precision="bf16", **kwargs)
    full = cached_train_loader(model, loader, sampler, precision="fp32", **kwargs)
    assert half.cache.levels[0].dtype == torch.bfloat16 and full.cache.levels[0].dtype == torch.float32
    assert half.cache.nbytes < 0.6 * full.cache.nbytes
    for a, b in zip(half.cache.levels, full.cache.levels):
        torch.testing.assert_close(a.float(), b, rtol=1e-2, atol=1e-2)


def _rank(rank, world_size, port, weld_root, out, count, flips):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        dataset, _ = _weld(weld_root, count=count, flips=flips)
        cache = build_feature_cache(
            _model(), dataset, device=torch.device("cpu"), batch_size=4, rank=rank, world_size=world_size
        )
        torch.save({"levels": cache.levels, "labels": cache.labels, "masks": cache.masks}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("count", "flips"),
    [(5, True), (2, False)],
    ids=["20 items in shares of 7, 7 and 6", "2 items: the third rank has none"],
)
def test_ranks_that_exchange_their_shares_each_hold_the_whole_cache(weld_root, tmp_path, count, flips):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank, args=(3, port, weld_root, tmp_path, count, flips), nprocs=3, join=True)
    dataset, _ = _weld(weld_root, count=count, flips=flips)
    single = build_feature_cache(_model(), dataset, device=torch.device("cpu"), batch_size=4)
    for rank in range(3):
        held = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert held["masks"] is None and torch.equal(held["labels"], single.labels)
        for got, want in zip(held["levels"], single.levels, strict=True):
            # one thread per rank against two here, and other batches: float rounding through the depthwise stack
            # (misplaced items differ by the features' own scale: mean magnitudes of 3 to 7)
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
