"""Detection quality per dataset, as mean +- std over seeds: the paper's settings, our defaults, and any candidate.

A fixed protocol per real dataset we have (`PROTOCOLS`: data, layout, split file, supervision, image size,
epochs, batch). Every run trains with `supersimplenet.train.fit` in this process (the same training step as the
Ray workers and Tune trials) on the protocol's train split and scores its test split through the one inference
path (`supersimplenet.train.predict`). The val split is never used here. Each run reports the image metrics of
three image scores (`supersimplenet.metrics.IMAGE_SCORES`: the classification head's, the anomaly map's maximum,
and their mean, "combined"), AUROC per defect class, and the pixel metrics where masks exist.

Settings (`--settings`, several allowed): `paper` (absolute sigma 0.015, Perlin threshold 0.2, or 0.6 for the
supervised protocols: the paper's values, tuned for WideResNet50 features), `defaults` (what the platform trains
with when a config names only the backbone: `supersimplenet.config.recommended_model_config`), `anomalib`
(anomalib 2.7.0's SuperSimpleNet, its own loss, optimiser groups and schedule, trained by this script on the same
images, epochs, batch and backbone weights: `fit_anomalib`; needs the `bench` extra; unsupervised protocols), or
`NAME:key=value,key=value` over ModelConfig/TrainConfig fields (`noise_std=2.0,perlin_threshold=0.4`).

    .venv/bin/python bench/bench_quality.py --datasets weld mpdd_unsup --settings paper defaults --seeds 0 1 2
    .venv/bin/python bench/bench_quality.py --datasets weld --epochs 10 --quick   # one seed, a smoke run

Prints a Markdown table of mean +- std (population std over the seeds) and writes every run's figures to
`--out` (JSON). ELPV needs the `elpv-dataset` package (the quickstart extra); its cells are exported once into
`--cache`. A dataset folder that is missing is a loud error, never a silent skip.

Limits: CPU-only figures on this machine take minutes per run (Lite0 trains at about 2.5 images/s at 256x256 on 2
cores); `--epochs` and `--train-limit` shrink a protocol and are recorded in the JSON beside each figure, so a
reduced run is never mistaken for the protocol's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "model"))  # runs from a checkout without the editable install too

from bench_inference import build_anomalib, build_ours  # noqa: E402
from supersimplenet.config import ModelConfig, TrainConfig, recommended_model_config  # noqa: E402
from supersimplenet.elpv import export_elpv  # noqa: E402
from supersimplenet.layouts import read_layout  # noqa: E402
from supersimplenet.loading import DefectDataset  # noqa: E402
from supersimplenet.backbones import get_preset  # noqa: E402
from supersimplenet.metrics import IMAGE_SCORES, compute_metrics  # noqa: E402
from supersimplenet.train import (  # noqa: E402
    Predictions,
    build_train_loader,
    eval_loader,
    fit,
    predict,
    seed_everything,
)


@dataclass(frozen=True)
class Protocol:
    """One dataset's fixed benchmark protocol."""

    root: str  # dataset folder (absolute, or relative to ../shared/data)
    layout: str
    supervision: str
    image_size: tuple[int, int]
    epochs: int
    batch_size: int
    split_file: str | None = None  # relative to the repository
    note: str = ""


PROTOCOLS: dict[str, Protocol] = {
    "weld": Protocol(
        "battery_weld/denoised",
        "mvtec",
        "unsupervised",
        (256, 128),
        30,
        16,
        split_file="jobs/splits/battery_weld.txt",
        note="36 normal training seams; test = the 2/3 of test/ the split file keeps there",
    ),
    "mpdd_unsup": Protocol(
        "mpdd_metal_plate/data_supervised/metal_plate",
        "folder",
        "unsupervised",
        (256, 256),
        30,
        16,
        note="the normal images of train/ only; test/ as shipped",
    ),
    "mpdd_sup": Protocol(
        "mpdd_metal_plate/data_supervised/metal_plate",
        "folder",
        "supervised",
        (256, 256),
        30,
        16,
        note="train/ with its 53 masked defective images; test/ as shipped",
    ),
    "elpv": Protocol(
        "elpv",
        "mvtec",
        "unsupervised",
        (256, 256),
        10,
        16,
        split_file="bench/splits/elpv_quality.txt",
        note="1,000 normal training cells; test 300 normal + 300 defective (probability 1) cells",
    ),
}


def paper_overrides(protocol: Protocol) -> dict[str, Any]:
    return {
        "noise_std_mode": "absolute",
        "noise_std": 0.015,
        "image_score": "head",
        "perlin_threshold": 0.6 if protocol.supervision != "unsupervised" else 0.2,
    }


def parse_setting(text: str) -> tuple[str, dict[str, str]]:
    """`paper`, `defaults` or `NAME:key=value,...` -> (name, raw overrides)."""
    if text in ("paper", "defaults", "anomalib"):
        return text, {}
    name, _, body = text.partition(":")
    if not name or not body:
        raise SystemExit(f"--settings: {text!r} is not 'paper', 'defaults', 'anomalib' or NAME:key=value,...")
    pairs = {}
    for item in body.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--settings {name}: {item!r} is not key=value")
        pairs[key.strip()] = value.strip()
    return name, pairs


def _coerce(value: str, current: Any) -> Any:
    if isinstance(current, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, tuple) or (current is None and "x" in value):  # 256x128, or feature_levels 3x4
        return tuple(int(v) for v in value.strip("[]()").split("x" if "x" in value else ";"))
    if current is None and value.lower() in ("true", "false"):  # an optional switch (train.flips)
        return value.lower() == "true"
    if current is None:  # an optional field: a number when it reads as one
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return None if value.lower() == "none" else value


def build_configs(
    protocol: Protocol, setting: str, raw: dict[str, str], *, seed: int, epochs: int, backbone: str
) -> tuple[ModelConfig, TrainConfig]:
    model = recommended_model_config(backbone, supervision=protocol.supervision, image_size=protocol.image_size)
    if setting in ("paper", "anomalib"):  # anomalib's model has the paper's settings built in
        model = replace(model, **paper_overrides(protocol))
    train = TrainConfig(epochs=epochs, batch_size=protocol.batch_size, seed=seed, supervision=protocol.supervision)
    model_fields = {f.name for f in fields(ModelConfig)}
    train_fields = {f.name for f in fields(TrainConfig)}
    for key, value in raw.items():
        if key in model_fields:
            model = replace(model, **{key: _coerce(value, getattr(model, key))})
        elif key in train_fields:
            train = replace(train, **{key: _coerce(value, getattr(train, key))})
        else:
            raise SystemExit(f"--settings {setting}: {key!r} is neither a ModelConfig nor a TrainConfig field")
    if "anomaly_map" not in raw:  # resolved again from the (possibly overridden) image score
        model = replace(model, anomaly_map=None)
    return model, train


def dataset_root(name: str, protocol: Protocol, cache: Path) -> Path:
    if name == "elpv":
        return export_elpv(cache / "elpv", split_file=REPO / protocol.split_file)
    root = Path(protocol.root) if Path(protocol.root).is_absolute() else SHARED / protocol.root
    if not root.is_dir():
        raise SystemExit(f"dataset {name}: folder {root} not found (the benchmark reads ../shared/data)")
    return root


def fit_anomalib(root: Path, samples: list, model_cfg: ModelConfig, train_cfg: TrainConfig) -> tuple[Any, float]:
    """anomalib's SuperSimpleNet (its torch model, `SSNLoss`, and the AdamW groups and MultiStepLR of its Lightning
    module, as `Supersimplenet.configure_optimizers` builds them) trained on the same images, epochs, batch and
    backbone weights as ours. Its own settings otherwise: absolute sigma 0.015, Perlin threshold 0.2, JIMS variant,
    unsupervised (`stop_grad`). Images are normalised with the backbone's statistics, as ours (anomalib's default
    pre-processor would use ImageNet's, wrong for the Lite weights). Returns (predictor, seconds): the predictor
    maps normalised images to (head score [B], anomaly map [B, H, W])."""
    from anomalib.models.image.supersimplenet.loss import SSNLoss  # noqa: PLC0415 (anomalib: the optional bench extra, --settings anomalib only)

    seed_everything(train_cfg.seed, deterministic=train_cfg.deterministic)
    ours = build_ours(model_cfg.backbone, torch.device("cpu"))  # only lends its loaded backbone weights
    model, note = build_anomalib(model_cfg.backbone, torch.device("cpu"), ours)
    if model is None:
        raise SystemExit(f"--settings anomalib: {note}")
    del ours
    preset = get_preset(model_cfg.backbone)
    train = [s for s in samples if s.label == 0]
    dataset = DefectDataset(root=root, samples=train, image_size=model_cfg.image_size, mean=preset.mean, std=preset.std)
    loader, sampler = build_train_loader(dataset, train, train_cfg)
    optimizer = torch.optim.AdamW(
        [
            {"params": model.adaptor.parameters(), "lr": 1e-4},
            {"params": model.segdec.parameters(), "lr": 2e-4, "weight_decay": 1e-5},
        ]
    )
    milestones = [int(train_cfg.epochs * 0.8), int(train_cfg.epochs * 0.9)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.4)
    loss_fn = SSNLoss()
    started = time.perf_counter()
    for epoch in range(train_cfg.epochs):
        sampler.set_epoch(epoch)
        model.train()
        for batch in loader:
            anomaly_map, score, masks, labels = model(
                images=batch["image"], masks=batch["mask"][:, 0], labels=batch["label"]
            )
            loss = loss_fn(pred_map=anomaly_map, pred_score=score, target_mask=masks, target_label=labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - started
    model.eval()

    @torch.no_grad()
    def predictor(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(images)
        return out.pred_score.flatten(), out.anomaly_map.reshape(images.shape[0], *images.shape[-2:])

    return predictor, seconds


def predict_anomalib(predictor, loader) -> Any:
    """`supersimplenet.train.Predictions` of anomalib's model (its score is the head's)."""
    scores, maps, labels, masks, indices = [], [], [], [], []
    for batch in loader:
        score, anomaly_map = predictor(batch["image"])
        scores.append(score.numpy())
        maps.append(anomaly_map.numpy())
        labels.append(batch["label"].numpy())
        masks.append(batch["mask"][:, 0].numpy())
        indices.append(np.asarray(batch["index"]))
    scores = np.concatenate(scores)
    return Predictions(
        scores=scores,
        labels=np.concatenate(labels).astype(np.int64),
        maps=np.concatenate(maps),
        masks=np.concatenate(masks).astype(np.uint8),
        indices=np.concatenate(indices),
        head_scores=scores,
    )


SUBSET_SEED = 2624


def limit_train(train: list, limit: int | None, *, first: bool = False) -> list:
    """At most `limit` training samples: a seeded random choice (the same for every training seed), in the
    layout's order; `first=True` takes the first `limit` instead (how rows before 2026-12-03 were made).

    The first N of a split file are its lowest image indices, and ELPV's index runs by module: its first 200
    normal training cells are 181 polycrystalline and 19 monocrystalline, while its test split is 57 % poly. A
    random choice keeps a reduced protocol's training images like the full protocol's.
    """
    if not limit or limit >= len(train):
        return list(train)
    if first:
        return list(train[:limit])
    chosen = np.random.default_rng(SUBSET_SEED).choice(len(train), size=limit, replace=False)
    return [train[i] for i in sorted(chosen)]


def run_once(
    name: str,
    protocol: Protocol,
    root: Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    train_limit: int | None,
    train_first: bool = False,
    anomalib: bool = False,
    save: Path | None = None,
) -> dict[str, Any]:
    options = {"split_file": str(REPO / protocol.split_file)} if protocol.split_file else {}
    samples = read_layout(root, protocol.layout, **options)
    train = limit_train([s for s in samples if s.split == "train"], train_limit, first=train_first)
    test = [s for s in samples if s.split == "test"]
    preset = get_preset(model_cfg.backbone)
    test_set = DefectDataset(root=root, samples=test, image_size=model_cfg.image_size, mean=preset.mean, std=preset.std)
    if anomalib:
        if protocol.supervision != "unsupervised":
            raise SystemExit("--settings anomalib: only the unsupervised protocols")
        predictor, train_seconds = fit_anomalib(root, train, model_cfg, train_cfg)
        predictions = predict_anomalib(predictor, eval_loader(test_set, batch_size=16))
        result = None
    else:
        started = time.perf_counter()
        result = fit(data_root=root, samples=train, model_config=model_cfg, train_config=train_cfg, progress=False)
        train_seconds = time.perf_counter() - started
        predictions = predict(result.model, eval_loader(test_set, batch_size=16), device=torch.device("cpu"))
        if save is not None:
            save_predictions(save, predictions, result.model, root, train, model_cfg)
    has_masks = any(s.mask for s in test)
    metrics = compute_metrics(
        scores=predictions.scores,
        labels=predictions.labels,
        maps=predictions.maps if has_masks else None,
        masks=predictions.masks if has_masks else None,
    )
    metrics.update(predictions.score_metrics())
    metrics.update(predictions.heads_pixel_metrics())  # the heads' map beside the memory's, where it is reported
    types = [test[i].defect_type for i in predictions.indices]
    for defect_type in sorted({t for t in types if t}):
        keep = np.array([t in ("", defect_type) for t in types])
        if len({t for t in types if t}) > 1:
            metrics[f"image_auroc_{model_cfg.image_score}/{defect_type}"] = compute_metrics(
                scores=predictions.scores[keep], labels=predictions.labels[keep]
            )["image_auroc"]
    normal = predictions.labels == 0
    return {
        "dataset": name,
        "train_images": len(train),
        "test_images": len(test),
        "train_seconds": train_seconds,
        "metrics": metrics,
        "final_loss": result.history[-1].get("loss") if result else None,
        "scores": {"normal": predictions.scores[normal].tolist(), "defective": predictions.scores[~normal].tolist()},
        "model_config": asdict(model_cfg),
        "train_config": asdict(train_cfg),
    }


def save_predictions(
    path: Path, predictions: Any, model: torch.nn.Module, root: Path, train: list, model_cfg: ModelConfig
) -> None:
    """Write a run's test predictions and the anomaly maps of its normal training images to `path` (npz, maps in
    float16): what `bench/bench_scores.py` compares image scores on without training again."""
    preset = get_preset(model_cfg.backbone)
    normals = [s for s in train if s.label == 0]
    train_set = DefectDataset(
        root=root, samples=normals, image_size=model_cfg.image_size, mean=preset.mean, std=preset.std
    )
    fitted = predict(model, eval_loader(train_set, batch_size=16), device=torch.device("cpu"))
    head = predictions.scores if predictions.head_scores is None else predictions.head_scores
    train_head = fitted.scores if fitted.head_scores is None else fitted.head_scores
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        maps=predictions.heads_maps.astype(np.float16),
        labels=predictions.labels,
        head=head,
        train_maps=fitted.heads_maps.astype(np.float16),
        train_head=train_head,
    )


def summarise(runs: list[dict[str, Any]], keys: list[str]) -> dict[str, tuple[float, float]]:
    out = {}
    for key in keys:
        values = np.array([r["metrics"].get(key, np.nan) for r in runs], dtype=float)
        if np.isfinite(values).any():
            out[key] = (float(np.nanmean(values)), float(np.nanstd(values)))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--settings", nargs="+", default=["paper", "defaults"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--epochs", type=int, default=None, help="override every protocol's epoch count")
    parser.add_argument(
        "--train-limit",
        type=int,
        default=None,
        help="train on N of the protocol's training images, a seeded random choice (limit_train)",
    )
    parser.add_argument(
        "--train-first",
        action="store_true",
        help="with --train-limit: the first N images instead (the rows made before 2026-12-03)",
    )
    parser.add_argument("--quick", action="store_true", help="one seed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--cache", type=Path, default=REPO / ".bench-cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "quality.json")
    parser.add_argument(
        "--save-predictions",
        type=Path,
        default=None,
        metavar="DIR",
        help="write each run's test maps and its normal training images' maps to "
        "DIR/<dataset>-<setting>-<seed>.npz (for bench/bench_scores.py)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = args.seeds[:1] if args.quick else args.seeds
    settings = [parse_setting(text) for text in args.settings]
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
        "runs": [],
        "summary": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    keys = (
        [f"image_auroc_{s}" for s in IMAGE_SCORES]
        + [f"ap_det_{s}" for s in IMAGE_SCORES]
        + ["pixel_auroc", "aupro", "ap_loc", "pixel_auroc_heads", "aupro_heads"]
    )
    rows = []
    for name in args.datasets:
        protocol = PROTOCOLS[name]
        root = dataset_root(name, protocol, args.cache)
        epochs = args.epochs or protocol.epochs
        for setting, raw in settings:
            runs = []
            for seed in seeds:
                model_cfg, train_cfg = build_configs(
                    protocol, setting, raw, seed=seed, epochs=epochs, backbone=args.backbone
                )
                save = (
                    args.save_predictions / f"{name}-{setting}-{seed}.npz"
                    if args.save_predictions and setting != "anomalib"
                    else None
                )
                run = run_once(
                    name,
                    protocol,
                    root,
                    model_cfg,
                    train_cfg,
                    train_limit=args.train_limit,
                    train_first=args.train_first,
                    anomalib=setting == "anomalib",
                    save=save,
                )
                run.update(
                    setting=setting,
                    seed=seed,
                    epochs=epochs,
                    train_subset=None if not args.train_limit else "first" if args.train_first else "random",
                )
                runs.append(run)
                report["runs"].append(run)
                aurocs = ", ".join(f"{s} {run['metrics'][f'image_auroc_{s}']:.3f}" for s in IMAGE_SCORES)
                print(
                    f"  {name} {setting} seed {seed}: image AUROC {aurocs} ({run['train_seconds']:.0f} s)", flush=True
                )
                args.out.write_text(json.dumps(report, indent=1, default=float))
            summary = summarise(runs, keys)
            report["summary"][f"{name}/{setting}"] = {
                "epochs": epochs,
                "seeds": seeds,
                "train_images": runs[0]["train_images"],
                **summary,
            }
            rows.append((name, setting, epochs, len(seeds), summary))
            args.out.write_text(json.dumps(report, indent=1, default=float))
    print()
    print("| dataset | settings | epochs | seeds | " + " | ".join(keys) + " |")
    print("|---|---|---|---|" + "---|" * len(keys))
    for name, setting, epochs, count, summary in rows:
        cells = [f"{summary[k][0]:.3f} ± {summary[k][1]:.3f}" if k in summary else "n/a" for k in keys]
        print(f"| {name} | {setting} | {epochs} | {count} | " + " | ".join(cells) + " |")
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
