"""A local disk store of feature caches, shared by every run that puts the same frozen backbone over the same items.

Why. The backbone is frozen, so a `supersimplenet.feature_cache.FeatureCache` depends on nothing a run trains or a
search varies: only on the backbone's weights, the items (image bytes, size, normalisation, flips; the seed and
recipe of synthetic defects) and the code that makes them. The trials of a search (sigma and threshold vary, the
images do not), the seeds of an evaluation and a retrain all build the same cache; on two cores that pass is about
15 s of every 90 s one-epoch trial, and the validation set's levels another 5 s. The store keeps each cache once
on the node's disk, and every later run loads it in a fraction of a second.

Key. sha256 over: a format number; the torch version; the source of the modules that compute an item and its
levels (`_CODE_MODULES`: a change to any of them makes new keys); the backbone's parameters and buffers (bytes);
the dataset's type, image size, mean and std, flips, and the seed and recipe of a synthetic dataset; every item's
sample fields and the sha256 of its image and mask files; the cache's dtype; and the names of the derived rows the
caller asked for with a tag saying how they are computed (`derived_tag`, e.g. the memory's pool). Anything else a
caller changes (sigma, threshold, heads, learning rate, seed of an unsupervised run) leaves the key alone, as it
leaves the cache alone. Hashing the files costs about as much as reading them (tens of ms for 200 cells).

Entries. ``<root>/<key>.pt``, written to a temporary name and renamed (readers never see half a file, two runs
writing the same key both succeed), loaded with ``torch.load(weights_only=True)``; an unreadable entry is deleted
and reported as a miss. After each write the least recently used entries (a hit touches its file) are deleted
until the store is within `max_bytes`.

Limits. Items whose dataset is of another type have no key (the store is skipped). The store trusts its
directory: it is a per-node cache like the dataset cache beside it, not a place other users can write to.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import os
import pickle
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from supersimplenet.feature_cache import FeatureCache
from supersimplenet.loading import DefectDataset
from supersimplenet.synthetic import SyntheticDefectDataset

log = logging.getLogger(__name__)

STORE_FORMAT = 1
# the modules whose code decides an item's pixels and its backbone levels
_CODE_MODULES = (
    "supersimplenet.backbones",
    "supersimplenet.feature_cache",
    "supersimplenet.loading",
    "supersimplenet.model",
    "supersimplenet.perlin",
    "supersimplenet.synthetic",
)


class FeatureStore:
    """Feature caches on disk under `root`, at most `max_bytes` in all (least recently used dropped first)."""

    def __init__(self, root: str | Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"FeatureStore max_bytes must be > 0, got {max_bytes}")
        self.root, self.max_bytes = Path(root), int(max_bytes)

    def key(
        self, model: torch.nn.Module, dataset: Any, *, dtype: torch.dtype, device: torch.device, derived_tag: str = ""
    ) -> str | None:
        """The key of `dataset`'s cache under `model`'s frozen backbone, or None for a dataset type it cannot key."""
        identity = _dataset_identity(dataset)
        if identity is None:
            return None
        extractor = model.feature_extractor
        digest = hashlib.sha256()
        for part in (f"format={STORE_FORMAT}", f"torch={torch.__version__}", _code_fingerprint(), identity):
            digest.update(part.encode() + b"\0")
        _hash_tensors(digest, extractor.state_dict().values())
        digest.update(f"dtype={dtype} device={device.type} autocast={extractor.autocast_backbone}".encode())
        digest.update(f"derived={derived_tag}".encode())
        return digest.hexdigest()

    def fetch(
        self,
        model: torch.nn.Module,
        dataset: Any,
        build: Callable[[], FeatureCache],
        *,
        dtype: torch.dtype,
        device: torch.device,
        world_size: int = 1,
        derived_tag: str = "",
    ) -> FeatureCache:
        """The stored cache of `dataset`, or `build()` stored. Under DDP (`world_size` > 1, every rank calls it)
        the ranks agree first: all load, or all build (the build exchanges shares between ranks), so a rank on a
        node whose store lacks the entry never leaves the others waiting."""
        key = self.key(model, dataset, dtype=dtype, device=device, derived_tag=derived_tag)
        cache = self.load(key) if key is not None else None
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            hit = torch.tensor([int(cache is not None)], device=device)
            dist.all_reduce(hit, op=dist.ReduceOp.MIN)
            cache = cache if bool(hit.item()) else None
        if cache is not None:
            log.info("feature store: %d items loaded from %s", len(cache), self.path(key))
            return cache
        cache = build()
        if key is not None and not self.path(key).exists():  # DDP ranks on one node: the first writer suffices
            self.save(key, cache)
        return cache

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str) -> FeatureCache | None:
        """The stored cache of `key`, or None (absent, or unreadable: then deleted)."""
        path = self.path(key)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            cache = FeatureCache(**state)
        except FileNotFoundError:
            return None
        except (OSError, EOFError, RuntimeError, TypeError, ValueError, KeyError, pickle.UnpicklingError) as error:
            # a torn or foreign file: drop it and build again
            log.warning("feature store: dropping unreadable %s (%s)", path, error)
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # least recently used goes first
        return cache

    def save(self, key: str, cache: FeatureCache) -> None:
        """Write `cache` under `key` atomically, then prune the store to `max_bytes`. A failed write is logged and
        leaves no file behind: the store is an accelerator, never a reason for a run to fail."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)  # no other user may plant entries
        path = self.path(key)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
        state = {
            "levels": cache.levels,
            "labels": cache.labels,
            "segmented": cache.segmented,
            "masks": cache.masks,
            "image_size": tuple(cache.image_size),
            "derived": dict(cache.derived),
        }
        try:
            torch.save(state, partial)
            os.replace(partial, path)
        except OSError as error:
            log.warning("feature store: could not write %s (%s)", path, error)
            return
        finally:
            partial.unlink(missing_ok=True)
        self.prune(keep=path)

    def prune(self, keep: Path | None = None) -> int:
        """Delete least recently used entries until the store is within `max_bytes`; returns how many."""
        entries = []
        for entry in self.root.glob("*.pt"):
            try:
                stat = entry.stat()
            except FileNotFoundError:  # pruned by another process just now
                continue
            entries.append((stat.st_mtime, stat.st_size, entry))
        total, removed = sum(size for _, size, _ in entries), 0
        for _, size, entry in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if entry == keep:
                continue
            entry.unlink(missing_ok=True)
            total, removed = total - size, removed + 1
        return removed


def _dataset_identity(dataset: Any) -> str | None:
    """What decides `dataset`'s items, as text (file contents by sha256), or None for a type without one."""
    if isinstance(dataset, SyntheticDefectDataset):
        kind = f"synthetic seed={dataset.seed} recipe={dataset.recipe}"
    elif isinstance(dataset, DefectDataset):
        kind = f"defect flips={dataset.flips}"
    else:
        return None
    lines = [
        kind,
        f"size={tuple(dataset.image_size)} mean={dataset.mean.flatten().tolist()} std={dataset.std.flatten().tolist()}",
    ]
    for sample in dataset.samples:
        files = [sample.image] + ([sample.mask] if sample.mask is not None else [])
        digests = " ".join(_file_sha256(Path(dataset.root) / name) for name in files)
        lines.append(f"{sample!r} {digests}")
    return "\n".join(lines)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _hash_tensors(digest: Any, tensors: Iterable[torch.Tensor]) -> None:
    for tensor in tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


_CODE_FINGERPRINT: list[str] = []


def _code_fingerprint() -> str:
    if not _CODE_FINGERPRINT:
        digest = hashlib.sha256()
        for name in _CODE_MODULES:
            digest.update(inspect.getsource(importlib.import_module(name)).encode())
        _CODE_FINGERPRINT.append(digest.hexdigest())
    return _CODE_FINGERPRINT[0]


__all__ = ["STORE_FORMAT", "FeatureStore"]
