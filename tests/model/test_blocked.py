"""The segmentation head's blocked training path (supersimplenet.blocked) against its layers."""

import copy

import pytest
import torch

from supersimplenet import blocked
from supersimplenet.model import SegmentationHead


def _head(seed: int = 0, channels: int = 24) -> SegmentationHead:
    torch.manual_seed(seed)
    head = SegmentationHead(channels=channels, hidden=64).train()
    for layer in head.modules():
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.xavier_normal_(layer.weight)
    with torch.no_grad():  # a trained-looking BatchNorm: gamma of both signs, beta off zero
        head.layers[1].weight.copy_(torch.linspace(-1.5, 2.0, 64))
        head.layers[1].bias.copy_(torch.linspace(-0.5, 0.7, 64))
    return head


def _step(head, features, *, use_blocked, dtype=torch.float64, steps=1):
    """Runs `steps` forward/backward passes (a position-dependent loss, so no gradient is trivially uniform)."""
    head = copy.deepcopy(head).to(dtype)
    head.blocked = use_blocked
    for _ in range(steps):
        head.zero_grad(set_to_none=True)
        x = features.to(dtype).clone().requires_grad_()
        y = head(x)
        weights = torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)
        (torch.sigmoid(y) * weights).sum().backward()
    grads = {name: p.grad for name, p in head.named_parameters()}
    norm = head.layers[1]
    return y.detach(), x.grad, grads, (norm.running_mean, norm.running_var, int(norm.num_batches_tracked))


def _rel(a, b):
    return float((a.detach().double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# 2 images of 20 x 30 positions: 600 per image, so the blocks of 512 end with a partial one
FEATURES = torch.randn(2, 24, 20, 30, generator=torch.Generator().manual_seed(3)) * 0.7 + 0.4


def test_the_blocked_path_computes_what_the_layers_compute_in_float64():
    ref = _step(_head(), FEATURES, use_blocked=False, steps=2)
    got = _step(_head(), FEATURES, use_blocked=True, steps=2)
    assert _rel(got[0], ref[0]) < 1e-10 and _rel(got[1], ref[1]) < 1e-10
    assert torch.count_nonzero(got[2]["layers.0.bias"]) == 0  # b1 cancels in training-mode BatchNorm
    assert ref[2]["layers.0.bias"].abs().max() < 1e-10
    for name in ("layers.0.weight", "layers.1.weight", "layers.1.bias", "layers.3.weight"):
        assert _rel(got[2][name], ref[2][name]) < 1e-10, name
    assert _rel(got[3][0], ref[3][0]) < 1e-12 and _rel(got[3][1], ref[3][1]) < 1e-12  # running statistics
    assert got[3][2] == ref[3][2] == 2


def test_in_float32_the_blocked_path_is_as_close_to_the_exact_result_as_the_layers_are():
    truth = _step(_head(), FEATURES, use_blocked=False)
    layers = _step(_head(), FEATURES, use_blocked=False, dtype=torch.float32)
    fast = _step(_head(), FEATURES, use_blocked=True, dtype=torch.float32)
    for index in (0, 1):
        assert _rel(fast[index], truth[index]) < max(10 * _rel(layers[index], truth[index]), 1e-6)
    for name in ("layers.0.weight", "layers.1.weight", "layers.1.bias", "layers.3.weight"):
        assert _rel(fast[2][name], truth[2][name]) < max(10 * _rel(layers[2][name], truth[2][name]), 1e-6), name


def test_under_bf16_autocast_the_blocked_path_stays_close_and_keeps_float32_gradients():
    head = _head()
    exact = _step(head, FEATURES, use_blocked=False, dtype=torch.float32)
    head = copy.deepcopy(head)
    x = FEATURES.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = head(x)
    weights = torch.linspace(-1, 1, y.numel()).view_as(y)
    (torch.sigmoid(y.float()) * weights).sum().backward()
    assert x.grad.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in head.parameters())
    assert _rel(y, exact[0]) < 0.03
    cosine = torch.nn.functional.cosine_similarity(x.grad.flatten(), exact[1].flatten(), dim=0)
    assert cosine > 0.99
    for name, p in head.named_parameters():
        if name != "layers.0.bias":
            assert torch.nn.functional.cosine_similarity(p.grad.flatten(), exact[2][name].flatten(), dim=0) > 0.99


def test_the_blocked_path_applies_only_to_cpu_training_with_a_plain_batchnorm():
    head = _head()
    norm = head.layers[1]
    assert blocked.applies(FEATURES, norm)
    assert not blocked.applies(FEATURES, copy.deepcopy(norm).eval())
    assert not blocked.applies(FEATURES, torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(norm)))
    cumulative = copy.deepcopy(norm)
    cumulative.momentum = None
    assert not blocked.applies(FEATURES, cumulative)
    if torch.cuda.is_available():
        assert not blocked.applies(FEATURES.cuda(), norm)


def test_the_model_trains_through_the_blocked_path_of_pairs_on_cpu(monkeypatch):
    from supersimplenet.config import ModelConfig
    from supersimplenet.model import build_model

    calls = []
    original = blocked.segmentation_head_of_pairs
    monkeypatch.setattr(blocked, "segmentation_head_of_pairs", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = build_model(ModelConfig(image_size=(72, 72), image_score="map_top1")).train()
    out = model(torch.rand(2, 3, 72, 72), torch.zeros(2, 1, 72, 72), torch.zeros(2))
    assert calls == [1] and out.map_logits.shape == (4, 1, 18, 18)
    model.eval()
    model(torch.rand(2, 3, 72, 72))
    assert calls == [1]  # inference keeps the layers (and the fast path, supersimplenet.fast)


@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_running_statistics_follow_batchnorm_with_its_momentum(momentum):
    head = _head()
    head.layers[1].momentum = momentum
    ref = _step(head, FEATURES, use_blocked=False, steps=3)
    got = _step(head, FEATURES, use_blocked=True, steps=3)
    assert _rel(got[3][0], ref[3][0]) < 1e-12 and _rel(got[3][1], ref[3][1]) < 1e-12


def _twin_step(head, clean, perturbed, *, use_twins, dtype=torch.float64):
    """One step on a duplicated batch [clean, clean] + noise where `perturbed` (formed and run through the layers,
    or `forward_pairs`): the gradient that reaches the clean features, the parameters', the map and running
    statistics."""
    head = copy.deepcopy(head).to(dtype)
    x = clean.to(dtype).clone().requires_grad_()
    noise = torch.randn(perturbed.shape[0], *clean.shape[1:], generator=torch.Generator().manual_seed(5))
    noise = (noise.to(dtype) * perturbed.to(dtype)).view(2, *clean.shape)
    if use_twins:
        y = head.forward_pairs(x, noise_values(noise, perturbed), perturbed)
    else:
        y = head((noise + x.unsqueeze(0)).flatten(0, 1))
    weights = torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)
    (torch.sigmoid(y) * weights).sum().backward()
    norm = head.layers[1]
    grads = {name: p.grad for name, p in head.named_parameters()}
    return y.detach(), x.grad, grads, (norm.running_mean, norm.running_var, int(norm.num_batches_tracked))


def noise_values(noise, perturbed):
    """The values [S, C] of dense noise [2, B, C, h, w] at the nonzero positions of `perturbed`, in (copy, row,
    column) order: what the training step hands the heads."""
    count, channels, height, width = noise.flatten(0, 1).shape
    where = torch.nonzero(perturbed.reshape(count, height * width))
    return noise.reshape(count, channels, height * width)[where[:, 0], :, where[:, 1]]


def _perturbed(count, height, width, seed=7):
    """Masks like training's: each copy perturbed with probability 1/2, inside a random region."""
    gen = torch.Generator().manual_seed(seed)
    keep = (torch.rand(count, 1, 1, 1, generator=gen) < 0.5).float()
    return (torch.rand(count, 1, height, width, generator=gen) < 0.3).float() * keep


@pytest.mark.parametrize("seed", [7, 8])
@pytest.mark.parametrize("channels", [24, 40], ids=["blocks", "wide-features-on-layers"])
def test_twin_positions_computed_once_give_the_layers_outputs_gradients_and_statistics(seed, channels):
    """Thin features run in blocks; wide ones (2C > hidden, WRN50's case) on the layers' own operations
    (`_layers_of_columns`): both compute each twin position once and match the layers on the formed batch."""
    wide = torch.randn(2, channels, *FEATURES.shape[-2:], generator=torch.Generator().manual_seed(4))
    clean = FEATURES if channels == FEATURES.shape[1] else wide
    perturbed = _perturbed(2 * clean.shape[0], *clean.shape[-2:], seed=seed)
    _, _, split = blocked.twin_columns(perturbed)
    assert 0 < split < clean[:, 0].numel()  # some positions are twins, some not
    norm = _head(channels=channels).layers[1]
    assert blocked.pairs_apply(clean, norm) and blocked.applies(clean, norm) == (channels == 24)
    ref = _twin_step(_head(channels=channels), clean, perturbed, use_twins=False)
    got = _twin_step(_head(channels=channels), clean, perturbed, use_twins=True)
    assert _rel(got[0], ref[0]) < 1e-10 and _rel(got[1], ref[1]) < 1e-10
    for name in ("layers.0.weight", "layers.1.weight", "layers.1.bias", "layers.3.weight"):
        assert _rel(got[2][name], ref[2][name]) < 1e-10, name
    assert _rel(got[3][0], ref[3][0]) < 1e-12 and _rel(got[3][1], ref[3][1]) < 1e-12
    assert got[3][2] == ref[3][2] == 1


def test_twin_columns_compute_each_shared_position_once_and_every_perturbed_copy_on_its_own():
    perturbed = torch.tensor([[0, 0, 1], [1, 0, 0]], dtype=torch.float32).view(2, 1, 1, 3)  # B = 1, 3 positions
    select, inverse, split = blocked.twin_columns(perturbed)
    # position 1: twins; 0: only the first copy is clean; 2: only the second; plus the two perturbed copies
    assert split == 1 and sorted(select.tolist()) == [0, 1, 2, 3, 5] and select[0] == 1
    assert inverse[1] == inverse[4] == 0  # both copies of the twin read the one computed position
    assert sorted(inverse.tolist()) == [0, 0, 1, 2, 3, 4] and torch.equal(select[inverse[select]], select)
