"""The patch memory ("memory" image score): built from normal images, scored alike by every path, saved whole."""

import pytest
import torch

from supersimplenet.backbones import get_preset, load_backbone_weights
from supersimplenet.checkpoint import CheckpointError, checkpoint_dict, model_from_checkpoint_dict
from supersimplenet.config import ConfigError, ModelConfig, TrainConfig
from supersimplenet.export import export_onnx
from supersimplenet.inference import inference_model
from supersimplenet.layouts import read_layout
from supersimplenet.loading import DefectDataset
from supersimplenet.memory import MemoryNotBuilt, PatchMemory
from supersimplenet.metrics import compute_metrics, image_scores
from supersimplenet.model import build_model
from supersimplenet.frozen import build_memory
from supersimplenet.train import eval_loader, fit, predict

WELD_SIZE = (256, 128)


def _weld_memory_model(weld_root, **fields):
    samples = read_layout(weld_root, "mvtec", split_file="jobs/splits/battery_weld.txt")
    config = ModelConfig(backbone="efficientnet_lite0", image_size=WELD_SIZE, image_score="memory", **fields)
    model = build_model(config)
    load_backbone_weights(model.feature_extractor.backbone, config.backbone, "default")
    model.eval()
    patches = build_memory(model, root=weld_root, samples=samples, device=torch.device("cpu"), seed=0)
    return model, samples, patches


def _test_set(root, samples, config):
    preset = get_preset(config.backbone)
    test = [s for s in samples if s.split == "test"]
    return DefectDataset(root=root, samples=test, image_size=config.image_size, mean=preset.mean, std=preset.std)


def test_the_memory_of_real_weld_seams_ranks_the_test_split_as_measured_and_every_path_scores_alike(weld_root):
    model, samples, patches = _weld_memory_model(weld_root)
    # 36 normal training seams x an 8 x 4 grid of patches (256 x 128 pixels, stride 4, pooled 8 x 8)
    assert patches == 36 * 8 * 4 and model.memory.bank.dtype == torch.float16
    test_set = _test_set(weld_root, samples, model.config)
    predictions = predict(model, eval_loader(test_set, batch_size=16), device=torch.device("cpu"))
    # QUALITY.md, "A memory of normal patches": 0.989 on this split, deterministic (frozen weights, no training)
    assert compute_metrics(scores=predictions.scores, labels=predictions.labels)["image_auroc"] == pytest.approx(
        0.989, abs=0.004
    )
    assert (predictions.scores == predictions.memory_scores).all()
    assert ((predictions.scores >= 0) & (predictions.scores < 1)).all()
    assert set(predictions.score_metrics()) >= {"image_auroc_memory", "image_auroc_map_top1", "ap_det_memory"}
    # the reported map is the memory's (QUALITY.md, "The patch memory's anomaly map": weld P-AUROC 0.914, AUPRO
    # 0.713 at pool 8, against the trained heads' 0.764 and 0.432); the heads' map rides beside it and is what
    # the map-based image scores read
    assert model.config.anomaly_map == "memory" and predictions.head_maps.shape == predictions.maps.shape
    pixel = compute_metrics(
        scores=predictions.scores, labels=predictions.labels, maps=predictions.maps, masks=predictions.masks
    )
    assert pixel["pixel_auroc"] == pytest.approx(0.914, abs=0.004) and pixel["aupro"] == pytest.approx(0.713, abs=0.01)
    heads = predictions.heads_pixel_metrics()  # evaluation reports the heads' map beside it
    assert set(heads) == {"pixel_auroc_heads", "aupro_heads", "ap_loc_heads"}
    assert heads["pixel_auroc_heads"] != pixel["pixel_auroc"]
    from_heads = image_scores(predictions.head_scores, predictions.head_maps)["map_top1"]
    assert predictions.score_metrics()["image_auroc_map_top1"] == pytest.approx(
        compute_metrics(scores=from_heads, labels=predictions.labels)["image_auroc"]
    )
    images = torch.stack([test_set[i]["image"] for i in range(6)])
    with torch.no_grad():
        reference = model(images)
    fast = inference_model(model)(images)
    assert torch.allclose(fast.score, reference.score, atol=1e-5)
    assert torch.allclose(fast.anomaly_map, reference.anomaly_map, atol=1e-5)
    assert torch.allclose(fast.head_map, reference.head_map, atol=1e-4)
    assert ((reference.anomaly_map >= 0) & (reference.anomaly_map < 1)).all()


def test_a_checkpoint_holds_the_whole_memory_and_one_without_it_is_refused(weld_root):
    model, samples, _ = _weld_memory_model(weld_root)
    payload = checkpoint_dict(model)
    assert payload["state_dict"]["memory.bank"].shape == (36 * 8 * 4, 152)
    loaded = model_from_checkpoint_dict(payload)
    assert torch.equal(loaded.memory.bank, model.memory.bank)
    images = torch.stack([_test_set(weld_root, samples, model.config)[i]["image"] for i in range(3)])
    with torch.no_grad():
        assert torch.equal(loaded(images).score, model(images).score)
    del payload["state_dict"]["memory.bank"]
    with pytest.raises(CheckpointError, match=r"memory\.bank"):
        model_from_checkpoint_dict(payload)


def test_a_memory_model_saved_before_the_memory_map_existed_still_reports_the_heads_map(weld_root):
    model, samples, _ = _weld_memory_model(weld_root)
    payload = checkpoint_dict(model)
    del payload["model_config"]["anomaly_map"]  # the checkpoints of 2026-12-06 and 12-07 have no such field
    old = model_from_checkpoint_dict(payload)
    assert old.config.anomaly_map == "heads" and old.config.image_score == "memory"
    images = torch.stack([_test_set(weld_root, samples, model.config)[i]["image"] for i in range(2)])
    with torch.no_grad():
        now, before = model(images), old(images)
    assert before.head_map is None and torch.equal(before.anomaly_map, now.head_map)
    assert torch.equal(before.score, now.score)
    payload["model_config"] = None
    with pytest.raises(CheckpointError, match="model_config"):
        model_from_checkpoint_dict(payload)


def test_the_anomaly_map_follows_the_image_score_unless_it_is_named():
    assert ModelConfig(image_score="memory").anomaly_map == "memory"
    assert ModelConfig(image_score="map_top1").anomaly_map == "heads"
    assert ModelConfig(image_score="memory", anomaly_map="heads").uses_memory
    named = ModelConfig(image_size=(128, 128), image_score="head", anomaly_map="memory")
    assert named.uses_memory and build_model(named).memory is not None
    assert not ModelConfig(image_score="head").uses_memory


def test_the_memory_is_saved_but_not_a_buffer_that_ddp_would_broadcast_every_step():
    memory = PatchMemory(channels=4, pool=2, max_patches=100)
    memory.build([torch.randn(3, 4, 8, 8)], seed=0)
    assert "bank" not in dict(memory.named_buffers()) and "bank" in memory.state_dict()
    assert memory.bank.shape == (3 * 4 * 4, 4)
    moved = memory.to(torch.float64)  # a cast of the module keeps the bank's float16 storage
    assert moved.bank.dtype == torch.float16 and moved.center.dtype == torch.float64


def test_a_larger_memory_keeps_a_seeded_subset_of_max_patches():
    features = [torch.randn(10, 4, 8, 8, generator=torch.Generator().manual_seed(1))]
    banks = []
    for seed in (0, 0, 1):
        memory = PatchMemory(channels=4, pool=1, max_patches=50)
        assert memory.build(features, seed=seed) == 50
        banks.append(memory.bank)
    assert torch.equal(banks[0], banks[1]) and not torch.equal(banks[0], banks[2])


def test_a_patch_far_from_every_normal_patch_scores_higher_than_a_normal_one():
    normal = torch.randn(20, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    memory = PatchMemory(channels=4, pool=2, max_patches=10_000)
    memory.build([normal], seed=0)
    odd = normal[:2].clone()
    odd[1, :, 0:2, 0:2] += 25.0  # one patch of the second image, far outside the normal patches
    scores = memory.score(odd)
    assert scores[1] > scores[0] + 0.2 and 0 <= scores[0] < scores[1] < 1
    maps = memory.anomaly_map(memory.distances(odd), (32, 32))  # 4 x 4 patches of 8 x 8 pixels
    assert maps.shape == (2, 1, 32, 32) and maps[1, 0, :8, :8].mean() > maps[1, 0, 16:, 16:].mean() + 0.2
    assert maps[1].amax() == pytest.approx(float(scores[1]), abs=0.05)  # one odd patch: its distance is the top 1 %


def test_a_memory_model_without_its_memory_says_how_it_is_built():
    model = build_model(ModelConfig(image_size=(128, 128), image_score="memory")).eval()
    with pytest.raises(MemoryNotBuilt, match="built from the normal training images"):
        with torch.no_grad():
            model(torch.zeros(1, 3, 128, 128))


def test_models_with_other_scores_carry_no_memory_and_build_memory_leaves_them_alone(weld_root):
    model = build_model(ModelConfig(image_size=(128, 128), image_score="map_top1"))
    assert model.memory is None and not any(k.startswith("memory.") for k in model.state_dict())
    assert build_memory(model, root=weld_root, samples=[], device=torch.device("cpu"), seed=0) == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"image_score": "memmory"}, "model.image_score must be one of"),
        ({"image_score": "memory", "memory_pool": 0}, "model.memory_pool must be an integer >= 1"),
        ({"image_score": "memory", "memory_pool": True}, "model.memory_pool must be an integer >= 1"),
        ({"image_score": "memory", "memory_max_patches": 0}, "model.memory_max_patches must be an integer >= 1"),
        ({"anomaly_map": "patches"}, "model.anomaly_map must be one of"),
    ],
)
def test_memory_settings_are_validated_by_name(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**fields)


def test_onnx_export_of_a_memory_model_is_refused_with_the_reason(tmp_path):
    model = build_model(ModelConfig(image_size=(128, 128), image_score="memory"))
    with pytest.raises(ValueError, match="not supported"):
        export_onnx(model, tmp_path / "m.onnx")


def test_fit_builds_the_memory_before_training_and_reports_its_score(weld_root):
    samples = read_layout(weld_root, "mvtec", split_file="jobs/splits/battery_weld.txt")
    result = fit(
        data_root=weld_root,
        samples=samples,
        model_config=ModelConfig(image_size=(160, 80), image_score="memory"),
        train_config=TrainConfig(epochs=1, batch_size=16),
        progress=False,
    )
    assert result.model.memory.built and result.model.memory.bank.shape[0] == 36 * 5 * 2  # 40 x 20 features
    # one epoch of the heads: the reported score is the memory's, already strong at this small size
    assert result.test_metrics["image_auroc"] > 0.9, result.test_metrics
