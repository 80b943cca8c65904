"""Optimisation setup, determinism, and real short training runs on real defect images."""

import json

import numpy as np
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
