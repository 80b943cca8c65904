"""Backbone weights: the shipped Lite0 weights are real ImageNet weights; bad files fail loudly."""

import pytest
import timm
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from supersimplenet.backbones import (
    WeightsError, build_feature_extractor, lite0_classifier_state_dict, load_backbone_weights,
)

DOG_CLASSES = range(151, 269)  # ImageNet-1k dog breeds
BIRDS_OF_PREY = {21, 22, 23, 24}  # kite, bald eagle, vulture, great grey owl


def _classify(model, path):
    image = Image.open(path).convert("RGB")
    x = TF.to_tensor(TF.center_crop(TF.resize(image, 256), 224))
    with torch.no_grad():
        return int(model(((x - 0.5) / 0.5)[None]).argmax())


def test_lite0_mapping_names_dog_and_bird_of_prey(shared_data):
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(lite0_classifier_state_dict(), strict=True)
    model.eval()
    assert _classify(model, shared_data / "imagenet_photos" / "dog.jpg") in DOG_CLASSES
    assert _classify(model, shared_data / "imagenet_photos" / "eagle.jpg") in BIRDS_OF_PREY


def test_extractor_gets_the_classifier_tensors():
    extractor = build_feature_extractor("efficientnet_lite0")
    provenance = load_backbone_weights(extractor, "efficientnet_lite0", "default")
    assert provenance.startswith("sha256:")
    full = lite0_classifier_state_dict()
    for key, value in extractor.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, full[key]), key


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
