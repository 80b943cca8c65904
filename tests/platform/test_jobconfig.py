"""Job configs: YAML -> overrides -> frozen dataclasses, and clear errors before anything starts."""

import pytest

from supersimplenet.config import ConfigError
from ssn_platform.jobconfig import load_job_config
from ssn_platform.services import PlatformError, check_mlflow

REPO_CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[2] / "jobs" / "configs"


@pytest.mark.parametrize("name", ["battery_weld.yaml", "mpdd_metal_plate.yaml", "smoke.yaml"])
def test_committed_configs_load(name):
    job = load_job_config(REPO_CONFIGS / name)
    assert job.registered_model_name == f"ssn-{job.product}"
    assert job.flat_params()["model.backbone"] == "efficientnet_lite0"


def test_overrides_apply_with_yaml_values():
    job = load_job_config(
        REPO_CONFIGS / "battery_weld.yaml",
        ["train.epochs=3", "model.image_size=[128,96]", "scaling.num_workers=1", "run_name=r1"],
    )
    assert job.train.epochs == 3 and job.model.image_size == (128, 96)
    assert job.scaling.num_workers == 1 and job.run_name == "r1"
    assert job.per_worker_batch_size == job.train.batch_size


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("train.epochs=0", "train.epochs"),
        ("model.backbone=resnet9000", "model.backbone"),
        ("train.supervision=semi", "train.supervision"),
        ("model.noise_std=-1", "model.noise_std"),
        ("scaling.num_workers=0", "scaling.num_workers"),
        ("train.learning_rate=1", "train.learning_rate"),
        ("dataset=/local/path", "dataset"),
        ("product=bad/name", "product"),
        ("run_name=../escape", "run_name"),
        ("train.batch_size=1", "train.batch_size"),
        ("epochs", "key=value"),
        ("train.precision=fp16", "train.precision"),
        ("model.feature_levels=[3,2]", "model.feature_levels"),
        ("synthetic_recipe=scratches", "synthetic_recipe"),
    ],
)
def test_invalid_values_name_the_culprit(override, culprit):
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        load_job_config(REPO_CONFIGS / "battery_weld.yaml", [override])


def test_precision_feature_levels_and_the_synthetic_recipe_reach_the_job_and_its_validation_set(weld_root):
    from supersimplenet.layouts import read_layout
    from ssn_platform.worker_data import build_validation_set

    job = load_job_config(
        REPO_CONFIGS / "battery_weld.yaml",
        ["train.precision=bf16", "model.feature_levels=[1,2]", "validation=synthetic", "synthetic_recipe=mixed"],
    )
    assert job.train.precision == "bf16" and job.model.feature_levels == (1, 2)
    normal = [s for s in read_layout(weld_root) if s.label == 0][:3]
    assert build_validation_set(job, weld_root, normal).recipe == "mixed"
    assert (
        build_validation_set(
            load_job_config(REPO_CONFIGS / "battery_weld.yaml", ["validation=synthetic"]), weld_root, normal
        ).recipe
        == "blend"
    )


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_job_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("product: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_job_config(bad)
    wrn = tmp_path / "wrn.yaml"
    wrn.write_text("product: p\ndataset: s3://ssn/datasets/p/latest\nmodel: {backbone: wide_resnet50}\n")
    with pytest.raises(ConfigError, match="weights"):
        load_job_config(wrn)


def test_unreachable_mlflow_is_a_clear_error(unused_tcp_port):
    with pytest.raises(PlatformError, match=f"127.0.0.1:{unused_tcp_port}.*unreachable"):
        check_mlflow(f"http://127.0.0.1:{unused_tcp_port}", timeout=2)


@pytest.fixture
def unused_tcp_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_model_section_naming_only_the_backbone_gets_its_recommended_settings(tmp_path):
    from supersimplenet.config import recommended_model_config

    path = tmp_path / "job.yaml"
    path.write_text("product: p\ndataset: s3://ssn/datasets/p/latest\nmodel: {backbone: efficientnet_lite1}\n")
    job = load_job_config(path)
    assert job.model == recommended_model_config("efficientnet_lite1")
    assert job.model.noise_std_mode == "relative"  # not the paper's absolute 0.015, tuned for WRN50 only
    assert job.model.image_score == "memory" and job.model.stop_grad  # unsupervised (QUALITY.md)
    supervised = load_job_config(path, ["train.supervision=supervised"])
    assert (supervised.model.image_score, supervised.model.stop_grad) == ("head", False)
    explicit = load_job_config(path, ["model.noise_std_mode=absolute", "model.noise_std=0.015"])
    assert (explicit.model.noise_std_mode, explicit.model.noise_std) == ("absolute", 0.015)
    wrn50 = load_job_config(path, ["model.backbone=wide_resnet50", "weights=random"])
    assert wrn50.model.noise_std_mode == "absolute"
