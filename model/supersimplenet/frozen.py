"""Passes of the frozen backbone over the training images before the heads train.

`measure_feature_scale` sets the scale of relative noise (`ModelConfig.noise_std_mode`), `build_memory` fills the
patch memory of a "memory" model (`supersimplenet.memory`), and the training feature cache
(`supersimplenet.feature_cache`) stores the backbone's levels of every training item. `run_frozen_passes` runs them
where training starts (`supersimplenet.train.fit`, every Ray Train rank): as one pass of the backbone when the cache
is on, as separate passes when it is off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch.utils.data import DataLoader

from supersimplenet.backbones import get_preset
from supersimplenet.config import TrainConfig
from supersimplenet.feature_cache import CachedLoader, cached_train_loader
from supersimplenet.feature_store import FeatureStore
from supersimplenet.loading import DefectDataset
from supersimplenet.model import SuperSimpleNet
from supersimplenet.samples import Sample

# Training items (index order) the relative noise scale is measured on: a median over channels of per-channel stds
# settles long before (it was 8 batches of the training loader, 64 to 128 images, until 2026-12-07)
SCALE_ITEMS = 128


@torch.no_grad()
def item_moments(features: torch.Tensor) -> torch.Tensor:
    """Per image of F [B, C, h, w]: the per-channel mean of F and of F^2 over its positions, [B, 2, C] float64."""
    flat = features.double().flatten(2)
    return torch.stack((flat.mean(2), (flat * flat).mean(2)), dim=1)


def scale_from_moments(moments: torch.Tensor) -> float:
    """The median over channels of F's standard deviation over the images of `item_moments` rows (every image has
    the same positions, so the images' means average to the whole set's)."""
    if not len(moments):
        raise ValueError("cannot measure the feature scale: the training set is empty")
    mean, mean_sq = moments.mean(0)
    return float((mean_sq - mean**2).clamp_min(0).sqrt().median())


@torch.no_grad()
def measure_feature_scale(
    model: SuperSimpleNet, dataset: DefectDataset, *, device: torch.device, batch_size: int = 16
) -> float:
    """Median per-channel standard deviation of the pooled backbone features F over the first `SCALE_ITEMS` items
    of the training set (index order, so every process and both paths of `run_frozen_passes` measure the same).

    With `noise_std_mode="relative"` the synthetic noise is `noise_std` times this scale, so one sigma transfers
    across backbones whose features differ in magnitude by orders.
    """
    subset = torch.utils.data.Subset(dataset, range(min(SCALE_ITEMS, len(dataset))))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    moments = [item_moments(model.feature_extractor(batch["image"].to(device))).cpu() for batch in loader]
    return scale_from_moments(torch.cat(moments) if moments else torch.empty(0))


@torch.no_grad()
def build_memory(
    model: SuperSimpleNet,
    *,
    root: str | Path,
    samples: Sequence[Sample],
    device: torch.device,
    seed: int,
    batch_size: int = 16,
) -> int:
    """Fill the patch memory of a model that carries one (`ModelConfig.uses_memory`, `supersimplenet.memory`) from
    the normal training images among `samples` (unflipped), and return its patch count; 0 and nothing done for
    other models.

    The backbone is frozen, so the memory can be built before the heads train; every caller does it there, where
    the relative noise scale is measured, so validation during training can report the score.
    """
    if model.memory is None:
        return 0
    preset = get_preset(model.config.backbone)
    normals = [s for s in samples if s.split == "train" and s.label == 0]
    dataset = DefectDataset(
        root=root, samples=normals, image_size=model.config.image_size, mean=preset.mean, std=preset.std
    )
    # its own generator: a loader without one draws its seed from the global RNG, which would shift every later
    # Perlin mask and noise draw (and make a run with the feature cache, which has no such loader, differ)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    batches = (model.feature_extractor(batch["image"].to(device)) for batch in loader)
    return model.memory.build(batches, seed=seed)


def run_frozen_passes(
    model: SuperSimpleNet,
    loader: DataLoader,
    sampler: Iterable[int],
    cfg: TrainConfig,
    *,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    fresh: bool = True,
    store: FeatureStore | None = None,
) -> CachedLoader | DataLoader:
    """Everything the frozen backbone computes before the heads train, and the loader to train with.

    A fresh run (`fresh`; a resumed one restores both from its checkpoint) measures the relative noise scale and
    builds the patch memory of a "memory" model; every run builds the training feature cache when it fits
    (`supersimplenet.feature_cache`). With the cache, the scale and the memory are computed from the cache's own
    pass (`derived`: per-image moments and memory patches of F, pooled once per batch from the float32 levels before
    any bf16 cast, exchanged between DDP ranks with the levels), so the backbone sees each training image once;
    without it, each has its own pass as before. Both give the same scale and memory (the same images, in the same
    order and the same batches when the training set has no flips and no defective images; to float rounding
    otherwise). With a `store` (`supersimplenet.feature_store`), a cache (and its derived rows) that an earlier run
    built from the same backbone and items is loaded instead of built. Every DDP rank must call it.
    """
    dataset = loader.dataset
    relative = fresh and model.config.noise_std_mode == "relative"
    memory = model.memory if fresh and model.memory is not None else None
    derived: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    if relative:
        derived["moments"] = item_moments
    if memory is not None:
        derived["patches"] = memory.patches
    cached = cached_train_loader(
        model,
        loader,
        sampler,
        device=device,
        precision=cfg.precision,
        budget_mib=cfg.feature_cache_mib,
        rank=rank,
        world_size=world_size,
        derived=derived,
        store=store,
        derived_tag=f"memory_pool={memory.pool}" if memory is not None else "",
    )
    if isinstance(cached, CachedLoader):
        extras = cached.cache.derived
        if relative:
            model.feature_scale.fill_(scale_from_moments(extras.pop("moments")[:SCALE_ITEMS]))
        if memory is not None:
            normal = [i for i, s in enumerate(dataset.samples) if s.split == "train" and s.label == 0]
            patches = extras.pop("patches")[normal]
            memory.build_from_patches(patches.reshape(-1, memory.channels), seed=cfg.seed)
        return cached
    if relative:
        model.feature_scale.fill_(measure_feature_scale(model, dataset, device=device, batch_size=cfg.batch_size))
    if memory is not None:
        build_memory(model, root=dataset.root, samples=dataset.samples, device=device, seed=cfg.seed)
    return cached


__all__ = ["SCALE_ITEMS", "build_memory", "item_moments", "measure_feature_scale", "run_frozen_passes"]
