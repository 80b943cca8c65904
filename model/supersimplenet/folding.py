"""The exact rewrites behind the fast inference path (`supersimplenet.fast`), as standalone functions.

* BatchNorm folding: `bn_scale_shift`, `fold_conv_bn` (a convolution followed by an eval-mode BatchNorm is one
  convolution, computed in float64) and `fold_backbone_batchnorm` (finds which convolution feeds each BatchNorm of a
  frozen backbone by tracing one forward pass, folds it, and replaces the BatchNorm by an identity).
* Spatial operators as matrices: bilinear resizing, the 3x3 average pool, the zero-padded shifts of a convolution's
  taps and the reflect-padded Gaussian blur are linear and separable, so along one axis each is a small matrix,
  built in float64 by running torch's own ops on the identity (`linear_resize_matrix`, `box3_matrix`,
  `shift_matrix`, `upsample_blur_matrix`, `level_operators`).

docs/design.md §7 and fast.py's docstring (items 1, 3 and 5) explain where each is used.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------------------------
# BatchNorm folding
# ----------------------------------------------------------------------------------------------------------------


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 such that bn(x) == x * scale + shift per channel in eval mode."""
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def fold_conv_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias (float64) of the convolution that equals bn(conv(x)) in eval mode."""
    scale, shift = bn_scale_shift(bn)
    weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    bias = conv.bias.double() * scale + shift if conv.bias is not None else shift
    return weight, bias


def _bn_replacement(bn: nn.Module) -> nn.Module:
    """What is left of a BatchNorm once folded: nothing, or the activation of timm's BatchNormAct2d."""
    tail = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    tail = [m for m in tail if not isinstance(m, nn.Identity)]
    if not tail:
        return nn.Identity()
    return tail[0] if len(tail) == 1 else nn.Sequential(*tail)


def fold_backbone_batchnorm(backbone: nn.Module, example: torch.Tensor) -> tuple[nn.Module, int]:
    """A copy of `backbone` in which every BatchNorm fed directly by a convolution is folded into it.

    Which convolution feeds which BatchNorm is found by running `example` once with hooks: a BatchNorm is folded
    only when its input is the very tensor a Conv2d returned and that convolution feeds nothing else. Any other
    BatchNorm is kept as is (still correct, just not folded).

    Returns:
        The folded copy (eval mode, no gradients) and the number of BatchNorms folded.
    """
    folded = copy.deepcopy(backbone).eval().requires_grad_(False)
    names = {module: name for name, module in folded.named_modules()}
    conv_of_output: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}  # the tensor is kept so ids are not reused
    consumers: dict[nn.Conv2d, int] = {}
    pairs: list[tuple[nn.Conv2d, nn.Module]] = []
    handles = []

    def after_conv(module, _inputs, output):
        conv_of_output[id(output)] = (module, output)

    def before_any(module, inputs):
        for tensor in inputs:
            entry = conv_of_output.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
            if entry is not None and entry[1] is tensor:
                conv = entry[0]
                consumers[conv] = consumers.get(conv, 0) + 1
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    pairs.append((conv, module))

    for module in folded.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(after_conv))
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if is_bn or not list(module.children()):  # leaves and BatchNorms (timm's BatchNormAct2d has children)
            handles.append(module.register_forward_pre_hook(before_any))
    try:
        with torch.no_grad():
            folded(example)
    finally:
        for handle in handles:
            handle.remove()

    count = 0
    for conv, bn in pairs:
        if consumers.get(conv, 0) != 1 or bn.running_mean is None or bn.running_var is None:
            continue
        weight, bias = fold_conv_bn(conv, bn)
        conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        parent_name, _, child = names[bn].rpartition(".")
        parent = folded.get_submodule(parent_name) if parent_name else folded
        setattr(parent, child, _bn_replacement(bn))
        count += 1
    return folded, count


# ----------------------------------------------------------------------------------------------------------------
# Spatial operators as matrices (float64, exact up to rounding)
# ----------------------------------------------------------------------------------------------------------------


def linear_resize_matrix(source: int, target: int, *, align_corners: bool) -> torch.Tensor:
    """[target, source] matrix of 1-D linear interpolation, built by resizing the identity with torch itself."""
    eye = torch.eye(source, dtype=torch.float64).unsqueeze(0)  # [1, source(channels), source(length)]
    out = F.interpolate(eye, size=target, mode="linear", align_corners=align_corners)  # [1, source, target]
    return out[0].t().contiguous()


def box3_matrix(size: int) -> torch.Tensor:
    """[size, size] matrix of the 1-D part of AvgPool2d(3, 1, 1) with count_include_pad=True (zeros outside, /3)."""
    idx = torch.arange(size)
    return ((idx[:, None] - idx[None, :]).abs() <= 1).double() / 3.0


def shift_matrix(size: int, offset: int) -> torch.Tensor:
    """[size, size] matrix S with (S x)[y] = x[y + offset], zero outside (one tap of a zero-padded convolution)."""
    idx = torch.arange(size)
    return (idx[None, :] == idx[:, None] + offset).double()


def upsample_blur_matrix(source: int, target: int, kernel: torch.Tensor) -> torch.Tensor:
    """[target, source] matrix of bilinear upsampling (align_corners=False) followed by the reflect-padded 1-D
    convolution with `kernel` (the reference model's post-processing along one axis), built by running those very
    torch ops on the identity in float64."""
    kernel = kernel.double().reshape(1, 1, -1)
    radius = (kernel.shape[-1] - 1) // 2
    eye = torch.eye(source, dtype=torch.float64).unsqueeze(1)  # [source (basis vectors), 1, source]
    up = F.interpolate(eye, size=target, mode="linear", align_corners=False)  # [source, 1, target]
    out = F.conv1d(F.pad(up, (radius, radius), mode="reflect"), kernel)  # [source, 1, target]
    return out[:, 0].t().contiguous()


def level_operators(source: int, target: int, taps: int) -> torch.Tensor:
    """[target, source * taps] stack of shift_k @ box3 @ resize, columns ordered (source, tap).

    Applying it along one axis of a level's map upscales it to the feature size (align_corners=True, as the
    feature extractor does), average-pools it and shifts it by each of the `taps` offsets of a zero-padded
    convolution of that width (taps=1: no shift).
    """
    base = box3_matrix(target) @ linear_resize_matrix(source, target, align_corners=True)
    half = taps // 2
    stack = torch.stack([shift_matrix(target, k - half) @ base for k in range(taps)], dim=-1)  # [target, source, taps]
    return stack.reshape(target, source * taps)
