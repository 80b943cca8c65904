"""Search noise sigma and Perlin threshold (optionally lr) for one product and backbone: Ray Tune + Optuna + ASHA.

    python jobs/tune.py --config jobs/configs/battery_weld.yaml --trials 12 [key=value ...]
    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/battery_weld.yaml --trials 12
    python jobs/tune.py --config jobs/configs/battery_weld.yaml --trials 6     # again: extends the same study
    python jobs/tune.py --smoke-test         # 2 trials x 2 epochs on a tiny generated dataset

Every trial trains the config's job (its epochs are ASHA's resource; override them, e.g. train.epochs=10) with
the trial's parameters and is scored per epoch on the dataset's val split (ingest with a split file, e.g.
--split-file jobs/splits/battery_weld.txt; synthetic defects when the val split has no defective images).
The study (default `ssn-<product>-<backbone>`) lives in a database (--storage, SSN_OPTUNA_STORAGE, or sqlite
next to the local stack's MLflow db); running again with the same study adds trials. The first trial is the
config's own values of the searched keys (the baseline; unless the study already has it, or --no-baseline), and
ASHA never stops it. Tuned settings are written to s3://<bucket>/tuned/<product>/<backbone>.yaml and logged with
the search's MLflow parent run: the best configuration's only when it beats the baseline by more than the margin
(max(--min-margin, the spread between nearly identical trials)), else the config's own values (`decision:
kept_defaults`), so `jobs/train.py --tuned` never trains with settings the search could not show to be better.
Under `ray job submit`, pass SSN_OPTUNA_STORAGE (or --storage) and the S3/MLflow settings in the runtime env.

Prints the decision and its reason, then a JSON summary (study, parent run, best parameters and value, decision,
baseline value, margin, tuned parameters, tuned settings URI) as its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _bootstrap  # noqa: F401  (puts model/ and platform/ on sys.path for plain checkouts)
from ssn_platform.tuned import DEFAULT_MIN_MARGIN  # light: no Ray, MLflow or torch

DEFAULT_SPACE = Path(__file__).with_name("configs") / "search_space.yaml"
SMOKE_OVERRIDES = [
    "train.epochs=2",
    "train.batch_size=4",
    "model.image_size=[96,96]",
    "scaling.num_workers=1",
    "checkpoint_every=2",
    "overlays=0",
]


def _smoke_dataset(directory: Path) -> str:
    """The train job's smoke dataset with one normal and one defective test image moved to val."""
    from ingest import make_smoke_dataset
    from ssn_platform.ingest import ingest

    root = make_smoke_dataset(directory / "smoke")
    split_file = directory / "split.txt"
    split_file.write_text("val test/good/000.png\nval test/scratch/000.png\n")
    result = ingest(root, product="smoke", options={"split_file": str(split_file)}, progress=False, update_latest=False)
    return result.uri


def _summary(result) -> dict:
    """The search's outcome as the one JSON line the command prints (the quickstart reads it)."""
    decision = result.decision
    summary = {
        "study": result.study_name,
        "search": result.search_name,
        "parent_run_id": result.parent_run_id,
        "validation": result.validation,
        "metric": result.metric,
        "best_trial": result.best_trial,
        "best_params": result.best_params,
        f"best_{result.metric}": result.best_value,
        "decision": decision.decision,
        "baseline_trial": decision.baseline_trial,
        f"baseline_{result.metric}": decision.baseline_value,
        "margin": decision.margin,
        "reason": decision.reason,
        "tuned_params": result.tuned_params,
        "tuned_settings": result.tuned_uri,
        "trials_in_study": len(result.trials),
        "trials_this_run": len(result.session_trials),
        "stopped_early": result.stopped_early,
        "max_concurrent": result.max_concurrent,
        "wall_seconds": round(result.wall_seconds, 1),
    }
    if result.retrain is not None:
        summary.update(
            retrain_run_id=result.retrain.mlflow_run_id,
            model_version=result.retrain.model_version,
            retrain_test_metrics=result.retrain.metrics,
        )
    return summary


def _parser() -> argparse.ArgumentParser:
    """The command's arguments (parsed before anything heavy is imported)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML job config (jobs/configs/*.yaml)")
    parser.add_argument("--trials", type=int, default=8, help="trials to add to the study in this run (default 8)")
    parser.add_argument("--space", default=str(DEFAULT_SPACE), help="search space YAML (default: %(default)s)")
    parser.add_argument("--study", default=None, help="Optuna study name (default ssn-<product>-<backbone>)")
    parser.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL (default: SSN_OPTUNA_STORAGE or sqlite next to the stack's MLflow db)",
    )
    parser.add_argument(
        "--metric",
        default="auto",
        help="per-epoch objective (default %(default)s: val_image_auroc on real labelled val images, "
        "val_image_auroc_combined on synthetic defects; ssn_platform.tuning.OBJECTIVES)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials at once (default: cluster CPUs or GPUs / one trial's workers)",
    )
    parser.add_argument(
        "--grace-period",
        type=int,
        default=None,
        help="ASHA: epochs before a trial can be stopped (default: a quarter of train.epochs, >= 1)",
    )
    parser.add_argument("--reduction-factor", type=int, default=2, help="ASHA reduction factor (default 2)")
    parser.add_argument("--time-budget", type=float, default=None, help="stop starting trials after MINUTES")
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate the config's own values of the searched keys first, unless the study has "
        "them already (default); --no-baseline: no such trial, and the best trial is written "
        "without a comparison when the study has none",
    )
    parser.add_argument(
        "--min-margin",
        type=float,
        default=DEFAULT_MIN_MARGIN,
        help="the best trial replaces the config's values only when it beats the baseline by more "
        "than max(this, the spread between nearly identical trials); in the metric's units "
        "(default %(default)s AUROC)",
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="retrain and register the tuned settings (the best "
        "configuration, or the config's own values when the search kept them)",
    )
    parser.add_argument("--address", default=None, help="Ray cluster address (default: SSN_RAY_ADDRESS or auto)")
    parser.add_argument("--smoke-test", action="store_true", help="tiny search on a generated dataset")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the base job")
    return parser


def _base_job_inputs(args: argparse.Namespace, argv: list[str] | None) -> tuple[str | None, list[str], int, str | None]:
    """(config, overrides, trials, study) of the base job: the command's own, or with --smoke-test a generated
    dataset ingested with a val split, the smoke config's small overrides, 2 trials (unless --trials is given) and a
    study named after the dataset version."""
    overrides = list(args.overrides)
    config = args.config
    trials = args.trials
    study = args.study
    if args.smoke_test:
        with tempfile.TemporaryDirectory() as directory:
            uri = _smoke_dataset(Path(directory))
        config = config or str(Path(__file__).with_name("configs") / "smoke.yaml")
        overrides = [*SMOKE_OVERRIDES, f"dataset={uri}", *overrides]
        trials = 2 if "--trials" not in (argv if argv is not None else sys.argv[1:]) else trials
        study = study or f"ssn-smoke-{uri.rstrip('/').split('/')[-2]}"
    return config, overrides, trials, study


def _search(args: argparse.Namespace, config: str, overrides: list[str], *, trials: int, study: str | None):
    """Loads the base job and the space and runs the search (`ssn_platform.tuning.run_search`)."""
    from ssn_platform.jobconfig import load_job_config
    from ssn_platform.search_space import SearchSpace
    from ssn_platform.tuning import run_search

    job = load_job_config(config, overrides)
    space = SearchSpace.load(args.space)
    return run_search(
        job,
        space=space,
        num_trials=trials,
        max_concurrent=args.max_concurrent,
        study_name=study,
        storage=args.storage,
        metric=args.metric,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        retrain=args.retrain,
        baseline=args.baseline,
        min_margin=args.min_margin,
        time_budget_s=args.time_budget * 60 if args.time_budget else None,
        address=args.address,
    )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)

    from supersimplenet.config import ConfigError
    from ssn_platform.services import PlatformError

    config, overrides, trials, study = _base_job_inputs(args, argv)
    if config is None:
        parser.error("--config is required (or --smoke-test)")
    try:
        result = _search(args, config, overrides, trials=trials, study=study)
    except (ConfigError, PlatformError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"tuned settings: {result.decision.decision}: {result.decision.reason}", flush=True)
    print(json.dumps(_summary(result), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
