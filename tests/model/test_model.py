"""Golden checks of docs/design.md §10 for the network (shapes, counts, generator, heads, post-processing)."""

import pytest
import torch
import torch.nn.functional as F

from supersimplenet.config import ConfigError, ModelConfig
from supersimplenet.model import GaussianBlur, build_model, downsample_mask, pooled_features


@pytest.fixture(scope="module")
def wrn50():
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="wide_resnet50"))


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="efficientnet_lite0", image_score="map_top1"))  # random heads, no memory


def test_wrn50_parameter_counts(wrn50):
    trainable = sum(p.numel() for p in wrn50.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrn50.parameters())
    backbone = sum(p.numel() for p in wrn50.feature_extractor.parameters())
    assert (trainable, total, backbone) == (8_856_835, 33_719_363, 24_862_528)
    assert sum(p.numel() for p in wrn50.adaptor.parameters()) == 2_360_832
    assert sum(p.numel() for p in wrn50.segmentation_head.parameters()) == 1_576_960
    assert sum(p.numel() for p in wrn50.classification_head.block.parameters()) == 4_918_784
    assert sum(p.numel() for p in wrn50.classification_head.fc.parameters()) == 259


def test_wrn50_shapes_eval_and_train(wrn50):
    x = torch.randn(2, 3, 256, 256)
    raw, adapted = wrn50.eval().features(x)
    assert raw.shape == adapted.shape == (2, 1536, 64, 64)
    out = wrn50(x)
    assert out.anomaly_map.shape == (2, 1, 256, 256) and out.score.shape == (2,)
    assert 0 <= float(out.anomaly_map.min()) and float(out.anomaly_map.max()) <= 1
    wrn50.train()
    out = wrn50(x, torch.zeros(2, 1, 256, 256), torch.zeros(2))
    assert out.map_logits.shape == (4, 1, 64, 64) and out.score_logits.shape == (4,)
    assert out.masks.shape == (4, 1, 64, 64) and out.labels.shape == (4,)
    assert set(out.masks.unique().tolist()) <= {0.0, 1.0} and set(out.labels.unique().tolist()) <= {0.0, 1.0}
    wrn50.eval()


@pytest.mark.parametrize("size, feature", [((640, 232), (160, 58)), ((128, 128), (32, 32))])
def test_feature_sizes_for_other_inputs(lite0, size, feature):
    raw, _ = lite0.eval().features(torch.randn(1, 3, *size))
    assert tuple(raw.shape[-2:]) == feature
    assert ModelConfig(image_size=size, image_score="map_top1").feature_size == feature
    assert lite0(torch.randn(1, 3, *size)).anomaly_map.shape == (1, 1, *size)


@pytest.mark.parametrize("levels, channels, feature", [((1, 2), 24 + 40, (64, 36)), ((3, 4), 112 + 320, (16, 10))])
def test_other_feature_levels_change_channels_and_resolution_and_survive_a_checkpoint(
    tmp_path, levels, channels, feature
):
    from supersimplenet.checkpoint import load_checkpoint, save_checkpoint
    from supersimplenet.inference import inference_model

    torch.manual_seed(0)
    config = ModelConfig(image_size=(128, 72), feature_levels=list(levels), image_score="map_top1")
    assert config.feature_levels == levels and config.feature_size == feature
    model = build_model(config).eval()
    assert model.feature_extractor.channels == model.adaptor.in_channels == channels
    images = torch.rand(2, 3, 128, 72)
    raw, _ = model.features(images)
    assert tuple(raw.shape[-2:]) == feature
    save_checkpoint(tmp_path / "model.pt", model)
    loaded, _ = load_checkpoint(tmp_path / "model.pt")
    assert loaded.config.feature_levels == levels
    expected, again = model(images), inference_model(loaded)(images)
    assert torch.allclose(expected.anomaly_map, again.anomaly_map, atol=1e-5)


def test_feature_levels_may_be_written_as_a_string_for_a_search_spaces_categorical_choice():
    assert ModelConfig(feature_levels="3,4").feature_levels == (3, 4)
    assert ModelConfig(feature_levels="3x4").feature_levels == (3, 4)


@pytest.mark.parametrize(
    "levels, message", [((3, 2), "increasing"), ((2, 5), "levels 0-4"), ((2,), "increasing"), ("a,b", "increasing")]
)
def test_bad_feature_levels_are_refused_by_field_name(levels, message):
    with pytest.raises(ConfigError, match=f"model.feature_levels.*{message}"):
        ModelConfig(feature_levels=levels)


def test_lite0_channels_from_feature_info(lite0):
    assert lite0.feature_extractor.channels == 40 + 112
    assert lite0.adaptor.in_channels == 152


def test_batch_size_one_keeps_batch_dimension(lite0):
    lite0.eval()
    assert lite0(torch.randn(1, 3, 128, 128)).score.shape == (1,)
    lite0.train()
    out = lite0(torch.randn(1, 3, 128, 128), torch.zeros(1, 1, 128, 128), torch.zeros(1))
    assert out.score_logits.shape == (2,)
    lite0.eval()


def _cls_loss_grads(stop_grad: bool):
    torch.manual_seed(1)
    model = build_model(ModelConfig(stop_grad=stop_grad, image_size=(128, 128)))
    model.train()
    out = model(torch.randn(2, 3, 128, 128), torch.zeros(2, 1, 128, 128), torch.zeros(2))
    F.binary_cross_entropy_with_logits(out.score_logits, out.labels).backward()
    return [p.grad for p in model.segmentation_head.parameters()]


def test_stop_gradient_blocks_cls_loss_from_seg_head():
    assert all(g is None or torch.count_nonzero(g) == 0 for g in _cls_loss_grads(True))
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in _cls_loss_grads(False))


def test_backbone_frozen_and_bn_statistics_unchanged(lite0):
    model = build_model(ModelConfig(image_size=(128, 128)))
    before = {k: v.clone() for k, v in model.feature_extractor.state_dict().items()}
    model.train()
    assert not model.feature_extractor.backbone.training
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    out = model(torch.randn(2, 3, 128, 128), torch.zeros(2, 1, 128, 128), torch.zeros(2))
    (out.map_logits.mean() + out.score_logits.mean()).backward()
    opt.step()
    assert all(p.grad is None and not p.requires_grad for p in model.feature_extractor.parameters())
    for key, value in model.feature_extractor.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_blur_kernel_size_and_constant_map():
    blur = GaussianBlur(sigma=4.0)
    assert blur.kernel_size == 25
    assert torch.allclose(blur.kernel_h.sum(), torch.tensor(1.0))
    const = torch.full((1, 1, 40, 30), 0.37)
    assert torch.allclose(blur(const), const, atol=1e-6)


def test_blur_matches_torchvision_gaussian_blur():
    from torchvision.transforms.functional import gaussian_blur

    x = torch.rand(2, 1, 64, 48)
    assert torch.allclose(GaussianBlur(sigma=4.0)(x), gaussian_blur(x, [25, 25], [4.0, 4.0]), atol=1e-6)


def test_pooling_counts_padding():
    # one level of ones, upscaled x2 to 6x6 (still ones), then the 3x3 average counting the zero padding
    pooled = pooled_features([torch.ones(1, 1, 3, 3)])[0, 0]
    assert torch.allclose(pooled[1:-1, 1:-1], torch.ones(4, 4))
    assert torch.allclose(pooled[0, 2], torch.tensor(6 / 9)) and torch.allclose(pooled[2, 0], torch.tensor(6 / 9))
    assert torch.allclose(pooled[0, 0], torch.tensor(4 / 9))


def test_mask_downsampling_block_and_single_pixel():
    mask = torch.zeros(1, 1, 256, 256)
    mask[..., 40:44, 80:84] = 1
    small = downsample_mask(mask, (64, 64), align_corners=False)
    assert small.sum() == 1 and small[0, 0, 10, 20] == 1
    dot = torch.zeros(1, 1, 256, 256)
    dot[..., 101, 77] = 1
    assert downsample_mask(dot, (64, 64), align_corners=False).sum() == 0


class TestGenerator:
    def _inputs(self, seed=0, b=4, c=8, h=32, w=32):
        g = torch.Generator().manual_seed(seed)
        adapted = torch.randn(b, c, h, w, generator=g)
        raw = torch.randn(b, c, h, w, generator=g)
        masks = torch.zeros(b, 1, h, w)
        masks[1, :, 4:12, 4:12] = 1
        labels = torch.tensor([0.0, 1.0, 0.0, 0.0])
        return adapted, raw, masks, labels

    def _model(self, **kw):
        return build_model(ModelConfig(image_size=(128, 128), **kw))

    def test_invariants(self):
        model = self._model(noise_std=0.5)
        adapted, raw, masks, labels = self._inputs()
        for seed in range(10):
            torch.manual_seed(seed)
            a2, r2, m2, y2 = model.add_synthetic_anomalies(adapted, raw, masks, labels)
            base_a, base_r = torch.cat((adapted, adapted)), torch.cat((raw, raw))
            gt = torch.cat((masks, masks))
            noised = (a2 != base_a).any(dim=1, keepdim=True)
            # unchanged wherever the noise mask is zero; JIMS: the same noise on A and F
            assert torch.allclose(a2 - base_a, r2 - base_r, atol=1e-6)
            # overlap=False: never inside a real defect
            assert not (noised & (gt > 0)).any()
            # final mask = GT or noised; label = GT-anomalous or any noised cell
            assert torch.equal(m2, ((gt > 0) | noised).float())
            expected = (torch.cat((labels, labels)) > 0) | noised.flatten(1).any(1)
            assert torch.equal(y2, expected.float())

    def test_the_noise_is_drawn_inside_the_masks_only_in_position_order_and_added_to_both_copies(self):
        """Perlin masks first, then sigma * N(0, 1), C values per masked (copy, row, column) in that order, zero
        outside the mask: a fixed random stream, and A' and F' are cat((A, A)) and cat((F, F)) plus that noise."""
        from supersimplenet.perlin import perlin_masks

        model = self._model(noise_std=0.5, perlin_threshold=0.1)
        adapted, raw, masks, labels = self._inputs()
        for seed in range(3):
            torch.manual_seed(seed)
            a2, r2, _, _ = model.add_synthetic_anomalies(adapted, raw, masks, labels)
            torch.manual_seed(seed)
            gt = torch.cat((masks, masks))
            perlin = perlin_masks(2 * adapted.shape[0], tuple(masks.shape[-2:]), threshold=0.1)
            noise_mask = (1 - gt) * perlin  # the defaults: noise on anomalous images too, never on a real defect
            where = noise_mask[:, 0].nonzero()  # (copy, row, column), row-major
            noise = torch.zeros_like(torch.cat((adapted, adapted)))
            noise[where[:, 0], :, where[:, 1], where[:, 2]] = torch.randn(where.shape[0], adapted.shape[1]) * 0.5
            assert where.shape[0] > 0 and torch.equal(a2, torch.cat((adapted, adapted)) + noise)
            assert torch.equal(r2, torch.cat((raw, raw)) + noise)

    def test_zero_sigma_leaves_features(self):
        model = self._model(noise_std=0.0)
        adapted, raw, masks, labels = self._inputs()
        a2, r2, _, _ = model.add_synthetic_anomalies(adapted, raw, masks, labels)
        assert torch.equal(a2, torch.cat((adapted, adapted))) and torch.equal(r2, torch.cat((raw, raw)))

    def test_noise_std(self):
        model = self._model(noise_std=0.015, perlin_threshold=0.0)
        adapted, raw, masks, labels = self._inputs(b=4, c=64)
        deltas = []
        for seed in range(5):
            torch.manual_seed(seed)
            a2, _, _, _ = model.add_synthetic_anomalies(adapted, raw, masks, labels)
            d = a2 - torch.cat((adapted, adapted))
            deltas.append(d[d != 0])
        std = float(torch.cat(deltas).std())
        assert abs(std - 0.015) < 0.0005

    def test_relative_sigma_scales_with_feature_scale(self):
        model = self._model(noise_std=0.1, noise_std_mode="relative")
        model.feature_scale.fill_(2.5)
        assert model.effective_noise_std == pytest.approx(0.25)


def test_invalid_config_names_field():
    with pytest.raises(ConfigError, match="model.backbone"):
        ModelConfig(backbone="resnet9000")
    with pytest.raises(ConfigError, match="image_size"):
        ModelConfig(image_size=(32, 32))


def test_an_unknown_image_score_is_an_error_naming_the_field():
    with pytest.raises(ConfigError, match="model.image_score.*'max'"):
        ModelConfig(image_score="max")


def test_a_config_naming_only_the_backbone_takes_the_presets_defaults():
    from supersimplenet.backbones import PRESETS
    from supersimplenet.config import recommended_model_config

    for name, preset in PRESETS.items():
        config = ModelConfig(backbone=name)
        assert (config.noise_std, config.noise_std_mode, config.perlin_threshold, config.image_score) == (
            preset.noise_std,
            preset.noise_std_mode,
            preset.perlin_threshold,
            preset.unsupervised_image_score,
        )
        assert config == recommended_model_config(name)
    lite0, wrn50 = ModelConfig(backbone="efficientnet_lite0"), ModelConfig(backbone="wide_resnet50")
    assert (lite0.noise_std, lite0.noise_std_mode, lite0.image_score) == (4.0, "relative", "memory")
    assert (wrn50.noise_std, wrn50.noise_std_mode, wrn50.image_score) == (0.015, "absolute", "head")  # the paper's
    supervised = recommended_model_config("efficientnet_lite0", supervision="supervised")
    assert (supervised.image_score, supervised.stop_grad, supervised.noise_std) == ("head", False, 4.0)


def test_a_sigma_mode_other_than_the_presets_needs_an_explicit_sigma():
    with pytest.raises(ConfigError, match="model.noise_std is required.*'absolute'.*4.0.*'relative'"):
        ModelConfig(backbone="efficientnet_lite0", noise_std_mode="absolute")
    assert ModelConfig(backbone="efficientnet_lite0", noise_std_mode="absolute", noise_std=0.015).noise_std == 0.015


def test_a_stored_config_with_every_field_loads_unchanged():
    from supersimplenet.config import from_dict, to_dict

    stored = {
        **to_dict(ModelConfig(backbone="efficientnet_lite0")),
        "noise_std": 0.015,
        "noise_std_mode": "absolute",
        "image_score": "head",
        "perlin_threshold": 0.5,
    }  # an older checkpoint's explicit paper settings
    config = from_dict(ModelConfig, stored, section="model")
    assert to_dict(config) == stored


@pytest.mark.parametrize("decomposed", [False, True], ids=["twin-images", "decomposed"])
def test_the_noised_classification_head_equals_convolving_the_duplicated_batch(monkeypatch, decomposed):
    """forward_noised gives the same logits, gradients (parameters, and clean features and map where they need
    them) and BatchNorm statistics as `forward` on the formed batch [F, F] + noise, in float64, on both of its
    paths: thin features convolve an image whose copies are both clean once (`twin_images`); wide ones (here
    forced by the threshold) convolve the clean features once, the noise only where it is nonzero and the map
    apart. The batch has such an image, noise touching every border (the zero padding) and a map that carries a
    gradient."""
    from supersimplenet import model as model_module
    from supersimplenet.duplicated import dense_noise, twin_images
    from supersimplenet.model import ClassificationHead

    monkeypatch.setattr(model_module, "SPARSE_MIN_CHANNELS", 1 if decomposed else 10**6)

    gen = torch.Generator().manual_seed(0)
    batch, channels, height, width = 3, 6, 9, 8
    perturbed = torch.zeros(2 * batch, 1, height, width, dtype=torch.float64)
    perturbed[1, :, 0:3, 5:8] = 1  # a corner
    perturbed[3, :, 4:9, 0:2] = 1  # another corner and an edge
    perturbed[4, :, 3:5, 3:6] = 1  # inside; image 0's copies (0 and 3) differ, image 2's (2 and 5) are both clean
    noise = (torch.randn(2 * batch, channels, height, width, generator=gen, dtype=torch.float64) * perturbed).view(
        2, batch, channels, height, width
    )
    where = torch.nonzero(perturbed.reshape(2 * batch, height * width))
    values = noise.reshape(2 * batch, channels, height * width)[where[:, 0], :, where[:, 1]]  # (copy, row, column)
    twins = twin_images(perturbed)  # image 2's copies (2 and 5) are both clean: computed once
    assert twins is not None and twins[0].tolist() == [0, 1, 2, 3, 4] and twins[1].tolist() == [0, 1, 2, 3, 4, 2]
    assert twin_images(torch.ones_like(perturbed)) is None
    weights = torch.randn(2 * batch, generator=gen, dtype=torch.float64)
    source_features = torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64)
    source_maps = torch.randn(batch, 1, height, width, generator=gen, dtype=torch.float64)
    map_change = torch.randn(2 * batch, 1, height, width, generator=gen, dtype=torch.float64) * perturbed
    results = []
    for noised in (False, True):
        torch.manual_seed(1)
        head = ClassificationHead(channels=channels, hidden=5).double().train()
        features, clean_maps = source_features.clone().requires_grad_(), source_maps.clone().requires_grad_()
        maps = torch.cat((clean_maps, clean_maps)) + map_change  # as the segmentation head's: equal where unperturbed
        if noised:
            logits = head.forward_noised(features, values, perturbed, maps)
        else:
            logits = head((noise + features.unsqueeze(0)).flatten(0, 1), maps)
        (logits * weights).sum().backward()
        norm = head.block[1]
        grads = {name: p.grad for name, p in head.named_parameters()}
        grads.update(features=features.grad, maps=clean_maps.grad)
        results.append((logits.detach(), grads, norm.running_mean.clone(), norm.running_var.clone()))
    (ref_logits, ref_grads, ref_mean, ref_var), (logits, grads, mean, var) = results
    assert torch.allclose(logits, ref_logits, rtol=1e-10, atol=1e-12)
    assert torch.allclose(mean, ref_mean, atol=1e-12) and torch.allclose(var, ref_var, atol=1e-12)
    for name, grad in ref_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-9, atol=1e-10), name
    assert torch.equal(dense_noise(values, perturbed, channels), noise)  # the values and their dense noise
