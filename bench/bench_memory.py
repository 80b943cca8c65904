"""A training-free reference beside SuperSimpleNet: how far a test image's patch features lie from every normal
training image's, in the frozen backbone features the model's heads read.

SuperSimpleNet learns a discriminator on top of frozen backbone features F (`SuperSimpleNet.feature_extractor`:
two backbone levels, 3x3-pooled, upscaled and concatenated; docs/design.md). The simplest detector on the same
features needs no training at all: remember the normal training images' patch features and score a test patch by
its distance to the nearest remembered one (the memory-bank idea of PatchCore, Roth et al., CVPR 2022, here
without its coreset). This script measures that detector on the benchmark's protocols (`bench_quality.PROTOCOLS`,
the same images, image size and ImageNet weights), so QUALITY.md can say how much of a product's quality the
features alone carry and where the learned heads add to it or fall short.

Mechanism, per protocol and `--pools` value p:

* F of every normal training image and every test image, average-pooled over p x p feature cells (F has stride 4:
  p = 4 makes one patch per 16 x 16 image pixels), standardised per channel by the training patches' mean and std;
* ``anynn``: each test patch's Euclidean distance to its nearest training patch, at any position; ``cellnn``: to
  the training patches at the same position only (a product imaged in a fixed pose);
* image scores: the maximum (``_max``) or the mean of the top 1 % (``_top1``) of an image's patch distances;
* anomaly map: the ``anynn`` distances upsampled bilinearly to the image, for the pixel metrics where masks exist.

Limits: nothing is trained, so every figure is one deterministic number (no seed to average over) unless
`--max-patches` keeps a seeded random subset of the training patches; the distances are exact (no approximate
search), so memory and time grow with training patches x test patches (`--max-patches` bounds both). The scores
are distances, not probabilities: only rank metrics (AUROC, AP, AUPRO) are reported.

    .venv/bin/python bench/bench_memory.py --datasets weld mpdd_unsup elpv --pools 2 4 8
    .venv/bin/python bench/bench_memory.py --datasets elpv --train-limit 400 --pools 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "model"))  # runs from a checkout without the editable install too
sys.path.insert(0, str(REPO / "bench"))

from bench_quality import PROTOCOLS, build_configs, dataset_root, limit_train  # noqa: E402
from supersimplenet.backbones import get_preset, load_backbone_weights  # noqa: E402
from supersimplenet.layouts import read_layout  # noqa: E402
from supersimplenet.loading import DefectDataset  # noqa: E402
from supersimplenet.metrics import compute_metrics  # noqa: E402
from supersimplenet.model import build_model  # noqa: E402
from supersimplenet.train import eval_loader  # noqa: E402

SCORES = ("anynn_max", "anynn_top1", "cellnn_max", "cellnn_top1")


def features(model: torch.nn.Module, root: Path, samples: list, image_size: tuple[int, int], preset) -> torch.Tensor:
    """F [N, C, h, w] of `samples` in float32 (frozen weights, eval mode)."""
    dataset = DefectDataset(root=root, samples=samples, image_size=image_size, mean=preset.mean, std=preset.std)
    with torch.inference_mode():
        return torch.cat(
            [model.feature_extractor(batch["image"]).float() for batch in eval_loader(dataset, batch_size=16)]
        )


def nearest(queries: torch.Tensor, memory: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Distance of each row of `queries` [Q, C] to its nearest row of `memory` [M, C] (exact, chunked)."""
    out = torch.empty(len(queries))
    for start in range(0, len(queries), chunk):
        out[start : start + chunk] = torch.cdist(queries[start : start + chunk], memory).amin(dim=1)
    return out


def top1(distances: torch.Tensor) -> torch.Tensor:
    flat = distances.flatten(1)
    return flat.topk(max(1, round(0.01 * flat.shape[1])), dim=1).values.mean(dim=1)


def score_pool(
    train_f: torch.Tensor, test_f: torch.Tensor, pool: int, *, max_patches: int | None, seed: int
) -> dict[str, Any]:
    """Patch distances of the test images at one pooling, their image scores and anomaly maps (at feature size)."""
    h, w = train_f.shape[-2:]
    grid = (max(1, h // pool), max(1, w // pool))
    train_p, test_p = F.adaptive_avg_pool2d(train_f, grid), F.adaptive_avg_pool2d(test_f, grid)
    mean = train_p.mean(dim=(0, 2, 3), keepdim=True)
    std = train_p.std(dim=(0, 2, 3), keepdim=True) + 1e-6
    train_p, test_p = (train_p - mean) / std, (test_p - mean) / std
    channels = train_p.shape[1]
    memory = train_p.permute(0, 2, 3, 1).reshape(-1, channels)
    if max_patches and len(memory) > max_patches:
        keep = torch.from_numpy(np.random.default_rng(seed).choice(len(memory), size=max_patches, replace=False))
        memory = memory[keep]
    any_nn = nearest(test_p.permute(0, 2, 3, 1).reshape(-1, channels), memory).reshape(len(test_p), *grid)
    cell_nn = torch.stack(  # per position: the test images' patches against the training patches there
        [
            torch.cdist(test_p[:, :, i, j], train_p[:, :, i, j]).amin(dim=1)
            for i in range(grid[0])
            for j in range(grid[1])
        ],
        dim=1,
    ).reshape(len(test_p), *grid)
    return {
        "grid": grid,
        "memory_patches": len(memory),
        "scores": {
            "anynn_max": any_nn.flatten(1).amax(dim=1),
            "anynn_top1": top1(any_nn),
            "cellnn_max": cell_nn.flatten(1).amax(dim=1),
            "cellnn_top1": top1(cell_nn),
        },
        "maps": any_nn,
    }


def run_dataset(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    protocol = PROTOCOLS[name]
    if protocol.supervision != "unsupervised":
        raise SystemExit(f"--datasets {name}: only the unsupervised protocols (the memory holds normal images)")
    root = dataset_root(name, protocol, args.cache)
    options = {"split_file": str(REPO / protocol.split_file)} if protocol.split_file else {}
    samples = read_layout(root, protocol.layout, **options)
    train = [s for s in limit_train([s for s in samples if s.split == "train"], args.train_limit) if s.label == 0]
    test = [s for s in samples if s.split == "test"]
    model_cfg, _ = build_configs(protocol, "defaults", {}, seed=0, epochs=1, backbone=args.backbone)
    model = build_model(model_cfg)
    provenance = load_backbone_weights(model.feature_extractor.backbone, model_cfg.backbone, "default")
    model.eval()
    preset = get_preset(model_cfg.backbone)
    started = time.perf_counter()
    train_f = features(model, root, train, model_cfg.image_size, preset)
    test_f = features(model, root, test, model_cfg.image_size, preset)
    feature_seconds = time.perf_counter() - started
    labels = np.array([s.label for s in test])
    has_masks = any(s.mask for s in test)
    masks = None
    if has_masks:
        dataset = DefectDataset(
            root=root, samples=test, image_size=model_cfg.image_size, mean=preset.mean, std=preset.std
        )
        masks = np.concatenate([batch["mask"][:, 0].numpy() for batch in eval_loader(dataset, batch_size=16)])
    rows = []
    for pool in args.pools:
        for seed in args.seeds if args.max_patches else [None]:
            started = time.perf_counter()
            result = score_pool(train_f, test_f, pool, max_patches=args.max_patches, seed=seed or 0)
            score_seconds = time.perf_counter() - started
            row: dict[str, Any] = {
                "dataset": name,
                "pool": pool,
                "grid": list(result["grid"]),
                "seed": seed,
                "train_images": len(train),
                "test_images": len(test),
                "memory_patches": result["memory_patches"],
                "feature_seconds": round(feature_seconds, 1),
                "score_ms_per_image": round(1000 * score_seconds / len(test), 2),
                "weights": provenance,
            }
            for key, values in result["scores"].items():
                metrics = compute_metrics(scores=values.numpy(), labels=labels)
                row[f"image_auroc_{key}"], row[f"ap_det_{key}"] = metrics["image_auroc"], metrics["ap_det"]
            if has_masks:
                maps = F.interpolate(result["maps"][:, None], size=model_cfg.image_size, mode="bilinear")[:, 0]
                scores = result["scores"]["anynn_top1"].numpy()  # the score the model reports
                pixel = compute_metrics(scores=scores, labels=labels, maps=maps.numpy(), masks=masks)
                row["pixel_auroc"], row["aupro"] = pixel["pixel_auroc"], pixel["aupro"]
            rows.append(row)
            print_row(row)
    return rows


def print_row(row: dict[str, Any]) -> None:
    cells = [f"{row[f'image_auroc_{key}']:.3f}" for key in SCORES] + [f"{row['ap_det_anynn_top1']:.3f}"]
    cells += [f"{row[key]:.3f}" if key in row else "" for key in ("pixel_auroc", "aupro")]
    grid = "x".join(map(str, row["grid"]))
    seed = "" if row["seed"] is None else f" (seed {row['seed']})"
    print(
        f"| {row['dataset']} | {row['pool']} | {grid} | {row['train_images']} | {row['memory_patches']}{seed} | "
        + " | ".join(cells)
        + f" | {row['score_ms_per_image']} |",
        flush=True,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    unsupervised = [name for name, p in PROTOCOLS.items() if p.supervision == "unsupervised"]
    parser.add_argument("--datasets", nargs="+", default=unsupervised, choices=unsupervised)
    parser.add_argument("--pools", nargs="+", type=int, default=[2, 4, 8], help="feature cells pooled per patch side")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--train-limit", type=int, default=None, help="a seeded random N of the training images")
    parser.add_argument("--max-patches", type=int, default=None, help="a seeded random subset of the memory")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="with --max-patches: the subsets")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--cache", type=Path, default=REPO / ".bench-cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "memory.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    header = ["dataset", "pool", "grid", "train images", "memory patches"]
    header += [f"I-AUROC {key}" for key in SCORES] + ["AP-det anynn_top1", "P-AUROC", "AUPRO", "ms/image (scoring)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = [row for name in args.datasets for row in run_dataset(name, args)]
    report = {
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
