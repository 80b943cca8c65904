"""Whole-epoch and whole-run training time, with and without the training feature cache (issue 14).

For each dataset (the protocols of `bench_quality.PROTOCOLS`: images, image size, batch), precision and cache
setting, trains `supersimplenet.train.fit` (the step the Ray workers and Tune trials run) for `--epochs` epochs on
the protocol's training images, without a test split, and reports:

- setup: the seconds before the first epoch (weights, the relative noise scale, the patch memory, and with the cache
  on, the one backbone pass that fills it);
- the first epoch and the median of the later epochs, in seconds and training images per second;
- the whole run, and what a run of the protocol's own epoch count would take at these rates;
- the cache's size, and the largest difference of an epoch's mean loss from the uncached run's (0 up to float
  rounding in fp32: the cache is exact there; bf16 stores bfloat16 levels).

    .venv/bin/python bench/bench_training.py --datasets weld mpdd_unsup --precisions fp32 bf16 --epochs 4

Prints a Markdown table and writes JSON (`--out`). Timings need the cores to themselves: run nothing else beside it.
The two settings of a row run back to back in one process, so they share the machine's state.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "model"))  # runs from a checkout without the editable install too

from bench_quality import PROTOCOLS, build_configs, dataset_root, limit_train  # noqa: E402
from supersimplenet.feature_cache import CACHE_DTYPES, estimate_bytes  # noqa: E402
from supersimplenet.layouts import read_layout  # noqa: E402
from supersimplenet.loading import DefectDataset  # noqa: E402
from supersimplenet.backbones import get_preset  # noqa: E402
from supersimplenet.supervision import apply_supervision  # noqa: E402
from supersimplenet.train import fit  # noqa: E402


def train_samples(name: str, cache: Path, limit: int | None) -> tuple[Path, list]:
    protocol = PROTOCOLS[name]
    root = dataset_root(name, protocol, cache)
    options = {"split_file": str(REPO / protocol.split_file)} if protocol.split_file else {}
    samples = read_layout(root, protocol.layout, **options)
    return root, limit_train([s for s in samples if s.split == "train"], limit)


def run(name: str, root: Path, train: list, precision: str, cache_mib: int, args) -> dict[str, Any]:
    protocol = PROTOCOLS[name]
    model_cfg, train_cfg = build_configs(
        protocol, "defaults", {}, seed=args.seed, epochs=args.epochs, backbone=args.backbone
    )
    train_cfg = replace(train_cfg, precision=precision, feature_cache_mib=cache_mib)
    started = time.perf_counter()
    result = fit(data_root=root, samples=train, model_config=model_cfg, train_config=train_cfg, progress=False)
    total = time.perf_counter() - started
    epochs = [row["seconds"] for row in result.history]
    trained = [s for s in apply_supervision(train, train_cfg.supervision) if s.split == "train"]  # as fit does
    items = len(trained) * (4 if train_cfg.resolved_flips else 1)
    later = statistics.median(epochs[1:] or epochs)
    setup = total - sum(epochs)
    cache_bytes = 0
    if cache_mib:
        preset = get_preset(model_cfg.backbone)
        dataset = DefectDataset(
            root=root,
            samples=trained,
            image_size=model_cfg.image_size,
            mean=preset.mean,
            std=preset.std,
            flips=train_cfg.resolved_flips,
        )
        cache_bytes = estimate_bytes(result.model, dataset, CACHE_DTYPES[precision])
    return {
        "dataset": name,
        "backbone": model_cfg.backbone,
        "image_size": list(model_cfg.image_size),
        "batch_size": train_cfg.batch_size,
        "items": items,
        "precision": precision,
        "cache": bool(cache_mib),
        "cache_mib": cache_bytes / 2**20,
        "setup_s": setup,
        "first_epoch_s": epochs[0],
        "later_epoch_s": later,
        "later_img_s": items / later,
        "total_s": total,
        "protocol_epochs": protocol.epochs,
        "protocol_run_s": setup + epochs[0] + later * (protocol.epochs - 1),
        "losses": [row["loss"] for row in result.history],
    }


@dataclass
class Options:
    """The parsed command line (a dataclass, so the warm-up can `replace` its epoch count)."""

    datasets: list[str] = field(default_factory=list)
    precisions: list[str] = field(default_factory=list)
    epochs: int = 4
    backbone: str = "efficientnet_lite0"
    seed: int = 0
    train_limit: int | None = None
    threads: int | None = None
    cache: Path = REPO / ".bench-cache"
    out: Path = REPO / "bench_results" / "training.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["weld", "mpdd_unsup"], choices=sorted(PROTOCOLS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=sorted(CACHE_DTYPES))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=None, help="N seeded random training images")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=REPO / ".bench-cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "training.json")
    args = parser.parse_args(namespace=Options())
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the later epochs are what the cache speeds up)")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for name in args.datasets:
        root, train = train_samples(name, args.cache, args.train_limit)
        for precision in args.precisions:
            # one-time costs (kernel selection, allocator growth) before either timed run
            run(name, root, train[:2], precision, 0, replace(args, epochs=1))
            pair = [run(name, root, train, precision, cache_mib, args) for cache_mib in (0, 4096)]
            pair[1]["loss_max_diff"] = max(abs(a - b) for a, b in zip(pair[0]["losses"], pair[1]["losses"]))
            rows.extend(pair)
            for row in pair:
                print(
                    f"{name} {precision} cache={row['cache']}: setup {row['setup_s']:.1f} s, epochs "
                    f"{row['first_epoch_s']:.1f} / {row['later_epoch_s']:.1f} s",
                    flush=True,
                )
    print(
        "\n| dataset | items | precision | cache | cache MiB | setup s | epoch 1 s | later epochs s | later img/s |"
        " speed-up | protocol run s | max loss diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for index, row in enumerate(rows):
        base = rows[index - 1] if row["cache"] else row
        print(
            f"| {row['dataset']} | {row['items']} | {row['precision']} | {'on' if row['cache'] else 'off'} |"
            f" {row['cache_mib']:.1f} | {row['setup_s']:.1f} | {row['first_epoch_s']:.1f} |"
            f" {row['later_epoch_s']:.2f} | {row['later_img_s']:.2f} |"
            f" {base['later_epoch_s'] / row['later_epoch_s']:.2f}x |"
            f" {row['protocol_run_s']:.0f} ({row['protocol_epochs']} epochs) |"
            f" {row.get('loss_max_diff', 0.0):.1e} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    args.out.write_text(json.dumps({"machine": machine, "epochs": args.epochs, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
