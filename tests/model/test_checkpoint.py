"""Checkpoints round-trip as state_dict + config and load without the training code."""

import subprocess
import sys

import pytest
import torch

from supersimplenet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from supersimplenet.config import ModelConfig
from supersimplenet.model import build_model


def test_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(image_size=(128, 128), noise_std_mode="relative", noise_std=0.3, image_score="map_top1")
    model = build_model(config).eval()
    model.feature_scale.fill_(2.0)
    path = save_checkpoint(tmp_path / "m.pt", model, metadata={"note": "x"})
    loaded, metadata = load_checkpoint(path)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.score, b.score) and torch.equal(a.anomaly_map, b.anomaly_map)
    assert loaded.config == model.config and float(loaded.feature_scale) == 2.0
    assert metadata == {"note": "x"}
    payload = torch.load(path, weights_only=True)  # plain tensors and primitives only: no pickled module
    assert set(payload) == {"format", "model_config", "state_dict", "metadata"}


def test_loads_in_a_fresh_interpreter_without_training_code(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_size=(128, 128)))  # the Lite0 default: a patch memory, filled here
    model.memory.build([torch.randn(2, model.feature_extractor.channels, 32, 32)], seed=0)
    save_checkpoint(tmp_path / "m.pt", model)
    code = (
        "import sys; sys.modules['supersimplenet.train'] = None\n"
        "from supersimplenet.checkpoint import load_checkpoint\n"
        f"m, _ = load_checkpoint({str(tmp_path / 'm.pt')!r}); print(type(m).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SuperSimpleNet"


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt"):
        load_checkpoint(foreign)
