"""Loading: samples to tensors, and the check that every file of a sample list loads.

`load_image` / `load_mask` / `DefectDataset` turn samples into tensors (docs/design.md §3.1: masks are resized with
nearest neighbour and scaled to {0, 1}; images bilinear without antialias, like cv2 in the official code).
`image_array` is the one conversion of a decoded image that training and serving share. `_open` is the one way a file
is decoded (fully: `load()` with Pillow's `ImageFile.LOAD_TRUNCATED_IMAGES` left False, so a truncated file is an
error); `supersimplenet.validation` decodes every file of a sample list with it before a dataset is used.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from supersimplenet.samples import DataError, PathLike, Sample


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in size):
        raise ValueError(f"size must be (height, width) of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _open(path: Path, what: str, data: bytes | None = None) -> Image.Image:
    """The fully decoded image of `path` (or of `data`, the bytes read from it); `DataError` naming the file when it
    is missing, unreadable or truncated."""
    try:
        img = Image.open(io.BytesIO(data) if data is not None else path)
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
    gray = _check_pixels(img, where=where)
    if gray is not None:
        # 16-bit grayscale (some industrial cameras): scale by the 16-bit range, then repeat the channel.
        return np.repeat((gray / 65535.0)[:, :, None], 3, axis=2)
    # convert("RGB") repeats the gray channel for L/1/LA, expands palettes and drops alpha.
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _check_pixels(img: Image.Image, *, where: str) -> np.ndarray | None:
    """`DataError` for pixels `image_array` cannot convert; the float32 gray array of a 16/32-bit integer image."""
    if img.mode == "F":
        raise DataError(f"unsupported floating-point image (mode F): {where}")
    if not (img.mode.startswith("I;16") or img.mode == "I"):
        return None
    gray = np.asarray(img, dtype=np.float32)
    if gray.min() < 0 or gray.max() > 65535:
        raise DataError(f"unsupported pixel range in {img.mode} image: {where}")
    return gray


def _mask_array(path: Path) -> np.ndarray:
    """HxW bool: True where the mask is non-zero (VisA stores class ids, others 255)."""
    return _mask_pixels(_open(path, "mask"))


def _mask_pixels(img: Image.Image) -> np.ndarray:
    """HxW bool of a decoded mask image: True where it is non-zero."""
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
        image = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False, antialias=False)[
            0
        ]
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


__all__ = [
    "DefectDataset",
    "image_array",
    "load_image",
    "load_mask",
]
