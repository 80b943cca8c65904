"""Configuration dataclasses for SuperSimpleNet.

`ModelConfig` fixes everything needed to rebuild the network (it travels inside every checkpoint);
`TrainConfig` holds what only training needs. Both are frozen and built from plain dicts so that
YAML -> CLI overrides -> dataclass is one code path (`from_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

SUPERVISION_REGIMES = ("unsupervised", "weak", "mixed", "supervised")
NOISE_STD_MODES = ("absolute", "relative")
# The image score a model reports (`supersimplenet.model.image_score`): the classification head's (the paper's),
# the maximum of the anomaly map, the mean of the two ("combined"), or the mean of the map's top 1 % of pixels.
IMAGE_SCORES = ("head", "map_max", "combined", "map_top1")
# "memory": the distance of the image's patch features to the nearest patch of the normal training images
# (`supersimplenet.memory`); not a function of the head and the map, so evaluation reports it only for models that
# carry a memory. `ModelConfig.image_score` takes any of `REPORTED_SCORES`.
MEMORY_SCORE = "memory"
REPORTED_SCORES = (*IMAGE_SCORES, MEMORY_SCORE)
# The anomaly map a model reports (localisation, pixel metrics, overlays, defect regions): the segmentation head's
# ("heads", the paper's) or the patch memory's distances ("memory"; QUALITY.md: better on every product with masks).
ANOMALY_MAPS = ("heads", MEMORY_SCORE)
TOP_FRACTION = 0.01  # of the anomaly map's pixels that "map_top1" averages


def top_count(pixels: int) -> int:
    """How many of an anomaly map's `pixels` the "map_top1" score averages (`TOP_FRACTION`, at least one)."""
    return max(1, round(TOP_FRACTION * pixels))


# Compute precision of a training step (`supersimplenet.train.train_step`): everything in float32, or the trainable
# layers (adaptor and heads, most of a step's FLOPs) under bfloat16 autocast with float32 weights, optimiser state,
# losses and frozen backbone.
TRAIN_PRECISIONS = ("fp32", "bf16")

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and anomaly-generator settings (docs/design.md §2-§3).

    Attributes:
        backbone: a preset name from `supersimplenet.backbones.PRESETS`.
        image_size: input (height, width); feature maps are a quarter of it.
        adapt_cls_features: ICPR (True) feeds adapted features to the classification head, JIMS (False) raw ones.
        stop_grad: detach the segmentation map before the classification head (unsupervised setting).
        noise_std: Gaussian noise sigma of the feature-space anomalies; None takes the backbone preset's
            (`BackbonePreset.noise_std`: relative 4.0 for the EfficientNet-Lites, the paper's absolute 0.015 for WRN50).
        noise_std_mode: "absolute" uses `noise_std` as is (the paper's 0.015 for WRN50); "relative" multiplies it
            by the backbone's feature scale measured on the training images (stored in the checkpoint), so that
            one value transfers across backbones. None takes the preset's; a mode other than the preset's needs
            an explicit `noise_std`.
        perlin_threshold: binarisation threshold of the Perlin noise; None takes the preset's (0.2).
        perlin_fallback: anomalib's rescale of a Perlin field that never exceeds the threshold (off in the paper).
        overlap: allow synthetic noise inside real defect regions (False in the supervised configs).
        noise_on_anomalous: also perturb images that are already anomalous (the paper's `bad=True`).
        mask_align_corners: align_corners of the GT-mask downsampling; None follows the version (True for JIMS).
        seg_hidden: hidden width of the segmentation head.
        cls_hidden: output channels of the classification head's convolution.
        blur_sigma: sigma of the Gaussian blur applied to the upsampled anomaly map.
        feature_levels: the two backbone feature levels (`feature_info` indices, increasing) that are upscaled and
            concatenated (or a string "i,j", as a search space's categorical choice); None takes the preset's
            (strides 8 and 16). The feature maps are twice the first level's
            size, so (1, 2) costs the heads about 4x and (3, 4) about 1/4 of the default.
        image_score: the image score every prediction reports, one of `IMAGE_SCORES`: "head" (the classification
            head's, the paper's), "map_max" (the anomaly map's maximum, the authors' "seg-" metrics), "combined"
            (the mean of the two) or "map_top1" (the mean of the map's highest 1 % of pixels: a defect covers many
            pixels, a single bright spot few; QUALITY.md). Changes no weight: evaluation compares all of them on any
            trained model. "memory" (`supersimplenet.memory`): the distance of the image's patches to the nearest
            patch of the normal training images, which the model then carries (QUALITY.md: better than the map's
            on every product we have). None takes the
            preset's unsupervised score (`recommended_model_config` sets "head" for supervised regimes).
        memory_pool: with image_score "memory", feature cells pooled per patch side (8: a patch per 32 x 32 pixels;
            4 is as good on weld and MPDD, but 16x the patches, so ELPV's 1,000 cells need a subset, which costs it
            0.02: QUALITY.md).
        memory_max_patches: with image_score "memory", the most patches the memory keeps (a seeded random subset).
        anomaly_map: the map every prediction reports, one of `ANOMALY_MAPS`: "heads" (the segmentation head's, the
            paper's) or "memory" (each patch's distance to the nearest normal patch, upsampled to the image;
            QUALITY.md, "The patch memory's anomaly map"). None follows the image score: "memory" for a "memory"
            model, else "heads". The map-based image scores ("map_max", "map_top1", "combined") always read the
            heads' map, which every prediction also carries (`InferenceOutput.head_map`). Checkpoints saved before
            this field existed load with "heads", the map they were evaluated with.

    Every None is resolved in `__post_init__`, so a built config (and every checkpoint) holds concrete values and
    `ModelConfig(backbone="efficientnet_lite0")` is the recommended unsupervised model of that backbone.
    """

    backbone: str = "efficientnet_lite0"
    image_size: tuple[int, int] = (256, 256)
    adapt_cls_features: bool = False
    stop_grad: bool = True
    noise_std: float | None = None
    noise_std_mode: str | None = None
    perlin_threshold: float | None = None
    perlin_fallback: bool = False
    overlap: bool = False
    noise_on_anomalous: bool = True
    mask_align_corners: bool | None = None
    seg_hidden: int = 1024
    cls_hidden: int = 128
    blur_sigma: float = 4.0
    image_score: str | None = None
    feature_levels: tuple[int, int] | None = None
    memory_pool: int = 8
    memory_max_patches: int = 65536
    anomaly_map: str | None = None

    def __post_init__(self) -> None:
        from supersimplenet.backbones import PRESETS  # noqa: PLC0415 (import cycle: backbones imports this module)

        _check(
            self.backbone in PRESETS, f"model.backbone: unknown backbone {self.backbone!r}; known: {sorted(PRESETS)}"
        )
        self._resolve_backbone_defaults(PRESETS[self.backbone])
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        _check(len(self.image_size) == 2, f"model.image_size must be (height, width), got {self.image_size!r}")
        # Feature maps are H/4 x W/4 and the Perlin lattice needs at least 17 cells per side (docs/design.md §3.7).
        _check(min(self.image_size) >= 68, f"model.image_size must be at least 68 px per side, got {self.image_size}")
        _check(self.noise_std >= 0, f"model.noise_std must be >= 0, got {self.noise_std}")
        _check(
            self.noise_std_mode in NOISE_STD_MODES,
            f"model.noise_std_mode must be one of {NOISE_STD_MODES}, got {self.noise_std_mode!r}",
        )
        _check(0.0 <= self.perlin_threshold, f"model.perlin_threshold must be >= 0, got {self.perlin_threshold}")
        _check(self.blur_sigma > 0, f"model.blur_sigma must be > 0, got {self.blur_sigma}")
        _check(self.seg_hidden > 0 and self.cls_hidden > 0, "model.seg_hidden and model.cls_hidden must be > 0")
        if self.feature_levels is not None:
            levels = self.feature_levels
            if isinstance(levels, str):  # "3,4": how a search space's categorical choice (primitives only) names them
                try:
                    levels = tuple(int(v) for v in levels.replace("x", ",").split(","))
                except ValueError:
                    levels = (levels,)
            levels = tuple(levels)
            _check(
                len(levels) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in levels)
                and 0 <= levels[0] < levels[1],
                f"model.feature_levels must be two increasing feature levels (e.g. [2, 3]), got {levels!r}",
            )
            available = PRESETS[self.backbone].num_levels
            _check(
                levels[1] < available,
                f"model.feature_levels: {self.backbone} has levels 0-{available - 1}, got {levels!r}",
            )
            object.__setattr__(self, "feature_levels", levels)
        _check(
            self.image_score in REPORTED_SCORES,
            f"model.image_score must be one of {REPORTED_SCORES}, got {self.image_score!r}",
        )
        _check(
            isinstance(self.memory_pool, int) and not isinstance(self.memory_pool, bool) and self.memory_pool >= 1,
            f"model.memory_pool must be an integer >= 1, got {self.memory_pool!r}",
        )
        _check(
            isinstance(self.memory_max_patches, int)
            and not isinstance(self.memory_max_patches, bool)
            and self.memory_max_patches >= 1,
            f"model.memory_max_patches must be an integer >= 1, got {self.memory_max_patches!r}",
        )
        if self.anomaly_map is None:
            object.__setattr__(self, "anomaly_map", MEMORY_SCORE if self.image_score == MEMORY_SCORE else "heads")
        _check(
            self.anomaly_map in ANOMALY_MAPS,
            f"model.anomaly_map must be one of {ANOMALY_MAPS}, got {self.anomaly_map!r}",
        )

    @property
    def uses_memory(self) -> bool:
        """Whether the model carries a patch memory: its image score or its anomaly map reads it."""
        return MEMORY_SCORE in (self.image_score, self.anomaly_map)

    def _resolve_backbone_defaults(self, preset: Any) -> None:
        """Fills the fields left None from the backbone preset, the one home of the per-backbone defaults."""
        mode = self.noise_std_mode if self.noise_std_mode is not None else preset.noise_std_mode
        if self.noise_std is None:
            _check(
                mode == preset.noise_std_mode,
                f"model.noise_std is required with model.noise_std_mode {mode!r}: {self.backbone}'s default "
                f"sigma is {preset.noise_std} in mode {preset.noise_std_mode!r}",
            )
            object.__setattr__(self, "noise_std", preset.noise_std)
        object.__setattr__(self, "noise_std_mode", mode)
        if self.perlin_threshold is None:
            object.__setattr__(self, "perlin_threshold", preset.perlin_threshold)
        if self.image_score is None:
            object.__setattr__(self, "image_score", preset.unsupervised_image_score)

    @property
    def feature_size(self) -> tuple[int, int]:
        """Spatial size of the feature maps: twice the first level's map (its stride is 2 ** (level + 1) in every
        preset), i.e. about a quarter of the input with the default levels."""
        from supersimplenet.backbones import get_preset  # noqa: PLC0415 (import cycle: backbones imports this module)

        first = (self.feature_levels or get_preset(self.backbone).out_indices)[0]
        stride = 2 ** (first + 1)
        height, width = self.image_size
        return (2 * -(-height // stride), 2 * -(-width // stride))

    @property
    def resolved_mask_align_corners(self) -> bool:
        if self.mask_align_corners is not None:
            return self.mask_align_corners
        return not self.adapt_cls_features


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (docs/design.md §5). Defaults are the paper's except the epoch count.

    `precision` ("fp32" or "bf16", `TRAIN_PRECISIONS`) is the compute precision of the trainable layers; see
    `supersimplenet.train.train_step`. bf16 needs hardware with native bfloat16 to be faster (AVX-512 BF16 or AMX
    CPUs, Ampere-or-newer GPUs); QUALITY.md and BENCHMARKS.md have its measured speed and accuracy.

    `feature_cache_mib` bounds the memory of the training feature cache (`supersimplenet.feature_cache`: the frozen
    backbone runs once per training item, not once per epoch); 0 turns it off.
    """

    epochs: int = 300
    batch_size: int = 32
    seed: int = 42
    supervision: str = "unsupervised"
    mask_ratio: float = 1.0
    lr_adaptor: float = 1e-4
    weight_decay_adaptor: float = 1e-2
    lr_heads: float = 2e-4
    weight_decay_heads: float = 1e-5
    milestones: tuple[float, float] = (0.8, 0.9)
    lr_gamma: float = 0.4
    clip_grad_norm: float | None = None
    flips: bool | None = None
    dilate: int | None = None
    dt_weight: float = 3.0
    dt_power: float = 2.0
    num_workers: int = 0
    eval_every: int = 0
    deterministic: bool = True
    precision: str = "fp32"
    feature_cache_mib: int = 4096

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(
            self.supervision in SUPERVISION_REGIMES,
            f"train.supervision must be one of {SUPERVISION_REGIMES}, got {self.supervision!r}",
        )
        _check(0.0 <= self.mask_ratio <= 1.0, f"train.mask_ratio must be in [0, 1], got {self.mask_ratio}")
        _check(self.lr_adaptor > 0 and self.lr_heads > 0, "train.lr_adaptor and train.lr_heads must be > 0")
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        _check(
            all(0 < m <= 1 for m in self.milestones), f"train.milestones are fractions in (0, 1], got {self.milestones}"
        )
        _check(
            self.dilate is None or (self.dilate >= 1 and self.dilate % 2 == 1),
            f"train.dilate must be an odd kernel size, got {self.dilate}",
        )
        _check(self.num_workers >= 0, f"train.num_workers must be >= 0, got {self.num_workers}")
        _check(
            isinstance(self.feature_cache_mib, int) and self.feature_cache_mib >= 0,
            f"train.feature_cache_mib must be an int >= 0 (0: off), got {self.feature_cache_mib!r}",
        )
        _check(
            self.precision in TRAIN_PRECISIONS,
            f"train.precision must be one of {TRAIN_PRECISIONS}, got {self.precision!r}",
        )

    @property
    def supervised(self) -> bool:
        """Any regime that uses labelled defects (weak, mixed or full)."""
        return self.supervision != "unsupervised"

    @property
    def resolved_clip_grad_norm(self) -> float | None:
        if self.clip_grad_norm is not None:
            return self.clip_grad_norm if self.clip_grad_norm > 0 else None
        return 1.0 if self.supervised else None

    @property
    def resolved_flips(self) -> bool:
        return self.supervised if self.flips is None else self.flips

    @property
    def resolved_dilate(self) -> int:
        """Kernel of the GT-mask dilation; 1 means none. JIMS dilates 7x7 in supervised training."""
        if self.dilate is not None:
            return self.dilate
        return 7 if self.supervised else 1

    def milestone_epochs(self) -> list[int]:
        return [int(m * self.epochs) for m in self.milestones]


def from_dict(cls: type[T], values: Mapping[str, Any] | None, *, section: str = "") -> T:
    """Builds a config dataclass from a mapping, rejecting unknown keys by name."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        prefix = f"{section}." if section else ""
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; known: {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as error:  # wrong value types surface as TypeError inside __post_init__
        raise ConfigError(f"{section or cls.__name__}: {error}") from error


def to_dict(config: Any) -> dict[str, Any]:
    """Plain, YAML- and JSON-friendly dict of a config dataclass (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def recommended_model_config(backbone: str, *, supervision: str = "unsupervised", **overrides: Any) -> ModelConfig:
    """The recommended settings per backbone and supervision regime.

    * sigma, its mode, the Perlin threshold and the unsupervised image score: the backbone preset's
      (`supersimplenet.backbones.BackbonePreset`), which `ModelConfig` resolves itself.
    * Supervised regimes (weak, mixed, full): the classification loss reaches the segmentation head
      (`stop_grad` False, the paper's supervised setting) and the head's score, which sees real labels.

    `overrides` whose value is None are ignored, so optional command-line flags can be passed straight through.
    """
    return ModelConfig(
        backbone=backbone,
        **{**regime_model_defaults(supervision), **{k: v for k, v in overrides.items() if v is not None}},
    )


def regime_model_defaults(supervision: str) -> dict[str, Any]:
    """The `ModelConfig` fields a supervision regime decides (stop_grad and, when supervised, the head's score)."""
    _check(
        supervision in SUPERVISION_REGIMES,
        f"train.supervision must be one of {SUPERVISION_REGIMES}, got {supervision!r}",
    )
    supervised = supervision != "unsupervised"
    return {"stop_grad": not supervised, **({"image_score": "head"} if supervised else {})}


__all__ = [
    "ConfigError",
    "ModelConfig",
    "TrainConfig",
    "SUPERVISION_REGIMES",
    "from_dict",
    "recommended_model_config",
    "regime_model_defaults",
    "to_dict",
]
