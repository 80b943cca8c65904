"""What a duplicated training batch computes once: the noise as its values, twin images, the decomposed convolution.

A training batch is the clean batch twice with Gaussian noise added inside Perlin masks (docs/design.md §3), and each
copy is perturbed with probability 1/2 over part of its area, so most of the duplicated batch repeats the clean one.
The heads' training paths (`SegmentationHead.forward_pairs`, `ClassificationHead.forward_noised` in
supersimplenet.model, and supersimplenet.blocked) use these helpers to compute each shared part once:

* `dense_noise`: the noise is carried as its values [S, C] at the S nonzero positions of its mask, in (copy, row,
  column) order; this forms the dense [2, B, C, h, w] tensor for the paths that need it.
* `twin_images`: the images whose two copies no noise reached (equal features and map).
* `sparse_convolution`: a convolution of inputs that are nonzero at those S positions only, from them alone.
"""

from __future__ import annotations

import torch


def dense_noise(values: torch.Tensor, perturbed: torch.Tensor, channels: int) -> torch.Tensor:
    """The training noise [2, B, C, h, w] (copy, image, ...) from its values [S, C] at the S nonzero positions of
    `perturbed` [2B, 1, h, w] in (copy, row, column) order; zero elsewhere."""
    count, _, height, width = perturbed.shape
    where = torch.nonzero(perturbed.reshape(count, height * width))
    noise = torch.zeros(count, channels, height * width, dtype=values.dtype, device=values.device)
    noise[where[:, 0], :, where[:, 1]] = values
    return noise.view(2, count // 2, channels, height, width)


def twin_images(perturbed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a duplicated training batch with noise mask `perturbed` [2B, 1, h, w]: when both copies of an image
    are unperturbed they are equal (features and map), about a quarter of the images (each copy is perturbed with
    probability 1/2). Returns (`computed` [n]: the images to compute, `source` [2B]: which computed image each
    copy is), or None when there are none."""
    clean = perturbed.flatten(1).amax(dim=1) == 0
    half = clean.numel() // 2
    twin = clean[:half] & clean[half:]
    if not bool(twin.any()):
        return None
    keep = torch.cat((torch.ones_like(twin), ~twin))
    computed = torch.nonzero(keep).squeeze(1)
    position = torch.cumsum(keep.long(), 0) - 1  # where each kept image lands in `computed`
    source = torch.where(keep, position, position[:half].repeat(2))  # a dropped second copy reads its first
    return computed, source


def sparse_convolution(values: torch.Tensor, where: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv2d(inputs, weight, padding="same") [n, out, h, w] in float32 or wider (an odd square kernel, no bias),
    for inputs [n, C, h, w] that are `values` [S, C] at the S nonzero positions of `where` [n, 1, h, w] in (image,
    row, column) order and zero elsewhere, computed from those positions only."""
    count, _, height, width = where.shape
    channels, hidden, kernel = values.shape[1], weight.shape[0], weight.shape[-1]
    radius = kernel // 2
    rows, cols = height + 2 * radius, width + 2 * radius  # the output grid padded by the kernel's reach
    index = torch.nonzero(where.reshape(count, height * width))  # [S, 2]: (image, position), the values' order
    products = values @ weight.permute(1, 2, 3, 0).reshape(channels, kernel * kernel * hidden)
    y, x = index[:, 1] // width, index[:, 1] % width
    first = index[:, 0] * (rows * cols) + y * cols + x  # the padded grid's (y, x) + (2 * radius - dy, ...) below
    offsets = torch.arange(kernel, device=values.device)
    shift = ((2 * radius - offsets).view(-1, 1) * cols + (2 * radius - offsets).view(1, -1)).reshape(-1)
    targets = (first.view(-1, 1) + shift.view(1, -1)).reshape(-1)  # [S * k * k], in products' order
    dtype = torch.promote_types(products.dtype, torch.float32)  # bf16 products are summed in float32
    grid = torch.zeros(count * rows * cols, hidden, dtype=dtype, device=values.device)
    grid = grid.index_add(0, targets, products.reshape(-1, hidden).to(dtype))
    grid = grid.view(count, rows, cols, hidden)[:, radius : radius + height, radius : radius + width]
    return grid.permute(0, 3, 1, 2)
