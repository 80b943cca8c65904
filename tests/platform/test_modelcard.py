"""Model cards (`ssn_platform.modelcard.render_model_card`): what a card says, from known facts."""

from __future__ import annotations

from ssn_platform.modelcard import render_model_card

FACTS = {
    "product": "battery-weld",
    "registered_model": "ssn-battery-weld",
    "version": "7",
    "run_id": "abc123",
    "git_sha": "0123abc",
    "recipe": "r-42",
    "dataset_version": "39fb828b9d4cc5b3",
    "written_at": "2026-12-03T10:00:00",
    "version_tags": {
        "dataset": "s3://ssn/datasets/battery-weld/39fb828b9d4cc5b3/manifest.json",
        "backbone": "efficientnet_lite0",
        "backbone_weights": "sha256:" + "ab" * 32,
        "noise_std": "4.0",
        "noise_std_mode": "relative",
        "effective_noise_std": "0.123",
        "perlin_threshold": "0.2",
        "supervision": "unsupervised",
        "threshold": "0.4375",
        "threshold_method": "false_alarm",
        "threshold_split": "val",
        "threshold_dataset": "s3://ssn/datasets/battery-weld/39fb828b9d4cc5b3/manifest.json",
        "threshold_params": '{"false_alarm_rate":0.01,"n_defective":25,"n_normal":12,"achieved":0.0}',
        "threshold_intervals": '{"confidence":0.95,"false_alarm_rate":[0.0,0.2646]}',
        "threshold_warning": "12 normal images cannot show a 1 % false-alarm rate",
    },
    "params": {
        "model.backbone": "efficientnet_lite0",
        "model.noise_std": "4.0",
        "model.noise_std_mode": "relative",
        "model.perlin_threshold": "0.2",
        "model.image_size": "(256, 128)",
        "model.feature_levels": "(2, 3)",
        "model.image_score": "map_top1",
        "train.epochs": "30",
        "train.batch_size": "16",
        "train.seed": "0",
        "train.precision": "bf16",
        "train.supervision": "unsupervised",
    },
    "metrics": {"test_image_auroc": 0.9641, "test_ap_det": 0.984, "test_aupro": 0.43},
    "breakdown": {
        "metrics": {
            "class.crack.image_auroc": 0.97,
            "class.crack.ap_det": 0.95,
            "class.missing.image_auroc": 0.91,
            "class.missing.ap_det": 0.9,
        }
    },
    "counts": {
        "samples": 144,
        "splits": {
            "train": {"normal": 36, "defective": 0, "segmented": 0},
            "test": {"normal": 23, "defective": 49, "segmented": 49},
        },
    },
}


def test_a_card_states_data_model_quality_per_class_threshold_with_interval_and_limits():
    card = render_model_card(FACTS)
    assert card.startswith("# Model card: ssn-battery-weld version 7\n")
    assert "| test | 23 | 49 | 49 |" in card and "| train | 36 | 0 | 0 |" in card and "144 images" in card
    assert "weights `sha256:" + "ab" * 32 + "`" in card
    assert "the backbone preset's recommended defaults" in card  # 4.0 relative, 0.2: Lite0's preset
    assert "| image_auroc | 0.9641 |" in card and "| crack | 0.9700 | 0.9500 |" in card
    assert "threshold 0.4375, method `false_alarm`" in card and "12 normal, 25 defective" in card
    assert '"false_alarm_rate": [0.0, 0.2646]' in card and "**warning**: 12 normal images" in card
    assert "## Known limits" in card


def test_a_card_says_when_settings_differ_from_the_preset_and_when_no_threshold_exists():
    facts = {
        **FACTS,
        "params": {**FACTS["params"], "model.noise_std": "1.4", "model.perlin_threshold": "0.51"},
        "version_tags": {k: v for k, v in FACTS["version_tags"].items() if not k.startswith("threshold")},
        "breakdown": None,
        "counts": None,
    }
    card = render_model_card(facts)
    assert "differs from the preset's defaults" in card
    assert "Not calibrated yet" in card and "defect class" not in card and "n/a images" in card
