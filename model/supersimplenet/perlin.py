"""Perlin-noise masks for the feature-space anomaly generator (docs/design.md §3.7, "Perlin mask")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_SCALE_EXPONENT = 5  # scales are 2**U{0..5}, i.e. {1, 2, 4, 8, 16, 32}


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (64 -> 64, 58 -> 64, 160 -> 256)."""
    return 1 << (int(n) - 1).bit_length()


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(
    size: tuple[int, int],
    scales: tuple[int, int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Gradient (Perlin) noise on a `size` grid with `scales` lattice cells along (height, width).

    Each lattice vertex gets a random unit gradient; each pixel blends the four corner dot products with the
    quintic fade, first along the height axis, then along the width. Values lie in [-1, 1] (after the sqrt(2)
    normalisation) and are exactly 0 on lattice points.
    """
    height, width = size
    rows, cols = scales
    if height % rows or width % cols:
        raise ValueError(f"Perlin grid {size} must be divisible by the scales {scales}")
    angles = 2 * math.pi * torch.rand(rows + 1, cols + 1, generator=generator, device=device)
    gradients = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)

    u = torch.arange(height, device=device, dtype=torch.float32) * rows / height
    v = torch.arange(width, device=device, dtype=torch.float32) * cols / width
    cell_u, cell_v = u.floor().long(), v.floor().long()
    frac_u, frac_v = (u - cell_u)[:, None], (v - cell_v)[None, :]

    def corner(du: int, dv: int) -> torch.Tensor:
        grad = gradients[cell_u + du][:, cell_v + dv]  # [height, width, 2]
        return grad[..., 0] * (frac_u - du) + grad[..., 1] * (frac_v - dv)

    fade_u, fade_v = _fade(frac_u), _fade(frac_v)
    top = torch.lerp(corner(0, 0), corner(1, 0), fade_u)
    bottom = torch.lerp(corner(0, 1), corner(1, 1), fade_u)
    return math.sqrt(2) * torch.lerp(top, bottom, fade_v)


def perlin_masks(
    count: int,
    size: tuple[int, int],
    *,
    threshold: float,
    fallback: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Binary Perlin masks [count, 1, h, w], about half of them empty by construction.

    Args:
        count: number of masks, one independent draw each.
        size: (h, w) of the feature map.
        threshold: noise values above it become 1.
        fallback: anomalib's variant: a field that nowhere exceeds the threshold is min-max rescaled to [-1, 1]
            first. The paper's code has no such rescale (default off).
        generator: optional RNG for reproducible draws.
        device: where the masks are made.
    """
    height, width = size
    lattice = (next_pow2(height), next_pow2(width))
    masks = torch.zeros(count, 1, height, width, device=device)
    exponents = torch.randint(0, MAX_SCALE_EXPONENT + 1, (count, 2), generator=generator)
    keep = torch.rand(count, generator=generator) <= 0.5  # the "no_anomaly = empty" rule: rand() > 0.5 -> empty
    for i in range(count):
        # Lattices smaller than 32 cannot hold 32 cells; the paper's code breaks there, we cap the scale instead.
        scales = (min(lattice[0], 2 ** int(exponents[i, 0])), min(lattice[1], 2 ** int(exponents[i, 1])))
        noise = perlin_noise(lattice, scales, generator=generator, device=device)
        if fallback and not bool((noise > threshold).any()):
            noise = 2 * (noise - noise.min()) / (noise.max() - noise.min()).clamp_min(1e-12) - 1
        noise = F.interpolate(noise[None, None], size=(height, width), mode="bilinear", align_corners=False)[0]
        if keep[i]:
            masks[i] = (noise > threshold).float()
    return masks
