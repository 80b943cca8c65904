"""Readers: one per public dataset layout, each turning a dataset folder into a flat list of `Sample` records.

**Readers** turn a dataset folder into a flat list of `Sample` records (paths relative to the dataset root, label,
split, whether the pixel mask is known). One reader per public layout (MVTec AD, VisA, KSDD2, SensumSODF) plus a
generic ``folder`` layout; `supersimplenet.layouts.read_layout` detects the layout (with the probes `_is_*` of this
module), dispatches to its reader and applies an optional split file.

Every reader raises `DataError` (a `ValueError`) naming the offending file or folder; nothing is skipped
silently. Only hidden entries (names starting with ".", e.g. ``.DS_Store``) are ignored when listing folders.

Side files (``split_file``, ``labels.csv``, VisA's CSV) name images by POSIX paths relative to the dataset
root passed to `read_layout`, the same form as `Sample.image`.
"""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath
from typing import Iterable

import numpy as np

from supersimplenet.loading import _mask_array
from supersimplenet.samples import SPLITS, DataError, PathLike, Sample, _normalise_rel, _raise_problems

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


# --------------------------------------------------------------------------------------------------------------
# Small file-system helpers
# --------------------------------------------------------------------------------------------------------------


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _visible_entries(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def _list_images(folder: Path) -> list[Path]:
    """Image files of `folder`, sorted by name; anything else that is not hidden is an error."""
    if not folder.is_dir():
        raise DataError(f"missing folder: {folder}")
    images, strays = [], []
    for entry in _visible_entries(folder):
        if entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(entry)
        else:
            strays.append(entry)
    if strays:
        raise DataError(
            f"{folder} must hold only image files ({', '.join(sorted(IMAGE_EXTENSIONS))}); found: "
            + ", ".join(str(p) for p in strays)
        )
    return images


def _by_stem(files: Iterable[Path], folder: Path) -> dict[str, Path]:
    """Map file stem -> path; two files with one stem (x.png and x.jpg) are ambiguous."""
    out: dict[str, Path] = {}
    for f in files:
        if f.stem in out:
            raise DataError(f"two files with the same name stem in {folder}: {out[f.stem].name} and {f.name}")
        out[f.stem] = f
    return out


def _mask_has_defect(path: Path) -> bool:
    try:
        return bool(_mask_array(path).any())
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types; the caller needs the path
        raise DataError(f"unreadable mask: {path} ({exc})") from exc


def _parse_label(value: str, *, where: str) -> int:
    text = value.strip().lower()
    if text in ("0", "normal", "good", "ok", "negative"):
        return 0
    if text in ("1", "anomaly", "defective", "defect", "bad", "ng", "positive"):
        return 1
    raise DataError(f"unknown label {value!r} in {where} (use 0/1, normal/anomaly or good/defective)")


# --------------------------------------------------------------------------------------------------------------
# Layout probes (detect_layout and the readers)
# --------------------------------------------------------------------------------------------------------------


def _is_mvtec(d: Path) -> bool:
    return (d / "train" / "good").is_dir()


def _is_folder(d: Path) -> bool:
    return any((d / s / "images").is_dir() for s in SPLITS)


def _is_ksdd2(d: Path) -> bool:
    for split in ("train", "test"):
        folder = d / split
        if folder.is_dir() and any(p.stem.endswith("_GT") for p in folder.iterdir() if p.is_file()):
            return True
    return False


def _is_sensum_category(d: Path) -> bool:
    return any((d / cls / "data").is_dir() for cls in ("negative", "positive"))


def _subdirs(d: Path) -> list[Path]:
    return [p for p in _visible_entries(d) if p.is_dir()]


# --------------------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------------------


def _category_base(root: Path, category: str | None, *, layout: str, probe) -> Path:
    """The folder that holds one category: root itself, or root/<category>."""
    if category is not None:
        base = root / category
        if not base.is_dir():
            raise DataError(f"{layout} layout: category folder not found: {base}")
        return base
    if probe(root):
        return root
    candidates = [c.name for c in _subdirs(root) if probe(c)]
    if len(candidates) == 1:
        return root / candidates[0]  # a single category needs no name; paths then start with it
    if candidates:
        raise DataError(f"{layout} layout: {root} holds several categories {candidates}; pass category=")
    raise DataError(f"{layout} layout: no dataset found at {root}")


def _read_mvtec(root: Path, category: str | None) -> list[Sample]:
    base = _category_base(root, category, layout="mvtec", probe=_is_mvtec)
    train_dir = base / "train"
    if not (train_dir / "good").is_dir():
        raise DataError(f"mvtec layout: missing folder {train_dir / 'good'}")
    extra = [p for p in _visible_entries(train_dir) if p.name != "good"]
    if extra:
        # MVTec trains on normal images only; a defect folder here would have no place for its masks.
        raise DataError(f"mvtec layout: {train_dir} may only hold good/; found: " + ", ".join(map(str, extra)))

    samples = [Sample(_rel(p, root), None, 0, "train", True) for p in _list_images(train_dir / "good")]

    test_dir, gt_dir = base / "test", base / "ground_truth"
    test_classes = _subdirs(test_dir) if test_dir.is_dir() else []
    gt_classes = _subdirs(gt_dir) if gt_dir.is_dir() else []
    if gt_dir.is_dir():
        stray = [p for p in _visible_entries(gt_dir) if not p.is_dir()]
        if stray:
            raise DataError(f"mvtec layout: {gt_dir} may only hold folders; found: " + ", ".join(map(str, stray)))
    if test_dir.is_dir():
        stray = [p for p in _visible_entries(test_dir) if not p.is_dir()]
        if stray:
            raise DataError(f"mvtec layout: {test_dir} may only hold folders; found: " + ", ".join(map(str, stray)))

    problems: list[str] = []
    test_names = {c.name for c in test_classes}
    for g in gt_classes:
        if g.name not in test_names:
            problems.append(f"mask folder without test images: {g} (no {test_dir / g.name})")

    for cls_dir in test_classes:
        normal = cls_dir.name == "good"
        images = _list_images(cls_dir)
        masks = (
            _by_stem(_list_images(gt_dir / cls_dir.name), gt_dir / cls_dir.name)
            if (gt_dir / cls_dir.name).is_dir()
            else {}
        )
        used: set[str] = set()
        for img in images:
            # MVTec names masks <stem>_mask.png; the battery-weld set (and others) reuse the image name.
            hits = [s for s in (f"{img.stem}_mask", img.stem) if s in masks]
            if len(hits) == 2:
                problems.append(f"two candidate masks for {img}: {masks[hits[0]]} and {masks[hits[1]]}")
                continue
            mask = masks[hits[0]] if hits else None
            if mask is not None:
                used.add(mask.stem)
            samples.append(
                Sample(
                    image=_rel(img, root),
                    mask=_rel(mask, root) if mask is not None else None,
                    label=0 if normal else 1,
                    split="test",
                    segmented=normal or mask is not None,
                    defect_type="" if normal else cls_dir.name,
                )
            )
        for stem, mask in masks.items():
            if stem not in used:
                problems.append(f"mask without image: {mask} (no matching image in {cls_dir})")
    _raise_problems(f"mvtec layout at {base}", problems)
    return samples


def _read_visa(root: Path, category: str | None) -> list[Sample]:
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DataError(f"visa layout: missing file {csv_path}")
    required = {"object", "split", "label", "image", "mask"}
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = required - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"visa layout: {csv_path} lacks columns {sorted(missing)}")
        rows = [(i + 2, row) for i, row in enumerate(reader)]  # +2: 1-based, after the header line

    objects = sorted({row["object"] for _, row in rows})
    if category is None:
        if len(objects) > 1:
            raise DataError(f"visa layout: {csv_path} holds several objects {objects}; pass category=")
    elif category not in objects:
        raise DataError(f"visa layout: category {category!r} not in {csv_path} (objects: {objects})")

    samples, problems = [], []
    for line, row in rows:
        if category is not None and row["object"] != category:
            continue
        where = f"{csv_path}:{line}"
        try:
            split = row["split"].strip()
            if split not in SPLITS:
                raise DataError(f"unknown split {split!r} in {where}")
            label = _parse_label(row["label"], where=where)
            image = _normalise_rel(row["image"], where=where)
            mask = _normalise_rel(row["mask"], where=where) if (row["mask"] or "").strip() else None
        except DataError as exc:
            problems.append(str(exc))
            continue
        if not (root / image).is_file():
            problems.append(f"missing image: {root / image} (listed in {where})")
            continue
        if mask is not None and not (root / mask).is_file():
            problems.append(f"missing mask: {root / mask} (listed in {where})")
            continue
        samples.append(Sample(image, mask, label, split, label == 0 or mask is not None))
    _raise_problems(f"visa layout at {root}", problems)
    return samples


def _read_ksdd2(root: Path) -> list[Sample]:
    splits = [s for s in ("train", "test") if (root / s).is_dir()]
    if not splits:
        raise DataError(f"ksdd2 layout: neither {root / 'train'} nor {root / 'test'} exists")
    samples, problems = [], []
    for split in splits:
        folder = root / split
        files = _by_stem(_list_images(folder), folder)
        gts = {stem: p for stem, p in files.items() if stem.endswith("_GT")}
        images = [p for stem, p in files.items() if not stem.endswith("_GT")]
        used: set[str] = set()
        for img in images:
            gt = gts.get(f"{img.stem}_GT")
            if gt is None:
                # KSDD2 labels come from the mask alone, so an image without one has no label.
                problems.append(f"image without mask: {img} (expected {folder / (img.stem + '_GT.png')})")
                continue
            used.add(gt.stem)
            try:
                label = int(_mask_has_defect(gt))
            except DataError as exc:
                problems.append(str(exc))
                continue
            samples.append(Sample(_rel(img, root), _rel(gt, root), label, split, True))
        for stem, gt in gts.items():
            if stem not in used:
                problems.append(f"mask without image: {gt}")
    _raise_problems(f"ksdd2 layout at {root}", problems)
    return samples


def _read_sensum(root: Path, category: str | None, fold: int) -> list[Sample]:
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or int(fold) not in (0, 1, 2):
        raise DataError(f"sensum layout: fold must be 0, 1 or 2, got {fold!r}")
    base = _category_base(root, category, layout="sensum", probe=_is_sensum_category)
    samples, problems = [], []
    for cls, label in (("negative", 0), ("positive", 1)):
        data_dir = base / cls / "data"
        if not data_dir.is_dir():
            raise DataError(f"sensum layout: missing folder {data_dir}")
        images = _list_images(data_dir)
        ann_dir = base / cls / "annotation"
        annotations = _by_stem(_list_images(ann_dir), ann_dir) if ann_dir.is_dir() else {}
        used: set[str] = set()
        # Deterministic 3-fold CV without the authors' split files: within each class, files sorted by
        # name, position i goes to test in fold i % 3 (so every class is split 1/3 test, 2/3 train).
        for i, img in enumerate(images):
            mask = annotations.get(img.stem)
            if mask is not None:
                used.add(img.stem)
            samples.append(
                Sample(
                    image=_rel(img, root),
                    mask=_rel(mask, root) if mask is not None else None,
                    label=label,
                    split="test" if i % 3 == int(fold) else "train",
                    segmented=label == 0 or mask is not None,
                )
            )
        for stem, mask in annotations.items():
            if stem not in used:
                problems.append(f"mask without image: {mask} (no {stem}.* in {data_dir})")
    _raise_problems(f"sensum layout at {base}", problems)
    return samples


def _read_labels_csv(path: Path, root: Path) -> dict[str, int]:
    if not path.is_file():
        raise DataError(f"labels file not found: {path}")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"image", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"labels file {path} lacks columns {sorted(missing)}")
        labels: dict[str, int] = {}
        problems = []
        for i, row in enumerate(reader):
            where = f"{path}:{i + 2}"
            try:
                image = _normalise_rel(row["image"] or "", where=where)
                label = _parse_label(row["label"] or "", where=where)
            except DataError as exc:
                problems.append(str(exc))
                continue
            if image in labels:
                problems.append(f"duplicate entry {image} in {where}")
            elif not (root / image).is_file():
                problems.append(f"missing image: {root / image} (listed in {where})")
            labels[image] = label
    _raise_problems(f"labels file {path}", problems)
    return labels


def _read_folder(root: Path, category: str | None, labels_file: PathLike | None) -> list[Sample]:
    base = _category_base(root, category, layout="folder", probe=_is_folder)
    if labels_file is not None:
        labels = _read_labels_csv(Path(labels_file), root)
    elif (root / "labels.csv").is_file():
        labels = _read_labels_csv(root / "labels.csv", root)
    else:
        labels = {}
    samples, problems = [], []
    seen: set[str] = set()
    for split in SPLITS:
        split_dir = base / split
        if not split_dir.is_dir():
            continue
        image_dir, mask_dir = split_dir / "images", split_dir / "masks"
        if not image_dir.is_dir():
            raise DataError(f"folder layout: missing folder {image_dir}")
        images = _list_images(image_dir)
        masks = _by_stem(_list_images(mask_dir), mask_dir) if mask_dir.is_dir() else {}
        used: set[str] = set()
        for img in images:
            rel = _rel(img, root)
            seen.add(rel)
            hits = [s for s in (img.stem, f"{img.stem}_mask") if s in masks]
            if len(hits) == 2:
                problems.append(f"two candidate masks for {img}: {masks[hits[0]]} and {masks[hits[1]]}")
                continue
            listed = labels.get(rel)
            if hits:
                mask = masks[hits[0]]
                used.add(mask.stem)
                try:
                    label = int(_mask_has_defect(mask))  # an empty mask means a good image
                except DataError as exc:
                    problems.append(str(exc))
                    continue
                if listed == 0 and label == 1:
                    problems.append(f"label {listed} in the labels file contradicts mask {mask} for {img}")
                    continue
                if listed == 1:
                    # a defective image with an empty mask: the dataset check's empty-mask policy decides
                    label = 1
                samples.append(Sample(rel, _rel(mask, root), label, split, True))
            elif listed is not None:
                # A normal image is segmented by definition (all-zero mask); a defective one is weak.
                samples.append(Sample(rel, None, listed, split, listed == 0))
            else:
                problems.append(
                    f"image with neither mask nor label: {img} (no mask in {mask_dir}, no entry in a labels file)"
                )
        for stem, mask in masks.items():
            if stem not in used:
                problems.append(f"mask without image: {mask}")
    if not any((base / s).is_dir() for s in SPLITS):
        raise DataError(f"folder layout: none of {[str(base / s) for s in SPLITS]} exists")
    base_rel = PurePosixPath(_rel(base, root))
    for rel in labels:
        # With a category, a root-level labels file may list other categories' images too.
        if rel not in seen and (base == root or PurePosixPath(rel).is_relative_to(base_rel)):
            problems.append(f"labels file names {root / rel}, which is not an image of the folder layout")
    _raise_problems(f"folder layout at {base}", problems)
    return samples


__all__ = [
    "IMAGE_EXTENSIONS",
]
