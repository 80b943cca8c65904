"""Balanced supervised sampling (docs/design.md §6.3).

`BalancedSampler` is the supervised epoch of docs/design.md §6.3 (every positive in 4 flip variants, negatives by
inverse-frequency sampling), deterministic and shardable over ranks.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from supersimplenet.samples import DataError


class BalancedSampler(torch.utils.data.Sampler[int]):
    """Balanced epochs for supervised training (docs/design.md §6.3), deterministic and sharded over ranks.

    Indices refer to a `DefectDataset` built over the same samples with the same `flips`. One epoch holds:

    * with flips: every positive in all 4 flip variants (4*N_pos draws) and 4*N_pos negative draws;
    * without flips: every positive twice and 2*N_pos negative draws.

    Negatives are always variant 0 (the official code flips only anomalous images). They are drawn by
    inverse-frequency sampling from the counts of all earlier epochs: q = 1 - freq/max(freq) (ones while
    nothing was drawn), q = q - median(q) + 1, q = q ** (4 ln N_neg), normalised; without replacement unless
    more draws are needed than negatives exist.

    The epoch list is a pure function of (labels, flips, seed, epoch): the draw history of epochs
    0..epoch-1 is replayed internally (and cached), so every rank can compute any epoch without shared
    state, and a sampler re-created from a checkpoint (`state_dict`) continues identically. The list is
    shuffled with a generator seeded by (seed, epoch), padded by wrapping to a multiple of `world_size`, and
    rank r takes positions r, r + world_size, ...

    Call `set_epoch` before each epoch, as with `DistributedSampler`. Unsupervised training (normal images
    only, docs/design.md §6.2) needs no balancing: use `torch.utils.data.DistributedSampler(shuffle=True)` there.
    """

    def __init__(
        self,
        *,
        labels: Sequence[int],
        flips: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        labels_arr = np.asarray([int(v) for v in labels], dtype=np.int64)
        if labels_arr.size and not np.isin(labels_arr, (0, 1)).all():
            raise ValueError("labels must be 0 or 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        self._n = int(labels_arr.size)
        self._pos = np.flatnonzero(labels_arr == 1)
        self._neg = np.flatnonzero(labels_arr == 0)
        if self._pos.size == 0:
            raise DataError("BalancedSampler needs at least one defective (label 1) training sample")
        if self._neg.size == 0:
            raise DataError("BalancedSampler needs at least one normal (label 0) training sample")
        self.flips = bool(flips)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0

        per_class = (4 if self.flips else 2) * self._pos.size
        if self.flips:
            self._positives = np.concatenate([self._pos + v * self._n for v in range(4)])
        else:
            self._positives = np.concatenate([self._pos, self._pos])
        self._neg_draws = per_class
        self._replace = per_class > self._neg.size
        # Replay cache: negative draws (positions into self._neg) per epoch, and the counts after them.
        self._history: list[np.ndarray] = []
        self._freq = np.zeros(self._neg.size, dtype=np.float64)

    def _rng(self, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed % 2**63, epoch, stream]))

    def _draw_negatives(self, epoch: int) -> np.ndarray:
        freq = self._freq
        top = freq.max()
        q = 1.0 - freq / top if top > 0 else np.ones_like(freq)
        q = q - np.median(q) + 1.0
        q = q ** (4.0 * math.log(freq.size))
        p = q / q.sum()
        if not self._replace and np.count_nonzero(p) < self._neg_draws:
            # Cannot happen for median-shifted weights (inferred), but never let numpy fail mid-training.
            p = (p + 1e-12) / (p + 1e-12).sum()
        return self._rng(epoch, 0).choice(freq.size, size=self._neg_draws, replace=self._replace, p=p)

    def _negatives(self, epoch: int) -> np.ndarray:
        while len(self._history) <= epoch:
            draw = self._draw_negatives(len(self._history))
            np.add.at(self._freq, draw, 1.0)
            self._history.append(draw)
        return self._neg[self._history[epoch]]

    def epoch_indices(self, epoch: int | None = None) -> list[int]:
        """The whole (unsharded, unpadded) shuffled index list of an epoch (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        full = np.concatenate([self._positives, self._negatives(epoch)])
        return full[self._rng(epoch, 1).permutation(full.size)].tolist()

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.set_epoch(int(state["epoch"]))

    def __len__(self) -> int:
        return -(-2 * self._neg_draws // self.world_size)

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()
        padded = len(self) * self.world_size
        # Wrap around (repeatedly, should world_size exceed the epoch) so every rank gets len(self) items.
        indices = (indices * -(-padded // len(indices)))[:padded]
        return iter(indices[self.rank :: self.world_size])


__all__ = [
    "BalancedSampler",
]
