"""The pure parts of an evaluation: the metrics of one set of test predictions, their aggregation over seeds, and
the report's tables. No MLflow, no torch, no I/O: numpy and `supersimplenet.metrics.compute_metrics` only, so the
evaluation job's arithmetic is tested without a stack (`ssn_platform.evaluation` scores, trains and logs).

* One set of predictions (`summarize`): `compute_metrics` of the reported image score (pixel metrics only where a
  test image has a mask), AUROC and AP of every image score (``image_auroc_<score>``, ``ap_det_<score>``), of every
  defect class against all normal test images (`per_class_metrics`; a defective image without a class name counts
  in no class, a class without a normal image to compare gets nan) and `score_histogram` (20 equal bins over
  [0, 1], scores clipped into it, the last bin closed).
* Over seeds (`aggregate`): numpy mean and population std (ddof 0) of the seeds where a metric is finite, with their
  count; a metric finite in no seed has mean and std nan. `sum_histograms` pools the seeds' test images.
* Tables (`markdown`, `ordered`): overall metrics in `compute_metrics` order, then other names, score variants and
  defect classes; undefined values read ``n/a``. `jsonable` writes non-finite floats as null (strict JSON) and
  `metric_key` maps a defect class name onto the characters MLflow accepts in a metric name.
* `check_seeds`: the job's seeds as distinct integers.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from supersimplenet.metrics import compute_metrics
from ssn_platform.services import PlatformError

HISTOGRAM_BINS = 20
OVERALL = ("image_auroc", "ap_det", "f1_max", "f1_threshold", "pixel_auroc", "ap_loc", "aupro", "pixel_f1_max")
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\-/ ]")  # what MLflow accepts in a metric name


def finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(float(value))


def jsonable(value: Any) -> Any:
    """`value` with numpy scalars as Python numbers and every non-finite float as None (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    return int(value) if isinstance(value, np.integer) else value


def metric_key(name: str) -> str:
    """`name` as a part of an MLflow metric name (letters, digits and ``_.-/`` and space; others become ``_``)."""
    return _KEY_CHARS.sub("_", name) or "_"


def check_seeds(seeds: Iterable[Any] | None) -> list[int]:
    """The seeds as distinct integers; PlatformError for none, a non-integer or a repeated one."""
    seeds = [str(seed) for seed in (seeds or [])]
    if not seeds:
        raise PlatformError("no seeds: pass at least one, e.g. --seeds 0 1 2")
    bad = [seed for seed in seeds if not re.fullmatch(r"[+-]?\d+", seed.strip())]
    if bad:
        raise PlatformError(f"seeds must be integers, got {bad}")
    out = [int(seed) for seed in seeds]
    if len(set(out)) != len(out):
        raise PlatformError(f"seeds must be distinct, got {out}")
    return out


def score_histogram(scores: Any, labels: Any, *, bins: int = HISTOGRAM_BINS) -> dict[str, list]:
    """Counts of normal and defective image scores in `bins` equal bins over [0, 1] (the last bin holds 1.0)."""
    s = np.clip(np.asarray(scores, dtype=np.float64).reshape(-1), 0.0, 1.0)
    y = np.asarray(labels).reshape(-1).astype(bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    normal, _ = np.histogram(s[~y], bins=edges)
    defective, _ = np.histogram(s[y], bins=edges)
    return {"edges": edges.tolist(), "normal": normal.tolist(), "defective": defective.tolist()}


def per_class_metrics(scores: Any, labels: Any, defect_types: Sequence[str]) -> dict[str, dict[str, float]]:
    """Image AUROC and AP of each defect class: its defective images against every normal image.

    Defective images without a class name count in no class. Undefined values (no normal image) are nan."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    types = np.asarray([t or "" for t in defect_types], dtype=object)
    if not (s.shape == y.shape == types.shape):
        raise ValueError(f"scores ({s.size}), labels ({y.size}) and defect_types ({types.size}) differ in length")
    out: dict[str, dict[str, float]] = {}
    for name in sorted({t for t, label in zip(types, y) if label == 1 and t}):
        keep = (y == 0) | ((y == 1) & (types == name))
        metrics = compute_metrics(scores=s[keep], labels=y[keep])
        out[name] = {
            "image_auroc": metrics["image_auroc"],
            "ap_det": metrics["ap_det"],
            "n_defective": int(((y == 1) & (types == name)).sum()),
        }
    return out


def summarize(predictions, samples: Sequence, *, image_score: str, overall: bool = True) -> dict[str, Any]:
    """Evaluation of test predictions (`supersimplenet.train.Predictions` of the reported `image_score`; `samples[k]`
    is image k): {"image_score", "n_images", "n_normal", "n_defective", "metrics", "classes", "histogram"}.
    "metrics": `compute_metrics` (with `overall`; pixel metrics where a test image has a mask, and the heads'
    map's as ``<metric>_heads`` when the model reports the memory's),
    ``image_auroc_<score>`` / ``ap_det_<score>`` of every image score and ``class.<defect type>.image_auroc|ap_det``."""
    labels = np.asarray(predictions.labels)
    if len(samples) != labels.size:
        raise ValueError(f"{len(samples)} samples for {labels.size} predictions")
    metrics: dict[str, float] = {}
    if overall:
        has_masks = any(getattr(s, "mask", None) for s in samples)
        metrics.update(
            compute_metrics(
                scores=predictions.scores,
                labels=labels,
                maps=predictions.maps if has_masks else None,
                masks=predictions.masks if has_masks else None,
            )
        )
    metrics.update(predictions.score_metrics())
    if overall:
        metrics.update(predictions.heads_pixel_metrics())  # the heads' map beside a reported memory map
    classes = per_class_metrics(predictions.scores, labels, [s.defect_type for s in samples])
    for name, values in classes.items():
        metrics[f"class.{metric_key(name)}.image_auroc"] = values["image_auroc"]
        metrics[f"class.{metric_key(name)}.ap_det"] = values["ap_det"]
    return {
        "image_score": image_score,
        "n_images": int(labels.size),
        "n_normal": int((labels == 0).sum()),
        "n_defective": int((labels == 1).sum()),
        "metrics": metrics,
        "classes": {name: values["n_defective"] for name, values in classes.items()},
        "histogram": score_histogram(predictions.scores, labels),
    }


def aggregate(per_run: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "std", "n"}} over runs: numpy mean and population std (ddof 0) of the runs where the
    metric is defined (finite); n counts them. A metric defined in no run has mean and std nan."""
    keys: dict[str, None] = {}
    for metrics in per_run:
        keys.update(dict.fromkeys(metrics))
    out = {}
    for key in keys:
        values = np.asarray([float(m[key]) for m in per_run if finite(m.get(key))], dtype=np.float64)
        out[key] = {
            "mean": float(np.mean(values)) if values.size else math.nan,
            "std": float(np.std(values)) if values.size else math.nan,
            "n": int(values.size),
        }
    return out


def sum_histograms(histograms: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """Bin-wise sum of `score_histogram`s (the seeds' test images pooled)."""
    return {
        "edges": list(histograms[0]["edges"]),
        "normal": np.sum([h["normal"] for h in histograms], axis=0).astype(int).tolist(),
        "defective": np.sum([h["defective"] for h in histograms], axis=0).astype(int).tolist(),
    }


def ordered(keys: Iterable[str]) -> list[str]:
    """Overall metrics in `compute_metrics` order, then other plain names, score variants, defect classes."""

    def rank(key: str) -> tuple:
        if key in OVERALL:
            return (0, OVERALL.index(key), key)
        variant = key.startswith(("image_auroc_", "ap_det_"))
        return (2 if variant else 3 if key.startswith("class.") else 1, 0, key)

    return sorted(keys, key=rank)


def _fmt(value: Any) -> str:
    return f"{float(value):.4f}" if finite(value) else "n/a"


def markdown(report: Mapping[str, Any]) -> str:
    """The Markdown tables of a report dict (`EvaluationReport.to_dict()`)."""
    lines = [f"# Evaluation: {report['title']}", ""]
    lines += [f"- {k}: {v}" for k, v in report["subject"].items() if v not in (None, "")]
    lines.append("")
    if report["mode"] == "seeds":
        runs = report["runs"]
        lines.append("| metric | mean ± std | n | " + " | ".join(f"seed {r['seed']}" for r in runs) + " |")
        lines.append("|---|---|---|" + "---|" * len(runs))
        for key in ordered(report["aggregate"]):
            agg = report["aggregate"][key]
            cells = [_fmt(r["metrics"].get(key)) for r in runs]
            lines.append(f"| {key} | {_fmt(agg['mean'])} ± {_fmt(agg['std'])} | {agg['n']} | {' | '.join(cells)} |")
    else:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_fmt(report['metrics'][key])} |" for key in ordered(report["metrics"])]
    histogram = report.get("histogram")
    if histogram:
        pooled = " (test images of all seeds pooled)" if report["mode"] == "seeds" else ""
        lines += [
            "",
            f"Reported image score ({report.get('image_score')}) of normal and defective test images{pooled}:",
            "",
            "| score | normal | defective |",
            "|---|---|---|",
        ]
        edges = histogram["edges"]
        for i, (normal, defective) in enumerate(zip(histogram["normal"], histogram["defective"])):
            close = "]" if i == len(edges) - 2 else ")"
            lines.append(f"| [{edges[i]:.2f}, {edges[i + 1]:.2f}{close} | {normal} | {defective} |")
    return "\n".join(lines) + "\n"
