"""Supervision regimes: the training view of a sample list.

`apply_supervision` derives the training view of a sample list for one supervision regime (unsupervised, weak,
mixed, supervised; docs/design.md §1 and §6.3). Val and test samples are never changed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from supersimplenet.samples import DataError, Sample

REGIMES = ("unsupervised", "weak", "mixed", "supervised")


def apply_supervision(
    samples: Sequence[Sample],
    regime: str,
    *,
    mask_ratio: float = 1.0,
    seed: int = 0,
) -> list[Sample]:
    """Derive the sample list that one supervision regime trains on. Val and test samples are untouched.

    * unsupervised: train keeps only normal images.
    * weak: defective train samples lose their masks (segmented False).
    * mixed: round(mask_ratio * N) of the N defective train samples keep their masks, the rest lose them. The
      kept ones are the first of a seeded permutation of the masked samples sorted by path, so the choice
      does not depend on input order and a smaller ratio keeps a subset of what a larger one keeps.
    * supervised: everything is kept as is.

    `mask_ratio` only matters for "mixed".

    Raises:
        DataError: unknown regime, ratio outside [0, 1], or "mixed" asking for more masks than exist.
    """
    if regime not in REGIMES:
        raise DataError(f"unknown supervision regime {regime!r}; use one of {REGIMES}")
    if not 0.0 <= float(mask_ratio) <= 1.0:
        raise DataError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    samples = list(samples)

    def defective_train(s: Sample) -> bool:
        return s.split == "train" and s.label == 1

    if regime == "supervised":
        return samples
    if regime == "unsupervised":
        return [s for s in samples if not defective_train(s)]
    if regime == "weak":
        return [dataclasses.replace(s, mask=None, segmented=False) if defective_train(s) else s for s in samples]

    n_defective = sum(defective_train(s) for s in samples)
    keep_count = int(math.floor(float(mask_ratio) * n_defective + 0.5))
    masked = sorted(s.image for s in samples if defective_train(s) and s.segmented)
    if keep_count > len(masked):
        raise DataError(
            f"mixed supervision with mask_ratio={mask_ratio} needs {keep_count} masked defective train images, "
            f"but only {len(masked)} of {n_defective} have masks"
        )
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, 0x5EED]))
    keep = {masked[i] for i in rng.permutation(len(masked))[:keep_count]}
    return [
        dataclasses.replace(s, mask=None, segmented=False) if defective_train(s) and s.image not in keep else s
        for s in samples
    ]


__all__ = [
    "REGIMES",
    "apply_supervision",
]
