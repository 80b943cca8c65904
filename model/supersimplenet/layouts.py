"""Reading a dataset folder: `read_layout` detects its layout, runs that layout's reader and applies a split file.

`detect_layout` guesses the layout of a folder; `read_layout` dispatches to the reader of `supersimplenet.readers`
(one per public layout, plus a generic ``folder`` layout) and applies an optional split file (`read_split_file`:
``<split> <relative image path>`` lines, paths in the form of `Sample.image`). Every error is a `DataError` naming
the offending file or folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from supersimplenet.readers import (
    _is_folder,
    _is_ksdd2,
    _is_mvtec,
    _is_sensum_category,
    _read_folder,
    _read_ksdd2,
    _read_mvtec,
    _read_sensum,
    _read_visa,
    _subdirs,
)
from supersimplenet.samples import SPLITS, DataError, PathLike, Sample, _normalise_rel, _raise_problems

LAYOUTS = ("mvtec", "visa", "ksdd2", "sensum", "folder")


# --------------------------------------------------------------------------------------------------------------
# Layout detection
# --------------------------------------------------------------------------------------------------------------


def detect_layout(root: PathLike) -> str:
    """Guess the layout of a dataset folder.

    Rules, in order: ``split_csv/1cls.csv`` -> visa; ``train/good`` (or ``ground_truth``) -> mvtec;
    ``<split>/images`` -> folder; ``train|test`` holding ``*_GT`` files -> ksdd2; ``negative|positive/data``
    in root or in a sub-folder -> sensum; sub-folders that are MVTec or folder categories -> that layout.

    Raises:
        DataError: `root` is not a folder or matches no layout.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root is not a folder: {root}")
    if (root / "split_csv" / "1cls.csv").is_file():
        return "visa"
    if _is_mvtec(root) or (root / "ground_truth").is_dir():
        return "mvtec"
    if _is_folder(root):
        return "folder"
    if _is_ksdd2(root):
        return "ksdd2"
    children = _subdirs(root)
    if _is_sensum_category(root) or any(_is_sensum_category(c) for c in children):
        return "sensum"
    # A root holding several categories (e.g. all of MVTec AD): the reader then needs `category`.
    if any(_is_mvtec(c) for c in children):
        return "mvtec"
    if any(_is_folder(c) for c in children):
        return "folder"
    raise DataError(
        f"unknown dataset layout at {root}: expected one of {LAYOUTS} "
        "(split_csv/1cls.csv, train/good, <split>/images, train/*_GT.png, <category>/negative/data)"
    )


# --------------------------------------------------------------------------------------------------------------
# Split files and the public reader
# --------------------------------------------------------------------------------------------------------------


def read_split_file(path: PathLike) -> dict[str, str]:
    """Parse a split file: one ``<split> <relative image path>`` per line; blank lines and ``#`` comments are
    ignored. Returns {image path: split}.

    Raises:
        DataError: unreadable file, malformed line, unknown split or duplicate image (naming file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    out: dict[str, str] = {}
    problems = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        parts = line.split(maxsplit=1)  # maxsplit keeps paths that contain spaces intact
        if len(parts) != 2:
            problems.append(f"expected '<split> <image path>' in {where}, got {raw!r}")
            continue
        split, image = parts
        if split not in SPLITS:
            problems.append(f"unknown split {split!r} in {where} (use one of {SPLITS})")
            continue
        try:
            image = _normalise_rel(image, where=where)
        except DataError as exc:
            problems.append(str(exc))
            continue
        if image in out:
            problems.append(f"duplicate entry {image} in {where}")
            continue
        out[image] = split
    _raise_problems(f"split file {path}", problems)
    return out


def _apply_split_file(root: Path, samples: list[Sample], split_file: PathLike) -> list[Sample]:
    assigned = read_split_file(split_file)
    known = {s.image for s in samples}
    problems = []
    for image in assigned:
        if image not in known:
            if (root / image).is_file():
                problems.append(f"split file names {root / image}, which is not an image of this layout")
            else:
                problems.append(f"split file names a missing image: {root / image}")
    _raise_problems(f"split file {split_file}", problems)
    return [dataclasses.replace(s, split=assigned[s.image]) if s.image in assigned else s for s in samples]


_LAYOUT_OPTIONS: dict[str, frozenset[str]] = {
    "mvtec": frozenset({"split_file"}),
    "visa": frozenset({"split_file"}),
    "ksdd2": frozenset({"split_file"}),
    "sensum": frozenset({"split_file", "fold"}),
    "folder": frozenset({"split_file", "labels_file"}),
}


def read_layout(
    root: PathLike,
    layout: str | None = None,
    *,
    category: str | None = None,
    **options: Any,
) -> list[Sample]:
    """Read a dataset folder into samples.

    Args:
        root: dataset root; every `Sample` path is relative to it.
        layout: one of `LAYOUTS`, or None to `detect_layout`.
        category: sub-dataset: VisA object (required when the CSV holds several), SensumSODF category folder,
            or for mvtec / folder a category sub-folder of `root` (e.g. MVTec AD's ``bottle``). Paths then
            start with the category. When `root` holds exactly one category folder it is used without a name.
            Not used by ksdd2.
        **options: ``split_file`` (any layout): path of a file of ``<split> <image>`` lines that assigns
            splits; images it does not list keep the layout's split. ``fold`` (sensum, 0/1/2, default 0).
            ``labels_file`` (folder, default ``root/labels.csv`` when present): CSV with columns image,label
            for images that have no mask.

    Layouts:
        mvtec: ``train/good/*``, ``test/<good|defect>/*``, ``ground_truth/<defect>/<stem>_mask.*`` or
            ``<stem>.*``. Splits train/test. A defect image without a mask is weakly labelled; a mask
            without an image is an error.
        visa: ``split_csv/1cls.csv`` (object,split,label,image,mask; label normal/anomaly).
        ksdd2: ``{train,test}/<id>.png`` + ``<id>_GT.png``; label = mask has a non-zero pixel.
        sensum: ``<category>/{negative,positive}/data/*`` + ``positive/annotation/<same name>``. Without a
            split file, fold k puts files at sorted position i with i % 3 == k (per class) into test.
        folder: ``{train,val,test}/{images,masks}``; empty mask = good (unless the labels file says defective:
            then the sample keeps its empty mask and `supersimplenet.validation`'s empty-mask policy decides);
            images without a mask take their label from the labels file (defective ones become weakly labelled).

    Raises:
        DataError: unknown layout or option, or any inconsistency in the folder (all problems listed).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root is not a folder: {root}")
    if layout is None:
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r} for {root}; use one of {LAYOUTS}")
    unknown = set(options) - _LAYOUT_OPTIONS[layout]
    if unknown:
        raise DataError(
            f"unknown option(s) {sorted(unknown)} for layout {layout!r} (allowed: {sorted(_LAYOUT_OPTIONS[layout])})"
        )

    if layout == "mvtec":
        samples = _read_mvtec(root, category)
    elif layout == "visa":
        samples = _read_visa(root, category)
    elif layout == "ksdd2":
        if category is not None:
            raise DataError(f"ksdd2 layout has no categories; got category={category!r} for {root}")
        samples = _read_ksdd2(root)
    elif layout == "sensum":
        samples = _read_sensum(root, category, options.get("fold", 0))
    else:
        samples = _read_folder(root, category, options.get("labels_file"))

    if not samples:
        raise DataError(f"no images found in {layout} layout at {root}")
    if options.get("split_file") is not None:
        samples = _apply_split_file(root, samples, options["split_file"])
    return samples


__all__ = [
    "LAYOUTS",
    "detect_layout",
    "read_layout",
    "read_split_file",
]
