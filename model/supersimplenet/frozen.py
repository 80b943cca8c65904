"""Passes of the frozen backbone over the training images before the heads train.

`measure_feature_scale` sets the scale of relative noise (`ModelConfig.noise_std_mode`), `build_memory` fills the
patch memory of a "memory" model (`supersimplenet.memory`). Both run where training starts: in
`supersimplenet.train.fit` and on every Ray Train rank. The third such pass, the training feature cache, has its own
module (`supersimplenet.feature_cache`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from supersimplenet.backbones import get_preset
from supersimplenet.loading import DefectDataset
from supersimplenet.model import SuperSimpleNet
from supersimplenet.samples import Sample


@torch.no_grad()
def measure_feature_scale(
    model: SuperSimpleNet, loader: DataLoader, *, device: torch.device, max_batches: int = 8
) -> float:
    """Median per-channel standard deviation of the pooled backbone features F over training images.

    With `noise_std_mode="relative"` the synthetic noise is `noise_std` times this scale, so one sigma transfers
    across backbones whose features differ in magnitude by orders.
    """
    total = total_sq = None
    count = 0
    for index, batch in enumerate(loader):
        if index >= max_batches:
            break
        raw = model.feature_extractor(batch["image"].to(device)).double()
        per_channel = raw.transpose(0, 1).flatten(1)
        total = per_channel.sum(1) if total is None else total + per_channel.sum(1)
        total_sq = (per_channel**2).sum(1) if total_sq is None else total_sq + (per_channel**2).sum(1)
        count += per_channel.shape[1]
    if not count:
        raise ValueError("cannot measure the feature scale: the training loader is empty")
    variance = (total_sq / count - (total / count) ** 2).clamp_min(0)
    return float(variance.sqrt().median())


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
    """Fill the patch memory of a model whose image score is "memory" (`supersimplenet.memory`) from the normal
    training images among `samples` (unflipped), and return its patch count; 0 and nothing done for other models.

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
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    batches = (model.feature_extractor(batch["image"].to(device)) for batch in loader)
    return model.memory.build(batches, seed=seed)


__all__ = ["build_memory", "measure_feature_scale"]
