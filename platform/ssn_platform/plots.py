"""Evaluation figures logged with each run: ROC and PR curves, anomaly-map overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from sklearn.metrics import auc, precision_recall_curve, roc_curve

from supersimplenet.visualize import overlay


def write_curves(scores: np.ndarray, labels: np.ndarray, out: Path) -> list[Path]:
    """roc_curve.png and pr_curve.png of image scores; nothing when only one class is present."""
    import matplotlib  # noqa: PLC0415 (matplotlib.use("Agg") runs first, when plotting)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (after matplotlib.use("Agg"))

    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return []
    out.mkdir(parents=True, exist_ok=True)
    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    paths = []
    for name, x, y, xlabel, ylabel, title in (
        ("roc_curve.png", fpr, tpr, "false positive rate", "true positive rate", f"ROC (AUC {auc(fpr, tpr):.3f})"),
        ("pr_curve.png", recall, precision, "recall", "precision", "precision-recall"),
    ):
        figure, axis = plt.subplots(figsize=(4, 4), dpi=100)
        axis.plot(x, y, lw=2)
        axis.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(0, 1), ylim=(0, 1.02))
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out / name)
        plt.close(figure)
        paths.append(out / name)
    return paths


def write_overlays(root: Path, samples: Sequence, predictions, out: Path, *, count: int) -> list[Path]:
    """Overlays for up to `count` test images: the highest-scoring defective and normal ones."""
    out.mkdir(parents=True, exist_ok=True)
    order = np.argsort(-predictions.scores)
    defective = [i for i in order if predictions.labels[i] == 1][: max(1, count // 2)]
    normal = [i for i in order if predictions.labels[i] == 0][: max(0, count - len(defective))]
    paths = []
    for i in defective + normal:
        sample = samples[int(predictions.indices[i])]
        image = Image.open(Path(root) / sample.image)
        picture = overlay(image, predictions.maps[i], mask=predictions.masks[i])
        kind = "defect" if predictions.labels[i] else "normal"
        name = f"{kind}_{predictions.scores[i]:.3f}_{Path(sample.image).stem}.png"
        picture.save(out / name)
        paths.append(out / name)
    return paths
