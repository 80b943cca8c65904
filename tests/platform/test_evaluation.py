"""The evaluation job: seeds of one config (mean ± std, nested MLflow runs) and registered versions.

The pure parts (aggregation, per-class metrics, histogram, tables, seed handling) run without a stack; one heavy
test runs both modes on the real local stack."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from supersimplenet.samples import Sample
from supersimplenet.metrics import compute_metrics
from ssn_platform.evaluation import parse_model_uri, require_test_split, train_seeds
from ssn_platform.evaluation_metrics import (
    aggregate,
    check_seeds,
    markdown,
    per_class_metrics,
    score_histogram,
    summarize,
    sum_histograms,
)
from ssn_platform.services import PlatformError

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "battery_weld.yaml"


def _job_module(monkeypatch):
    """jobs/evaluate.py as a module (its `_bootstrap` import needs jobs/ on sys.path)."""
    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------
# Without a stack
# ---------------------------------------------------------------------------------------------------------
def test_seed_metrics_aggregate_to_the_numpy_mean_and_population_std_of_the_seeds_that_define_them():
    stats = aggregate(
        [{"image_auroc": 0.8, "aupro": math.nan}, {"image_auroc": 0.9, "aupro": 0.5}, {"image_auroc": 1.0}]
    )
    assert stats["image_auroc"]["mean"] == pytest.approx(0.9, abs=1e-12)
    assert stats["image_auroc"]["std"] == pytest.approx(math.sqrt(0.02 / 3), abs=1e-12)  # ddof 0, not 1
    assert stats["image_auroc"]["n"] == 3
    assert stats["aupro"] == {"mean": 0.5, "std": 0.0, "n": 1}
    assert math.isnan(aggregate([{"ap_loc": None}, {"ap_loc": math.nan}])["ap_loc"]["mean"])


def test_each_defect_class_is_scored_against_every_normal_image():
    normal = [0.1, 0.2, 0.3, 0.4]
    scores = normal + [0.35, 0.5] + [0.05, 0.9] + [0.6]
    labels = [0] * 4 + [1] * 5
    types = [""] * 4 + ["crack", "crack", "dent", "dent", ""]  # the last defect has no class
    classes = per_class_metrics(scores, labels, types)
    assert sorted(classes) == ["crack", "dent"]
    # crack: 0.35 beats 3 of 4 normals, 0.5 all 4 -> 7/8; ranked 0.5 (D) 0.4 0.35 (D) -> AP (1 + 2/3) / 2
    assert classes["crack"]["image_auroc"] == pytest.approx(7 / 8)
    assert classes["crack"]["ap_det"] == pytest.approx((1 + 2 / 3) / 2)
    # dent: 0.9 beats all, 0.05 none -> 1/2; ranked 0.9 (D) ... 0.05 (D) sixth -> AP (1 + 2/6) / 2
    assert classes["dent"]["image_auroc"] == pytest.approx(0.5)
    assert classes["dent"]["ap_det"] == pytest.approx((1 + 2 / 6) / 2)
    assert classes["crack"]["n_defective"] == classes["dent"]["n_defective"] == 2


def test_score_histogram_counts_normal_and_defective_scores_in_twenty_bins_over_zero_to_one():
    histogram = score_histogram([0.0, 0.04, 0.051, 0.5, 1.0, -0.2, 0.72, 0.97, 0.999], [0, 0, 0, 0, 0, 0, 1, 1, 1])
    assert len(histogram["edges"]) == 21 and histogram["edges"][0] == 0.0 and histogram["edges"][-1] == 1.0
    normal, defective = np.array(histogram["normal"]), np.array(histogram["defective"])
    assert normal.sum() == 6 and defective.sum() == 3
    assert normal[0] == 3 and normal[1] == 1 and normal[10] == 1 and normal[19] == 1  # -0.2 clips into bin 0
    assert defective[14] == 1 and defective[19] == 2
    pooled = sum_histograms([histogram, histogram])
    assert pooled["normal"] == (2 * normal).tolist() and pooled["defective"] == (2 * defective).tolist()


def _predictions(head, maps, labels, masks=None):
    from supersimplenet.train import Predictions

    maps = np.asarray(maps, dtype=np.float32)
    return Predictions(
        scores=np.asarray(head, dtype=np.float32),
        labels=np.asarray(labels),
        maps=maps,
        masks=np.zeros(maps.shape, np.uint8) if masks is None else np.asarray(masks, np.uint8),
        indices=np.arange(len(labels)),
        head_scores=np.asarray(head, dtype=np.float32),
    )


def test_summary_has_every_image_score_and_pixel_metrics_only_where_masks_exist():
    maps = np.zeros((4, 4, 4))
    maps[0, 0, 0], maps[1, 1, 1], maps[2, 2, 2], maps[3, 3, 3] = 0.9, 0.1, 0.2, 0.8
    head, labels = [0.2, 0.1, 0.7, 0.9], [0, 0, 1, 1]
    samples = [
        Sample(image=f"{i}.png", mask=None, label=y, split="test", segmented=y == 0, defect_type="dent" if y else "")
        for i, y in enumerate(labels)
    ]
    summary = summarize(_predictions(head, maps, labels), samples, image_score="head")
    metrics = summary["metrics"]
    assert metrics["image_auroc"] == metrics["image_auroc_head"] == 1.0
    assert metrics["image_auroc_map_max"] == pytest.approx(0.5)  # map maxima 0.9 0.1 | 0.2 0.8
    assert metrics["image_auroc_combined"] == pytest.approx(0.75)  # means 0.55 0.1 | 0.45 0.85
    assert metrics["class.dent.image_auroc"] == 1.0 and summary["classes"] == {"dent": 2}
    assert "pixel_auroc" not in metrics and summary["n_normal"] == summary["n_defective"] == 2

    masks = np.zeros((4, 4, 4))
    masks[2, 2, 2] = masks[3, 3, 3] = 1
    masked = [
        Sample(
            image=s.image,
            mask=f"m{i}.png" if s.label else None,
            label=s.label,
            split="test",
            segmented=True,
            defect_type=s.defect_type,
        )
        for i, s in enumerate(samples)
    ]
    summary = summarize(_predictions(head, maps, labels, masks), masked, image_score="head")
    assert summary["metrics"]["pixel_auroc"] == pytest.approx(
        compute_metrics(scores=head, labels=labels, maps=maps, masks=masks)["pixel_auroc"]
    )


def test_predictions_of_a_model_reporting_another_score_still_carry_the_heads_scores(tmp_path):
    import dataclasses

    import torch
    from PIL import Image

    from supersimplenet.config import ModelConfig
    from supersimplenet.loading import DefectDataset
    from supersimplenet.model import build_model
    from supersimplenet.train import eval_loader, predict

    rng = np.random.default_rng(0)
    samples = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        samples.append(Sample(image=f"{i}.png", mask=None, label=i % 2, split="test", segmented=i % 2 == 0))
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_size=(72, 72), image_score="map_max")).eval()
    dataset = DefectDataset(root=tmp_path, samples=samples, image_size=(72, 72), mean=(0.5,) * 3, std=(0.25,) * 3)
    device = torch.device("cpu")
    reported = predict(model, eval_loader(dataset, batch_size=2), device=device)
    np.testing.assert_allclose(reported.scores, reported.maps.reshape(4, -1).max(axis=1))
    model.config = dataclasses.replace(model.config, image_score="head")
    head = predict(model, eval_loader(dataset, batch_size=2), device=device).scores
    np.testing.assert_allclose(reported.head_scores, head, atol=1e-7)
    assert not np.allclose(head, reported.scores)


def test_training_test_step_logs_a_breakdown_that_agrees_with_its_test_metrics(tmp_path, monkeypatch):
    import torch

    from supersimplenet.layouts import read_layout
    from supersimplenet.model import build_model
    from ssn_platform.jobconfig import build_job_config
    from ssn_platform.training import finalize_run

    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    from ingest import make_smoke_dataset  # 2 normal and 2 "scratch" test images with masks

    root = make_smoke_dataset(tmp_path / "smoke")
    test = [s for s in read_layout(root, "mvtec") if s.split == "test"]
    job = build_job_config(
        {
            "product": "smoke",
            "dataset": "s3://ssn/datasets/smoke/latest",
            "register": False,
            "overlays": 1,
            "model": {"image_size": [96, 96], "image_score": "combined"},
            "scaling": {"num_workers": 1},
            "train": {"batch_size": 2},
        }
    )
    torch.manual_seed(0)
    logged = tmp_path / "logged"

    class Client:
        def log_artifacts(self, run_id, local_dir, artifact_path):
            shutil.copytree(local_dir, logged / artifact_path)

    tracker = SimpleNamespace(run_id="r", client=Client(), log_metrics=lambda metrics, step: None)
    metrics = finalize_run(
        job,
        build_model(job.model).eval(),
        root=root,
        test_samples=test,
        device=torch.device("cpu"),
        tracker=tracker,
        provenance="random",
    )
    breakdown = json.loads((logged / "evaluation" / "breakdown.json").read_text())
    assert breakdown["image_score"] == "combined" and breakdown["classes"] == {"scratch": 2}
    assert "image_auroc" not in breakdown["metrics"]  # the run logs the overall metrics itself
    # one defect class, every normal image: the class's AUROC is the run's (reported score: the combined one)
    assert breakdown["metrics"]["class.scratch.image_auroc"] == pytest.approx(metrics["image_auroc"])
    for key in (f"{m}_{k}" for m in ("image_auroc", "ap_det") for k in ("head", "map_max", "combined")):
        assert breakdown["metrics"][key] == pytest.approx(metrics[key])  # the run logs them as test_<key> too
    assert sum(breakdown["histogram"]["normal"]) == sum(breakdown["histogram"]["defective"]) == 2


def test_markdown_table_shows_mean_plus_minus_std_and_every_seed():
    runs = [
        {"seed": s, "run_name": f"r-seed{s}", "run_id": str(s), "metrics": {"image_auroc": v}}
        for s, v in ((0, 0.8), (1, 0.9), (2, 1.0))
    ]
    text = markdown(
        {
            "mode": "seeds",
            "title": "r",
            "subject": {"dataset": "s3://ssn/d"},
            "runs": runs,
            "aggregate": aggregate([r["metrics"] for r in runs]),
            "image_score": "head",
            "histogram": score_histogram([0.1, 1.0], [0, 1]),
        }
    )
    assert "| metric | mean ± std | n | seed 0 | seed 1 | seed 2 |" in text
    assert "| image_auroc | 0.9000 ± 0.0816 | 3 | 0.8000 | 0.9000 | 1.0000 |" in text
    assert "| [0.10, 0.15) | 1 | 0 |" in text and "| [0.95, 1.00] | 0 | 1 |" in text
    version = markdown({"mode": "version", "title": "v", "subject": {}, "metrics": {"ap_det": math.nan}})
    assert "| ap_det | n/a |" in version


def test_seeds_must_be_distinct_integers():
    assert check_seeds(["0", 2, "-1"]) == [0, 2, -1]
    with pytest.raises(PlatformError, match="no seeds"):
        check_seeds([])
    with pytest.raises(PlatformError, match="distinct"):
        check_seeds(["1", "1"])
    with pytest.raises(PlatformError, match="integers.*'x'"):
        check_seeds(["0", "x"])


def test_parallel_seed_runs_overlap_and_return_in_seed_order():
    both_running = threading.Barrier(2, timeout=30)  # broken (an error) unless two runs are inside at once

    def train(job):
        both_running.wait()
        return job * 10

    assert train_seeds([1, 2, 3, 4], parallel=2, train=train) == [10, 20, 30, 40]
    assert train_seeds([1, 2], parallel=1, train=lambda job: -job) == [-1, -2]

    def failing(job):
        if job == 2:
            raise RuntimeError("seed 2 failed")
        return job

    with pytest.raises(RuntimeError, match="seed 2 failed"):
        train_seeds([1, 2, 3], parallel=2, train=failing)


def test_model_uris_name_a_version_or_an_alias_and_nothing_else():
    assert parse_model_uri("models:/ssn-weld/3") == ("ssn-weld", "3", None)
    assert parse_model_uri("models:/ssn-weld@champion") == ("ssn-weld", None, "champion")
    with pytest.raises(PlatformError, match="runs:/abc/model"):
        parse_model_uri("runs:/abc/model")


def test_a_dataset_without_a_test_split_is_refused_by_name():
    assert require_test_split([{"split": "test"}, {"split": "train"}], "d") == [{"split": "test"}]
    with pytest.raises(PlatformError, match=r"s3://ssn/datasets/x/v1 has no 'test' split.*\['train', 'val'\]"):
        require_test_split([{"split": "train"}, {"split": "val"}], "s3://ssn/datasets/x/v1")


def test_job_moves_overrides_after_the_seeds_back_and_refuses_a_missing_seed(monkeypatch, capsys):
    job = _job_module(monkeypatch)
    assert job._split_seeds(["0", "1,2", "train.epochs=1"], ["x=1"]) == (["0", "1", "2"], ["train.epochs=1", "x=1"])
    assert job.main(["--config", str(CONFIG), "--seeds", "train.epochs=1"]) == 2
    assert "no seeds" in capsys.readouterr().err
    assert job.main(["--config", str(CONFIG), "--seeds", "0", "--product", "p", "--version", "1"]) == 2
    assert "not both" in capsys.readouterr().err


def test_smoke_test_evaluates_two_seeds_of_the_train_jobs_smoke_run(monkeypatch, capsys):
    import ssn_platform.evaluation
    import ssn_platform.ingest

    job_module = _job_module(monkeypatch)
    uri = "s3://ssn/datasets/smoke/0123456789abcdef/manifest.json"
    monkeypatch.setattr(ssn_platform.ingest, "ingest", lambda root, **kw: SimpleNamespace(uri=uri))
    calls = []

    def evaluate_seeds(job, seeds, **options):
        calls.append((job, seeds))
        return SimpleNamespace(markdown=lambda: "| image_auroc |", summary=lambda: {"mode": "seeds"})

    monkeypatch.setattr(ssn_platform.evaluation, "evaluate_seeds", evaluate_seeds)
    assert job_module.main(["--smoke-test"]) == 0
    ((job, seeds),) = calls
    assert seeds == [0, 1] and job.dataset == uri and job.product == "smoke"
    assert job.train.epochs == 1 and job.model.image_size == (96, 96) and job.scaling.num_workers == 2
    assert capsys.readouterr().out.splitlines()[-1] == '{"mode": "seeds"}'


# ---------------------------------------------------------------------------------------------------------
# On the local stack
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.stack
@pytest.mark.heavy
def test_seed_runs_nest_under_a_parent_with_their_mean_and_std_and_a_version_reproduces_its_run(
    live_stack, weld_dataset, monkeypatch, capsys, tmp_path
):
    import os

    import mlflow
    from mlflow import MlflowClient

    from ssn_platform.evaluation import evaluate_version
    from ssn_platform.jobconfig import load_job_config
    from ssn_platform.training import run_training

    product, base = f"weld-{uuid.uuid4().hex[:6]}", f"t-{uuid.uuid4().hex[:8]}"
    overrides = [
        f"dataset={weld_dataset}",
        f"product={product}",
        f"run_name={base}",
        "train.epochs=1",
        "train.batch_size=8",
        "model.image_size=[96,96]",
        "scaling.num_workers=2",
        "overlays=1",
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "job",
            "submit",
            "--working-dir",
            str(REPO),
            "--",
            "python",
            "jobs/evaluate.py",
            "--config",
            "jobs/configs/battery_weld.yaml",
            "--seeds",
            "0",
            "1",
            *overrides,
        ],
        cwd=REPO,
        env={**os.environ, "SSN_GIT_SHA": "test"},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"mode"')]
    assert lines and "| image_auroc |" in proc.stdout, proc.stdout[-6000:]
    parent_id = json.loads(lines[-1])["evaluation_run_id"]

    client = MlflowClient()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["ssn.evaluate.mode"] == "seeds"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    assert sorted(c.info.run_name for c in children) == [f"{base}-seed0", f"{base}-seed1"]
    for child in children:
        assert child.info.status == "FINISHED" and child.data.params["register"] == "False"
        assert child.data.params["train.seed"] == child.info.run_name[-1]
    aurocs = np.array([c.data.metrics["test_image_auroc"] for c in children])
    metrics = parent.data.metrics
    assert metrics["image_auroc_mean"] == pytest.approx(np.mean(aurocs), abs=1e-9)
    assert metrics["image_auroc_std"] == pytest.approx(np.std(aurocs), abs=1e-9)
    # weld's defects are one class, and the model reports the config's image score: both views equal the headline
    reported = load_job_config(REPO / "jobs/configs/battery_weld.yaml").model.image_score
    assert metrics[f"image_auroc_{reported}_mean"] == pytest.approx(np.mean(aurocs), abs=1e-9)
    assert metrics["class.defective.image_auroc_mean"] == pytest.approx(np.mean(aurocs), abs=1e-9)
    assert {"evaluation.md", "evaluation.json"} <= {a.path for a in client.list_artifacts(parent_id)}
    report = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=parent_id, artifact_path="evaluation.json", dst_path=str(tmp_path)
            )
        ).read_text()
    )
    n_test = int(parent.data.tags["ssn.evaluate.n_test_images"])
    assert sum(report["histogram"]["normal"]) + sum(report["histogram"]["defective"]) == 2 * n_test
    assert not client.search_model_versions(f"name = 'ssn-{product}'")  # seeds register nothing

    job = load_job_config(CONFIG, [*overrides, f"run_name={base}-registered", "register=true"])
    trained = run_training(job)
    assert trained.model_version == "1"
    evaluate_job = _job_module(monkeypatch)
    assert evaluate_job.main(["--product", product, "--version", "1"]) == 0, capsys.readouterr().err
    summary = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith('{"mode"')][-1])
    assert summary["metrics"]["image_auroc"] == pytest.approx(trained.metrics["image_auroc"], abs=1e-6)
    run = client.get_run(summary["evaluation_run_id"])
    assert run.data.tags["ssn.evaluate.source_run_id"] == trained.mlflow_run_id
    assert (
        run.data.tags["ssn.evaluate.dataset_version"]
        == client.get_run(trained.mlflow_run_id).data.tags["ssn.dataset.version"]
    )  # the dataset it was trained on, by default
    assert run.data.metrics["image_auroc"] == pytest.approx(trained.metrics["image_auroc"], abs=1e-6)
    with pytest.raises(PlatformError, match=f"ssn-{product} version 99 does not exist"):
        evaluate_version(product=product, version="99")

    # promote can require the recipe's multi-seed mean: the registered run (seed 42) shares the seeds' recipe
    from ssn_platform.promotion import promote
    from ssn_platform.thresholds import calibrate_version

    assert client.get_run(trained.mlflow_run_id).data.tags["ssn.recipe"] == parent.data.tags["ssn.recipe"]
    calibrate_version(product, "1", split="test", method="false_alarm", false_alarm_rate=0.1)
    too_few = promote(product, "1", floor=0.0, require_seeds=3)
    assert not too_few.promoted and ">= 3 seeds" in too_few.reason and "[2]" in too_few.reason, too_few.reason
    below = promote(product, "1", floor=metrics["image_auroc_mean"] + 1e-6, require_seeds=2)
    assert not below.promoted and "multi-seed mean" in below.reason, below.reason
    assert below.seeds_evaluation["run_id"] == parent_id and not below.candidate_metrics  # refused before scoring
    promoted = promote(product, "1", floor=0.0, require_seeds=2)
    assert promoted.promoted, promoted.reason
    assert promoted.seeds_evaluation == {
        "run_id": parent_id,
        "seeds": [0, 1],
        "mean": pytest.approx(np.mean(aurocs)),
        "std": pytest.approx(np.std(aurocs)),
    }
    recorded = client.get_run(promoted.run_id).data
    assert recorded.metrics["seeds_image_auroc_mean"] == pytest.approx(np.mean(aurocs))
    assert recorded.params["seeds_evaluation_run_id"] == parent_id and recorded.params["require_seeds"] == "2"


def test_a_recipe_fingerprint_ignores_the_seed_and_the_loader_but_not_the_settings_or_the_data():
    from ssn_platform.jobconfig import load_job_config
    from ssn_platform.lineage import recipe_fingerprint

    base = recipe_fingerprint(load_job_config(CONFIG, []), "v1")
    assert recipe_fingerprint(load_job_config(CONFIG, ["train.seed=7", "train.num_workers=2"]), "v1") == base
    assert recipe_fingerprint(load_job_config(CONFIG, ["model.noise_std=2.0"]), "v1") != base
    assert recipe_fingerprint(load_job_config(CONFIG, ["train.epochs=31"]), "v1") != base
    assert recipe_fingerprint(load_job_config(CONFIG, []), "v2") != base
