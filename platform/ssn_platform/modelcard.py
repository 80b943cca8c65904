"""Model cards: one Markdown page per registered version, saying what it is, what it was trained on, how good it is
and how its decision threshold was set.

`write_model_card(product, version)` gathers everything from the registry, the version's run and its dataset
manifest, renders `render_model_card`, logs it as the run's artifact ``model_card/v<version>/model_card.md`` and
sets it as the model version's registry description (cut at `DESCRIPTION_LIMIT` characters, with a pointer to the
artifact). The registration (`ssn_platform.registry.log_and_register`) writes the first card; calibration
(`ssn_platform.thresholds.record_threshold`) writes it again with the threshold. Sections:

* the version: product, registered model, run, git commit, recipe fingerprint;
* data: the dataset version and its images per split and label (from the manifest);
* model: backbone and the sha256 of its weights file, image size, feature levels, image score, sigma and Perlin
  threshold, and where they came from (the backbone preset's defaults, or set by the job config / tuned settings);
* quality: the test metrics of the run and the per-defect-class image AUROC and AP (``evaluation/breakdown.json``);
* decision threshold: value, method, split and images it used, the promised rate with its 95 % interval, and the
  calibration's warning;
* known limits: what the figures cannot say.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from supersimplenet.config import recommended_model_config
from ssn_platform.datasets import DatasetReader
from ssn_platform.names import registered_model_name

DESCRIPTION_LIMIT = 4500  # the registry's description field: a summary; the artifact holds the whole card
ARTIFACT_DIR = "model_card"
HEADLINE = ("image_auroc", "ap_det", "f1_max", "pixel_auroc", "aupro", "image_auroc_head", "image_auroc_map_max")


def _fmt(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "n/a" if math.isnan(number) else f"{number:.4f}"


def _json(text: str | None) -> dict[str, Any]:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}


def _origin(params: dict[str, str]) -> str:
    """Where sigma and the Perlin threshold came from: the backbone preset's recommendation, or the job."""
    try:
        recommended = recommended_model_config(
            params.get("model.backbone", ""), supervision=params.get("train.supervision", "unsupervised")
        )
    except Exception:  # noqa: BLE001 - an unknown or user-supplied backbone has no recommendation
        return "set by the job config (no preset recommendation for this backbone)"
    same = (
        str(recommended.noise_std) == params.get("model.noise_std")
        and recommended.noise_std_mode == params.get("model.noise_std_mode")
        and str(recommended.perlin_threshold) == params.get("model.perlin_threshold")
    )
    return (
        "the backbone preset's recommended defaults (docs/backbones.md)"
        if same
        else "set by the job config or a tuned-settings file of jobs/tune.py (differs from the preset's defaults "
        f"sigma {recommended.noise_std} {recommended.noise_std_mode}, threshold {recommended.perlin_threshold})"
    )


def render_model_card(facts: dict[str, Any]) -> str:
    """The card's Markdown from `facts` (what `gather` returns): pure, so it is tested without services."""
    tags, params, metrics = facts["version_tags"], facts["params"], facts["metrics"]
    counts = facts.get("counts") or {}
    lines = [
        f"# Model card: {facts['registered_model']} version {facts['version']}",
        "",
        f"Product `{facts['product']}`; run `{facts['run_id']}`; code `{facts.get('git_sha') or 'unknown'}`; "
        f"recipe `{facts.get('recipe') or 'n/a'}`; card written {facts['written_at']}.",
        "",
        "## Data",
        "",
    ]
    lines.append(
        f"Dataset `{tags.get('dataset', 'unknown')}` (version `{facts.get('dataset_version') or 'unknown'}`), "
        f"{counts.get('samples', 'n/a')} images:"
    )
    lines += ["", "| split | normal | defective | with masks |", "|---|---|---|---|"]
    for split, c in sorted((counts.get("splits") or {}).items()):
        lines.append(f"| {split} | {c['normal']} | {c['defective']} | {c['segmented']} |")
    lines += [
        "",
        "## Model",
        "",
        f"- backbone `{tags.get('backbone')}`, weights `{tags.get('backbone_weights', 'not recorded')}`",
        f"- image size {params.get('model.image_size', 'n/a')}, feature levels "
        f"{params.get('model.feature_levels', 'n/a')}, image score `{params.get('model.image_score', 'n/a')}`",
        f"- sigma {tags.get('noise_std')} ({tags.get('noise_std_mode')}; effective "
        f"{tags.get('effective_noise_std', 'n/a')}), Perlin threshold {tags.get('perlin_threshold')}, "
        f"supervision `{tags.get('supervision')}`: {_origin(params)}",
        f"- training: {params.get('train.epochs', 'n/a')} epochs, batch {params.get('train.batch_size', 'n/a')}, "
        f"seed {params.get('train.seed', 'n/a')}, precision {params.get('train.precision', 'fp32')}",
        "",
        "## Quality on the test split",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(metrics[f'test_{k}'])} |" for k in HEADLINE if f"test_{k}" in metrics]
    classes = (facts.get("breakdown") or {}).get("metrics") or {}
    per_class = sorted({k.split(".")[1] for k in classes if k.startswith("class.")})
    if per_class:
        lines += ["", "| defect class | image AUROC | AP |", "|---|---|---|"]
        lines += [
            f"| {c} | {_fmt(classes.get(f'class.{c}.image_auroc'))} | {_fmt(classes.get(f'class.{c}.ap_det'))} |"
            for c in per_class
        ]
    lines += ["", "## Decision threshold", ""]
    if tags.get("threshold"):
        threshold_params = _json(tags.get("threshold_params"))
        intervals = _json(tags.get("threshold_intervals"))
        lines += [
            f"- threshold {float(tags['threshold']):.6g}, method `{tags.get('threshold_method')}`, on split "
            f"`{tags.get('threshold_split')}` of `{tags.get('threshold_dataset')}` "
            f"({threshold_params.get('n_normal', '?')} normal, {threshold_params.get('n_defective', '?')} "
            f"defective images)",
            f"- promised: {json.dumps({k: v for k, v in threshold_params.items() if k in ('false_alarm_rate', 'target_recall', 'achieved')}, default=str)}",  # noqa: E501
            f"- 95 % intervals: {json.dumps(intervals) if intervals else 'n/a'}",
        ]
        if tags.get("threshold_warning"):
            lines.append(f"- **warning**: {tags['threshold_warning']}")
    else:
        lines.append("Not calibrated yet: run `jobs/calibrate.py`; the endpoint refuses a version without one.")
    lines += [
        "",
        "## Known limits",
        "",
        "- The figures are one training run on one test split; seed-to-seed spread is in QUALITY.md and "
        "`jobs/evaluate.py --seeds` measures it for this recipe.",
        "- Images unlike the training data (other lighting, optics, product variant) are outside what the "
        "test split measures; watch them with `jobs/drift.py`.",
        "- The map (and regions) are at the model's input size unless `map_resolution=original` is asked for.",
        "- The false-alarm rate holds for images like the calibration split; its interval widens as that split "
        "shrinks.",
    ]
    return "\n".join(lines) + "\n"


def gather(product: str, version: str) -> dict[str, Any]:
    """Everything the card shows, from MLflow (version, run, breakdown artifact) and the dataset manifest."""
    from mlflow import MlflowClient  # noqa: PLC0415 (MLflow: kept off the Serve app's import)

    client = MlflowClient()
    name = registered_model_name(product)
    model_version = client.get_model_version(name, str(version))
    run = client.get_run(model_version.run_id)
    facts: dict[str, Any] = {
        "product": product,
        "registered_model": name,
        "version": str(version),
        "run_id": model_version.run_id,
        "version_tags": dict(model_version.tags or {}),
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "git_sha": run.data.tags.get("ssn.git_sha"),
        "recipe": run.data.tags.get("ssn.recipe"),
        "dataset_version": run.data.tags.get("ssn.dataset.version"),
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with tempfile.TemporaryDirectory() as directory:
        try:
            local = client.download_artifacts(model_version.run_id, "evaluation/breakdown.json", directory)
            facts["breakdown"] = json.loads(Path(local).read_text())
        except Exception:  # noqa: BLE001 - runs registered without a test step have none
            facts["breakdown"] = None
    manifest = run.data.tags.get("ssn.dataset.manifest") or facts["version_tags"].get("dataset")
    if manifest:
        try:
            facts["counts"] = DatasetReader(manifest).manifest.to_dict()["counts"]
        except Exception:  # noqa: BLE001 - a card without counts beats no card; it says n/a
            facts["counts"] = None
    return facts


def write_model_card(product: str, version: str) -> str:
    """Renders the card of a version, logs it as an artifact of its run and sets the registry description."""
    from mlflow import MlflowClient  # noqa: PLC0415 (MLflow: kept off the Serve app's import)

    facts = gather(product, version)
    card = render_model_card(facts)
    client = MlflowClient()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model_card.md"
        path.write_text(card, encoding="utf-8")
        client.log_artifact(facts["run_id"], str(path), artifact_path=f"{ARTIFACT_DIR}/v{version}")
    description = (
        card
        if len(card) <= DESCRIPTION_LIMIT
        else (
            card[:DESCRIPTION_LIMIT]
            + f"\n\n(cut; the whole card: run artifact {ARTIFACT_DIR}/v{version}/model_card.md)"
        )
    )
    client.update_model_version(facts["registered_model"], str(version), description=description)
    return card


def refresh_model_card(product: str, version: str) -> None:
    """`write_model_card`, logging instead of raising: a card must never fail the registration or calibration that
    triggers it (the next calibration writes it again)."""
    try:
        write_model_card(product, version)
    except Exception:  # noqa: BLE001 - reported, not fatal
        logging.getLogger(__name__).warning("model card of %s version %s not written", product, version, exc_info=True)


__all__ = ["refresh_model_card", "render_model_card", "write_model_card"]
