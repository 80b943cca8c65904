"""Optimisation setup, determinism, and real short training runs on real defect images."""

import json

import pytest
import torch

from supersimplenet.config import ModelConfig, TrainConfig
from supersimplenet.layouts import read_layout
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


def _tiny_fit(weld_root, seed, **settings):
    samples = read_layout(weld_root)
    train = [s for s in samples if s.split == "train"][:6]
    test = [s for s in samples if s.split == "test"][::12]
    return fit(
        data_root=weld_root,
        samples=train + test,
        model_config=ModelConfig(image_size=(128, 128), noise_std_mode="relative", noise_std=0.5),
        train_config=TrainConfig(epochs=2, batch_size=3, seed=seed, **settings),
        progress=False,
    )


def test_training_with_the_feature_cache_reaches_the_model_of_training_from_the_images(weld_root):
    cached, plain = _tiny_fit(weld_root, 4, feature_cache_mib=64), _tiny_fit(weld_root, 4, feature_cache_mib=0)
    for row_cached, row_plain in zip(cached.history, plain.history, strict=True):
        assert row_cached["loss"] == pytest.approx(row_plain["loss"], rel=1e-4)
    assert cached.test_metrics["image_auroc"] == pytest.approx(plain.test_metrics["image_auroc"], abs=1e-6)
    plain_state = plain.model.state_dict()
    for name, value in cached.model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, plain_state[name], rtol=1e-3, atol=1e-5, msg=name)


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

    summary = main(
        [
            "--data",
            str(weld_root),
            "--epochs",
            "10",
            "--batch-size",
            "16",
            "--image-size",
            "160",
            "80",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
        ]
    )
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
        data_root=mpdd_root,
        samples=positives + negatives + test,
        model_config=ModelConfig(
            image_size=(128, 128), noise_std_mode="relative", noise_std=4.0, perlin_threshold=0.6, stop_grad=False
        ),
        train_config=TrainConfig(epochs=3, batch_size=16, seed=456654, supervision="supervised"),
        progress=False,
    )
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert result.test_metrics["image_auroc"] > 0.7, result.test_metrics
    assert result.test_metrics["pixel_auroc"] > 0.7, result.test_metrics


def _one_step_gradients(weld_root, precision, *, blocked=True):
    """Losses and gradients of one training step on 4 real weld seams from a fixed initial state (`blocked`: the
    heads' training fast path: the segmentation head's blocks and pairs, the classification head's twin images or,
    for wide features, its decomposed convolution; else both heads' layers on the formed duplicated batch)."""
    from supersimplenet.backbones import get_preset, load_backbone_weights
    from supersimplenet.loading import DefectDataset
    from supersimplenet.train import train_step

    config = ModelConfig(image_size=(128, 72), noise_std_mode="relative", noise_std=4.0)
    torch.manual_seed(0)
    model = build_model(config)
    model.segmentation_head.blocked = blocked
    model.classification_head.fast = blocked
    load_backbone_weights(model.feature_extractor.backbone, config.backbone, "default")
    preset = get_preset(config.backbone)
    samples = [s for s in read_layout(weld_root) if s.split == "train"][:4]
    dataset = DefectDataset(
        root=weld_root, samples=samples, image_size=config.image_size, mean=preset.mean, std=preset.std
    )
    batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    cfg = TrainConfig(batch_size=4, precision=precision)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves the weights as they were
    torch.manual_seed(1)  # the same Perlin masks and noise in both precisions
    losses = train_step(model, batch, optimizer, cfg, device=torch.device("cpu"))
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return losses, grads


def test_a_bf16_training_step_matches_the_fp32_step_on_real_images(weld_root):
    """bf16 autocast changes rounding only: the same losses within 2 % and gradients pointing the same way, while
    weights and gradients stay float32."""
    fp32_losses, fp32_grads = _one_step_gradients(weld_root, "fp32")
    bf16_losses, bf16_grads = _one_step_gradients(weld_root, "bf16")
    assert fp32_losses["loss"] > 0.05
    for name in fp32_losses:
        assert bf16_losses[name] == pytest.approx(fp32_losses[name], rel=0.02, abs=1e-3), name
    assert fp32_grads.keys() == bf16_grads.keys() and len(fp32_grads) >= 6
    for name, grad in fp32_grads.items():
        assert bf16_grads[name].dtype == torch.float32
        if grad.norm() < 1e-4:  # the biases of convolutions followed by BatchNorm: zero in exact arithmetic
            assert bf16_grads[name].norm() < 1e-3, name
            continue
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), bf16_grads[name].flatten(), dim=0)
        assert cosine > 0.99, (name, float(cosine))
        assert float((bf16_grads[name] - grad).norm() / grad.norm()) < 0.15, name


@pytest.mark.parametrize("decomposed", [False, True], ids=["thin-features", "decomposed-convolution"])
def test_a_training_step_on_the_fast_path_matches_the_layers_on_real_images(weld_root, monkeypatch, decomposed):
    """The training fast path (supersimplenet.blocked, ClassificationHead.forward_noised) computes the reference
    step: the same losses and every gradient within 1e-4 (relative) in float32; Lite0's features take the
    classification head's thin path, or its decomposed convolution when the threshold is lowered to them."""
    from supersimplenet import model as model_module

    monkeypatch.setattr(model_module, "SPARSE_MIN_CHANNELS", 1 if decomposed else 10**6)
    reference_losses, reference_grads = _one_step_gradients(weld_root, "fp32", blocked=False)
    losses, grads = _one_step_gradients(weld_root, "fp32", blocked=True)
    assert reference_losses["loss"] > 0.05
    for name, value in reference_losses.items():
        assert losses[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert grads.keys() == reference_grads.keys() and len(grads) >= 6
    assert torch.count_nonzero(grads["segmentation_head.layers.0.bias"]) == 0  # exact: b1 cancels in BatchNorm
    for name, grad in reference_grads.items():
        if grad.norm() < 1e-4:  # biases a training-mode BatchNorm cancels: zero in exact arithmetic, rounding here
            assert grads[name].norm() < 1e-4, name
            continue
        assert float((grads[name] - grad).norm() / grad.norm()) < 1e-4, name


def test_the_backbone_stays_float32_inside_a_bf16_autocast(weld_root):
    model = build_model(ModelConfig(image_size=(128, 72))).eval()
    images = torch.rand(2, 3, 128, 72)
    reference = model.feature_extractor(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model.feature_extractor(images)
    assert autocast.dtype == torch.float32 and torch.equal(autocast, reference)


def test_an_unknown_training_precision_is_refused_by_name():
    from supersimplenet.config import ConfigError

    with pytest.raises(ConfigError, match="train.precision"):
        TrainConfig(precision="fp16")
