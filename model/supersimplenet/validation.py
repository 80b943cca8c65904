"""Validation: decode every image and mask of a sample list before the list is used, and the empty-mask policy.

`check_samples` reads each file once, checks it with PIL's ``verify()`` (PNG checksums) and decodes it fully with
`supersimplenet.loading._open`, the function training reads files with (``load()`` with Pillow's
``ImageFile.LOAD_TRUNCATED_IMAGES`` left False), so a truncated JPEG, PNG, BMP or TIFF is named here instead of
failing a training job later. Decoding runs in a thread pool bounded by the CPU count (Pillow releases the GIL while
it decodes). Every problem of the whole list is collected and raised as one `DataError`.

A defective image whose mask decodes to all zeros is handled by `empty_masks` (`EMPTY_MASK_POLICIES`):
``"error"`` refuses the list, naming the files and the option; ``"label-only"`` keeps the image as defective
without a mask (not segmented: training learns from its label only, as in weak supervision, and no loss treats the
empty mask as ground truth); ``"drop"`` leaves the image out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from PIL import Image

from supersimplenet.loading import _check_pixels, _mask_pixels, _open
from supersimplenet.samples import EMPTY_MASK_POLICIES, DataError, PathLike, Sample, _raise_problems


@dataclasses.dataclass(frozen=True)
class DecodedFile:
    """One fully decoded file: its size in pixels, the sha256 and length of the bytes that were decoded and, for a
    mask, whether any pixel is non-zero."""

    size: tuple[int, int]
    sha256: str
    nbytes: int
    has_defect: bool | None = None


@dataclasses.dataclass(frozen=True)
class CheckedSamples:
    """The outcome of `check_samples`.

    Attributes:
        samples: the sample list after the empty-mask policy (the input order, without dropped images).
        empty_masks: images (relative paths, sorted) whose defective mask decoded to all zeros; under "label-only"
            they are in `samples` without their mask, under "drop" they are not.
        policy: the empty-mask policy that was applied.
        files: relative path -> (sha256, bytes) of every file `samples` names, as read and decoded.
    """

    samples: tuple[Sample, ...]
    empty_masks: tuple[str, ...]
    policy: str
    files: Mapping[str, tuple[str, int]]


def decode_file(path: Path, what: str) -> DecodedFile:
    """Reads `path` once, verifies and fully decodes those bytes; `DataError` naming the file and the reason."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"missing {what}: {path}") from None
    except OSError as exc:
        raise DataError(f"unreadable {what}: {path} ({type(exc).__name__}: {exc})") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # PNG chunk checksums; checks nothing for JPEG, BMP or TIFF, hence the full decode below
    except Exception as exc:  # noqa: BLE001 - PIL raises many exception types for broken files
        raise DataError(f"unreadable {what}: {path} ({type(exc).__name__}: {exc})") from None
    img = _open(path, what, data)
    has_defect = None
    try:
        if what == "mask":
            has_defect = bool(_mask_pixels(img).any())
        else:
            _check_pixels(img, where=str(path))
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - conversions of exotic modes
        raise DataError(f"unreadable {what}: {path} ({type(exc).__name__}: {exc})") from None
    return DecodedFile(size=img.size, sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data), has_defect=has_defect)


def decode_workers(workers: int | None = None) -> int:
    """Threads for decoding: `workers`, at most the CPUs this process may run on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, workers if workers is not None else cpus))


def check_samples(
    root: PathLike, samples: Sequence[Sample], *, empty_masks: str = "error", workers: int | None = None
) -> CheckedSamples:
    """Decode every image and mask of `samples` and check the list as a whole; apply the empty-mask policy.

    Checks: every image and listed mask exists, passes PIL's ``verify()`` and decodes fully (a truncated file is an
    error); a mask has its image's size; a normal image's mask is empty; a defective image's mask is not empty
    (else `empty_masks` decides); no image is listed twice; the train split is not empty.

    Raises:
        DataError: one error listing every problem, each with the offending path; ValueError for an unknown
            `empty_masks`.
    """
    if empty_masks not in EMPTY_MASK_POLICIES:
        raise ValueError(f"empty_masks must be one of {EMPTY_MASK_POLICIES}, got {empty_masks!r}")
    root = Path(root)
    samples = list(samples)
    problems: list[str] = []
    counts: dict[str, int] = {}
    for s in samples:
        counts[s.image] = counts.get(s.image, 0) + 1
    problems += [f"image listed {n} times: {root / image}" for image, n in counts.items() if n > 1]

    wanted = {s.image: "image" for s in samples}
    wanted.update({s.mask: "mask" for s in samples if s.mask is not None and s.mask not in wanted})
    decoded = _decode_all(root, wanted, workers)

    empty: list[Sample] = []
    for s in samples:
        image_path = root / s.image
        mask_path = root / s.mask if s.mask is not None else None
        image = decoded[s.image]
        mask = decoded[s.mask] if s.mask is not None else None
        if isinstance(image, DataError):
            if image_path.exists() or mask_path is None or not mask_path.is_file():
                problems.append(str(image))
            else:
                problems.append(f"mask without image: {mask_path} (image {image_path} is missing)")
            continue
        if mask is None:
            continue
        if isinstance(mask, DataError):
            problems.append(f"{mask} (for image {image_path})")
        elif mask.size != image.size:
            problems.append(
                f"mask size {mask.size[0]}x{mask.size[1]} differs from image size "
                f"{image.size[0]}x{image.size[1]}: {mask_path} (image {image_path})"
            )
        elif s.label == 1 and not mask.has_defect:
            empty.append(s)
        elif s.label == 0 and mask.has_defect:
            problems.append(f"non-empty mask for a normal image: {mask_path} (image {image_path})")

    kept = _apply_policy(samples, empty, empty_masks)
    if empty and empty_masks == "error":
        problems += [f"empty mask for a defective image: {root / s.mask} (image {root / s.image})" for s in empty]
        problems.append(
            f"{len(empty)} defective image(s) have an empty mask: choose what to do with them with the empty-mask "
            "option (jobs/ingest.py --empty-masks, empty_masks=): 'label-only' keeps them as defective images "
            "without a mask (their labels still train, as in weak supervision), 'drop' leaves them out"
        )
    if not any(s.split == "train" for s in kept):
        problems.insert(0, f"empty train set: no sample has split 'train' under {root}")
    _raise_problems(f"invalid dataset at {root}", problems)
    files = {}
    for s in kept:
        for rel in (s.image, s.mask):
            if rel is not None:
                entry = decoded[rel]
                assert isinstance(entry, DecodedFile)
                files[rel] = (entry.sha256, entry.nbytes)
    return CheckedSamples(
        samples=tuple(kept), empty_masks=tuple(sorted(s.image for s in empty)), policy=empty_masks, files=files
    )


def _decode_all(root: Path, wanted: Mapping[str, str], workers: int | None) -> dict[str, DecodedFile | DataError]:
    """relative path -> its DecodedFile, or the DataError that names why it is not one."""

    def one(item: tuple[str, str]) -> DecodedFile | DataError:
        rel, what = item
        try:
            return decode_file(root / rel, what)
        except DataError as exc:
            return exc

    items = sorted(wanted.items())
    with ThreadPoolExecutor(max_workers=decode_workers(workers)) as pool:
        return dict(zip((rel for rel, _ in items), pool.map(one, items)))


def _apply_policy(samples: Sequence[Sample], empty: Sequence[Sample], policy: str) -> list[Sample]:
    """`samples` with the empty-mask policy applied to the images of `empty`."""
    affected = {s.image for s in empty}
    if policy == "drop":
        return [s for s in samples if s.image not in affected]
    if policy == "label-only":
        return [dataclasses.replace(s, mask=None, segmented=False) if s.image in affected else s for s in samples]
    return list(samples)


def validate_samples(
    root: PathLike, samples: Sequence[Sample], *, empty_masks: str = "error", workers: int | None = None
) -> list[Sample]:
    """`check_samples` for callers that need only the resulting sample list."""
    return list(check_samples(root, samples, empty_masks=empty_masks, workers=workers).samples)


__all__ = [
    "CheckedSamples",
    "DecodedFile",
    "check_samples",
    "decode_file",
    "decode_workers",
    "validate_samples",
]
