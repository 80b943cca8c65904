"""Patch memory: the "memory" image score, the distance of an image's patches to the nearest normal patch.

SuperSimpleNet's heads learn to tell normal features F from synthetically perturbed ones. On the products we have,
a detector that learns nothing does better at the image level: remember the patch features of the normal training
images and score a new image by how far its most unusual patches lie from the nearest remembered one (the
memory-bank idea of PatchCore, Roth et al., CVPR 2022; here without its coreset). Measured with the same frozen
Lite0 features (QUALITY.md, "A memory of normal patches"; `memory_pool` 8): image AUROC weld 0.989 against the
heads' best 0.964 +- 0.008, MPDD 0.998 against 1.000, ELPV 0.933 against 0.885 (1,000 cells). So a model whose
`ModelConfig.image_score` is "memory" (the Lite presets' unsupervised default) carries this module beside its
heads and reports its score, and by default its anomaly map too (4. below; the map-based image scores and the
search's objectives keep reading the heads' map).

Mechanism:

1. Patches. F [B, C, h, w] (stride 4) is average-pooled over `pool` x `pool` cells (8: 32 x 32 image pixels) into
   a grid of (h // pool, w // pool) patches, each standardised per channel by the training patches' mean
   (`center`) and std (`spread`).
2. Memory. The standardised patches of the normal training images (every position), a seeded random subset of
   `max_patches` when there are more, kept in float16 (`bank` [M, C]).
3. Score. Each patch's Euclidean distance to its nearest memory patch (any position: parts may move); the image's
   distance d is the mean of its highest 1 % of patch distances (`top_count`, at least one); the score is
   d / (d + sqrt(C)), monotone in d and in [0, 1) like the other scores (sqrt(C) is the distance scale of
   standardised features).
4. Map ("memory" anomaly map, `ModelConfig.anomaly_map`). The patch distances upsampled bilinearly to the image
   and bounded as the score: a map on the patch grid (8 x 8 for 256 x 256 at pool 8), coarse but, on every product
   with masks we have, a better localisation than the segmentation head's (QUALITY.md, "The patch memory's
   anomaly map").

Limits: the memory holds normal appearance only (labelled defects are not used; supervised regimes keep the head's
score); its size grows with the training images (64 patches per 256 x 256 image at pool 8) up to `max_patches`
(65,536 x 152 channels of Lite0 in float16: 20 MB in the checkpoint); a random subset can drop rare normal patches,
which then score as unusual (ELPV at pool 4, 256,000 patches cut to 65,536: 0.937 -> 0.915; QUALITY.md), so the
default pool keeps 1,000 images whole; distances are exact, computed in float32 in chunks (no coreset, no
approximate search: about 15 ms per image for 64,000 patches on 2 cores).

The bank is a tensor attribute, not a registered buffer: Ray Train's DistributedDataParallel broadcasts every
buffer before every step, and the bank (megabytes) never changes during training. It is saved in and loaded from
the state_dict like a buffer (`_save_to_state_dict`, `_load_from_state_dict`, which also takes its size from the
checkpoint) and follows `.to()` (`_apply`).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from supersimplenet.config import MEMORY_SCORE, ModelConfig, top_count

QUERY_CHUNK = 1024  # patches per distance block: a [1024, M] float32 block (256 MB at M = 65,536)


def seed_free(config: ModelConfig, normal_train_images: int) -> bool:
    """Whether every training seed gives a model of `config` the same image scores: a "memory" model's score comes
    from the frozen backbone and every patch of its normal training images (mechanism 2.), so no seed reaches it
    unless the patches exceed `memory_max_patches` and a seeded subset is kept. (The heads' own scores and map do
    depend on the seed.)"""
    if config.image_score != MEMORY_SCORE:
        return False
    rows, cols = patch_grid(config.feature_size, config.memory_pool)
    return normal_train_images * rows * cols <= config.memory_max_patches


def patch_grid(feature_size: tuple[int, int], pool: int) -> tuple[int, int]:
    """The memory's patch grid (rows, columns) over features of `feature_size` pooled `pool` x `pool` (mechanism 1.)."""
    return max(1, feature_size[0] // pool), max(1, feature_size[1] // pool)


class MemoryNotBuilt(RuntimeError):
    """A "memory" model asked for its score before its memory was built from normal training images."""


class PatchMemory(nn.Module):
    """The memory of normal patches of one model (see the module docstring)."""

    def __init__(self, *, channels: int, pool: int, max_patches: int) -> None:
        super().__init__()
        self.channels, self.pool, self.max_patches = channels, pool, max_patches
        self.register_buffer("center", torch.zeros(channels))
        self.register_buffer("spread", torch.ones(channels))
        self.bank: torch.Tensor | None = None  # [M, C] float16, standardised patches of normal images

    @property
    def built(self) -> bool:
        return self.bank is not None and self.bank.shape[0] > 0

    def grid(self, feature_size: tuple[int, int]) -> tuple[int, int]:
        return patch_grid(feature_size, self.pool)

    def _pooled(self, features: torch.Tensor) -> torch.Tensor:
        """F [B, C, h, w] -> unstandardised patches [B, gh, gw, C] in float32."""
        pooled = F.adaptive_avg_pool2d(features.float(), self.grid(tuple(features.shape[-2:])))
        return pooled.permute(0, 2, 3, 1)

    @torch.no_grad()
    def patches(self, features: torch.Tensor) -> torch.Tensor:
        """F [B, C, h, w] -> each image's unstandardised patches [B, gh * gw, C] in float32: what `build` keeps."""
        return self._pooled(features).reshape(features.shape[0], -1, self.channels)

    @torch.no_grad()
    def build(self, feature_batches: Iterable[torch.Tensor], *, seed: int) -> int:
        """Fill the memory from F of normal training images (batches [B, C, h, w]); returns its patch count."""
        patches = [self.patches(batch).reshape(-1, self.channels).cpu() for batch in feature_batches]
        return self.build_from_patches(torch.cat(patches) if patches else torch.empty(0, self.channels), seed=seed)

    @torch.no_grad()
    def build_from_patches(self, patches: torch.Tensor, *, seed: int) -> int:
        """Fill the memory from the `patches` ([N, C], rows of `patches(F)` of normal training images in image
        order); returns its patch count."""
        if not len(patches):
            raise ValueError("cannot build the patch memory: no normal training images")
        center = patches.double().mean(dim=0)
        spread = patches.double().std(dim=0, unbiased=False).clamp_min(1e-6)
        standardised = ((patches.double() - center) / spread).float()
        if len(standardised) > self.max_patches:
            keep = np.sort(np.random.default_rng(seed).choice(len(standardised), size=self.max_patches, replace=False))
            standardised = standardised[torch.from_numpy(keep)]
        device = self.center.device
        self.center.copy_(center.float().to(device))
        self.spread.copy_(spread.float().to(device))
        self.bank = standardised.to(device=device, dtype=torch.float16)
        return len(self.bank)

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """F [B, C, h, w] -> each patch's distance to its nearest memory patch [B, gh, gw] (float32)."""
        if not self.built:
            raise MemoryNotBuilt(
                'model.image_score "memory": the patch memory is empty; it is built from the normal training '
                "images when training starts (supersimplenet.frozen.build_memory)"
            )
        patches = (self._pooled(features) - self.center) / self.spread
        batch, rows, cols = patches.shape[:3]
        queries = patches.reshape(-1, self.channels)
        bank = self.bank.float()
        nearest = torch.cat([torch.cdist(chunk, bank).amin(dim=1) for chunk in queries.split(QUERY_CHUNK)])
        return nearest.reshape(batch, rows, cols)

    def _bounded(self, distance: torch.Tensor) -> torch.Tensor:
        """Distances -> [0, 1), monotone (mechanism 3.)."""
        return distance / (distance + math.sqrt(self.channels))

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """F [B, C, h, w] -> the image score [B] in [0, 1) (mechanism 3.)."""
        return self.score_of(self.distances(features))

    def score_of(self, distances: torch.Tensor) -> torch.Tensor:
        """Patch distances [B, gh, gw] (`distances`) -> the image score [B] in [0, 1) (mechanism 3.)."""
        flat = distances.flatten(1)
        return self._bounded(flat.topk(top_count(int(flat.shape[1])), dim=1).values.mean(dim=1))

    def anomaly_map(self, distances: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Patch distances [B, gh, gw] -> the anomaly map [B, 1, H, W] in [0, 1) at the image `size` (mechanism
        4.): upsampled bilinearly (half-pixel centres), then bounded as the score is."""
        upsampled = F.interpolate(distances[:, None].float(), size=size, mode="bilinear", align_corners=False)
        return self._bounded(upsampled)

    # -- the bank in the state_dict, and on the module's device ------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.bank is not None:
            destination[prefix + "bank"] = self.bank if keep_vars else self.bank.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        bank = state_dict.get(prefix + "bank")
        if bank is not None:
            if bank.ndim != 2 or bank.shape[1] != self.channels:
                error_msgs.append(f"{prefix}bank: expected [M, {self.channels}], got {list(bank.shape)}")
            else:
                self.bank = bank.detach().to(device=self.center.device, dtype=torch.float16).clone()
        elif strict:
            missing_keys.append(prefix + "bank")
        super()._load_from_state_dict(
            {k: v for k, v in state_dict.items() if k != prefix + "bank"},
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.bank is not None:
            moved = fn(self.bank)
            # keep float16 storage whatever dtype the model is cast to
            self.bank = moved if not moved.is_floating_point() else moved.to(torch.float16)
        return self
