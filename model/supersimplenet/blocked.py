"""The segmentation head's training step in cache-sized blocks: the same outputs, gradients and BatchNorm statistics.

The head is, per feature position x (C channels): y = w2 . LeakyReLU(BN(W1 x + b1)), with S = 1024 hidden
channels and BatchNorm in training mode (statistics of the current batch, docs/design.md §2.3). Run as two 1x1
convolutions over 2B x 64 x 64 positions it writes, and reads back several times, a hidden tensor of 2B x 1024 x 64
x 64 floats (268 MB at batch 8); on a CPU that memory traffic, not arithmetic, set its speed (about 47 GFLOP/s on
two Zen 4 cores, where the same cores multiply matrices at about 250) and it took most of a training step: about
1.3 s of a 2.1 s Lite0 step (256x256, batch 8) in fp32 and most of the bf16 step (BENCHMARKS.md; both paths are
timed by `bench/bench_inference.py --train-only`).

Here the hidden tensor never exists. Three observations make that possible:

1. BatchNorm's statistics are those of a linear map of x, so they follow from x's mean m and covariance K (C x C):
   mean_s = w_s . m + b1_s and var_s = w_s^T K w_s (the biased variance BatchNorm normalises with). After that
   the whole head is a per-position function with fixed weights: h = s * z + beta, z = W1 (x - m), s = gamma /
   sqrt(var + eps). b1 cancels (its gradient is exactly zero, which is what is returned).
2. Per position that function is two matrix products with an elementwise step between them, so it runs over blocks
   of `BLOCK_POSITIONS` positions of one image (a [1024, 512] hidden block stays in the cache), forward and
   backward. The backward recomputes each block's z instead of storing it (one extra [S, C] x [C, n] product per
   pass, cheap next to the memory traffic it saves).
3. BatchNorm's backward needs two per-channel means over all positions, mean(g_h) and mean(g_h * z_hat), before
   any input gradient: a first pass accumulates them (g_h = w2 * g_y * leaky'(h), one fused
   `leaky_relu_backward` over a broadcast view), a second computes g_z = s * (g_h - mean(g_h) - z_hat *
   mean(g_h z_hat)) per element, as BatchNorm's own backward does, and from it the W1 and x gradients. Forming g_z
   per element matters: the algebraically equal form that applies the mean corrections after the product with W1
   loses about three digits to cancellation in float32.

4. A training batch is the clean batch twice, with noise added inside Perlin masks (docs/design.md §3): wherever
   neither copy of an image was perturbed, the two copies of a position hold the same features, and with
   BatchNorm's statistics shared every per-position step gives them the same hidden values and output.
   `segmentation_head_of_pairs` computes such a position once, with weight 2 in the statistics and in BatchNorm's
   backward, and only the perturbed copies separately (about 62 % of the 2B x h x w positions at Perlin threshold
   0.2, where each copy is perturbed with probability 1/2 over about a quarter of its area). It gathers its
   columns from the clean batch (and the noise, for the perturbed copies) without forming the duplicated one;
   autograd's gather and scatter sum the two copies' map gradients into the one computed position and the
   columns' gradients into the clean features.

fp32 reproduces the reference head's outputs, gradients and running statistics to float32 rounding
(tests/model/test_blocked.py: relative 1e-6 on random data, and a whole training step on real images within 1e-4).
Under bf16 autocast the block products and elementwise steps run in bfloat16 while the statistics, the gradient
sums and the parameters stay float32 (as autocast would keep them); that is an approximation of the same kind as
autocast's, measured by image AUROC in QUALITY.md.

5. Wide features (2C above the hidden width: WRN50's 1,536 channels), where blocks cost more than the layers,
   still compute each twin position once (`_layers_of_columns`): one product per computed column, then the
   layers' own BatchNorm over the hidden values with the twins' columns repeated (exact, see there), about a
   third less of the head's work at threshold 0.2.

Used by `SegmentationHead.forward` in training mode on CPU tensors (`applies`; `pairs_apply` for observation 5):
CUDA keeps the convolutions (its memory bandwidth makes blocking pointless), and so do SyncBatchNorm (statistics
across processes), traced graphs and a BatchNorm without running statistics or with a cumulative (None) momentum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Positions per block: [1024, 512] hidden floats = 2 MiB. 512 and 1024 were equal and 256 slower on 2 Zen 4 cores.
BLOCK_POSITIONS = 512


def applies(features: torch.Tensor, norm: nn.Module) -> bool:
    """Whether the blocked training path computes this head: CPU eager training with a plain BatchNorm2d, on thin
    features."""
    # Thin features only: the covariance costs C^2 per position and the backward recomputes blocks; measured on 2
    # Zen 4 cores (fp32, 2B x 64 x 64): C 152 3.6x faster, C 432 1.8x, C 1536 (WRN50) 1.4x slower than the layers.
    return pairs_apply(features, norm) and 2 * features.shape[1] <= norm.num_features


def pairs_apply(features: torch.Tensor, norm: nn.Module) -> bool:
    """Whether `segmentation_head_of_pairs` may compute this head (in blocks, or on its layers where `applies` does
    not hold): CPU eager training with a plain BatchNorm2d that keeps running statistics with a momentum."""
    return (
        features.device.type == "cpu"
        and features.dim() == 4
        and type(norm) is nn.BatchNorm2d
        and norm.training
        and norm.affine
        and norm.track_running_stats
        and norm.momentum is not None
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
    )


def _blocks(positions: int, split: int):
    """(start, stop, weight) column ranges of at most BLOCK_POSITIONS: columns before `split` count twice."""
    for first, last, weight in ((0, split, 2), (split, positions, 1)):
        for start in range(first, last, BLOCK_POSITIONS):
            yield start, min(start + BLOCK_POSITIONS, last), weight


class _BlockedHead(torch.autograd.Function):
    """(x [C, P] columns, W1, b1, gamma, beta, w2) -> map logits y [P]; also var_s and w_s . m (no gradient).

    Columns before `split` stand for two positions of the batch (twins), the rest for one: BatchNorm's statistics
    weigh them so, and the backward's per-position BatchNorm terms count twice for them (`_blocks`)."""

    @staticmethod
    def forward(ctx, x, w1, b1, gamma, beta, w2, eps: float, slope: float, dtype: torch.dtype, split: int):
        channels, positions = x.shape
        count = positions + split  # positions of the batch
        with torch.no_grad():
            rows32 = x.to(w1.dtype)  # statistics in the parameters' precision
            mean = (rows32.sum(1) + rows32[:, :split].sum(1)) / count
            centred = rows32 - mean[:, None]
            cov = centred @ centred.t()
            if split:
                cov.addmm_(centred[:, :split], centred[:, :split].t())
            cov /= count
            del centred, rows32
            var = ((w1 @ cov) * w1).sum(1)
            inv_std = torch.rsqrt(var + eps)
            scale = gamma * inv_std
            shift = w1 @ mean
            a = (scale[:, None] * w1).to(dtype)
            c = (beta - scale * shift).to(dtype)[:, None]
            out_w = w2.to(dtype)[None, :]
            xd = x.to(dtype)
            out = torch.empty(1, positions, dtype=dtype)
            hidden = torch.empty(a.shape[0], min(BLOCK_POSITIONS, positions), dtype=dtype)
            for start, stop, _ in _blocks(positions, split):
                block = torch.addmm(c, a, xd[:, start:stop], out=hidden[:, : stop - start])
                nn.functional.leaky_relu_(block, slope)
                torch.mm(out_w, block, out=out[:, start:stop])
        ctx.save_for_backward(x, w1, gamma, beta, w2, inv_std, shift)
        ctx.slope, ctx.dtype, ctx.has_bias, ctx.split = slope, dtype, b1 is not None, split
        ctx.mark_non_differentiable(var, shift)
        return out.to(x.dtype).view(positions), var, shift

    @staticmethod
    def backward(ctx, grad_y, _grad_var, _grad_shift):
        x, w1, gamma, beta, w2, inv_std, shift = ctx.saved_tensors
        slope, dtype, split = ctx.slope, ctx.dtype, ctx.split
        channels, positions = x.shape
        hidden_channels = w1.shape[0]
        count = positions + split
        xd = x.to(dtype)
        grad = grad_y.reshape(1, positions).to(dtype)  # a twin column's: the sum of both copies' gradients
        w1d = w1.to(dtype)
        scale32 = gamma * inv_std
        scale, beta_col, neg_shift = scale32.to(dtype)[:, None], beta.to(dtype)[:, None], (-shift).to(dtype)[:, None]
        width_blk = min(BLOCK_POSITIONS, positions)
        z_buf, h_buf = (
            torch.empty(hidden_channels, width_blk, dtype=dtype),
            torch.empty(hidden_channels, width_blk, dtype=dtype),
        )

        def block_z_u(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            """z = W1 (x - m) of a block and u = g_y * leaky'(h) with h = s z + beta."""
            z = torch.addmm(neg_shift, w1d, xd[:, start:stop], out=z_buf[:, : stop - start])
            h = torch.mul(z, scale, out=h_buf[:, : stop - start]).add_(beta_col)  # 2-5x faster than addcmul
            # one fused kernel over a broadcast view of g_y
            u = torch.ops.aten.leaky_relu_backward(grad[:, start:stop].expand_as(h), h, slope, False)
            return z, u

        # Pass 1: sum_n u and sum_n u * z per hidden channel (g_h = w2 * u). u is linear in g_y, so a twin
        # column's u, from its summed g_y, is the sum of its two copies' u.
        acc = w1.dtype  # sums and gradients in the parameters' precision (float32 under bf16 autocast)
        u_sum = torch.zeros(hidden_channels, dtype=acc)
        uz_sum = torch.zeros(hidden_channels, dtype=acc)
        for start, stop, _ in _blocks(positions, split):
            z, u = block_z_u(start, stop)
            u_sum += u.sum(1, dtype=acc)
            uz_sum += torch.linalg.vecdot(u, z).to(acc)
        grad_beta = w2 * u_sum  # sum_n g_h
        ghz = w2 * uz_sum  # sum_n g_h * z
        grad_gamma = ghz * inv_std  # sum_n g_h * z_hat
        grad_w2 = scale32 * uz_sum + beta * u_sum  # sum_n g_y * leaky(h), with h = s z + beta
        # Pass 2: g_z = s * w2 * u - s * mean(g_h) - s * mean(g_h z_hat) * z_hat (the last two per copy: twice for
        # a twin column), then the W1 and x gradients.
        coef_u = (scale32 * w2).to(dtype)[:, None]
        mean_term = -scale32 * grad_beta / count
        slope_term = -scale32 * ghz * inv_std * inv_std / count
        constants = {
            weight: ((weight * slope_term).to(dtype)[:, None], (weight * mean_term).to(dtype)[:, None])
            for weight in (1, 2)
        }
        grad_w1 = torch.zeros_like(w1)
        grad_x = torch.empty(channels, positions, dtype=dtype)
        t_buf = torch.empty(hidden_channels, width_blk, dtype=dtype)
        for start, stop, weight in _blocks(positions, split):
            z, u = block_z_u(start, stop)
            neg_slope_z, neg_mean = constants[weight]
            gz = torch.mul(z, neg_slope_z, out=t_buf[:, : stop - start]).add_(neg_mean).add_(u.mul_(coef_u))
            block_x = xd[:, start:stop]
            if dtype == acc:
                grad_w1.addmm_(gz, block_x.t())
            else:
                grad_w1 += torch.mm(gz, block_x.t()).to(acc)
            torch.mm(w1d.t(), gz, out=grad_x[:, start:stop])
        # b1 cancels in training-mode BatchNorm: its gradient is exactly zero (returned as zeros, not None, so the
        # optimiser treats it as the reference step does, weight decay included).
        grad_b1 = torch.zeros(hidden_channels, dtype=w1.dtype) if ctx.has_bias else None
        return (
            grad_x.to(x.dtype),
            grad_w1.to(w1.dtype),
            grad_b1,
            grad_gamma.to(gamma.dtype),
            grad_beta.to(beta.dtype),
            grad_w2.to(w2.dtype),
            None,
            None,
            None,
            None,
        )


def _head_of_columns(
    columns: torch.Tensor, split: int, conv1: nn.Conv2d, norm: nn.BatchNorm2d, slope: float, conv2: nn.Conv2d
) -> torch.Tensor:
    """The head's map logits [P] of feature columns [C, P] (the first `split` twins), updating `norm`'s running
    statistics as BatchNorm does over the batch's P + split positions."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else conv1.weight.dtype
    with torch.autocast("cpu", enabled=False):
        y, var, shift = _BlockedHead.apply(
            columns,
            conv1.weight.flatten(1),
            conv1.bias,
            norm.weight,
            norm.bias,
            conv2.weight.flatten(),
            norm.eps,
            slope,
            dtype,
            split,
        )
        with torch.no_grad():
            count = columns.shape[1] + split
            bias = conv1.bias if conv1.bias is not None else 0.0
            norm.running_mean.mul_(1 - norm.momentum).add_(norm.momentum * (shift + bias))
            norm.running_var.mul_(1 - norm.momentum).add_(norm.momentum * var * count / max(count - 1, 1))
            norm.num_batches_tracked.add_(1)
    return y


def _columns(features: torch.Tensor) -> torch.Tensor:
    """[n, C, h, w] -> [C, n*h*w], position index (image, row, column)."""
    return features.transpose(0, 1).reshape(features.shape[1], -1)


def blocked_segmentation_head(
    features: torch.Tensor, conv1: nn.Conv2d, norm: nn.BatchNorm2d, slope: float, conv2: nn.Conv2d
) -> torch.Tensor:
    """conv2(LeakyReLU(norm(conv1(features)))) in training mode, in blocks; updates `norm`'s running statistics
    as BatchNorm does (momentum, unbiased variance, `num_batches_tracked`)."""
    n, _, height, width = features.shape
    y = _head_of_columns(_columns(features), 0, conv1, norm, slope, conv2)
    return y.view(n, height, width).unsqueeze(1)


def twin_columns(perturbed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Which positions of a duplicated batch to compute (observation 4 of the module's docstring).

    Args:
        perturbed: [2B, 1, h, w], nonzero where a copy was changed; where neither copy of a position was, the
            two copies are equal.

    Returns:
        `select` [P]: the flat (copy, row, column) index of each computed position, the twins first; `inverse`
        [2B*h*w]: the computed position each copy reads its output from; `split`: how many twins lead `select`.
    """
    flat = perturbed.reshape(-1) != 0
    half = flat.numel() // 2
    first, second = flat[:half], flat[half:]
    twins = torch.nonzero(~first & ~second).squeeze(1)
    singles = torch.cat(
        (
            torch.nonzero(~first & second).squeeze(1),  # the first copy is the only unperturbed one
            torch.nonzero(first & ~second).squeeze(1) + half,  # the second is
            torch.nonzero(flat).squeeze(1),  # every perturbed copy
        )
    )
    select = torch.cat((twins, singles))
    inverse = torch.empty(flat.numel(), dtype=torch.long)
    inverse[select] = torch.arange(select.numel())
    inverse[twins + half] = torch.arange(twins.numel())
    return select, inverse, int(twins.numel())


def segmentation_head_of_pairs(
    clean: torch.Tensor,
    noise: torch.Tensor,
    perturbed: torch.Tensor,
    conv1: nn.Conv2d,
    norm: nn.BatchNorm2d,
    slope: float,
    conv2: nn.Conv2d,
) -> torch.Tensor:
    """`blocked_segmentation_head` of the duplicated batch `[clean, clean] + noise` [2B, C, h, w] (`clean` [B, C,
    h, w]; `noise` its values [S, C] at the S nonzero positions of `perturbed` [2B, 1, h, w] in (copy, row, column)
    order, zero elsewhere), without forming it: each position that neither copy perturbs is computed once
    (observation 4), and only the perturbed copies' positions read their noise. The same map logits [2B, 1, h, w],
    gradients (to `clean` and the parameters) and running statistics as the layers on the formed batch."""
    batch, _, height, width = clean.shape
    select, inverse, split = twin_columns(perturbed)
    positions = batch * height * width
    noisy = int(torch.count_nonzero(perturbed))  # the perturbed copies close `select`
    base = _columns(clean).index_select(1, select % positions)
    if noise.shape[0] != noisy:
        raise ValueError(f"{noise.shape[0]} noise values for {noisy} perturbed positions")
    if noisy:  # the perturbed copies close `select` in (copy, row, column) order: the values' order
        base = torch.cat((base[:, : select.numel() - noisy], base[:, select.numel() - noisy :] + noise.t()), dim=1)
    if applies(clean, norm):
        y = _head_of_columns(base, split, conv1, norm, slope, conv2)
    else:
        y = _layers_of_columns(base, split, conv1, norm, slope, conv2)
    return y.index_select(0, inverse).view(2 * batch, 1, height, width)


def _layers_of_columns(
    columns: torch.Tensor, split: int, conv1: nn.Conv2d, norm: nn.BatchNorm2d, slope: float, conv2: nn.Conv2d
) -> torch.Tensor:
    """`_head_of_columns` with the layers' own operations, for wide features (`applies` does not hold): one
    product per column, then BatchNorm over the hidden values with the twins' columns repeated, so its
    statistics, running statistics and backward are the formed batch's. Only the repeated columns' BatchNorm is
    computed twice; the products, LeakyReLU and the output layer run once per column. Gradients are exact: a
    twin's two BatchNorm rows hold the same normalised value, so BatchNorm's input gradient summed over them is
    the formed batch's whether the map's gradient reaches one row (the sum of both copies', here) or each its own;
    its parameter gradients are sums over rows and equal too."""
    hidden = torch.addmm(conv1.bias.unsqueeze(1), conv1.weight.flatten(1), columns)  # [S, P]
    normed = F.batch_norm(
        torch.cat((hidden[:, :split], hidden), dim=1).unsqueeze(0),  # [1, S, split + P]
        norm.running_mean,
        norm.running_var,
        norm.weight,
        norm.bias,
        training=True,
        momentum=norm.momentum,
        eps=norm.eps,
    )
    norm.num_batches_tracked.add_(1)
    activated = F.leaky_relu(normed[0, :, split:], slope)
    return conv2.weight.flatten().unsqueeze(0).matmul(activated).squeeze(0)  # [P]


__all__ = [
    "BLOCK_POSITIONS",
    "applies",
    "blocked_segmentation_head",
    "pairs_apply",
    "segmentation_head_of_pairs",
    "twin_columns",
]
