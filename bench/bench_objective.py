"""Does the search's objective rank settings the way real defects do? Spearman's rank correlation per dataset.

`jobs/tune.py` ranks trials by an objective measured on the val split. A product without labelled defects gets a
synthetic one: image AUROC on its normal val images plus one synthetic-defect copy of each
(`supersimplenet.synthetic.SyntheticDefectDataset`, what `ssn_platform.training.build_validation_set` builds for
``validation: synthetic``). A search is only as good as that objective's ranking of settings agrees with the ranking
by real defects. This script measures it: for a fixed set of settings per dataset (`settings_grid`: a Halton
sequence over the default search space, relative sigma 0.1-8 on a log scale and Perlin threshold 0.05-0.9, the
first point being the recommended defaults), it trains one model per setting with `supersimplenet.train.fit` on the
dataset's `bench/bench_quality.py` protocol and reports

* the objective variants on the synthetic val set: image AUROC of each image score (``syn_image_auroc_<score>``),
  pixel AUROC (``syn_pixel_auroc``, the synthetic defects have masks) and the mean of the model's image AUROC and
  the pixel AUROC (``syn_image_pixel``);
* the real test image AUROC of each image score;
* Spearman's rho (scipy) between every objective variant and the real test AUROC of the model's image score, and
  the real test AUROC of the setting each variant would have chosen, beside the defaults' and the best one's.

Val images per dataset: the normal images of the val split (weld and ELPV: their split files' val lines; MPDD metal
plate: its `val/` folder); a dataset without one holds its last 8 normal training images (by path) out of training.

    .venv/bin/python bench/bench_objective.py --datasets weld --epochs 15 --points 12
    .venv/bin/python bench/bench_objective.py --datasets mpdd_unsup --epochs 15 --points 12

Prints a table per dataset and writes `--out` (JSON). One seed per setting, as a search trial has. Every trained
model is kept in `--models` (`<dataset>/<k>.pt`); `--rescore` loads them instead of training, so another synthetic
recipe or objective is compared on the very same models in seconds:

    .venv/bin/python bench/bench_objective.py --datasets weld --epochs 15 --rescore --recipe structural

ASHA's question, whether a short trial ranks settings like the full run does: train the same grid with fewer epochs
into other `--models` and rank its objectives against the full run's test AUROC (`--reference`, that run's JSON):

    .venv/bin/python bench/bench_objective.py --datasets weld --epochs 4 --models .bench-cache/objective-models-e4 \
        --reference bench_results/objective_weld.json --out bench_results/objective_weld_e4.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import PROTOCOLS, REPO, build_configs, dataset_root, limit_train  # noqa: E402

from supersimplenet.backbones import get_preset  # noqa: E402
from supersimplenet.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from supersimplenet.layouts import read_layout  # noqa: E402
from supersimplenet.loading import DefectDataset  # noqa: E402
from supersimplenet.metrics import compute_metrics  # noqa: E402
from supersimplenet.synthetic import SYNTHETIC_RECIPES, SyntheticDefectDataset  # noqa: E402
from supersimplenet.train import eval_loader, fit, predict  # noqa: E402

SIGMA_RANGE = (0.1, 8.0)  # jobs/configs/search_space.yaml: relative sigma, log-uniform
THRESHOLD_RANGE = (0.05, 0.9)  # and the Perlin threshold, uniform
MPDD_VAL_NORMALS = 8


def halton(index: int, base: int) -> float:
    """The `index`-th (1-based) element of the van der Corput sequence in `base`."""
    result, fraction = 0.0, 1.0
    while index:
        fraction /= base
        result += fraction * (index % base)
        index //= base
    return result


def settings_grid(points: int) -> list[dict[str, float]]:
    """The recommended defaults, then `points - 1` Halton points (bases 2 and 3) over the search space."""
    lite0 = get_preset("efficientnet_lite0")
    grid = [{"noise_std": lite0.noise_std, "perlin_threshold": lite0.perlin_threshold}]
    low, high = math.log(SIGMA_RANGE[0]), math.log(SIGMA_RANGE[1])
    for index in range(1, points):
        grid.append(
            {
                "noise_std": round(math.exp(low + halton(index, 2) * (high - low)), 3),
                "perlin_threshold": round(
                    THRESHOLD_RANGE[0] + halton(index, 3) * (THRESHOLD_RANGE[1] - THRESHOLD_RANGE[0]), 3
                ),
            }
        )
    return grid


def splits(name: str, root: Path) -> tuple[list, list, list]:
    """(train, val normals, test) samples of a dataset's protocol."""
    protocol = PROTOCOLS[name]
    options = {"split_file": str(REPO / protocol.split_file)} if protocol.split_file else {}
    samples = read_layout(root, protocol.layout, **options)
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    val = [s for s in samples if s.split == "val" and s.label == 0]
    if not val:  # MPDD: hold out the last normal training images
        normal = sorted((s for s in train if s.label == 0), key=lambda s: s.image)
        val = normal[-MPDD_VAL_NORMALS:]
        train = [s for s in train if s not in val]
    return train, val, test


def score(model, dataset, *, with_pixels: bool) -> dict[str, float]:
    predictions = predict(model, eval_loader(dataset, batch_size=16), device=torch.device("cpu"))
    out = {k: v for k, v in predictions.score_metrics().items() if k.startswith("image_auroc_")}
    if with_pixels:
        pixel = compute_metrics(
            scores=predictions.scores, labels=predictions.labels, maps=predictions.maps, masks=predictions.masks
        )
        out["pixel_auroc"] = pixel["pixel_auroc"]
    return out


def run_setting(
    name: str,
    root: Path,
    data: tuple[list, list, list],
    setting: dict[str, float],
    *,
    seed: int,
    epochs: int,
    train_limit: int | None,
    train_first: bool,
    precision: str,
    model_file: Path,
    rescore: bool,
    recipe: str,
) -> dict[str, Any]:
    protocol = PROTOCOLS[name]
    train, val, test = data
    model_cfg, train_cfg = build_configs(
        protocol, "defaults", {}, seed=seed, epochs=epochs, backbone="efficientnet_lite0"
    )
    model_cfg = replace(model_cfg, **setting)
    train_cfg = replace(train_cfg, precision=precision)
    started = time.perf_counter()
    if rescore:
        model, metadata = load_checkpoint(model_file)
        if model.config != model_cfg or metadata.get("epochs") != epochs:
            raise SystemExit(f"{model_file} was trained with other settings or epochs; train again without --rescore")
    else:
        model = fit(
            data_root=root,
            samples=limit_train(train, train_limit, first=train_first),
            model_config=model_cfg,
            train_config=train_cfg,
            progress=False,
        ).model
        model_file.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model_file, model, metadata={"epochs": epochs, "seed": seed, "precision": precision})
    seconds = time.perf_counter() - started
    preset = get_preset(model_cfg.backbone)
    common = dict(root=root, image_size=model_cfg.image_size, mean=preset.mean, std=preset.std)
    synthetic = score(model, SyntheticDefectDataset(samples=val, seed=seed, recipe=recipe, **common), with_pixels=True)
    real = score(model, DefectDataset(samples=test, **common), with_pixels=False)
    objective = {f"syn_{k}": v for k, v in synthetic.items()}
    objective["syn_image_pixel"] = 0.5 * (synthetic[f"image_auroc_{model_cfg.image_score}"] + synthetic["pixel_auroc"])
    return {
        "setting": setting,
        "seed": seed,
        "train_seconds": seconds,
        "objective": objective,
        "test": {f"test_{k}": v for k, v in real.items()},
        "image_score": model_cfg.image_score,
    }


def correlations(runs: list[dict[str, Any]], target: str) -> dict[str, float]:
    truth = [r["test"][target] for r in runs]
    out = {}
    for key in runs[0]["objective"]:
        rho = spearmanr([r["objective"][key] for r in runs], truth).statistic
        out[key] = float(rho)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["weld", "mpdd_unsup"], choices=["weld", "mpdd_unsup", "elpv"])
    parser.add_argument("--points", type=int, default=12, help="settings per dataset (>= 12 for the issue)")
    parser.add_argument("--epochs", type=int, default=None, help="override the protocols' epoch counts")
    parser.add_argument(
        "--train-limit",
        type=int,
        default=None,
        help="train on N of the training images, a seeded random choice (bench_quality.limit_train)",
    )
    parser.add_argument(
        "--train-first",
        action="store_true",
        help="with --train-limit: the first N instead (the ELPV rows of 2026-12-03 were made so)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--cache", type=Path, default=REPO / ".bench-cache")
    parser.add_argument("--models", type=Path, default=REPO / ".bench-cache" / "objective-models")
    parser.add_argument("--rescore", action="store_true", help="score the models of an earlier run, train nothing")
    parser.add_argument(
        "--recipe",
        default="blend",
        choices=list(SYNTHETIC_RECIPES),
        help="synthetic-defect recipe of the objective (supersimplenet.synthetic)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "objective.json")
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="JSON of a run of the same grid at the full budget: also rank this run's objectives "
        "against that run's test AUROC (does a short trial predict the full run?)",
    )
    args = parser.parse_args(argv)
    reference = json.loads(args.reference.read_text())["datasets"] if args.reference else {}
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "datasets": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.datasets:
        root = dataset_root(name, PROTOCOLS[name], args.cache)
        data = splits(name, root)
        epochs = args.epochs or PROTOCOLS[name].epochs
        runs = []
        entry = report["datasets"][name] = {
            "epochs": epochs,
            "train_images": len(data[0]),
            "val_normals": len(data[1]),
            "test_images": len(data[2]),
            "runs": runs,
        }
        entry["recipe"] = args.recipe
        for index, setting in enumerate(settings_grid(args.points)):
            run = run_setting(
                name,
                root,
                data,
                setting,
                seed=args.seed,
                epochs=epochs,
                train_limit=args.train_limit,
                train_first=args.train_first,
                precision=args.precision,
                model_file=args.models / name / f"{index:02d}.pt",
                rescore=args.rescore,
                recipe=args.recipe,
            )
            runs.append(run)
            target, objective = f"test_image_auroc_{run['image_score']}", f"syn_image_auroc_{run['image_score']}"
            print(
                f"  {name} sigma {setting['noise_std']:.3f} threshold {setting['perlin_threshold']:.3f}: "
                f"objective {run['objective'][objective]:.3f} "
                f"pixel {run['objective']['syn_pixel_auroc']:.3f}, test {run['test'][target]:.3f} "
                f"({run['train_seconds']:.0f} s)",
                flush=True,
            )
            args.out.write_text(json.dumps(report, indent=1, default=float))
        target = f"test_image_auroc_{runs[0]['image_score']}"
        entry["target"] = target
        entry["spearman"] = correlations(runs, target) if len(runs) >= 3 else {}
        # What a search would have handed over: the real AUROC of each objective's best setting, beside the defaults'
        # (the first setting) and the best real one.
        entry["chosen"] = {
            key: runs[max(range(len(runs)), key=lambda i: runs[i]["objective"][key])]["test"][target]
            for key in runs[0]["objective"]
        }
        entry["defaults_test"], entry["best_test"] = runs[0]["test"][target], max(r["test"][target] for r in runs)
        full = reference.get(name, {}).get("runs")
        if full:
            if [r["setting"] for r in full] != [r["setting"] for r in runs]:
                raise SystemExit(f"{args.reference}: {name} was run on another grid")
            entry["reference"] = {
                "path": str(args.reference),
                "epochs": reference[name]["epochs"],
                "spearman": correlations([{**r, "test": f["test"]} for r, f in zip(runs, full)], target),
                "spearman_own_test": correlations(
                    [{**f, "objective": {"test": r["test"][target]}} for r, f in zip(runs, full)], target
                )["test"],
            }
            print(
                f"{name}: against the {reference[name]['epochs']}-epoch run's test AUROC: "
                + ", ".join(f"{k} {v:+.3f}" for k, v in entry["reference"]["spearman"].items())
                + f"; this run's own test AUROC {entry['reference']['spearman_own_test']:+.3f}"
            )
        args.out.write_text(json.dumps(report, indent=1, default=float))
        print(f"\n{name} ({epochs} epochs, {len(runs)} settings): Spearman's rho against {target}")
        print(f"defaults' test AUROC {entry['defaults_test']:.3f}, best setting's {entry['best_test']:.3f}")
        print("| objective | rho | test AUROC of its best setting |\n|---|---|---|")
        for key, rho in entry["spearman"].items():
            print(f"| {key} | {rho:+.3f} | {entry['chosen'][key]:.3f} |")
        print()
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
