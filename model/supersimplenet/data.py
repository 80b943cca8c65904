"""Datasets for SuperSimpleNet: layout readers, supervision regimes, image loading and balanced sampling.

The module is split in four parts:

* **Readers** turn a dataset folder into a flat list of `Sample` records (paths relative to the dataset
  root, label, split, whether the pixel mask is known). One reader per public layout (MVTec AD, VisA, KSDD2,
  SensumSODF) plus a generic ``folder`` layout; `read_layout` dispatches and applies an optional split file.
* `apply_supervision` derives the training view of a sample list for one supervision regime
  (unsupervised, weak, mixed, supervised; docs/design.md §1 and §6.3).
* `load_image` / `load_mask` / `DefectDataset` turn samples into tensors (docs/design.md §3.1: masks are resized with
  nearest neighbour and scaled to {0, 1}; images bilinear without antialias, like cv2 in the official code).
* `BalancedSampler` is the supervised epoch of docs/design.md §6.3 (every positive in 4 flip variants, negatives by
  inverse-frequency sampling), deterministic and shardable over ranks.

Every reader raises `DataError` (a `ValueError`) naming the offending file or folder; nothing is skipped
silently. Only hidden entries (names starting with ".", e.g. ``.DS_Store``) are ignored when listing folders.

Side files (``split_file``, ``labels.csv``, VisA's CSV) name images by POSIX paths relative to the dataset
root passed to `read_layout`, the same form as `Sample.image`.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SPLITS = ("train", "val", "test")
LAYOUTS = ("mvtec", "visa", "ksdd2", "sensum", "folder")
REGIMES = ("unsupervised", "weak", "mixed", "supervised")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

PathLike = str | Path


class DataError(ValueError):
    """Invalid or inconsistent dataset input; the message names the offending file or folder."""


# --------------------------------------------------------------------------------------------------------------
# Sample record
# --------------------------------------------------------------------------------------------------------------


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


def _raise_problems(header: str, problems: Sequence[str]) -> None:
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise DataError(f"{header} ({len(problems)} problem(s)):\n{lines}")


def _parse_label(value: str, *, where: str) -> int:
    text = value.strip().lower()
    if text in ("0", "normal", "good", "ok", "negative"):
        return 0
    if text in ("1", "anomaly", "defective", "defect", "bad", "ng", "positive"):
        return 1
    raise DataError(f"unknown label {value!r} in {where} (use 0/1, normal/anomaly or good/defective)")


# --------------------------------------------------------------------------------------------------------------
# Layout detection
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
        masks = _by_stem(_list_images(gt_dir / cls_dir.name), gt_dir / cls_dir.name) \
            if (gt_dir / cls_dir.name).is_dir() else {}
        used: set[str] = set()
        for img in images:
            # MVTec names masks <stem>_mask.png; the battery-weld set (and others) reuse the image name.
            hits = [s for s in (f"{img.stem}_mask", img.stem) if s in masks]
            if len(hits) == 2:
                problems.append(
                    f"two candidate masks for {img}: {masks[hits[0]]} and {masks[hits[1]]}"
                )
                continue
            mask = masks[hits[0]] if hits else None
            if mask is not None:
                used.add(mask.stem)
            samples.append(Sample(
                image=_rel(img, root),
                mask=_rel(mask, root) if mask is not None else None,
                label=0 if normal else 1,
                split="test",
                segmented=normal or mask is not None,
                defect_type="" if normal else cls_dir.name,
            ))
        for stem, mask in masks.items():
            if stem not in used:
                problems.append(f"mask without image: {mask} (no matching image in {cls_dir})")
    _raise_problems(f"mvtec layout at {base}", problems)
    return samples


def _normalise_rel(path: str, *, where: str) -> str:
    text = path.strip().replace("\\", "/")
    pure = PurePosixPath(text)
    if not text or pure.is_absolute() or ".." in pure.parts:
        raise DataError(f"path must be relative to the dataset root, got {path!r} in {where}")
    return pure.as_posix()


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
            samples.append(Sample(
                image=_rel(img, root),
                mask=_rel(mask, root) if mask is not None else None,
                label=label,
                split="test" if i % 3 == int(fold) else "train",
                segmented=label == 0 or mask is not None,
            ))
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
                if listed is not None and listed != label:
                    problems.append(
                        f"label {listed} in the labels file contradicts mask {mask} for {img}"
                    )
                    continue
                samples.append(Sample(rel, _rel(mask, root), label, split, True))
            elif listed is not None:
                # A normal image is segmented by definition (all-zero mask); a defective one is weak.
                samples.append(Sample(rel, None, listed, split, listed == 0))
            else:
                problems.append(f"image with neither mask nor label: {img} (no mask in {mask_dir}, "
                                f"no entry in a labels file)")
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


def write_split_file(path: PathLike, samples: Iterable[Sample]) -> None:
    """Write the splits of `samples` in the format `read_split_file` reads (sorted, one line per image)."""
    lines = sorted(f"{s.split} {s.image}" for s in samples)
    Path(path).write_text("".join(line + "\n" for line in lines))


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
        folder: ``{train,val,test}/{images,masks}``; empty mask = good; images without a mask take their
            label from the labels file (defective ones become weakly labelled).

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
            f"unknown option(s) {sorted(unknown)} for layout {layout!r} "
            f"(allowed: {sorted(_LAYOUT_OPTIONS[layout])})"
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


# --------------------------------------------------------------------------------------------------------------
# Supervision regimes and validation
# --------------------------------------------------------------------------------------------------------------


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


def validate_samples(root: PathLike, samples: Sequence[Sample]) -> None:
    """Open every image and mask and check the sample list as a whole.

    Checks: the train split is not empty; no image is listed twice; every image exists and is readable (PIL
    verify); a listed mask exists, is readable and has its image's size; a mask whose image is missing; a
    defective segmented image with an empty mask, or a normal image with a non-empty mask.

    Raises:
        DataError: one error listing every problem with the offending path.
    """
    root = Path(root)
    problems: list[str] = []
    if not any(s.split == "train" for s in samples):
        problems.append(f"empty train set: no sample has split 'train' under {root}")
    counts: dict[str, int] = {}
    for s in samples:
        counts[s.image] = counts.get(s.image, 0) + 1
    problems += [f"image listed {n} times: {root / image}" for image, n in counts.items() if n > 1]

    for s in samples:
        image_path = root / s.image
        mask_path = root / s.mask if s.mask is not None else None
        if not image_path.is_file():
            if mask_path is not None and mask_path.is_file():
                problems.append(f"mask without image: {mask_path} (image {image_path} is missing)")
            else:
                problems.append(f"missing image: {image_path}")
            continue
        try:
            with Image.open(image_path) as im:
                image_size = im.size
                im.verify()
        except Exception as exc:  # noqa: BLE001 - PIL raises many exception types for broken files
            problems.append(f"unreadable image: {image_path} ({type(exc).__name__}: {exc})")
            continue
        if mask_path is None:
            continue
        if not mask_path.is_file():
            problems.append(f"missing mask: {mask_path} (for image {image_path})")
            continue
        try:
            with Image.open(mask_path) as im:
                mask_size = im.size
                im.verify()
            has_defect = bool(_mask_array(mask_path).any())
        except Exception as exc:  # noqa: BLE001 - as above
            problems.append(f"unreadable mask: {mask_path} ({type(exc).__name__}: {exc})")
            continue
        if mask_size != image_size:
            problems.append(
                f"mask size {mask_size[0]}x{mask_size[1]} differs from image size "
                f"{image_size[0]}x{image_size[1]}: {mask_path} (image {image_path})"
            )
        elif s.label == 1 and not has_defect:
            problems.append(f"empty mask for a defective image: {mask_path} (image {image_path})")
        elif s.label == 0 and has_defect:
            problems.append(f"non-empty mask for a normal image: {mask_path} (image {image_path})")
    _raise_problems(f"invalid dataset at {root}", problems)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in size):
        raise ValueError(f"size must be (height, width) of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _open(path: Path, what: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return img
    except FileNotFoundError as exc:
        raise DataError(f"missing {what}: {path}") from exc
    except Exception as exc:
        raise DataError(f"unreadable {what}: {path} ({type(exc).__name__}: {exc})") from exc


def _image_array(path: Path) -> np.ndarray:
    """HxWx3 float32 in [0, 1]."""
    return image_array(_open(path, "image"), where=str(path))


def image_array(img: Image.Image, *, where: str = "image") -> np.ndarray:
    """A decoded PIL image as HxWx3 float32 in [0, 1] (the one conversion used by training and serving)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit grayscale (some industrial cameras): scale by the 16-bit range, then repeat the channel.
        gray = np.asarray(img, dtype=np.float32)
        if gray.min() < 0 or gray.max() > 65535:
            raise DataError(f"unsupported pixel range in {img.mode} image: {where}")
        gray = gray / 65535.0
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":
        raise DataError(f"unsupported floating-point image (mode F): {where}")
    # convert("RGB") repeats the gray channel for L/1/LA, expands palettes and drops alpha.
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _mask_array(path: Path) -> np.ndarray:
    """HxW bool: True where the mask is non-zero (VisA stores class ids, others 255)."""
    img = _open(path, "mask")
    if img.mode == "P":
        img = img.convert("RGB")  # palette indices are not intensities
    elif img.mode in ("LA", "PA"):
        img = img.convert("L")
    elif img.mode == "RGBA":
        img = img.convert("RGB")
    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr.any(axis=2)
    return arr > 0


def load_image(path: PathLike, *, size: tuple[int, int]) -> torch.Tensor:
    """Load an image as float [3, H, W] in [0, 1].

    Grayscale is repeated to 3 channels. Resizing is bilinear with align_corners=False and no antialiasing,
    which matches cv2.resize(INTER_LINEAR) of the official code (docs/design.md §8).

    Raises:
        DataError: missing or unreadable file.
    """
    return resize_image(_image_array(Path(path)), size=size)


def resize_image(arr: np.ndarray, *, size: tuple[int, int]) -> torch.Tensor:
    """HxWx3 float array in [0, 1] -> float [3, H, W] at `size` (bilinear, align_corners=False, no antialias)."""
    height, width = _check_size(size)
    image = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1).contiguous()
    if image.shape[1:] != (height, width):
        image = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False,
                              antialias=False)[0]
    return image


def load_mask(path: PathLike | None, *, size: tuple[int, int]) -> torch.Tensor:
    """Load a pixel mask as float [1, H, W] of 0/1 (non-zero -> 1, nearest-neighbour resize); zeros for None."""
    height, width = _check_size(size)
    if path is None:
        return torch.zeros(1, height, width)
    mask = torch.from_numpy(_mask_array(Path(path))).to(torch.float32)[None]
    if mask.shape[1:] != (height, width):
        mask = F.interpolate(mask[None], size=(height, width), mode="nearest")[0]
    return mask


def normalization_tensors(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated per-channel (mean, std) as [3, 1, 1] tensors for normalising [3, H, W] images."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each, got {mean!r} and {std!r}")
    if any(float(v) <= 0 for v in std):
        raise ValueError(f"std values must be positive, got {std!r}")
    return torch.tensor([float(v) for v in mean]).view(3, 1, 1), torch.tensor([float(v) for v in std]).view(3, 1, 1)


class DefectDataset(torch.utils.data.Dataset):
    """Tensors for a list of samples, optionally extended by the 4 flip variants of docs/design.md §6.3.

    Index i selects sample i % n and variant i // n (n = len(samples)): 0 as is, 1 vertical flip, 2 horizontal
    flip, 3 both (a 180 degree rotation). Image and mask are flipped together.

    Items are dicts: image float [3, H, W] normalised with mean/std, mask float [1, H, W] of 0/1, label float32
    scalar, segmented bool scalar, index (the dataset index i).
    """

    def __init__(
        self,
        *,
        root: PathLike,
        samples: Sequence[Sample],
        image_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        flips: bool = False,
    ) -> None:
        self.root = Path(root)
        self.samples = tuple(samples)
        self.image_size = _check_size(image_size)
        self.mean, self.std = normalization_tensors(mean, std)
        self.flips = bool(flips)

    def __len__(self) -> int:
        return len(self.samples) * (4 if self.flips else 1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        total = len(self)
        index = int(index)
        if not -total <= index < total:
            raise IndexError(f"index {index} out of range for a dataset of {total} items")
        index %= total
        n = len(self.samples)
        sample, variant = self.samples[index % n], index // n
        image = load_image(self.root / sample.image, size=self.image_size)
        mask = load_mask(self.root / sample.mask if sample.mask is not None else None, size=self.image_size)
        dims = {0: (), 1: (-2,), 2: (-1,), 3: (-2, -1)}[variant]
        if dims:
            image, mask = image.flip(dims), mask.flip(dims)
        return {
            "image": (image - self.mean) / self.std,
            "mask": mask,
            "label": torch.tensor(float(sample.label), dtype=torch.float32),
            "segmented": torch.tensor(bool(sample.segmented)),
            "index": index,
        }


# --------------------------------------------------------------------------------------------------------------
# Balanced supervised sampling (docs/design.md §6.3)
# --------------------------------------------------------------------------------------------------------------


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
            raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
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
        return iter(indices[self.rank::self.world_size])


__all__ = [
    "BalancedSampler",
    "DataError",
    "DefectDataset",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "REGIMES",
    "SPLITS",
    "Sample",
    "apply_supervision",
    "detect_layout",
    "load_image",
    "load_mask",
    "read_layout",
    "read_split_file",
    "validate_samples",
    "write_split_file",
]
