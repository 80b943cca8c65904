"""The frozen backbone's output, computed once per training item and reused by every epoch.

Why it is exact. A training item of `supersimplenet.loading.DefectDataset` is a pure function of its index: there is
no random augmentation (the flip variants are items of their own), and the backbone is frozen in eval mode
(`supersimplenet.model.FeatureExtractor`), so the backbone's two feature levels of an item never change while the
heads train. Everything random in a step (Perlin masks, Gaussian noise) happens after the backbone, on the global
RNG, which building the cache does not touch. So a step on cached float32 levels computes the same losses and
gradients as a step on the images (to float rounding; tests/model/test_feature_cache.py), and from the second epoch
on a step neither decodes an image nor runs the backbone.

What is stored. The two backbone levels (stride 8 and 16), not the pooled features F they become
(`supersimplenet.model.pooled_features`, which every step still computes from them: cheap next to the heads): F has
2x2 times the first level's positions and the channels of both, so for EfficientNet-Lite0 it is 9x larger (622k
against 70k floats per 256x256 image). Masks are kept (as bytes) only when some item has one; labels and the
`segmented` flags always.

Precision. float32 under fp32 training; bfloat16 under bf16 training (half the memory). The bf16 levels are an
approximation of the same kind as bf16 autocast, whose adaptor and heads round F to bfloat16 anyway; QUALITY.md
measures it.

Bounded. `budget_mib` caps the bytes one process stores; a training set whose cache would exceed it trains from the
images as before (logged, never an error).

Distributed. Under DDP every rank needs every item over the epochs (the sampler reshuffles its shard per epoch). Rank
r computes items r, r + W, ... and the ranks exchange their shares with `all_gather` on the process group, so
building costs each rank at most one epoch's backbone work, whatever the world size.

One pass for all. The other passes of the frozen backbone over the training images before the heads train (the
relative noise scale, the patch memory) take what they need from this one (`derived`, `supersimplenet.frozen`), so a
run with the cache runs the backbone over its training images exactly once.

Used by `supersimplenet.frozen.run_frozen_passes` (called by `supersimplenet.train.fit` and by the platform's Ray
Train loop) through `cached_train_loader`, and
`CachedLoader` yields batches in exactly the order the image loader would (the same sampler, batch size and
`drop_last=False`), with "levels" in place of "image"; `supersimplenet.train.train_step` takes either.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from supersimplenet.loading import DefectDataset
from supersimplenet.model import SuperSimpleNet

if TYPE_CHECKING:  # the store imports this module
    from supersimplenet.feature_store import FeatureStore

log = logging.getLogger(__name__)

CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class FeatureCache:
    """Backbone levels, masks, labels and `segmented` flags of every item of a training set, by dataset index."""

    def __init__(
        self,
        levels: list[torch.Tensor],
        labels: torch.Tensor,
        segmented: torch.Tensor,
        masks: torch.Tensor | None,
        image_size: tuple[int, int],
        derived: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.levels = levels  # each [N, C_l, h_l, w_l]
        self.labels = labels  # [N] float32
        self.segmented = segmented  # [N] bool
        self.masks = masks  # [N, 1, H, W] uint8, or None when every mask is empty
        self.image_size = image_size
        # per-item tensors computed from F of the float32 levels while the cache was built (`build_feature_cache`'s
        # `derived`): the other frozen passes' inputs, dropped by their consumer once used
        self.derived = dict(derived or {})

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nbytes(self) -> int:
        tensors = [*self.levels, self.labels, self.segmented] + ([self.masks] if self.masks is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """The items at `indices` as a training batch: float32 "levels" instead of an "image"."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if self.masks is None:
            masks = torch.zeros(len(index), 1, *self.image_size)
        else:
            masks = self.masks.index_select(0, index).float()
        return {
            "levels": [level.index_select(0, index).float() for level in self.levels],
            "mask": masks,
            "label": self.labels.index_select(0, index),
            "segmented": self.segmented.index_select(0, index),
            "index": index,
        }


def estimate_bytes(model: SuperSimpleNet, dataset: DefectDataset, dtype: torch.dtype) -> int:
    """Bytes the cache of `dataset` would take (levels at `dtype`, masks included when any sample has one, or
    always for a dataset that makes its own masks, such as synthetic defects)."""
    device = model.mean.device
    with torch.no_grad():
        probe = model.feature_extractor.levels(torch.zeros(1, 3, *dataset.image_size, device=device))
    per_item = sum(level.numel() for level in probe) * torch.tensor([], dtype=dtype).element_size()
    if not isinstance(dataset, DefectDataset) or any(sample.mask is not None for sample in dataset.samples):
        per_item += dataset.image_size[0] * dataset.image_size[1]
    return len(dataset) * (per_item + 5)


@torch.no_grad()
def build_feature_cache(
    model: SuperSimpleNet,
    dataset: DefectDataset,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    derived: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> FeatureCache:
    """Runs the frozen backbone once over this rank's share of `dataset` (items rank, rank + W, ...) and, under an
    initialised process group, exchanges the shares so that every rank holds every item.

    `derived` maps names to functions of a batch's F (`FeatureExtractor.pool` of the float32 levels, computed once
    per batch, before the levels' cast to `dtype`) that return one row per item ([B, ...]); their rows are
    exchanged like the levels, so
    `cache.derived[name]` holds every item's in index order. The frozen passes that need the training images'
    features (the noise scale, the patch memory: `supersimplenet.frozen`) ride on this pass instead of their own."""
    derived = dict(derived or {})
    extractor = model.feature_extractor
    mine = list(range(rank, len(dataset), world_size))
    # a rank with no share (fewer items than ranks) still runs item 0, for the shapes of what it sends, and sends
    # none of its rows
    subset = torch.utils.data.Subset(dataset, mine or [0])
    # a loader of its own generator: iterating one without draws a seed from the global RNG, which would shift the
    # Perlin masks and noise of every later step
    loader = DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=num_workers, generator=torch.Generator()
    )
    levels: list[list[torch.Tensor]] = []
    masks, labels, segmented = [], [], []
    extras: dict[str, list[torch.Tensor]] = {name: [] for name in derived}
    for batch in loader:
        computed = extractor.levels(batch["image"].to(device))
        levels = levels or [[] for _ in computed]
        for store, level in zip(levels, computed):
            store.append(level.to("cpu", dtype))
        features = extractor.pool(computed) if derived else None
        for name, function in derived.items():
            extras[name].append(function(features).cpu())
        masks.append(batch["mask"].to(torch.uint8))
        labels.append(batch["label"].float())
        segmented.append(batch["segmented"].bool())
    shares = [torch.cat(store) for store in levels] + [torch.cat(masks), torch.cat(labels), torch.cat(segmented)]
    shares += [torch.cat(extras[name]) for name in derived]
    shares = [share[: len(mine)] for share in shares]
    if world_size > 1:
        shares = [_exchange(share, len(dataset), rank, world_size, device) for share in shares]
    extra_tensors = dict(zip(derived, shares[len(shares) - len(derived) :]))
    shares = shares[: len(shares) - len(derived)]
    *level_tensors, mask_tensor, label_tensor, segmented_tensor = shares
    return FeatureCache(
        derived=extra_tensors,
        levels=level_tensors,
        labels=label_tensor,
        segmented=segmented_tensor,
        masks=mask_tensor if bool(mask_tensor.any()) else None,
        image_size=tuple(dataset.image_size),
    )


def _exchange(share: torch.Tensor, total: int, rank: int, world_size: int, device: torch.device) -> torch.Tensor:
    """Every rank's share of a tensor (rank r holds items r, r + W, ...) gathered into all items in index order."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("build_feature_cache with world_size > 1 needs an initialised process group")
    rows = math.ceil(total / world_size)
    wire = share.to(torch.uint8) if share.dtype == torch.bool else share  # gloo and NCCL: no bool all_gather
    padded = torch.zeros((rows, *share.shape[1:]), dtype=wire.dtype, device=device)
    padded[: share.shape[0]] = wire.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    out = torch.empty((total, *share.shape[1:]), dtype=wire.dtype)
    for source, part in enumerate(gathered):
        count = len(range(source, total, world_size))
        out[source::world_size] = part[:count].cpu()
    return out.bool() if share.dtype == torch.bool else out


class CachedLoader:
    """Batches of a `FeatureCache` in the order of `sampler`: what `DataLoader(dataset, batch_size, sampler=sampler)`
    would yield, with "levels" in place of "image". `len` is the number of batches, as a DataLoader's."""

    def __init__(self, cache: FeatureCache, sampler: Iterable[int], batch_size: int) -> None:
        self.cache, self.sampler, self.batch_size = cache, sampler, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        indices = list(self.sampler)
        for start in range(0, len(indices), self.batch_size):
            yield self.cache.batch(indices[start : start + self.batch_size])


def cached_train_loader(
    model: SuperSimpleNet,
    loader: DataLoader,
    sampler: Iterable[int],
    *,
    device: torch.device,
    precision: str,
    budget_mib: int,
    rank: int = 0,
    world_size: int = 1,
    derived: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    store: FeatureStore | None = None,
    derived_tag: str = "",
) -> CachedLoader | DataLoader:
    """The training loader to use: a `CachedLoader` over the backbone levels of `loader`'s dataset when they fit in
    `budget_mib` (0 turns the cache off), else `loader` itself. Every rank must call it (it may all_gather).
    `derived`: as in `build_feature_cache` (not computed when the cache is off). `store`: the cache is taken from
    (and put into) this `supersimplenet.feature_store.FeatureStore` when it holds it; `derived_tag` says how the
    derived rows are computed, for its key."""
    dataset = loader.dataset
    dtype = CACHE_DTYPES[precision]
    if budget_mib <= 0 or not isinstance(dataset, DefectDataset):
        return loader
    needed = estimate_bytes(model, dataset, dtype)
    if needed > budget_mib * 2**20:
        log.warning(
            "feature cache off: %d training items need %.0f MiB, over train.feature_cache_mib=%d",
            len(dataset),
            needed / 2**20,
            budget_mib,
        )
        return loader

    def build() -> FeatureCache:
        return build_feature_cache(
            model,
            dataset,
            device=device,
            dtype=dtype,
            batch_size=loader.batch_size or 16,
            num_workers=loader.num_workers,
            rank=rank,
            world_size=world_size,
            derived=derived,
        )

    if store is None:
        cache = build()
    else:
        tag = ",".join([*sorted(derived or {}), derived_tag])
        cache = store.fetch(model, dataset, build, dtype=dtype, device=device, world_size=world_size, derived_tag=tag)
    log.info("feature cache: %d items, %.1f MiB (%s)", len(cache), cache.nbytes / 2**20, precision)
    return CachedLoader(cache, sampler, loader.batch_size or 1)


__all__ = [
    "CACHE_DTYPES",
    "CachedLoader",
    "FeatureCache",
    "build_feature_cache",
    "cached_train_loader",
    "estimate_bytes",
]
