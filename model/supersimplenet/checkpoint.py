"""Checkpoints: a state_dict plus the config that rebuilds the network, never a pickled module.

Loading needs nothing but this package: the model is rebuilt from its `ModelConfig` (no weights loaded) and the
saved state_dict, backbone included, is applied strictly.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from supersimplenet.config import ModelConfig, from_dict, to_dict
from supersimplenet.model import SuperSimpleNet, build_model

FORMAT = "supersimplenet-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, foreign or does not fit its own config."""


def checkpoint_dict(model: SuperSimpleNet, *, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model_config": to_dict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": dict(metadata or {}),
    }


def save_checkpoint(path: str | Path, model: SuperSimpleNet, *, metadata: dict[str, Any] | None = None) -> Path:
    """Writes atomically (temp file + rename) so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(checkpoint_dict(model, metadata=metadata), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def model_from_checkpoint_dict(payload: dict[str, Any], *, source: str = "checkpoint") -> SuperSimpleNet:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{source}: not a SuperSimpleNet checkpoint (expected format {FORMAT!r})")
    values = payload.get("model_config")
    if not isinstance(values, dict):
        raise CheckpointError(f"{source}: its model_config is missing or not a mapping")
    # saved before `ModelConfig.anomaly_map` existed: such a model reported (and was evaluated on) the heads' map
    values = {"anomaly_map": "heads", **values}
    config = from_dict(ModelConfig, values, section="model")
    model = build_model(config)
    result = model.load_state_dict(payload["state_dict"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{source}: state_dict does not fit its config; missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.eval()


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[SuperSimpleNet, dict]:
    """Returns the model in eval mode and the checkpoint's metadata."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    model = model_from_checkpoint_dict(payload, source=str(path))
    return model.to(map_location), payload.get("metadata", {})
