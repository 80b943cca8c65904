"""Optimisation setup, determinism, and real short training runs on real defect images."""

import json

import pytest
import torch

from supersimplenet.config import ModelConfig, TrainConfig
from supersimplenet.data import read_layout
from supersimplenet.model import build_model
from supersimplenet.train import build_optimizer, build_scheduler, fit, main


def test_optimizer_groups_and_lr_milestones():
    model = build_model(ModelConfig(image_size=(128, 128)))
    cfg = TrainConfig(epochs=300)
    optimizer = build_optimizer(model, cfg)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert (groups["adaptor"]["lr"], groups["adaptor"]["weight_decay"]) == (1e-4, 1e-2)
    for head in ("segmentation_head", "classification_head"):
        assert (groups[head]["lr"], groups[head]["weight_decay"]) == (2e-4, 1e-5)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable
    scheduler = build_scheduler(optimizer, cfg)
    lrs = []
    for _ in range(300):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[239] == pytest.approx(1e-4) and lrs[240] == pytest.approx(0.4e-4)
    assert lrs[269] == pytest.approx(0.4e-4) and lrs[270] == pytest.approx(0.16e-4)


def test_supervised_defaults_follow_the_paper():
    sup = TrainConfig(supervision="supervised")
    assert sup.resolved_clip_grad_norm == 1.0 and sup.resolved_dilate == 7 and sup.resolved_flips
    unsup = TrainConfig()
    assert unsup.resolved_clip_grad_norm is None and unsup.resolved_dilate == 1 and not unsup.resolved_flips


def _tiny_fit(weld_root, seed):
    samples = read_layout(weld_root)
    train = [s for s in samples if s.split == "train"][:6]
    test = [s for s in samples if s.split == "test"][::12]
    return fit(
        data_root=weld_root, samples=train + test,
        model_config=ModelConfig(image_size=(128, 128), noise_std_mode="relative", noise_std=0.5),
        train_config=TrainConfig(epochs=2, batch_size=3, seed=seed), progress=False,
    )


def test_seeded_runs_are_identical(weld_root):
    a, b = _tiny_fit(weld_root, 7), _tiny_fit(weld_root, 7)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert a.test_metrics["image_auroc"] == b.test_metrics["image_auroc"]
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


@pytest.mark.heavy
def test_unsupervised_run_on_battery_weld_learns(weld_root, tmp_path):
    """Real training through the CLI: the loss falls and the test split is scored well above chance."""
    from supersimplenet.checkpoint import load_checkpoint

    summary = main([
        "--data", str(weld_root), "--epochs", "10", "--batch-size", "16", "--image-size", "160", "80",
        "--out", str(tmp_path), "--device", "cpu",
    ])
    losses = [row["loss"] for row in summary["history"]]
    assert losses[-1] < 0.3 * losses[0]
    metrics = summary["test_metrics"]
    assert metrics["image_auroc"] > 0.75, metrics
    assert metrics["pixel_auroc"] > 0.6, metrics
    assert json.loads((tmp_path / "metrics.json").read_text())["test_metrics"] == pytest.approx(metrics, nan_ok=True)
    model, metadata = load_checkpoint(tmp_path / "model.pt")
    assert metadata["test_metrics"]["image_auroc"] == pytest.approx(metrics["image_auroc"])
    assert float(model.feature_scale) > 0.1  # relative sigma was calibrated on the training images


@pytest.mark.heavy
def test_supervised_run_on_mpdd_metal_plate_learns(mpdd_root):
    """Supervised (masks, flips, balanced sampler, dt weights, clipping) on a fixed subset of MPDD's train split."""
    samples = read_layout(mpdd_root, "folder")
    train = [s for s in samples if s.split == "train"]
    positives = [s for s in train if s.label == 1][:16]
    negatives = [s for s in train if s.label == 0][:16]
    test = [s for s in samples if s.split == "test"]
    result = fit(
        data_root=mpdd_root, samples=positives + negatives + test,
        model_config=ModelConfig(image_size=(128, 128), noise_std_mode="relative", noise_std=4.0,
                                 perlin_threshold=0.6, stop_grad=False),
        train_config=TrainConfig(epochs=3, batch_size=16, seed=456654, supervision="supervised"),
        progress=False,
    )
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert result.test_metrics["image_auroc"] > 0.7, result.test_metrics
    assert result.test_metrics["pixel_auroc"] > 0.7, result.test_metrics
