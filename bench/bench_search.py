"""Whole searches, timed: `jobs/tune.py` on the local stack before and after the training fast path.

    infra/local/stack up && eval "$(infra/local/stack env)"
    .venv/bin/python bench/bench_search.py --variants before after --trials 8
    .venv/bin/python bench/bench_search.py --variants after --trials 20

A search is what the platform spends most of its training compute on, so this times the whole of one as a user
runs it, not a step: Ray Tune + Optuna + ASHA trials on the Ray head, each trial a Ray Train run that reads the
dataset from S3, trains, validates every epoch and checkpoints, and the search's own MLflow and Optuna
bookkeeping. The protocol is fixed: ELPV at 256x256 with 200 normal training cells and a labelled val split of
50 normal + 50 defective cells (`bench/splits/elpv_search.txt`, made by `supersimplenet.elpv.make_split_file`),
the quickstart's config (`jobs/configs/elpv.yaml`: EfficientNet-Lite0, batch 16), 6 epochs per trial, one Ray
Train worker per trial (so two trials run at once on two cores), the default search space and ASHA schedule.
The dataset is exported and ingested as product `elpv-search-bench` on first use (ingest is idempotent).

Variants (overrides of the same config; every variant starts a study of its own, so no trial is reused):

* ``before``: fp32 training from the images (`train.precision=fp32 train.feature_cache_mib=0`), the training path
  before issue 14;
* ``after``: the config as shipped: bf16 autocast and the training feature cache;
* ``after_fp32``: fp32 with the feature cache (for CPUs without native bf16).

Reads the JSON summary `jobs/tune.py` prints last (wall seconds, trials, ASHA's early stops, best and baseline
objective, the decision), adds the command's own wall time (process start to exit: imports, Ray connection,
every trial) and, from the Optuna storage, the epochs each trial trained (its intermediate values). Prints a table
and writes bench_results/search.json. Limits: one run per variant (a search takes minutes to an hour here), so a
difference under ~10 % is within the noise of a shared machine; trial order and ASHA's stops depend on the sampled
settings and the objective, so the variants do not train the same epochs: compare seconds per epoch trained (the
command's seconds over all trials' epochs; two trials run at once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _stdlib_platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _folder in ("platform", "model"):
    if str(REPO / _folder) not in sys.path:
        sys.path.insert(0, str(REPO / _folder))

import optuna  # noqa: E402 (after the sys.path setup above)
import torch  # noqa: E402 (after the sys.path setup above)
from ssn_platform.ingest import ingest  # noqa: E402 (after the sys.path setup above)
from ssn_platform.study import default_storage_url, open_storage  # noqa: E402 (after the sys.path setup above)
from supersimplenet.elpv import export_elpv  # noqa: E402 (after the sys.path setup above)

PRODUCT = "elpv-search-bench"
SPLIT_FILE = REPO / "bench" / "splits" / "elpv_search.txt"
CONFIG = "jobs/configs/elpv.yaml"
PROTOCOL = ["train.epochs=6", "scaling.num_workers=1", "overlays=0"]
VARIANTS = {
    "before": ["train.precision=fp32", "train.feature_cache_mib=0"],
    "after": [],
    "after_fp32": ["train.precision=fp32"],
}


def ensure_dataset(cache: Path) -> str:
    """The protocol's cells exported under `cache` and ingested as PRODUCT; returns the dataset version's URI."""
    local = export_elpv(cache, split_file=SPLIT_FILE)
    result = ingest(local, product=PRODUCT, options={"split_file": str(SPLIT_FILE)}, progress=False)
    return result.uri


def run_search(variant: str, *, dataset: str, trials: int, study: str, log_dir: Path) -> dict:
    """One `jobs/tune.py` run; returns its summary line plus the command's wall seconds. Its output goes to
    log_dir/<study>.log."""
    command = [
        sys.executable,
        str(REPO / "jobs" / "tune.py"),
        "--config",
        CONFIG,
        "--trials",
        str(trials),
        "--study",
        study,
        f"dataset={dataset}",
        *PROTOCOL,
        *VARIANTS[variant],
    ]
    log_path = log_dir / f"{study}.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    lines = log_path.read_text().splitlines()
    if done.returncode != 0:
        tail = "\n".join(lines[-20:])
        raise SystemExit(f"{variant}: jobs/tune.py exited {done.returncode}; see {log_path}:\n{tail}")
    summary = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
    return {
        "variant": variant,
        "command_seconds": round(seconds, 1),
        "log": str(log_path),
        **study_epochs(study),
        **summary,
    }


def study_epochs(study: str) -> dict:
    """Epochs the study's trials trained (one intermediate value per epoch) and each trial's seconds, from the
    Optuna storage: the variants' trials stop at different rungs, so seconds per epoch trained is the comparable
    figure."""
    trials = optuna.load_study(study_name=study, storage=open_storage(default_storage_url())).trials
    done = [t for t in trials if t.datetime_complete is not None]
    return {
        "epochs_trained": sum(len(t.intermediate_values) for t in trials),
        "trial_epochs": [len(t.intermediate_values) for t in trials],
        "trial_seconds": [round((t.datetime_complete - t.datetime_start).total_seconds(), 1) for t in done],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["before", "after"])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--cache", type=Path, default=REPO / ".bench-cache" / "elpv-search")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "search.json")
    args = parser.parse_args(argv)
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise SystemExit('no stack environment: run `infra/local/stack up && eval "$(infra/local/stack env)"` first')

    dataset = ensure_dataset(args.cache)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for variant in args.variants:
        study = f"bench-search-{variant}-{args.trials}t-{stamp}"
        print(f"[{time.strftime('%H:%M:%S')}] {variant}: {args.trials} trials, study {study}", flush=True)
        rows.append(run_search(variant, dataset=dataset, trials=args.trials, study=study, log_dir=args.out.parent))
        args.out.write_text(json.dumps(_payload(args, dataset, rows), indent=2))

    print(f"\n{PRODUCT}: {CONFIG} {' '.join(PROTOCOL)}, 256x256, 200 normal training cells")
    header = ["variant", "trials", "stopped by ASHA", "epochs trained", "search s", "command s", "s per epoch"]
    header += ["s per trial", "best", "baseline"]
    print("| " + " | ".join([*header, "decision"]) + " |")
    print("|---" * (len(header) + 1) + "|")
    for row in rows:
        metric = row["metric"]
        print(
            f"| {row['variant']} | {row['trials_this_run']} | {len(row['stopped_early'])} | {row['epochs_trained']} "
            f"| {row['wall_seconds']} | {row['command_seconds']} "
            f"| {row['command_seconds'] / max(1, row['epochs_trained']):.1f} "
            f"| {row['command_seconds'] / max(1, row['trials_this_run']):.1f} "
            f"| {_fmt(row.get(f'best_{metric}'))} | {_fmt(row.get(f'baseline_{metric}'))} | {row['decision']} |"
        )
    print(f"\nwrote {args.out}")
    return 0


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _payload(args, dataset: str, rows: list[dict]) -> dict:
    return {
        "protocol": {"config": CONFIG, "overrides": PROTOCOL, "split_file": str(SPLIT_FILE.relative_to(REPO))},
        "dataset": dataset,
        "trials": args.trials,
        "machine": {
            "cpus": os.cpu_count(),
            "processor": _stdlib_platform.processor() or _stdlib_platform.machine(),
            "torch": torch.__version__,
        },
        "runs": rows,
    }


if __name__ == "__main__":
    raise SystemExit(main())
