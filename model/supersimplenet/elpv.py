"""ELPV solar cells (the `elpv-dataset` registry package) exported as an MVTec-layout folder.

ELPV ships 2,624 electroluminescence images of solar cells (300x300, grayscale) with a defect probability each and
no masks. We use probability 0 as normal and probability 1 as defective; the 1/3 and 2/3 cells are left out. The
selection and split of the quickstart are fixed by a committed split file (`jobs/splits/elpv.txt`), whose paths
name the package's image index: `train/good/cell_0012.png` is image 12. Data licence: CC BY-NC-SA 4.0.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from supersimplenet.layouts import read_split_file
from supersimplenet.samples import DataError

_NAME = re.compile(r"^(train/good|test/good|test/defective)/cell_(\d{4})\.png$")


def load_elpv() -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 300, 300] uint8 and defect probabilities [N] from the installed package."""
    try:
        from elpv_dataset.utils import load_dataset  # noqa: PLC0415 (optional extra quickstart: elpv-dataset)
    except ImportError as error:
        raise DataError(
            "the ELPV data comes from the package elpv-dataset==1.0.0.post1, which is not installed"
        ) from error
    images, probabilities, _types = load_dataset()
    return np.asarray(images), np.asarray(probabilities, dtype=np.float64)


def export_elpv(out_dir: str | Path, *, split_file: str | Path) -> Path:
    """Writes the images named by `split_file` under `out_dir` (idempotent: existing identical files stay).

    Raises:
        DataError: a listed image whose label disagrees with its folder, or a malformed name.
    """
    out_dir = Path(out_dir)
    images, probabilities = load_elpv()
    for rel_path in read_split_file(split_file):
        match = _NAME.match(rel_path)
        if not match:
            raise DataError(f"{split_file}: {rel_path!r} is not <train/good|test/good|test/defective>/cell_NNNN.png")
        folder, index = match.group(1), int(match.group(2))
        expected = 1.0 if folder.endswith("defective") else 0.0
        if index >= len(images) or probabilities[index] != expected:
            raise DataError(f"{split_file}: {rel_path} is not an ELPV image of defect probability {expected:g}")
        target = out_dir / rel_path
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".part")
            Image.fromarray(images[index]).save(partial, format="PNG")
            partial.rename(target)
    return out_dir


def make_split_file(
    path: str | Path, *, train: int, val: int, test: int, seed: int = 2624, title: str = "ELPV quickstart split"
) -> None:
    """The recipe of the committed split files: seeded choice of normal and defective cells."""
    _, probabilities = load_elpv()
    rng = np.random.default_rng(seed)
    normal = rng.permutation(np.flatnonzero(probabilities == 0.0))
    defective = rng.permutation(np.flatnonzero(probabilities == 1.0))
    lines = [f"# {title}: make_split_file(train={train}, val={val}, test={test}, seed={seed})"]
    lines += [f"train train/good/cell_{i:04d}.png" for i in sorted(normal[:train])]
    lines += [f"val test/good/cell_{i:04d}.png" for i in sorted(normal[train : train + val])]
    lines += [f"val test/defective/cell_{i:04d}.png" for i in sorted(defective[:val])]
    lines += [f"test test/good/cell_{i:04d}.png" for i in sorted(normal[train + val : train + val + test])]
    lines += [f"test test/defective/cell_{i:04d}.png" for i in sorted(defective[val : val + test])]
    Path(path).write_text("\n".join(lines) + "\n")
