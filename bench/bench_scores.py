"""Which image score ranks real defects best: candidate scores computed from saved predictions, per dataset.

`bench/bench_quality.py --save-predictions DIR` writes, for every run, the test split's anomaly maps, labels and the
head's scores, and the maps and head scores of the run's normal training images (the only normal images a
training job has when a product has no labelled defects). This script computes every candidate image score of
`SCORES` on those arrays, without training again, and prints test image AUROC and AP-det as mean +- std over the
seeds of each dataset and setting, plus the mean over datasets (the rule of QUALITY.md: a score counts when it
helps on average and hurts no dataset beyond its noise).

    .venv/bin/python bench/bench_scores.py /tmp/q/preds --out bench_results/scores.json

Candidates (each a function of one image's map and head score and of statistics of the normal training images):

* ``head``, ``map_max``: today's scores (`supersimplenet.model.image_score`);
* ``top<p>``: the mean of the image's top p % of map pixels (less sensitive to one bright spot than the maximum);
* ``pos_max``: the maximum of the map minus the per-pixel mean map of the normal training images: a product imaged
  at a fixed pose has places (edges, busbars, weld ends) that every normal image lights up a little;
* ``posz_max``: the maximum of that difference divided by the per-pixel std of the training maps (floored at their
  median std, so that pixels no training image varied at do not explode);
* ``posz_top1``: the mean of the top 1 % of that standardised map;
* ``combined_z``: the mean of head and map_max after standardising each by the normal training images' scores
  (today's ``combined`` averages two probabilities on different scales).

Limits: the training images' maps are those of images the model was fitted on, so their statistics are lower than
fresh normal images' would be; position statistics need a product imaged in a fixed pose (they mean little for
textures). Every figure comes from models saved by one benchmark command; nothing here trains.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "model"))

from supersimplenet.metrics import compute_metrics  # noqa: E402

Stats = dict[str, np.ndarray]


def train_statistics(train_maps: np.ndarray, train_head: np.ndarray) -> Stats:
    maps = train_maps.astype(np.float64)
    std = maps.std(axis=0)
    return {
        "mean": maps.mean(axis=0),
        "std": np.maximum(std, np.median(std)) + 1e-6,
        "map_max": maps.reshape(len(maps), -1).max(axis=1),
        "head": train_head.astype(np.float64),
    }


def _top(fraction: float) -> Callable[[np.ndarray, np.ndarray, Stats], np.ndarray]:
    def score(maps: np.ndarray, head: np.ndarray, stats: Stats) -> np.ndarray:
        flat = maps.reshape(len(maps), -1)
        k = max(1, int(round(fraction * flat.shape[1])))
        return np.sort(flat, axis=1)[:, -k:].mean(axis=1)

    return score


def _zscore(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return (values - reference.mean()) / (reference.std() + 1e-6)


def _combined_z(maps: np.ndarray, head: np.ndarray, stats: Stats) -> np.ndarray:
    map_max = maps.reshape(len(maps), -1).max(axis=1)
    return 0.5 * (_zscore(head, stats["head"]) + _zscore(map_max, stats["map_max"]))


SCORES: dict[str, Callable[[np.ndarray, np.ndarray, Stats], np.ndarray]] = {
    "head": lambda maps, head, stats: head,
    "map_max": lambda maps, head, stats: maps.reshape(len(maps), -1).max(axis=1),
    "top0.1": _top(0.001),
    "top1": _top(0.01),
    "top5": _top(0.05),
    "pos_max": lambda maps, head, stats: (maps - stats["mean"]).reshape(len(maps), -1).max(axis=1),
    "posz_max": lambda maps, head, stats: ((maps - stats["mean"]) / stats["std"]).reshape(len(maps), -1).max(axis=1),
    "posz_top1": lambda maps, head, stats: _top(0.01)((maps - stats["mean"]) / stats["std"], head, stats),
    "combined_z": _combined_z,
}


def score_run(path: Path) -> dict[str, dict[str, float]]:
    data = np.load(path)
    maps = data["maps"].astype(np.float64)
    stats = train_statistics(data["train_maps"], data["train_head"])
    out = {}
    for name, fn in SCORES.items():
        metrics = compute_metrics(scores=fn(maps, data["head"].astype(np.float64), stats), labels=data["labels"])
        out[name] = {"image_auroc": metrics["image_auroc"], "ap_det": metrics["ap_det"]}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the --save-predictions folder of bench_quality.py")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "scores.json")
    args = parser.parse_args(argv)
    files = sorted(args.folder.glob("*.npz"))
    if not files:
        raise SystemExit(f"{args.folder}: no .npz predictions (run bench_quality.py --save-predictions first)")
    groups: dict[str, list] = defaultdict(list)
    for path in files:
        match = re.fullmatch(r"(.+)-(\d+)", path.stem)
        if not match:
            raise SystemExit(f"{path}: expected <dataset>-<setting>-<seed>.npz")
        groups[match.group(1)].append((int(match.group(2)), score_run(path)))
    report: dict = {"folder": str(args.folder), "groups": {}}
    for metric in ("image_auroc", "ap_det"):
        print(f"\n{metric}, mean ± std over seeds\n")
        print("| dataset-setting | seeds | " + " | ".join(SCORES) + " |")
        print("|---|---|" + "---|" * len(SCORES))
        means = defaultdict(list)
        for group, runs in sorted(groups.items()):
            cells = []
            for name in SCORES:
                values = np.array([r[name][metric] for _, r in runs])
                report["groups"].setdefault(group, {}).setdefault(name, {})[metric] = {
                    "mean": float(values.mean()),
                    "std": float(values.std()),
                    "per_seed": {seed: r[name][metric] for seed, r in runs},
                }
                means[name].append(values.mean())
                cells.append(f"{values.mean():.3f} ± {values.std():.3f}")
            print(f"| {group} | {len(runs)} | " + " | ".join(cells) + " |")
        print("| mean over groups | | " + " | ".join(f"{np.mean(means[n]):.3f}" for n in SCORES) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
