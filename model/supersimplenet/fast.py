"""Inference-only fast path of SuperSimpleNet: the same outputs as `SuperSimpleNet.eval()(x)`, computed cheaper.

    fast = FastSuperSimpleNet.from_model(model)                        # fp32, equal to the reference within ~2e-5
    fast = FastSuperSimpleNet.from_model(model, dtype=torch.bfloat16)  # bf16 (see BF16_BACKBONES)
    out = fast(normalised_images)                                      # InferenceOutput(anomaly_map, score)

Every trick is an exact rewrite of the reference computation (equal up to floating-point rounding; the folding
and matrix helpers are in `supersimplenet.folding`):

1. BatchNorm folding. Each BatchNorm of the frozen backbone (found by tracing which convolution feeds it), and
   those of both heads, is folded into its convolution: w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps)
   + beta, computed in float64.
2. Adaptor folding. The adaptor is a 1x1 convolution, so it folds into the linear layer after it:
   W' = W_seg @ W_ad, b' = W_seg @ b_ad + b_seg for the segmentation head's first convolution. In JIMS mode
   (`adapt_cls_features=False`) the classification head reads raw features, so the adaptor never runs. In ICPR mode
   the separable heads (3.) fold it into the classification convolution too, tap by tap (W'_t = W_t @ W_ad; the bias
   b_ad under the 5x5 convolution's zero padding becomes a fixed bias map); the folded heads run it once.
3. Low-resolution heads (``heads="separable"``). The pooled features are F = P(U(l2)) (+) P(U(l3)): the bilinear
   upscale U (align_corners=True) and the 3x3 average pool P (count_include_pad) act on every channel alike, so a
   channel-mixing layer commutes with them. The segmentation head's first convolution is computed on the stride-8
   and stride-16 maps (4x and 16x fewer positions) and only its result is upscaled and pooled. The classification
   head's 5x5 convolution is 25 channel projections (one per tap) followed by 25 zero-padded shifts; U, P and the
   shifts are separable matrices, so "project at low resolution, then upscale, pool and shift" is two small matrix
   products per level, the shifts stacked along the contraction. F, A and the 1537-channel concatenation are never
   materialised: for WRN50 at 256x256 the heads drop from about 36 to about 4 GMAC per image. ``heads="folded"``
   keeps the reference layout (F materialised, direct convolutions) with 1.-2. only; it is faster when F is thin
   (EfficientNet-Lite0: 152 channels). ``heads="auto"`` (the default) chooses by channel count.
4. Cache-sized segmentation head (CPU, ``heads="folded"``). The head's 1x1 convolutions are two matrix products
   over positions; run as convolutions they write and re-read a [B, 1024, h, w] hidden tensor (268 MB at batch
   16, 256x256) and ran at 37 % of the machine's matmul peak. Run over blocks of `SEG_CHUNK_ROWS` positions, the
   hidden block stays in cache (2.5x faster on 2 Zen 4 cores). Traced (ONNX) and GPU graphs keep the convolutions.
5. Post-processing as matrices. Bilinear upsampling (align_corners=False) and the reflect-padded Gaussian blur
   are both linear and act on rows and columns separately, so per axis they are one [H, h] matrix (built in
   float64 by running torch's own ops on the identity): the map becomes A_h @ M @ A_w^T, two small matrix
   products instead of an upsample and two 1-D convolutions over the full-size map (15x faster at 256x256).
6. Backbone in micro-batches (CPU). The backbone's early stages are memory-bound (EfficientNet-Lite0's depthwise
   layers: 27 % of the matmul peak at batch 16); run `BACKBONE_MICRO_BATCH` images at a time, their activations
   stay in cache (2x faster for Lite0 on 2 Zen 4 cores). Every image is computed alone either way (eval-mode
   BatchNorm), so the result is the same. Traced (ONNX) and GPU graphs run the whole batch.
7. channels_last, `torch.inference_mode`, optional bfloat16 (the map post-processing and the final linear layer
   always run in float32).

Work whose result the reference throws away is skipped: the adaptor output in JIMS mode, F itself in separable
mode, the backbone stages after stride 16 (already cut by `build_feature_extractor`).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from supersimplenet.folding import fold_backbone_batchnorm, fold_conv_bn, level_operators, upsample_blur_matrix
from supersimplenet.model import InferenceOutput, SuperSimpleNet, pooled_features, reported_output

HeadsMode = Literal["auto", "separable", "folded"]

# "auto" picks the low-resolution heads from this many feature channels on (measured on 2 Zen 4 cores: they win
# 3x for WRN50's 1536 channels and lose 1.3x for EfficientNet-Lite0's 152, where F is small and the direct
# convolutions are already cheap).
SEPARABLE_MIN_CHANNELS = 512

# Backbones whose features survive bfloat16. EfficientNet-Lite0's depthwise stack loses about 12 % of its feature
# norm in bf16 (weld test split: pixel AUROC 74.6 -> 65.6), so with dtype=bfloat16 its backbone stays float32 unless
# asked otherwise; its heads, most of its FLOPs, still run in bf16. WRN50 keeps its features within about 0.1 %.
BF16_BACKBONES = frozenset({"wide_resnet50"})

# Positions per block of the cache-sized segmentation head (4.): 1024 x 1024 hidden floats = 4 MiB, measured best
# of 128-4096 on 2 Zen 4 cores (114 ms vs 290 ms for the convolutions at batch 16, 256x256).
SEG_CHUNK_ROWS = 1024

# Images per backbone call on CPU (6.): Lite0 at 256x256, batch 16, 2 Zen 4 cores: 1 -> 178 ms, 2 -> 141, 4 -> 133,
# 8 -> 203, 16 (whole batch) -> 272.
BACKBONE_MICRO_BATCH = 4


def _eager_cpu(tensor: torch.Tensor) -> bool:
    """Whether the CPU-only rewrites (4., 6.) apply: eager execution on CPU. Traced graphs (ONNX export) need the
    batch-size-independent form, and a GPU gains nothing from blocking."""
    return tensor.device.type == "cpu" and not torch.jit.is_tracing()


# ----------------------------------------------------------------------------------------------------------------
# The fast model
# ----------------------------------------------------------------------------------------------------------------


def _fold_heads(model: SuperSimpleNet, channels: int, *, icpr: bool) -> dict:
    """The heads' weights folded in float64 (1.-2.): the segmentation head's BatchNorm into its first 1x1
    convolution (`w_seg`, `b_seg`) and the adaptor in front of it (`seg_w`, `seg_b`); the classification head's
    BatchNorm into its 5x5 convolution (`w_cls`, `b_cls`), split into the feature part (`w_cls_feat`, with the
    adaptor folded per tap in ICPR mode and its bias as `bias_kernel`) and the map channel (`w_cls_map`)."""
    seg_conv, seg_bn, seg_act, seg_out = model.segmentation_head.layers
    w_seg, b_seg = fold_conv_bn(seg_conv, seg_bn)  # [S, C, 1, 1], [S]
    w_seg = w_seg.flatten(1)
    w_ad = model.adaptor.weight.double().flatten(1)  # [C, C]
    b_ad = model.adaptor.bias.double()
    block_conv, block_bn, _ = model.classification_head.block
    w_cls, b_cls = fold_conv_bn(block_conv, block_bn)  # [O, C+1, k, k], [O]
    w_cls_feat, w_cls_map = w_cls[:, :channels], w_cls[:, channels:]
    bias_kernel = None
    if icpr:  # the classification head reads A = W_ad F + b_ad: fold W_ad per tap, b_ad into a bias map
        bias_kernel = torch.einsum("ocyx,c->oyx", w_cls_feat, b_ad).unsqueeze(1)  # [O, 1, k, k]
        w_cls_feat = torch.einsum("ocyx,cd->odyx", w_cls_feat, w_ad)
    return {
        "negative_slope": float(seg_act.negative_slope),
        "kernel": int(w_cls.shape[-1]),
        "w_seg": w_seg,
        "b_seg": b_seg,
        "seg_w": w_seg @ w_ad,
        "seg_b": w_seg @ b_ad + b_seg,
        "seg_out_w": seg_out.weight.double().flatten(1),  # [1, S]
        "w_cls": w_cls,
        "b_cls": b_cls,
        "w_cls_feat": w_cls_feat,
        "w_cls_map": w_cls_map,
        "bias_kernel": bias_kernel,
    }


class FastSuperSimpleNet(nn.Module):
    """Inference-only SuperSimpleNet. Build it with `from_model`; call it on normalised images like the reference.

    Attributes:
        heads: "separable" (low-resolution heads) or "folded" (reference layout, folded weights).
        dtype: compute dtype of the heads (float32 or bfloat16); backbone_dtype: that of the backbone.
        channels_last: run the backbone in channels_last memory format.
    """

    def __init__(self) -> None:  # use from_model
        super().__init__()
        self._spatial: dict[tuple, tuple[torch.Tensor, ...]] = {}

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_model(
        cls,
        model: SuperSimpleNet,
        *,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
        heads: HeadsMode = "auto",
        backbone_dtype: torch.dtype | None = None,
    ) -> "FastSuperSimpleNet":
        """Folds a (trained) reference model into a fast inference model. The reference is left untouched.

        Args:
            model: the reference model (any mode; only its eval-mode computation is reproduced).
            dtype: torch.float32 (equal to the reference within about 2e-5) or torch.bfloat16.
            channels_last: run the backbone and the convolutions in channels_last memory format.
            heads: "separable" (low-resolution heads), "folded" (reference layout) or "auto" (separable from
                `SEPARABLE_MIN_CHANNELS` backbone channels on).
            backbone_dtype: dtype of the backbone alone. Default: `dtype`, except float32 for backbones not in
                `BF16_BACKBONES` (then only the heads run in bf16).
        """
        if heads not in ("auto", "separable", "folded"):
            raise ValueError(f"heads must be 'auto', 'separable' or 'folded', got {heads!r}")
        if backbone_dtype is None:
            backbone_dtype = dtype if model.config.backbone in BF16_BACKBONES else torch.float32
        for value in (dtype, backbone_dtype):
            if value not in (torch.float32, torch.bfloat16):
                raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {value}")
        self = cls()
        self.config = model.config
        self.dtype = dtype
        self.backbone_dtype = backbone_dtype
        self.channels_last = channels_last
        self.icpr = bool(model.config.adapt_cls_features)
        device = next(model.parameters()).device

        example = torch.zeros(1, 3, *model.config.image_size, device=device)
        backbone, self.folded_batchnorms = fold_backbone_batchnorm(model.feature_extractor.backbone, example)
        if channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        self.backbone = backbone.to(backbone_dtype)
        self.level_channels = [int(c) for c in model.feature_extractor.backbone.feature_info.channels()]
        if heads == "auto":
            heads = "separable" if sum(self.level_channels) >= SEPARABLE_MIN_CHANNELS else "folded"
        self.heads = heads

        folded = _fold_heads(model, sum(self.level_channels), icpr=self.icpr)
        self.negative_slope, self.kernel = folded["negative_slope"], folded["kernel"]
        self._store_common(model, folded, device)
        if heads == "separable":
            self._store_separable(folded, device)
        else:
            self._store_folded(model, folded, device)
        # the patch memory ("memory" score) reads F itself, in float32, from the same backbone levels
        self.memory = copy.deepcopy(model.memory) if model.memory is not None else None
        return self.eval()

    def _buffer(self, name: str, value: torch.Tensor, device: torch.device, *, keep_fp32: bool = False) -> None:
        self.register_buffer(name, value.to(device, torch.float32 if keep_fp32 else self.dtype).contiguous())

    def _store_common(self, model: SuperSimpleNet, folded: dict, device: torch.device) -> None:
        """Buffers of both head layouts: input normalisation (so preprocessing code takes either model), the blur
        kernels, the final linear layer (float32 always) and the classification head's map-channel part."""
        fc = model.classification_head.fc
        self._buffer("mean", model.mean.double(), device, keep_fp32=True)
        self._buffer("std", model.std.double(), device, keep_fp32=True)
        self._buffer("blur_h", model.blur.kernel_h.double(), device, keep_fp32=True)
        self._buffer("blur_w", model.blur.kernel_w.double(), device, keep_fp32=True)
        self.blur_radius = int(model.blur.radius)
        self._buffer("fc_weight", fc.weight.double(), device, keep_fp32=True)
        self._buffer("fc_bias", fc.bias.double(), device, keep_fp32=True)
        self._buffer("cls_map_weight", folded["w_cls_map"], device)  # [O, 1, k, k]
        self._buffer("cls_bias", folded["b_cls"], device)  # [O]
        bias_kernel = folded["bias_kernel"]
        self.register_buffer("cls_bias_kernel", None if bias_kernel is None else bias_kernel.to(device, self.dtype))

    def _store_separable(self, folded: dict, device: torch.device) -> None:
        """One projection per level (3.); columns of the classification part ordered (ky, out, kx) so that the
        regrouping before the spatial contractions copies runs of kx."""
        channels = sum(self.level_channels)
        splits = torch.tensor(self.level_channels).cumsum(0).tolist()
        starts = [0] + splits[:-1]
        cls_rows = folded["w_cls_feat"].permute(2, 0, 3, 1).reshape(-1, channels)  # [(ky, O, kx), C]
        for index, (start, stop) in enumerate(zip(starts, splits)):
            self._buffer(f"proj_seg_{index}", folded["seg_w"][:, start:stop].t(), device)  # [C_l, S]
            self._buffer(f"proj_cls_{index}", cls_rows[:, start:stop].t(), device)  # [C_l, k*k*O]
        self._buffer("seg_bias", folded["seg_b"], device)
        self._buffer("seg_out", folded["seg_out_w"].t(), device)  # [S, 1]

    def _store_folded(self, model: SuperSimpleNet, folded: dict, device: torch.device) -> None:
        """The reference layout with folded convolutions; in ICPR mode the adaptor runs (once) instead of being
        folded into both heads."""
        seg_w, seg_b, w_cls_feat = folded["seg_w"], folded["seg_b"], folded["w_cls_feat"]
        self.adaptor = None
        if self.icpr:
            channels = sum(self.level_channels)
            adaptor = nn.Conv2d(channels, channels, 1).to(device)
            adaptor.weight.data.copy_(model.adaptor.weight)
            adaptor.bias.data.copy_(model.adaptor.bias)
            self.adaptor = adaptor.to(self.dtype)
            seg_w, seg_b = folded["w_seg"], folded["b_seg"]  # the adaptor runs: do not fold it in
            w_cls_feat = folded["w_cls"][:, :channels]
            self.cls_bias_kernel = None
        self._buffer("seg_weight", seg_w[:, :, None, None], device)
        self._buffer("seg_bias", seg_b, device)
        self._buffer("seg_out_weight", folded["seg_out_w"][:, :, None, None], device)
        self._buffer("cls_feat_weight", w_cls_feat, device)
        if self.channels_last:
            for name in ("seg_weight", "seg_out_weight", "cls_feat_weight", "cls_map_weight"):
                setattr(self, name, getattr(self, name).contiguous(memory_format=torch.channels_last))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB images -> the backbone's input normalisation (as `SuperSimpleNet.normalize`)."""
        return (images - self.mean) / self.std

    # -- helpers -----------------------------------------------------------------------------------------------

    def _spatial_operators(
        self, sizes: tuple[tuple[int, int], ...], target: tuple[int, int], device: torch.device
    ) -> tuple[torch.Tensor, ...]:
        """Per level: the classification head's H and W operators [T, n * k] (cached per shape)."""
        key = (sizes, target, device.type, device.index)
        if key not in self._spatial:
            ops = []
            for height, width in sizes:
                ops.append(level_operators(height, target[0], self.kernel))
                ops.append(level_operators(width, target[1], self.kernel))
            self._spatial[key] = tuple(op.to(device, self.dtype) for op in ops)
        return self._spatial[key]

    def _cls_bias_map(self, target: tuple[int, int], device: torch.device) -> torch.Tensor:
        """[O, h, w] bias of the classification conv before ReLU (a map in ICPR mode, constant otherwise)."""
        key = ("bias", target, device.type, device.index)
        if key not in self._spatial:
            bias = self.cls_bias.float().view(-1, 1, 1).expand(-1, *target)
            if self.cls_bias_kernel is not None:
                ones = torch.ones(1, 1, *target, device=device)
                bias = bias + F.conv2d(ones, self.cls_bias_kernel.float(), padding=self.kernel // 2)[0]
            self._spatial[key] = (bias.to(self.dtype).contiguous(),)
        return self._spatial[key][0]

    def _map_operators(
        self, source: tuple[int, int], size: tuple[int, int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_h [H, h], A_w^T [w, W]): upsampling + blur per axis, float32 (cached per shape)."""
        key = ("map", source, size, device.type, device.index)
        if key not in self._spatial:
            rows = upsample_blur_matrix(source[0], size[0], self.blur_h.flatten())
            cols = upsample_blur_matrix(source[1], size[1], self.blur_w.flatten())
            self._spatial[key] = (rows.to(device, torch.float32), cols.t().contiguous().to(device, torch.float32))
        return self._spatial[key]

    def _postprocess(
        self,
        map_logits: torch.Tensor,
        score_logits: torch.Tensor,
        size: tuple[int, int],
        distances: torch.Tensor | None = None,
    ) -> InferenceOutput:
        """Upsample, separable Gaussian blur (reflect padding), sigmoid, in float32 as in the reference; the first
        two as the matrices A_h @ M @ A_w^T (see 5. above). The reported score and map as the reference's
        (`supersimplenet.model.reported_output`)."""
        source = (int(map_logits.shape[-2]), int(map_logits.shape[-1]))
        rows, cols = self._map_operators(source, size, map_logits.device)
        maps = torch.sigmoid(torch.matmul(torch.matmul(rows, map_logits.float()), cols))
        return reported_output(self.config, self.memory, maps, torch.sigmoid(score_logits.float()), distances, size)

    def _score(self, hidden_max: torch.Tensor, hidden_mean: torch.Tensor, map_logits: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat(
            (
                hidden_max.float(),
                hidden_mean.float(),
                map_logits.float().amax(dim=(2, 3)),
                map_logits.float().mean(dim=(2, 3)),
            ),
            dim=1,
        )
        return F.linear(pooled, self.fc_weight, self.fc_bias).reshape(-1)

    # -- forward -----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> InferenceOutput:
        """Normalised images [B, 3, H, W] -> InferenceOutput(anomaly_map [B, 1, H, W], score [B]), as the reference."""
        return self.run(images)

    @torch.inference_mode()
    def forward_levels(self, levels: list[torch.Tensor], size: tuple[int, int]) -> InferenceOutput:
        """`forward` from the backbone's levels of images of `size` (H, W), as `FeatureExtractor.levels` computes
        them: what validation scores from its cached levels (`supersimplenet.feature_cache`), skipping the
        backbone. Equal to `forward` on the images to float rounding (the backbone's own)."""
        levels = [level.to(self.backbone_dtype) for level in levels]
        if self.channels_last:  # the layout the backbone's own levels have in `run`, so the heads take the same kernels
            levels = [level.contiguous(memory_format=torch.channels_last) for level in levels]
        return self.run_levels(levels, size)

    def run(self, images: torch.Tensor) -> InferenceOutput:
        """`forward` without inference_mode (for tracing and ONNX export)."""
        size = (int(images.shape[-2]), int(images.shape[-1]))  # python ints: fixed sizes, also when traced
        x = images.to(self.backbone_dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.run_levels(self._backbone_levels(x), size)

    def run_levels(self, levels: list[torch.Tensor], size: tuple[int, int]) -> InferenceOutput:
        """Everything after the backbone: F for the memory, both heads, post-processing."""
        if self.backbone_dtype != self.dtype:
            levels = [level.to(self.dtype) for level in levels]
        distances = raw = None
        if self.memory is not None:  # F in float32 whatever the heads' dtype
            raw = pooled_features([level.float() for level in levels])
            distances = self.memory.distances(raw)
        if self.heads == "separable":
            map_logits, hidden_max, hidden_mean = self._separable_heads(levels)
        else:  # the folded heads read the same F when they compute in float32 too
            shared = raw if raw is not None and raw.dtype == levels[0].dtype else None
            map_logits, hidden_max, hidden_mean = self._folded_heads(levels, shared)
        return self._postprocess(map_logits, self._score(hidden_max, hidden_mean, map_logits), size, distances)

    def _backbone_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's levels; on CPU computed `BACKBONE_MICRO_BATCH` images at a time (6.)."""
        if not _eager_cpu(x) or x.shape[0] <= BACKBONE_MICRO_BATCH:
            return self.backbone(x)
        parts = [self.backbone(chunk) for chunk in x.split(BACKBONE_MICRO_BATCH)]
        return [torch.cat(level) for level in zip(*parts)]

    def _separable_heads(self, levels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both heads from the backbone levels without materialising F or A.

        Index names: b image, (i, j) level position, (y, x) feature position, s seg hidden channel, o cls channel,
        (p, q) the 5x5 tap (row, column).
        """
        batch = levels[0].shape[0]
        height, width = (int(v) for v in levels[0].shape[-2:])  # python ints: fixed sizes, also when traced
        target = (2 * height, 2 * width)
        sizes = tuple((int(level.shape[-2]), int(level.shape[-1])) for level in levels)
        device = levels[0].device
        ops = self._spatial_operators(sizes, target, device)
        k = self.kernel
        out_channels = self.cls_bias.shape[0]
        seg_channels = self.seg_bias.shape[0]
        seg = cls = None
        for index, level in enumerate(levels):
            n_h, n_w = sizes[index]
            cls_h, cls_w = ops[2 * index : 2 * index + 2]
            rows = level.permute(0, 2, 3, 1).reshape(-1, level.shape[1])  # [(b, i, j), C_l], free for NHWC
            # Segmentation: project to S channels at the level's resolution (NHWC), then upscale as the
            # reference upscales F; the 3x3 pool follows once both levels are summed.
            y = (rows @ getattr(self, f"proj_seg_{index}")).view(batch, n_h, n_w, seg_channels).permute(0, 3, 1, 2)
            y = F.interpolate(y, size=target, mode="bilinear", align_corners=True)
            seg = y if seg is None else seg.add_(y)
            # Classification: 25 projections, columns (p, o, q); regroup to [(i, p, b, o), (j, q)], then the
            # W-operator (upscale, pool, shift by q) and the H-operator (same, shift by p) as two matrix products.
            y = (rows @ getattr(self, f"proj_cls_{index}")).view(batch, n_h, n_w, k, out_channels, k)
            y = y.permute(1, 3, 0, 4, 2, 5).reshape(-1, n_w * k)
            r = (y @ cls_w.t()).view(n_h * k, -1)  # [(i, p), (b, o, x)]
            cls = cls_h @ r if cls is None else cls.addmm_(cls_h, r)  # [y, (b, o, x)]
        # seg: pool, bias, LeakyReLU, 1x1 output conv (a dot product over the NHWC channels).
        seg = F.avg_pool2d(seg, kernel_size=3, stride=1, padding=1)  # [b, s, y, x], channels_last
        seg = F.leaky_relu_(seg.add_(self.seg_bias.view(1, -1, 1, 1)), self.negative_slope)
        map_logits = seg.permute(0, 2, 3, 1).reshape(-1, seg_channels) @ self.seg_out  # [(b, y, x), 1]
        map_logits = map_logits.view(batch, 1, target[0], target[1])
        # cls: [y, b, o, x] + bias map + the map channel's 5x5 conv, ReLU, global max / mean over (y, x).
        hidden = cls.view(target[0], batch, out_channels, target[1])
        from_map = F.conv2d(map_logits, self.cls_map_weight, padding=k // 2)  # [b, o, y, x]
        bias_map = self._cls_bias_map(target, device)  # [o, y, x]
        hidden.add_(from_map.permute(2, 0, 1, 3)).add_(bias_map.permute(1, 0, 2).unsqueeze(1))
        hidden = F.relu_(hidden)
        return map_logits, hidden.amax(dim=(0, 3)), hidden.mean(dim=(0, 3))

    def _folded_heads(
        self, levels: list[torch.Tensor], raw: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both heads from F (`raw`, computed from the levels when not given) with the folded weights."""
        raw = pooled_features(levels) if raw is None else raw
        if self.channels_last:
            raw = raw.contiguous(memory_format=torch.channels_last)
        seg_input = cls_input = raw
        if self.adaptor is not None:  # ICPR: both heads read the adapted features
            seg_input = cls_input = self.adaptor(raw)
        map_logits = self._segmentation_logits(seg_input)
        k = self.kernel
        hidden = F.conv2d(cls_input, self.cls_feat_weight, self.cls_bias, padding=k // 2)
        hidden = hidden + F.conv2d(map_logits, self.cls_map_weight, padding=k // 2)
        hidden = F.relu_(hidden)
        return map_logits, hidden.amax(dim=(2, 3)), hidden.mean(dim=(2, 3))

    def _segmentation_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Segmentation head (folded) on features [b, C, h, w] -> map logits [b, 1, h, w]; blocked on CPU (4.)."""
        if not _eager_cpu(features):
            hidden = F.leaky_relu_(F.conv2d(features, self.seg_weight, self.seg_bias), self.negative_slope)
            return F.conv2d(hidden, self.seg_out_weight)
        batch, channels, height, width = features.shape
        rows = features.permute(0, 2, 3, 1).reshape(-1, channels)  # [(b, y, x), C], a view for channels_last
        count = rows.shape[0]
        out = rows.new_empty(count, 1)
        block = rows.new_empty(min(SEG_CHUNK_ROWS, count), self.seg_bias.shape[0])
        weight, out_weight = self.seg_weight.flatten(1).t(), self.seg_out_weight.flatten(1).t()  # views [C, S], [S, 1]
        for start in range(0, count, SEG_CHUNK_ROWS):
            part = rows[start : start + SEG_CHUNK_ROWS]
            hidden = torch.addmm(self.seg_bias, part, weight, out=block[: part.shape[0]])
            F.leaky_relu_(hidden, self.negative_slope)
            torch.mm(hidden, out_weight, out=out[start : start + part.shape[0]])
        return out.view(batch, height, width, 1).permute(0, 3, 1, 2)


__all__ = [
    "BACKBONE_MICRO_BATCH",
    "BF16_BACKBONES",
    "SEG_CHUNK_ROWS",
    "SEPARABLE_MIN_CHANNELS",
    "FastSuperSimpleNet",
]
