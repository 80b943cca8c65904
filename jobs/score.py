"""Batch inspection: score every image under an S3 prefix (or a dataset version) with a product's champion.

    python jobs/score.py --product battery-weld --input s3://line-3/2026-12-03/
    python jobs/score.py --product battery-weld --version 3 --data s3://ssn/datasets/battery-weld/<version> --split test
    ray job submit --working-dir . -- python jobs/score.py --product battery-weld --input s3://line-3/2026-12-03/ \
        --actors 4 --cpus-per-actor 2 --masks
    python jobs/score.py --smoke-test     # trains, calibrates and scores the tiny generated dataset, then resumes

Runs on Ray Data (`ssn_platform.scoring`): a streaming read from S3, an actor pool that loads the version once per
actor and scores through the endpoint's decoder and inference code, and one Parquet table written back to S3 under
``<output>/<product>/v<version>/table/`` (partitions ``status=ok`` and ``status=error``; bad images are rows of the
errors partition, never a crash), with optional mask PNGs under ``.../masks/``. A rerun skips the images the same
version already scored. The version is ``--version`` or the champion, resolved once. A summary is logged to MLflow
(experiment ``ssn-<product>-scoring``) and printed as JSON on the last line; exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _bootstrap  # noqa: F401  (puts model/ and platform/ on sys.path for plain checkouts)


def _smoke_version(address: str | None) -> tuple[str, str]:
    """The smoke product's dataset (ingested) and a freshly trained and calibrated version of it."""
    from ingest import make_smoke_dataset
    from train import SMOKE_OVERRIDES

    from ssn_platform.ingest import ingest
    from ssn_platform.thresholds import calibrate_version
    from ssn_platform.training import run_training
    from ssn_platform.tuned_settings import load_tuned_job_config

    with tempfile.TemporaryDirectory() as directory:
        dataset = ingest(make_smoke_dataset(Path(directory) / "smoke"), product="smoke", progress=False).uri
    job = load_tuned_job_config(
        str(Path(__file__).with_name("configs") / "smoke.yaml"), [*SMOKE_OVERRIDES, f"dataset={dataset}"], None
    )
    version = run_training(job, address=address).model_version
    calibrate_version("smoke", version, split="test", method="false_alarm", false_alarm_rate=0.5)
    return dataset, version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--product", help="product (registered model ssn-<product>)")
    parser.add_argument("--version", default=None, help="registered version (default: the champion)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", help="s3://bucket/prefix/: every image object below it")
    source.add_argument("--data", help="a dataset version URI (s3://<bucket>/datasets/<product>/<version>)")
    parser.add_argument("--split", default=None, help="--data: only this split (default: every image)")
    parser.add_argument("--output", default=None, help="results prefix (default: s3://<input bucket>/scores)")
    parser.add_argument("--masks", action="store_true", help="also write each image's defect mask as a PNG")
    parser.add_argument(
        "--resolution",
        default="model",
        choices=("model", "original"),
        help="grid of the masks, defect area and regions: the model's input size or the image's",
    )
    parser.add_argument("--actors", type=int, default=1, help="scoring actors (default 1)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (and torch threads) per actor")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (> 0: score on CUDA)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--limit", type=int, default=None, help="score at most this many new images")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: SSN_RAY_ADDRESS or auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--smoke-test", action="store_true", help="train, calibrate and score the smoke dataset")
    args = parser.parse_args(argv)

    from mlflow.exceptions import MlflowException

    from supersimplenet.checkpoint import CheckpointError
    from ssn_platform.scoring import ScoreSettings, score_images_job
    from ssn_platform.services import PlatformError
    from ssn_platform.storage import StorageError

    try:
        if args.smoke_test:
            if args.product or args.input or args.data:
                raise PlatformError("--smoke-test picks its own product and data")
            args.product, args.split = "smoke", "test"
            args.data, args.version = _smoke_version(args.address)
        elif not args.product or not (args.input or args.data):
            parser.error("--product and --input or --data are required (or --smoke-test)")
        settings = ScoreSettings(
            product=args.product,
            input=args.input or args.data,
            version=args.version,
            dataset=bool(args.data),
            split=args.split,
            output=args.output,
            masks=args.masks,
            resolution=args.resolution,
            actors=args.actors,
            cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=args.gpus_per_actor,
            batch_size=args.batch_size,
            precision=args.precision,
            limit=args.limit,
        )
        summary = score_images_job(settings, address=args.address, progress=not args.no_progress)
        if args.smoke_test:  # a second pass finds everything scored: the resume path
            again = score_images_job(settings, address=args.address, progress=False)
            if again.scored or again.skipped != summary.listed:
                raise PlatformError(f"smoke test: the rerun scored {again.scored} images again")
    except (ValueError, PlatformError, StorageError, CheckpointError, MlflowException) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{summary.registered_model} v{summary.version}: {summary.scored} scored ({summary.anomalous} anomalous), "
        f"{summary.errors} errors, {summary.skipped} already scored; {summary.images_per_s:.1f} images/s; "
        f"table {summary.table}",
        file=sys.stderr,
    )
    print(json.dumps(summary.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
