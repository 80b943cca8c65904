"""Train (or resume) a SuperSimpleNet model on Ray Train, tracked and registered in MLflow.

    python jobs/train.py --config jobs/configs/battery_weld.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/battery_weld.yaml train.epochs=50
    python jobs/train.py --config jobs/configs/battery_weld.yaml --tuned s3://ssn/tuned/battery-weld/efficientnet_lite0.yaml
    python jobs/train.py --smoke-test          # ingests a tiny generated dataset, trains 1 epoch with 2 workers

Overrides use dotted keys and YAML values (`scaling.num_workers=2 model.noise_std=0.5`). Submitting again with the
same `run_name=` resumes from the run's last checkpoint. Prints a JSON summary (run, MLflow run id, model version,
test metrics) as its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _bootstrap  # noqa: F401  (puts model/ and platform/ on sys.path for plain checkouts)

SMOKE_OVERRIDES = [
    "train.epochs=1",
    "train.batch_size=4",
    "model.image_size=[96,96]",
    "scaling.num_workers=2",
    "checkpoint_every=1",
    "register=true",
    "overlays=2",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML job config (jobs/configs/*.yaml)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: SSN_RAY_ADDRESS or auto)")
    parser.add_argument("--smoke-test", action="store_true", help="tiny end-to-end run on a generated dataset")
    parser.add_argument(
        "--tuned", default=None, help="tuned settings written by jobs/tune.py (s3:// URI or file); overrides still win"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)

    from supersimplenet.config import ConfigError
    from ssn_platform.training import PlatformError, run_training

    overrides = list(args.overrides)
    config = args.config
    if args.smoke_test:
        from ssn_platform.ingest import ingest
        from ingest import make_smoke_dataset

        with tempfile.TemporaryDirectory() as directory:
            result = ingest(make_smoke_dataset(Path(directory) / "smoke"), product="smoke", progress=False)
        config = config or str(Path(__file__).with_name("configs") / "smoke.yaml")
        overrides = [*SMOKE_OVERRIDES, f"dataset={result.uri}", *overrides]
    if config is None:
        parser.error("--config is required (or --smoke-test)")
    try:
        from ssn_platform.tuned_settings import load_tuned_job_config

        job = load_tuned_job_config(config, overrides, args.tuned)
        result = run_training(job, address=args.address)
    except (ConfigError, PlatformError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "run_name": result.run_name,
                "mlflow_run_id": result.mlflow_run_id,
                "model_version": result.model_version,
                "resumed": result.resumed,
                "test_metrics": result.metrics,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
