"""Synthetic defects in image space: a validation signal for products without labelled defects.

`SyntheticDefectDataset` turns n normal images into 2n validation items: every normal image as it is (label 0, an
all-zero mask) and one synthetic-defect version of it (label 1, the defect's mask). The hyperparameter search ranks
trials by image AUROC on such a set when the product has no real defective validation images.

Recipe (DRAEM-like, all in image space at the model's input resolution, before normalisation):

1. Region. A Perlin field (`supersimplenet.perlin.perlin_noise`) on the next power-of-two grid of the image, with
   2**U{1..4} lattice cells per axis (capped by the grid), cropped to H x W. The region is where the field exceeds
   its (1 - a) quantile, with the target area a ~ U(1 %, 6 %) of the image; it is never empty (the field's maximum
   pixel is always inside).
2. Content. A blend, with random convex weights, of
   (a) another normal image of the set, rolled by a random shift of a quarter to three quarters of each side
       (foreign but plausible texture, misplaced structure),
   (b) the image itself after a brightness/contrast change (contrast x U(0.6, 1.4), brightness shift of
       0.12-0.35 in either direction),
   (c) the image plus Gaussian noise (std U(0.05, 0.2)).
3. Paste. Inside the region the image becomes (1 - o) * image + o * content with opacity o ~ U(0.6, 1.0); values
   are clipped to [0, 1] and then normalised with the backbone's mean and std, like `DefectDataset`.

Every draw of item i comes from a `torch.Generator` seeded by (seed, i) alone, so the same seed gives identical
tensors in any order, on any worker, on every epoch. Images are loaded with `supersimplenet.data.load_image`
(bilinear resize to `image_size`, values in [0, 1]).

Limits: such defects are stand-ins. They measure whether a model flags local departures from the normal
appearance; they cannot tell how well it sees a product's real defect types (see the search job's note on how
well the synthetic objective ranks trials against a real one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from supersimplenet.data import PathLike, Sample, _check_size, load_image, normalization_tensors
from supersimplenet.perlin import next_pow2, perlin_noise

AREA_RANGE = (0.01, 0.06)  # fraction of the image covered by one synthetic defect
SCALE_EXPONENTS = (1, 4)  # Perlin lattice cells per axis: 2**U{1..4}
CONTRAST_RANGE = (0.6, 1.4)
BRIGHTNESS_RANGE = (0.12, 0.35)
NOISE_STD_RANGE = (0.05, 0.2)
OPACITY_RANGE = (0.6, 1.0)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def item_generator(seed: int, index: int) -> torch.Generator:
    """The RNG of synthetic item `index` (a function of seed and index only)."""
    mixed = (int(seed) * 1_000_003 + int(index) * 7_919 + 0x5EED) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def defect_region(size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Binary Perlin-shaped region [H, W] (float 0/1) covering a few % of the image, never empty."""
    height, width = size
    grid = (next_pow2(height), next_pow2(width))
    low, high = SCALE_EXPONENTS
    exponents = torch.randint(low, high + 1, (2,), generator=generator)
    scales = (min(grid[0], 2 ** int(exponents[0])), min(grid[1], 2 ** int(exponents[1])))
    field = perlin_noise(grid, scales, generator=generator)[:height, :width]
    area = _uniform(generator, *AREA_RANGE)
    threshold = torch.quantile(field.flatten().double(), 1.0 - area).item()
    region = (field > threshold).float()
    flat_max = int(torch.argmax(field))
    region.view(-1)[flat_max] = 1.0  # never empty, even if the field is flat
    return region


def synthesize_defect(
    image: torch.Tensor, donor: torch.Tensor, generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(defective image [3, H, W] in [0, 1], mask [1, H, W] of 0/1) from a normal image and a donor image."""
    _, height, width = image.shape
    region = defect_region((height, width), generator)

    shift = (
        int(round(_uniform(generator, 0.25, 0.75) * height)),
        int(round(_uniform(generator, 0.25, 0.75) * width)),
    )
    foreign = torch.roll(donor, shifts=shift, dims=(1, 2))
    contrast = _uniform(generator, *CONTRAST_RANGE)
    sign = 1.0 if float(torch.rand((), generator=generator)) < 0.5 else -1.0
    brightness = sign * _uniform(generator, *BRIGHTNESS_RANGE)
    mean = image.mean(dim=(1, 2), keepdim=True)
    photometric = (image - mean) * contrast + mean + brightness
    noise_std = _uniform(generator, *NOISE_STD_RANGE)
    noisy = image + noise_std * torch.randn(image.shape, generator=generator)
    weights = torch.rand(3, generator=generator) + 0.1
    weights = weights / weights.sum()
    content = weights[0] * foreign + weights[1] * photometric + weights[2] * noisy

    opacity = _uniform(generator, *OPACITY_RANGE)
    alpha = opacity * region[None]
    defective = (image * (1.0 - alpha) + content * alpha).clamp(0.0, 1.0)
    return defective, region[None]


class SyntheticDefectDataset(torch.utils.data.Dataset):
    """Normal images plus one synthetic-defect version of each (see the module docstring for the recipe).

    Index i < n is normal image i as is (label 0, zero mask); index n + k is the synthetic-defect version of normal
    image k (label 1, mask of the defect), made deterministically from (seed, k). Items are dicts like
    `DefectDataset`'s: image float [3, H, W] normalised with mean/std, mask float [1, H, W] of 0/1, label float32
    scalar, segmented bool scalar (always True), index.

    Raises:
        ValueError: no samples, a sample that is not normal (label 0), or bad mean/std.
    """

    def __init__(
        self,
        *,
        root: PathLike,
        samples: Sequence[Sample],
        image_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        seed: int,
    ) -> None:
        self.root = Path(root)
        self.samples = tuple(samples)
        if not self.samples:
            raise ValueError("SyntheticDefectDataset needs at least one normal image")
        defective = [s.image for s in self.samples if s.label != 0]
        if defective:
            raise ValueError(
                f"SyntheticDefectDataset takes normal images only (label 0); got {len(defective)} defective, "
                f"e.g. {defective[0]}"
            )
        self.image_size = _check_size(image_size)
        self.mean, self.std = normalization_tensors(mean, std)
        self.seed = int(seed)

    def __len__(self) -> int:
        return 2 * len(self.samples)

    def _load(self, position: int) -> torch.Tensor:
        return load_image(self.root / self.samples[position].image, size=self.image_size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        total = len(self)
        index = int(index)
        if not -total <= index < total:
            raise IndexError(f"index {index} out of range for a dataset of {total} items")
        index %= total
        n = len(self.samples)
        position = index % n
        image = self._load(position)
        if index < n:
            mask = torch.zeros(1, *self.image_size)
            label = 0.0
        else:
            generator = item_generator(self.seed, position)
            # the donor is another image of the set (the image itself when the set holds only one)
            donor_position = (position + 1 + int(torch.randint(max(1, n - 1), (), generator=generator))) % n \
                if n > 1 else position
            image, mask = synthesize_defect(image, self._load(donor_position), generator)
            label = 1.0
        return {
            "image": (image - self.mean) / self.std,
            "mask": mask,
            "label": torch.tensor(label, dtype=torch.float32),
            "segmented": torch.tensor(True),
            "index": index,
        }


__all__ = ["SyntheticDefectDataset", "defect_region", "item_generator", "synthesize_defect"]
