"""The sample record every dataset module passes around: `Sample`, `DataError` and the split names.

A `Sample` names one image by its POSIX path relative to the dataset root, with its label, its split and whether its
pixel mask is known. `supersimplenet.layouts` reads dataset folders into lists of samples (through the per-layout
readers of `supersimplenet.readers`), `supersimplenet.supervision` derives the training view of a list for one
supervision regime, `supersimplenet.validation` decodes every file of a list and checks it,
`supersimplenet.loading` turns samples into tensors and `supersimplenet.sampler` balances supervised epochs over
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

SPLITS = ("train", "val", "test")
# What a dataset check does with a defective image whose mask decodes to all zeros (supersimplenet.validation):
# refuse the dataset, keep the image as defective without a mask, or leave the image out.
EMPTY_MASK_POLICIES = ("error", "label-only", "drop")

PathLike = str | Path


class DataError(ValueError):
    """Invalid or inconsistent dataset input; the message names the offending file or folder."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Attributes:
        image: POSIX path of the image, relative to the dataset root.
        mask: relative path of the pixel mask, or None when there is none.
        label: 0 normal, 1 defective.
        split: "train", "val" or "test".
        segmented: True when the pixel mask is known. Normal images are segmented (an all-zero mask is implied
            when `mask` is None); a defective image without a mask is weakly labelled (segmented False).
        defect_type: defect class name where the layout has one (MVTec defect folder); "" for normal images
            and for layouts without defect classes.
    """

    image: str
    mask: str | None
    label: int
    split: str
    segmented: bool
    defect_type: str = ""

    def __post_init__(self) -> None:
        _check_relative(self.image, what="image")
        if self.mask is not None:
            _check_relative(self.mask, what="mask")
        if self.label not in (0, 1):
            raise DataError(f"label must be 0 or 1, got {self.label!r} for {self.image}")
        if self.split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {self.split!r} for {self.image}")
        if self.mask is not None and not self.segmented:
            raise DataError(f"a sample with a mask must be segmented: {self.image} (mask {self.mask})")


def _check_relative(path: str, *, what: str) -> None:
    if not isinstance(path, str) or not path:
        raise DataError(f"{what} path must be a non-empty string, got {path!r}")
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or "\\" in path:
        raise DataError(f"{what} path must be a POSIX path relative to the dataset root, got {path!r}")


def _raise_problems(header: str, problems: Sequence[str]) -> None:
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise DataError(f"{header} ({len(problems)} problem(s)):\n{lines}")


def _normalise_rel(path: str, *, where: str) -> str:
    text = path.strip().replace("\\", "/")
    pure = PurePosixPath(text)
    if not text or pure.is_absolute() or ".." in pure.parts:
        raise DataError(f"path must be relative to the dataset root, got {path!r} in {where}")
    return pure.as_posix()


__all__ = [
    "DataError",
    "EMPTY_MASK_POLICIES",
    "SPLITS",
    "Sample",
]
