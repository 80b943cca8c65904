"""Evaluate SuperSimpleNet: several seeds of one training job (mean ± std), or one registered version.

    python jobs/evaluate.py --config jobs/configs/battery_weld.yaml --seeds 0 1 2 [key=value ...] [--parallel N]
    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/battery_weld.yaml --seeds 0 1 2
    python jobs/evaluate.py --product battery-weld --version 3 [--dataset s3://ssn/datasets/battery-weld/<version>]
    python jobs/evaluate.py --model-uri models:/ssn-battery-weld@champion
    python jobs/evaluate.py --smoke-test       # tiny generated dataset, 1 epoch at 96x96, 2 workers, seeds 0 and 1

Seeds (`--config`): one training run per seed through the train job's code (`train.seed=<k>`, run name
`<base>-seed<k>` with `<base>` the `run_name=` override or a fresh name; never registered), each a child of one
MLflow parent run in the job's experiment, which holds `<metric>_mean` and `<metric>_std` (population std over the
seeds) of every test metric. Evaluating the same `run_name=` again reuses the seeds' finished runs. The runs go one
after the other: each already uses every worker of the config (`scaling.num_workers`); `--parallel N` runs N at
once (threads in this driver, one Ray Train run each) and only helps when the cluster has room for N times the
workers (the job warns otherwise; the runs then wait for CPUs).

Version (`--product/--version` or `--model-uri`): scores the test split of `--dataset` (default: the dataset version
the model was trained on) with the registered model through the training job's inference path.

Both report metrics per image score (head, map_max, mean), AUROC and AP per defect class, pixel metrics where the
test images have masks, and a 20-bin histogram of normal and defective scores: logged on an MLflow parent run
(tags ssn.evaluate.*, artifacts evaluation.md and evaluation.json) and printed as a Markdown table, followed by a
JSON summary as the last line. Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _bootstrap  # noqa: F401  (puts model/ and platform/ on sys.path for plain checkouts)

SMOKE_SEEDS = ["0", "1"]


def _split_seeds(items: list[str] | None, overrides: list[str]) -> tuple[list[str] | None, list[str]]:
    """`--seeds 0 1 2 key=value`: argparse hands the overrides after the seeds to --seeds; move them back.
    Seeds may also be given as `0,1,2`."""
    if items is None:
        return None, overrides
    seeds = [part for item in items if "=" not in item for part in item.split(",") if part.strip()]
    return seeds, [item for item in items if "=" in item] + overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="seeds: YAML job config (jobs/configs/*.yaml)")
    parser.add_argument("--seeds", nargs="*", default=None, help="seeds: one training run per seed, e.g. 0 1 2")
    parser.add_argument("--parallel", type=int, default=1, help="seeds: runs at once (default 1)")
    parser.add_argument("--product", help="version: product (registered model ssn-<product>)")
    parser.add_argument("--version", help="version: registered model version")
    parser.add_argument("--model-uri", help="version: models:/<name>/<version> or models:/<name>@<alias>")
    parser.add_argument("--dataset", help="version: dataset URI (default: the one the version was trained on)")
    parser.add_argument("--experiment", help="version: MLflow experiment (default: the training run's)")
    parser.add_argument("--batch-size", type=int, default=16, help="version: inference batch size")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: SSN_RAY_ADDRESS or auto)")
    parser.add_argument(
        "--tuned",
        default=None,
        help="seeds: tuned settings written by jobs/tune.py (s3:// URI or file); overrides still win",
    )
    parser.add_argument("--smoke-test", action="store_true", help="2 seeds of a tiny run on a generated dataset")
    parser.add_argument("overrides", nargs="*", help="seeds: key=value overrides of the config")
    args = parser.parse_args(argv)

    from mlflow.exceptions import MlflowException

    from supersimplenet.checkpoint import CheckpointError
    from ssn_platform.evaluation import check_seeds, evaluate_seeds, evaluate_version
    from ssn_platform.tuned_settings import load_tuned_job_config
    from ssn_platform.storage import StorageError
    from ssn_platform.services import PlatformError

    seeds, overrides = _split_seeds(args.seeds, list(args.overrides))
    by_version = bool(args.product or args.version or args.model_uri)
    try:
        if by_version and (args.config or args.smoke_test or seeds is not None or overrides or args.tuned):
            raise PlatformError(
                "give either --config/--smoke-test with --seeds and overrides, or a version "
                "(--product/--version or --model-uri), not both"
            )
        if by_version:
            report = evaluate_version(
                product=args.product,
                version=args.version,
                model_uri=args.model_uri,
                dataset=args.dataset,
                experiment=args.experiment,
                batch_size=args.batch_size,
            )
        else:
            config = args.config
            if args.smoke_test:
                seeds = seeds if seeds is not None else SMOKE_SEEDS
            elif config is None:
                parser.error("--config (with --seeds), --product/--version, --model-uri or --smoke-test is required")
            seeds = check_seeds(seeds)  # bad seeds fail before anything is ingested or trained
            if args.smoke_test:
                from ssn_platform.ingest import ingest
                from ingest import make_smoke_dataset
                from train import SMOKE_OVERRIDES

                with tempfile.TemporaryDirectory() as directory:
                    result = ingest(make_smoke_dataset(Path(directory) / "smoke"), product="smoke", progress=False)
                config = config or str(Path(__file__).with_name("configs") / "smoke.yaml")
                overrides = [*SMOKE_OVERRIDES, f"dataset={result.uri}", *overrides]
            job = load_tuned_job_config(config, overrides, args.tuned)
            report = evaluate_seeds(job, seeds, parallel=args.parallel, address=args.address, config_path=config)
    except (ValueError, PlatformError, StorageError, CheckpointError, MlflowException) as error:  # ConfigError too
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.markdown())
    print(json.dumps(report.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
