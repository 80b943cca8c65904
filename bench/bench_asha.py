"""Does ASHA's early rung rank settings like the full trial? Spearman's rho between each epoch's objective and the
last epoch's, over trials that all ran every epoch.

    infra/local/stack up && eval "$(infra/local/stack env)"
    .venv/bin/python bench/bench_asha.py --run 12            # a search whose trials ASHA never stops, then the table
    .venv/bin/python bench/bench_asha.py --study NAME        # the table of a study already run

`--run N` runs `jobs/tune.py` with bench_search.py's protocol (ELPV at 256x256, 200 normal training cells, a
labelled val split of 50 + 50 cells, the ELPV config, 6 epochs, one worker per trial, the default space) but
`--grace-period` equal to the epochs, so ASHA stops no trial and every trial reports the objective after every
epoch. The objective is the search's own for this product (real labelled val cells: the heads' `map_top1` image
AUROC, `ssn_platform.search_session.MEMORY_SPLIT_OBJECTIVE`). For each epoch e it prints rho between the trials'
objective after e epochs and after the last, marks the epochs ASHA would judge at by default
(`default_grace_period`, reduction factor 2), and says where the last epoch's best trial stood after e epochs. A rung
ASHA uses should rank like the full trial (rho near 1) and keep the final best in its upper half.

Limits: one seed per setting (the objective moves by about 0.01 between seeds), 12 settings drawn by the search's
own TPE sampler (its first trials are random start-up points, then it concentrates), and the full trial's ranking is
its val objective, not test AUROC (the search never looks at the test split). Writes bench_results/asha.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _folder in ("platform", "model"):
    if str(REPO / _folder) not in sys.path:
        sys.path.insert(0, str(REPO / _folder))

import optuna  # noqa: E402 (after the sys.path setup above)
from bench_search import CONFIG, PROTOCOL, ensure_dataset  # noqa: E402 (after the sys.path setup above)
from scipy.stats import spearmanr  # noqa: E402 (after the sys.path setup above)
from ssn_platform.search_session import default_grace_period  # noqa: E402 (after the sys.path setup above)
from ssn_platform.study import default_storage_url, open_storage  # noqa: E402 (after the sys.path setup above)

EPOCHS = 6


def run_full_trials(trials: int, cache: Path, log_dir: Path) -> str:
    """A search with the protocol in which no trial is stopped; returns its study name."""
    study = f"bench-asha-{trials}t-{time.strftime('%Y%m%d-%H%M%S')}"
    command = [sys.executable, str(REPO / "jobs" / "tune.py"), "--config", CONFIG, "--trials", str(trials)]
    command += ["--study", study, "--grace-period", str(EPOCHS), f"dataset={ensure_dataset(cache)}", *PROTOCOL]
    log_path = log_dir / f"{study}.log"
    print(f"[{time.strftime('%H:%M:%S')}] {trials} trials, none stopped: study {study}, log {log_path}", flush=True)
    with log_path.open("w") as log:
        done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SystemExit(f"jobs/tune.py exited {done.returncode}; see {log_path}")
    return study


def rung_table(study_name: str) -> dict:
    """rho between each epoch's objective and the last epoch's over the study's trials that ran every epoch."""
    study = optuna.load_study(study_name=study_name, storage=open_storage(default_storage_url()))
    curves = [t.intermediate_values for t in study.trials if t.intermediate_values]
    epochs = max(len(curve) for curve in curves)
    full = [[curve[step] for step in sorted(curve)] for curve in curves if len(curve) == epochs]
    if len(full) < 4:
        raise SystemExit(f"study {study_name}: {len(full)} trials ran all {epochs} epochs; a ranking needs >= 4")
    final = [curve[-1] for curve in full]
    best = max(range(len(full)), key=final.__getitem__)
    grace, rungs = default_grace_period(epochs), []
    while grace * 2 ** len(rungs) < epochs:
        rungs.append(grace * 2 ** len(rungs))
    rows = []
    for epoch in range(1, epochs):
        values = [curve[epoch - 1] for curve in full]
        rho = float(spearmanr(values, final).statistic)
        best_rank = 1 + sum(value > values[best] for value in values)
        rows.append({"epoch": epoch, "asha_rung": epoch in rungs, "rho": round(rho, 3), "final_best_rank": best_rank})
    return {
        "study": study_name,
        "trials": len(full),
        "epochs": epochs,
        "final_values": [round(v, 4) for v in final],
        "params": [t.params for t in study.trials if len(t.intermediate_values) == epochs],
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=int, metavar="TRIALS", help="run a search of TRIALS unstopped trials first")
    source.add_argument("--study", help="an existing study whose trials ran every epoch")
    parser.add_argument("--cache", type=Path, default=REPO / ".bench-cache" / "elpv-search")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "asha.json")
    args = parser.parse_args(argv)
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise SystemExit('no stack environment: run `infra/local/stack up && eval "$(infra/local/stack env)"` first')
    args.out.parent.mkdir(parents=True, exist_ok=True)
    study = run_full_trials(args.run, args.cache, args.out.parent) if args.run else args.study

    result = rung_table(study)
    print(f"\nstudy {study}: {result['trials']} trials x {result['epochs']} epochs; rho against the last epoch")
    print("| after epoch | ASHA rung by default | Spearman rho | the final best trial's rank |")
    print("|---|---|---|---|")
    for row in result["rows"]:
        rung = "yes" if row["asha_rung"] else ""
        print(f"| {row['epoch']} | {rung} | {row['rho']:+.3f} | {row['final_best_rank']} of {result['trials']} |")
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
