"""SuperSimpleNet (Rolih, Fucka, Skocaj; ICPR 2024 and JIMS 2025), read top to bottom.

    image -> frozen backbone (strides 8, 16) -> upscale x2 of the first level, concat, 3x3 avg-pool   = F
    F -> 1x1 adaptor                                                                                = A
    training only: duplicate the batch, add Gaussian noise inside Perlin masks                      = A', F'
    A' -> segmentation head -> map logits M
    [A' or F', M] -> classification head -> score logit s
    inference: M upsampled to the image, Gaussian blur (sigma 4), sigmoid; sigmoid(s)
    "memory" models only: F -> distance to the nearest normal training patch (supersimplenet.memory): the image
    score, and by default the anomaly map (ModelConfig.anomaly_map; the heads' map stays in InferenceOutput.head_map)

Shapes and constants follow docs/design.md; channel counts come from the backbone.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from supersimplenet import blocked
from supersimplenet.backbones import build_feature_extractor, get_preset
from supersimplenet.config import MEMORY_SCORE, ModelConfig, top_count
from supersimplenet.duplicated import dense_noise, sparse_convolution, twin_images
from supersimplenet.memory import PatchMemory
from supersimplenet.perlin import perlin_masks


class FeatureExtractor(nn.Module):
    """Frozen backbone -> upscaled, concatenated, locally averaged features F [B, C, 2*H8, 2*W8]."""

    def __init__(self, *, backbone: str, levels: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.backbone = build_feature_extractor(backbone, levels)
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.channels = int(sum(self.backbone.feature_info.channels()))
        self.autocast_backbone = False

    def train(self, mode: bool = True) -> "FeatureExtractor":
        super().train(mode)
        self.backbone.eval()  # BatchNorm statistics of the backbone never change
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.levels(images))

    def _precision(self, device: torch.device):
        # Float32 also inside a bf16 training step's autocast: the frozen backbone is a small share of a step's
        # time, and Lite0's depthwise stack loses accuracy in bf16 (supersimplenet.fast, BF16_BACKBONES).
        # `autocast_backbone = True` lets an enclosing autocast reach it (tests compare against that).
        return contextlib.nullcontext() if self.autocast_backbone else torch.autocast(device.type, enabled=False)

    def levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's two feature levels (strides 8 and 16) of normalised images: what the training feature
        cache stores (supersimplenet.feature_cache)."""
        with torch.no_grad(), self._precision(images.device):
            x = images if self.autocast_backbone else images.float()
            # channels_last input: oneDNN's channels_last kernels, about 1.5x faster for Lite0's depthwise stack on
            # CPU (as the fast path runs it); the levels go back to the default layout the heads are written for
            levels = self.backbone(x.contiguous(memory_format=torch.channels_last))
            return [level.contiguous() for level in levels]

    def pool(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """F of the two levels (`pooled_features`), in float32 unless `autocast_backbone`."""
        with torch.no_grad(), self._precision(levels[0].device):
            return pooled_features(levels if self.autocast_backbone else [level.float() for level in levels])


def pooled_features(levels: list[torch.Tensor]) -> torch.Tensor:
    """F from the backbone's two levels: the first level's size doubled, both upscaled to it (bilinear,
    align_corners=True), concatenated and averaged over 3x3 (count_include_pad=True: border cells divide by 9, as in
    the paper's code). The fast path computes the patch memory's F with this function too."""
    height, width = levels[0].shape[-2:]
    size = (2 * height, 2 * width)
    upscaled = [F.interpolate(level, size=size, mode="bilinear", align_corners=True) for level in levels]
    return F.avg_pool2d(torch.cat(upscaled, dim=1), kernel_size=3, stride=1, padding=1)


class SegmentationHead(nn.Module):
    """1x1 conv -> BatchNorm -> LeakyReLU -> 1x1 conv. Training on CPU runs the same computation in cache-sized
    blocks (`supersimplenet.blocked`; equal up to float rounding, 3x faster); `blocked = False` forces the layers."""

    def __init__(self, *, channels: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1, bias=True),
            nn.BatchNorm2d(hidden),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, 1, kernel_size=1, bias=False),
        )
        self.blocked = True

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        conv1, norm, act, conv2 = self.layers
        if self.blocked and blocked.applies(features, norm):
            return blocked.blocked_segmentation_head(features, conv1, norm, act.negative_slope, conv2)
        return self.layers(features)

    def forward_pairs(self, clean: torch.Tensor, noise: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
        """Map logits [2B, 1, h, w] of a training batch: `clean` [B, C, h, w] twice plus the noise, given as its
        values [S, C] at the nonzero positions of `perturbed` [2B, 1, h, w] (`dense_noise`). On CPU each position
        the two copies share is computed once (`blocked.segmentation_head_of_pairs`); else the layers run on the
        formed batch."""
        conv1, norm, act, conv2 = self.layers
        if self.blocked and blocked.pairs_apply(clean, norm):
            return blocked.segmentation_head_of_pairs(clean, noise, perturbed, conv1, norm, act.negative_slope, conv2)
        return self.layers((dense_noise(noise, perturbed, clean.shape[1]) + clean.unsqueeze(0)).flatten(0, 1))


# Feature channels from which the classification head's training step decomposes its convolution
# (`ClassificationHead.forward_noised`): Lite0-2 have 152-168, WRN50 1,536.
SPARSE_MIN_CHANNELS = 512


class ClassificationHead(nn.Module):
    """Conv block over [features, map], then global max/avg pooling of both and one linear layer."""

    def __init__(self, *, channels: int, hidden: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(channels + 1, hidden, kernel_size=5, padding="same", bias=True),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
        )
        self.fc = nn.Linear(2 * hidden + 2, 1, bias=True)
        self.fast = True  # forward_noised's shortcuts; False: `forward` on the formed batch (tests compare)

    def forward(self, features: torch.Tensor, map_logits: torch.Tensor) -> torch.Tensor:
        """Score logits [n] of features [n, C, h, w] and map logits [n, 1, h, w]."""
        return self._pool(self.block(torch.cat((features, map_logits), dim=1)), map_logits)

    def forward_noised(
        self, clean: torch.Tensor, noise: torch.Tensor, perturbed: torch.Tensor, map_logits: torch.Tensor
    ) -> torch.Tensor:
        """Score logits [2B] of a training batch: the same as `forward` on the features [clean, clean] + noise
        (`clean` [B, C, h, w]; the noise as its values [S, C] at the nonzero positions of `perturbed` [2B, 1, h, w],
        `dense_noise`) and `map_logits` [2B, 1, h, w], computing less than that.

        Wide features on CPU (`_decomposed`): the convolution is linear in its input, so conv([F + N, M]) =
        conv_F(F) + conv_F(N) + conv_M(M) + bias, with conv_F and conv_M its weight's feature and map slices.
        conv_F(F) is computed once per image and added to both copies (autograd sums both copies' gradients into
        it); conv_M has one input channel. The noise is nonzero only at the perturbed positions (about an eighth of
        the 2B x h x w), so conv_F(N) is computed per nonzero position: one product [S, C] x [C, k*k*hidden] gives
        what each position adds to the k x k outputs around it, which `index_add` sums into a zero-padded output
        grid (cropped after, as the convolution's zero padding drops them). That is about 1.25 batch-equivalents of
        the 5x5 convolution instead of 2, forward and backward, the same sums in another order. The sums run in
        float32 under bf16 autocast, and the result goes on in the convolution's own dtype, as the convolution's
        output would.

        That pays off for wide features only (`SPARSE_MIN_CHANNELS`): each nonzero position's k*k*hidden products
        go through memory, which for Lite0's 152 channels costs more than the convolution it replaces (a bf16 step
        1.4x slower); for WRN50's 1,536 it is 1.2x faster in bf16 (BENCHMARKS.md). Thin features form the batch
        instead and convolve once each image whose two copies no noise reached (`twin_images`, about a quarter of
        the images): its output is copied before BatchNorm, whose statistics thus stay the whole batch's, and
        autograd sums the copies' gradients into the one computed. CUDA (whose `index_add` sums in no fixed order)
        takes that path too; `fast = False` runs `forward` on the formed batch. Both paths equal it in float64
        (tests/model/test_model.py) and a whole step on real images within 1e-4 in float32 (test_train.py).
        """
        channels = clean.shape[1]
        if self.fast and clean.device.type == "cpu" and channels >= SPARSE_MIN_CHANNELS:
            return self._decomposed(clean, noise, perturbed, map_logits)
        formed = (dense_noise(noise, perturbed, channels) + clean.unsqueeze(0)).flatten(0, 1)
        twins = twin_images(perturbed) if self.fast else None
        if twins is None:
            return self.forward(formed, map_logits)
        computed, source = twins
        conv, norm, act = self.block
        inputs = torch.cat((formed.index_select(0, computed), map_logits.index_select(0, computed)), dim=1)
        return self._pool(act(norm(conv(inputs).index_select(0, source))), map_logits)

    def _decomposed(
        self, clean: torch.Tensor, noise: torch.Tensor, perturbed: torch.Tensor, map_logits: torch.Tensor
    ) -> torch.Tensor:
        conv, norm, act = self.block
        channels = clean.shape[1]
        w_features, w_map = conv.weight[:, :channels], conv.weight[:, channels:]
        base = F.conv2d(clean, w_features, conv.bias, padding=conv.padding)  # [B, hidden, h, w]
        from_map = F.conv2d(map_logits, w_map, padding=conv.padding)  # [2B, hidden, h, w]
        from_noise = sparse_convolution(noise, perturbed, w_features)  # [2B, hidden, h, w], at least float32
        hidden = (base.unsqueeze(0) + from_map.unflatten(0, (2, -1)) + from_noise.unflatten(0, (2, -1))).flatten(0, 1)
        return self._pool(act(norm(hidden.to(base.dtype))), map_logits)

    def _pool(self, hidden: torch.Tensor, map_logits: torch.Tensor) -> torch.Tensor:
        # Adaptive pooling, as the paper's code pools: the same values as amax / mean, and under bf16 autocast
        # about a fifth of the head's step faster (amax's backward compares and rescales the whole hidden tensor
        # in float32, mean's upcasts it; max pooling's backward scatters to one index per channel). The gradient
        # differs from amax's only for tied maxima, which amax shares out and max pooling gives to one of them.
        pooled = torch.cat(
            (
                F.adaptive_max_pool2d(hidden, 1).flatten(1),
                F.adaptive_avg_pool2d(hidden, 1).flatten(1),
                map_logits.amax(dim=(2, 3)),
                map_logits.mean(dim=(2, 3)),
            ),
            dim=1,
        )
        return self.fc(pooled).reshape(-1)  # never a bare squeeze(): batch size 1 must stay [1]


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of size 2*ceil(3*sigma)+1 (25 for sigma 4)."""
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


class GaussianBlur(nn.Module):
    """Separable Gaussian blur with reflect padding on [B, 1, H, W] maps (exports to ONNX as two convolutions)."""

    def __init__(self, *, sigma: float) -> None:
        super().__init__()
        kernel = gaussian_kernel1d(sigma)
        self.radius = (kernel.numel() - 1) // 2
        self.register_buffer("kernel_h", kernel.view(1, 1, -1, 1), persistent=False)
        self.register_buffer("kernel_w", kernel.view(1, 1, 1, -1), persistent=False)

    @property
    def kernel_size(self) -> int:
        return 2 * self.radius + 1

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        r = self.radius
        maps = F.conv2d(F.pad(maps, (0, 0, r, r), mode="reflect"), self.kernel_h)
        return F.conv2d(F.pad(maps, (r, r, 0, 0), mode="reflect"), self.kernel_w)


def downsample_mask(masks: torch.Tensor, size: tuple[int, int], *, align_corners: bool) -> torch.Tensor:
    """Image-resolution binary masks -> feature resolution: bilinear, then >= 0.5 (the DeSTSeg recipe)."""
    resized = F.interpolate(masks.float(), size=size, mode="bilinear", align_corners=align_corners)
    return (resized >= 0.5).float()


@dataclass
class TrainOutput:
    """What a training forward returns for the 2B duplicated samples."""

    map_logits: torch.Tensor  # [2B, 1, h, w]
    score_logits: torch.Tensor  # [2B]
    masks: torch.Tensor  # [2B, 1, h, w] binary: real defects plus synthetic ones
    labels: torch.Tensor  # [2B] binary


@dataclass
class InferenceOutput:
    anomaly_map: torch.Tensor  # [B, 1, H, W] in [0, 1]: the map of `ModelConfig.anomaly_map`
    score: torch.Tensor  # [B] in [0, 1]: the image score of `ModelConfig.image_score`
    head_score: torch.Tensor | None = None  # [B] the classification head's probability (equals score for "head")
    memory_score: torch.Tensor | None = None  # [B] the patch memory's score, for models that carry a memory
    head_map: torch.Tensor | None = None  # [B, 1, H, W] the segmentation head's map when anomaly_map is another


def image_score(
    kind: str, head_score: torch.Tensor, anomaly_map: torch.Tensor, memory_score: torch.Tensor | None = None
) -> torch.Tensor:
    """The reported image score [B] from the head's probability [B] and the anomaly map [B, 1, H, W] in [0, 1]
    (`ModelConfig.image_score`; the same function for the reference and the fast path), or the patch memory's
    score [B] for "memory"."""
    if kind == MEMORY_SCORE:
        if memory_score is None:
            raise ValueError('image_score "memory" needs the patch memory\'s score')
        return memory_score
    if kind == "head":
        return head_score
    if kind == "map_top1":
        flat = anomaly_map.flatten(1)
        return flat.topk(top_count(int(flat.shape[1])), dim=1).values.mean(dim=1)  # H, W fixed per model
    map_max = anomaly_map.flatten(1).amax(dim=1)
    return map_max if kind == "map_max" else 0.5 * (head_score + map_max)  # "combined"


def reported_output(
    config: ModelConfig,
    memory: PatchMemory | None,
    heads_map: torch.Tensor,
    head: torch.Tensor,
    distances: torch.Tensor | None,
    size: tuple[int, int],
) -> InferenceOutput:
    """What a prediction reports (the same function for the reference and the fast path): the heads' map [B, 1, H,
    W] and probability [B], and a memory model's patch distances, -> the configured image score and anomaly map."""
    memory_score = memory.score_of(distances) if distances is not None else None
    score = image_score(config.image_score, head, heads_map, memory_score)
    if config.anomaly_map != MEMORY_SCORE:
        return InferenceOutput(anomaly_map=heads_map, score=score, head_score=head, memory_score=memory_score)
    if distances is None:
        raise ValueError('anomaly_map "memory" needs the patch memory\'s distances')
    return InferenceOutput(
        anomaly_map=memory.anomaly_map(distances, size),
        score=score,
        head_score=head,
        memory_score=memory_score,
        head_map=heads_map,
    )


class SuperSimpleNet(nn.Module):
    """The whole model. `forward` trains with synthetic anomalies in train mode and predicts in eval mode."""

    def __init__(self, *, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        preset = get_preset(config.backbone)
        self.register_buffer("mean", torch.tensor(preset.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preset.std).view(1, 3, 1, 1), persistent=False)
        self.feature_extractor = FeatureExtractor(backbone=config.backbone, levels=config.feature_levels)
        channels = self.feature_extractor.channels
        self.adaptor = nn.Conv2d(channels, channels, kernel_size=1, bias=True)
        self.segmentation_head = SegmentationHead(channels=channels, hidden=config.seg_hidden)
        self.classification_head = ClassificationHead(channels=channels, hidden=config.cls_hidden)
        self.blur = GaussianBlur(sigma=config.blur_sigma)
        # Scale of the backbone's features, measured on training images when noise_std_mode is "relative".
        self.register_buffer("feature_scale", torch.ones(()))
        self.memory = (
            PatchMemory(channels=channels, pool=config.memory_pool, max_patches=config.memory_max_patches)
            if config.uses_memory
            else None
        )
        self._init_trainable()

    def _init_trainable(self) -> None:
        for module in (self.adaptor, self.segmentation_head, self.classification_head):
            for layer in module.modules():
                if isinstance(layer, (nn.Conv2d, nn.Linear)):
                    nn.init.xavier_normal_(layer.weight)
                elif isinstance(layer, nn.BatchNorm2d):
                    nn.init.ones_(layer.weight)

    @property
    def effective_noise_std(self) -> float:
        if self.config.noise_std_mode == "relative":
            return self.config.noise_std * float(self.feature_scale)
        return self.config.noise_std

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB images -> the backbone's input normalisation."""
        return (images - self.mean) / self.std

    def features(
        self, images: torch.Tensor | None, levels: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw pooled features F and adapted features A of normalised images, or of their backbone levels when
        given (the training feature cache, supersimplenet.feature_cache)."""
        if levels is not None:
            raw = self.feature_extractor.pool(levels)
        elif images is not None:
            raw = self.feature_extractor(images)
        else:
            raise ValueError("features need images or their backbone levels")
        return raw, self.adaptor(raw)

    def heads(
        self,
        adapted: torch.Tensor,
        cls_features: torch.Tensor,
        noise: torch.Tensor | None = None,
        perturbed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map and score logits. A training batch passes the clean A and classifier features [B, ...], the `noise`
        both copies of them get, as its values [S, C] at the S nonzero positions of its mask `perturbed` [2B, 1, h, w]
        in (copy, row, column) order (`dense_noise`): each head then computes what the two copies share once
        (`SegmentationHead.forward_pairs`, `ClassificationHead.forward_noised`), forming the duplicated batch A' =
        [A, A] + noise (or F') only where its path needs it (the classification head's thin features, fallbacks)."""
        if noise is None:
            map_logits = self.segmentation_head(adapted)
        else:
            map_logits = self.segmentation_head.forward_pairs(adapted, noise, perturbed)
        head_map = map_logits.detach() if self.config.stop_grad else map_logits
        if noise is None:
            return map_logits, self.classification_head(cls_features, head_map)
        return map_logits, self.classification_head.forward_noised(cls_features, noise, perturbed, head_map)

    def add_synthetic_anomalies(
        self,
        adapted: torch.Tensor,
        raw: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Duplicates the batch and adds Gaussian noise inside Perlin masks (docs/design.md §3).

        Args:
            adapted: A [B, C, h, w].
            raw: F [B, C, h, w]; perturbed with the same noise (JIMS).
            masks: real defect masks at feature resolution [B, 1, h, w].
            labels: image labels [B].

        Returns:
            Perturbed A' and F' [2B, ...], the final masks [2B, 1, h, w] and labels [2B].
        """
        values, noise_mask, final_masks, final_labels = self._synthetic_noise(adapted, masks, labels)
        noise = dense_noise(values, noise_mask, adapted.shape[1])
        return (
            (noise + adapted.unsqueeze(0)).flatten(0, 1),
            (noise + raw.unsqueeze(0)).flatten(0, 1),
            final_masks,
            final_labels,
        )

    def _synthetic_noise(
        self, adapted: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The noise of `add_synthetic_anomalies` as its values [S, C] at the S nonzero positions of its mask
        (`dense_noise` forms it), the mask [2B, 1, h, w] (where it is 0 a copy equals A and F), and the final masks
        and labels."""
        cfg = self.config
        count = 2 * adapted.shape[0]
        masks, labels = torch.cat((masks, masks)), torch.cat((labels, labels)).float()
        noise_mask = torch.ones_like(masks)
        if not cfg.noise_on_anomalous:
            noise_mask = noise_mask * (1 - labels).view(-1, 1, 1, 1)
        if not cfg.overlap:
            noise_mask = noise_mask * (1 - masks)
        perlin = perlin_masks(
            count,
            tuple(masks.shape[-2:]),
            threshold=cfg.perlin_threshold,
            fallback=cfg.perlin_fallback,
            device=masks.device,
        )
        noise_mask = noise_mask * perlin
        # Gaussian noise only where the mask is 1 (about an eighth of the positions at threshold 0.2), drawn in
        # (copy, row, column) order, C values per position, in float32 in every precision: the same random stream
        # whether or not the step runs under bf16 autocast. Zero elsewhere; the heads read the values where they
        # are, and only fallbacks form the dense [2, B, C, h, w] noise.
        positions = int(torch.count_nonzero(noise_mask))
        values = torch.randn(positions, adapted.shape[1], dtype=torch.float32, device=adapted.device)
        values.mul_(self.effective_noise_std)
        final_masks = ((masks + noise_mask) > 0).float()
        final_labels = ((labels + final_masks.flatten(1).amax(dim=1)) > 0).float()
        return values, noise_mask, final_masks, final_labels

    def forward(
        self,
        images: torch.Tensor | None,
        masks: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        levels: list[torch.Tensor] | None = None,
    ) -> TrainOutput | InferenceOutput:
        """Train mode: `images` [B,3,H,W] normalised, `masks` [B,1,H,W] and `labels` [B] -> TrainOutput. `levels`,
        the images' cached backbone levels (supersimplenet.feature_cache), may stand in for `images` (then None).

        Eval mode: normalised `images` -> InferenceOutput with the anomaly map at the input size.
        """
        raw, adapted = self.features(images, levels if self.training else None)
        if not self.training:
            map_logits, score_logits = self.heads(adapted, adapted if self.config.adapt_cls_features else raw)
            distances = self.memory.distances(raw) if self.memory is not None else None
            return self.postprocess(map_logits, score_logits, tuple(images.shape[-2:]), distances)
        if masks is None or labels is None:
            raise ValueError("training forward needs masks and labels (zeros for normal images)")
        feature_masks = downsample_mask(
            masks, tuple(adapted.shape[-2:]), align_corners=self.config.resolved_mask_align_corners
        )
        values, noise_mask, final_masks, final_labels = self._synthetic_noise(adapted, feature_masks, labels)
        cls_features = adapted if self.config.adapt_cls_features else raw
        map_logits, score_logits = self.heads(adapted, cls_features, values, noise_mask)
        return TrainOutput(map_logits=map_logits, score_logits=score_logits, masks=final_masks, labels=final_labels)

    def postprocess(
        self,
        map_logits: torch.Tensor,
        score_logits: torch.Tensor,
        size: tuple[int, int],
        distances: torch.Tensor | None = None,
    ) -> InferenceOutput:
        """The heads' logits (and a memory model's patch distances [B, gh, gw]) -> InferenceOutput at `size`."""
        upsampled = F.interpolate(map_logits, size=size, mode="bilinear", align_corners=False)
        return reported_output(
            self.config, self.memory, torch.sigmoid(self.blur(upsampled)), torch.sigmoid(score_logits), distances, size
        )

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {
            "adaptor": self.adaptor,
            "segmentation_head": self.segmentation_head,
            "classification_head": self.classification_head,
        }


def build_model(config: ModelConfig) -> SuperSimpleNet:
    """Builds the network with a randomly initialised backbone; loads no weights (see `load_backbone_weights`)."""
    return SuperSimpleNet(config=config)
