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

Recipes (`SYNTHETIC_RECIPES`, `SyntheticDefectDataset(recipe=...)`): "blend" is the one above. "structural" draws
one of four defect kinds closer to real surface defects, each at a random scale: a scratch or crack (a thin random
polyline, sometimes branched, 1-4 px wide per 256 px, darker or brighter), holes or spots (1-3 filled ellipses with a
soft rim), a stain (a Perlin region tinted per channel at low opacity: colour, not texture, changes) and a texture
or geometry change (inside a Perlin region the image is blurred or locally displaced by a smooth random field).
"mixed" draws the blend or one of the four structural kinds with equal probability.

Every draw of item i comes from a `torch.Generator` seeded by (seed, i) alone, so the same seed gives identical
tensors in any order, on any worker, on every epoch. Images are loaded with `supersimplenet.loading.load_image`
(bilinear resize to `image_size`, values in [0, 1]).

Limits: such defects are stand-ins. They measure whether a model flags local departures from the normal
appearance; they cannot tell how well it sees a product's real defect types (see the search job's note on how
well the synthetic objective ranks trials against a real one).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

from supersimplenet.loading import _check_size, load_image, normalization_tensors
from supersimplenet.perlin import next_pow2, perlin_noise
from supersimplenet.samples import PathLike, Sample

AREA_RANGE = (0.01, 0.06)  # fraction of the image covered by one synthetic defect
SCALE_EXPONENTS = (1, 4)  # Perlin lattice cells per axis: 2**U{1..4}
CONTRAST_RANGE = (0.6, 1.4)
BRIGHTNESS_RANGE = (0.12, 0.35)
NOISE_STD_RANGE = (0.05, 0.2)
OPACITY_RANGE = (0.6, 1.0)
SYNTHETIC_RECIPES = ("blend", "structural", "mixed")
DEFAULT_RECIPE = "blend"  # what the search's synthetic validation uses (ssn_platform.training.build_validation_set)
STRUCTURAL_KINDS = ("scratch", "holes", "stain", "warp")


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
    image: torch.Tensor,
    donor: torch.Tensor,
    generator: torch.Generator,
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


def _coordinates(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    return ys, xs


def _polyline_distance(points: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Distance [H, W] of every pixel to a polyline of points [K, 2] (y, x)."""
    pixels = torch.stack((ys, xs), dim=-1)  # [H, W, 2]
    best = torch.full(ys.shape, float("inf"))
    for start, end in zip(points[:-1], points[1:]):
        direction = end - start
        length = max(float((direction**2).sum()), 1e-6)
        t = (((pixels - start) * direction).sum(-1) / length).clamp(0.0, 1.0)
        nearest = start + t[..., None] * direction
        best = torch.minimum(best, ((pixels - nearest) ** 2).sum(-1).sqrt())
    return best


def _random_walk(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A crack-like polyline [K, 2]: 3-8 segments, each turning by up to 60 degrees, 15-60 % of the diagonal."""
    diagonal = math.hypot(height, width)
    segments = int(torch.randint(3, 9, (), generator=generator))
    step = _uniform(generator, 0.15, 0.6) * diagonal / segments
    point = torch.tensor([_uniform(generator, 0.1, 0.9) * height, _uniform(generator, 0.1, 0.9) * width])
    angle = _uniform(generator, 0.0, 2 * math.pi)
    points = [point]
    for _ in range(segments):
        angle += _uniform(generator, -math.pi / 3, math.pi / 3)
        point = point + step * torch.tensor([math.sin(angle), math.cos(angle)])
        points.append(point)
    return torch.stack(points)


def _shade(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The image made darker or brighter by 0.15-0.5: the content of scratches, cracks and holes."""
    amount = _uniform(generator, 0.15, 0.5)
    return image * (1 - amount) if float(torch.rand((), generator=generator)) < 0.6 else image + amount * (1 - image)


def structural_defect(image: torch.Tensor, kind: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(defective image [3, H, W], mask [1, H, W]) of one structural kind (`STRUCTURAL_KINDS`)."""
    _, height, width = image.shape
    scale = min(height, width) / 256.0
    ys, xs = _coordinates(height, width)
    if kind == "scratch":
        points = _random_walk(height, width, generator)
        distance = _polyline_distance(points, ys, xs)
        if float(torch.rand((), generator=generator)) < 0.4:  # a branch from a point of the crack
            branch = _random_walk(height, width, generator)
            branch = branch - branch[0] + points[int(torch.randint(1, len(points), (), generator=generator))]
            distance = torch.minimum(distance, _polyline_distance(branch[: max(2, len(branch) // 2)], ys, xs))
        half_width = _uniform(generator, 0.5, 2.0) * scale
        alpha = 1.0 - (distance - half_width).clamp(0.0, 1.0)  # anti-aliased edge, one pixel wide
        region = (distance <= half_width + 0.5).float()
        content = _shade(image, generator)
    elif kind == "holes":
        alpha = torch.zeros(height, width)
        for _ in range(int(torch.randint(1, 4, (), generator=generator))):
            radius_y = _uniform(generator, 0.015, 0.06) * min(height, width)
            radius_x = radius_y * _uniform(generator, 0.6, 1.6)
            centre = (_uniform(generator, 0.1, 0.9) * height, _uniform(generator, 0.1, 0.9) * width)
            r = (((ys - centre[0]) / radius_y) ** 2 + ((xs - centre[1]) / radius_x) ** 2).sqrt()
            alpha = torch.maximum(alpha, (1.0 - (r - 1.0) / 0.3).clamp(0.0, 1.0))  # soft rim
        region = (alpha >= 0.5).float()
        content = _shade(image, generator)
    elif kind == "stain":
        region = defect_region((height, width), generator)
        tint = 1.0 + torch.stack([torch.tensor(_uniform(generator, -0.35, 0.35)) for _ in range(3)]).view(3, 1, 1)
        alpha = region * _uniform(generator, 0.3, 0.7)
        content = image * tint
    elif kind == "warp":
        region = defect_region((height, width), generator)
        if float(torch.rand((), generator=generator)) < 0.5:  # texture: a local blur
            sigma = _uniform(generator, 1.5, 4.0) * scale
            radius = max(1, int(3 * sigma))
            taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
            taps = taps / taps.sum()
            padded = torch.nn.functional.pad(image[None], (radius, radius, radius, radius), mode="replicate")
            content = torch.nn.functional.conv2d(padded, taps.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
            content = torch.nn.functional.conv2d(content, taps.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)[0]
        else:  # geometry: a smooth displacement of up to 2-8 px
            amplitude = _uniform(generator, 2.0, 8.0) * scale
            coarse = torch.rand(1, 2, 5, 5, generator=generator) * 2 - 1
            field = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
            base = torch.stack((xs / max(width - 1, 1), ys / max(height - 1, 1)), dim=-1) * 2 - 1
            pixel = torch.tensor([2 / max(width - 1, 1), 2 / max(height - 1, 1)])  # one pixel in grid units
            offset = field[0].permute(1, 2, 0) * amplitude * pixel
            content = torch.nn.functional.grid_sample(
                image[None], (base + offset)[None], mode="bilinear", padding_mode="border", align_corners=True
            )[0]
        alpha = region
    else:
        raise ValueError(f"unknown structural defect kind {kind!r}; known: {STRUCTURAL_KINDS}")
    if not bool(region.any()):  # a defect that left the image: mark its strongest pixel so the mask is never empty
        flat = int(torch.argmax(alpha))
        region.view(-1)[flat] = 1.0
    defective = (image * (1.0 - alpha[None]) + content * alpha[None]).clamp(0.0, 1.0)
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
        recipe: str = DEFAULT_RECIPE,
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
        if recipe not in SYNTHETIC_RECIPES:
            raise ValueError(f"unknown synthetic recipe {recipe!r}; known: {SYNTHETIC_RECIPES}")
        self.recipe = recipe

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
            donor_position = (
                (position + 1 + int(torch.randint(max(1, n - 1), (), generator=generator))) % n if n > 1 else position
            )
            kinds = {"blend": ("blend",), "structural": STRUCTURAL_KINDS, "mixed": ("blend", *STRUCTURAL_KINDS)}
            options = kinds[self.recipe]
            kind = options[int(torch.randint(len(options), (), generator=generator))] if len(options) > 1 else "blend"
            if kind == "blend":
                image, mask = synthesize_defect(image, self._load(donor_position), generator)
            else:
                image, mask = structural_defect(image, kind, generator)
            label = 1.0
        return {
            "image": (image - self.mean) / self.std,
            "mask": mask,
            "label": torch.tensor(label, dtype=torch.float32),
            "segmented": torch.tensor(True),
            "index": index,
        }


__all__ = [
    "DEFAULT_RECIPE",
    "STRUCTURAL_KINDS",
    "SYNTHETIC_RECIPES",
    "SyntheticDefectDataset",
    "defect_region",
    "item_generator",
    "structural_defect",
    "synthesize_defect",
]
