"""A self-contained HTML report of a product's run: metrics, curves, overlays, the search plot, served results."""

from __future__ import annotations

import base64
import html
import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

import mlflow
from mlflow import MlflowClient

METRIC_LABELS = {
    "image_auroc": "Image AUROC",
    "ap_det": "AP (detection)",
    "f1_max": "F1-max",
    "pixel_auroc": "Pixel AUROC",
    "ap_loc": "AP (localisation)",
    "aupro": "AUPRO (FPR 0.3)",
}


def _img(path: Path, *, width: int = 320) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" width="{width}" alt="{html.escape(path.name)}">'


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return html.escape(str(value))


def _artifacts(run_id: str, path: str, into: Path) -> Path | None:
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(into)))
    except Exception:  # noqa: BLE001 - an artifact a run did not produce (e.g. no curves with one class) is left out
        return None


def write_report(
    out: str | Path,
    *,
    product: str,
    training_run_id: str,
    model_version: str | None,
    search_run_id: str | None = None,
    served: Sequence[dict[str, Any]] = (),
    links: dict[str, str] | None = None,
) -> Path:
    """Writes `out` (an HTML file with every picture embedded) and returns its path."""
    client = MlflowClient()
    run = client.get_run(training_run_id)
    metrics = {k[len("test_") :]: v for k, v in run.data.metrics.items() if k.startswith("test_")}
    parts = _heading(product, training_run_id, model_version)
    parts += _metrics_table(metrics)
    parts += _configuration_table(run.data.params)
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        parts += _training_pictures(training_run_id, tmp / "train")
        if search_run_id:
            parts += _search_section(client, search_run_id, tmp / "search")
    if served:
        parts += _served_table(served)
    if links:
        parts += _links(links)
    parts.append("</body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    return out


def _heading(product: str, training_run_id: str, model_version: str | None) -> list[str]:
    """The page's head and style, its title and the model version and training run it reports."""
    return [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>ssn-platform report: {html.escape(product)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img{margin:4px}</style></head><body>",
        f"<h1>SuperSimpleNet on {html.escape(product)}</h1>",
        f"<p>Model version {_fmt(model_version)} &middot; MLflow run <code>{html.escape(training_run_id)}</code></p>",
    ]


def _metrics_table(metrics: dict[str, float]) -> list[str]:
    """The training run's test metrics that have a label (`METRIC_LABELS`), in that order."""
    parts = ["<h2>Test metrics</h2><table><tr><th>metric</th><th>value</th></tr>"]
    parts += [
        f"<tr><td>{METRIC_LABELS.get(k, k)}</td><td>{_fmt(metrics[k])}</td></tr>" for k in METRIC_LABELS if k in metrics
    ]
    parts.append("</table>")
    return parts


def _configuration_table(params: dict[str, str]) -> list[str]:
    """The run's main settings (backbone, noise, Perlin threshold, epochs, workers, image size) that it logged."""
    keys = (
        "model.backbone",
        "model.noise_std",
        "model.noise_std_mode",
        "model.perlin_threshold",
        "train.epochs",
        "scaling.num_workers",
        "model.image_size",
    )
    parts = ["<h2>Configuration</h2><table>"]
    parts += [f"<tr><td>{html.escape(k)}</td><td>{_fmt(params.get(k, ''))}</td></tr>" for k in keys if k in params]
    parts.append("</table>")
    return parts


def _training_pictures(training_run_id: str, into: Path) -> list[str]:
    """The ROC and precision-recall curves and the test overlays of the training run's ``evaluation`` artifacts
    (downloaded into `into`), each section left out when the run did not log it."""
    parts: list[str] = []
    evaluation = _artifacts(training_run_id, "evaluation", into)
    if evaluation is not None:
        curves = [p for p in (evaluation / "roc_curve.png", evaluation / "pr_curve.png") if p.is_file()]
        if curves:
            parts.append("<h2>ROC and precision-recall</h2>" + "".join(_img(p) for p in curves))
        overlays = sorted((evaluation / "overlays").glob("*.png")) if (evaluation / "overlays").is_dir() else []
        if overlays:
            parts.append("<h2>Anomaly maps on test images</h2><p>score_name; white outline: ground truth</p>")
            parts += [
                f"<figure style='display:inline-block'>{_img(p, width=200)}"
                f"<figcaption>{html.escape(p.stem)}</figcaption></figure>"
                for p in overlays
            ]
    return parts


def _search_section(client, search_run_id: str, into: Path) -> list[str]:
    """The search run's plots (its ``search`` artifacts, downloaded into `into`) and its ``ssn.tuned.*`` tags."""
    search = _artifacts(search_run_id, "search", into)
    pictures = sorted(search.glob("*.png")) if search is not None else []
    parts = ["<h2>Noise &sigma; x Perlin threshold search</h2>"]
    parts += [_img(p, width=420) for p in pictures] or ["<p>no search plots were logged</p>"]
    tuned = client.get_run(search_run_id).data.tags
    rows = {k: v for k, v in tuned.items() if k.startswith("ssn.tuned.")}
    if rows:
        parts.append(
            "<table>"
            + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in sorted(rows.items()))
            + "</table>"
        )
    return parts


def _served_table(served: Sequence[dict[str, Any]]) -> list[str]:
    """The endpoint's answers for held-back test images: one row per image."""
    parts = [
        "<h2>Endpoint answers for held-back test images</h2><table><tr><th>image</th><th>label</th>"
        "<th>score</th><th>threshold</th><th>decision</th><th>latency ms</th></tr>"
    ]
    for row in served:
        decision = "anomalous" if row.get("is_anomalous") else "normal"
        parts.append(
            f"<tr><td>{_fmt(row.get('image'))}</td><td>{_fmt(row.get('label'))}</td>"
            f"<td>{_fmt(row.get('score'))}</td><td>{_fmt(row.get('threshold'))}</td>"
            f"<td>{decision}</td><td>{_fmt(row.get('latency_ms'))}</td></tr>"
        )
    parts.append("</table>")
    return parts


def _links(links: dict[str, str]) -> list[str]:
    """The links the caller names (MLflow, the endpoint's docs, ...), as a list."""
    return [
        "<h2>Links</h2><ul>"
        + "".join(
            f"<li>{html.escape(k)}: <a href='{html.escape(v)}'>{html.escape(v)}</a></li>" for k, v in links.items()
        )
        + "</ul>"
    ]
