"""Calibrate (or recalibrate) the decision threshold of a registered version, without retraining.

    python jobs/calibrate.py --product battery-weld --version 3
    python jobs/calibrate.py --product battery-weld --version 3 --data s3://ssn/datasets/battery-weld/<version> \
        --method false_alarm --false-alarm-rate 0.005
    ray job submit --working-dir . -- python jobs/calibrate.py --product battery-weld --version 3

Scores the validation split (``--split``, default val) of the version's dataset (tag ``dataset``) or of ``--data``
with the model library's inference code, computes the threshold (``--method``: auto, false_alarm, f1, recall) and
stores it on the version: tags threshold, threshold_method, threshold_params, threshold_split, threshold_dataset,
threshold_intervals, threshold_warning, and the artifact calibration/v<version>/threshold.json on the version's run.
A dataset without the split is an error; the test split is never used in its place. Prints the threshold as JSON on
its last line, with the 95 % confidence intervals of its rates and a warning when the split has too few images for
the requested rate (docs/jobs.md); exit status 2 on errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import _bootstrap  # noqa: F401  (puts model/ and platform/ on sys.path for plain checkouts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--product", required=True, help="product name (registered model ssn-<product>)")
    parser.add_argument("--version", required=True, help="registered model version")
    parser.add_argument("--data", default=None, help="dataset URI (default: the version's dataset tag)")
    parser.add_argument("--split", default="val", help="dataset split to calibrate on (default: val)")
    parser.add_argument(
        "--method",
        default="auto",
        choices=("auto", "false_alarm", "f1", "recall"),
        help="auto: f1 with labelled defects, else false_alarm",
    )
    parser.add_argument("--false-alarm-rate", type=float, default=0.01, help="false_alarm: target rate")
    parser.add_argument("--target-recall", type=float, default=0.95, help="recall: target recall")
    args = parser.parse_args(argv)

    from mlflow.exceptions import MlflowException

    from supersimplenet.checkpoint import CheckpointError
    from ssn_platform.storage import StorageError
    from ssn_platform.thresholds import TooFewImagesWarning, calibrate_version
    from ssn_platform.services import PlatformError

    try:
        with warnings.catch_warnings():  # printed below, with the result
            warnings.simplefilter("ignore", TooFewImagesWarning)
            threshold = calibrate_version(
                args.product,
                args.version,
                data_uri=args.data,
                split=args.split,
                method=args.method,
                false_alarm_rate=args.false_alarm_rate,
                target_recall=args.target_recall,
            )
    except (PlatformError, StorageError, CheckpointError, MlflowException, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{args.product} v{args.version}: threshold {threshold.value:.6g} ({threshold.method}, "
        f"{threshold.n_normal} normal / {threshold.n_defective} defective {threshold.split} images; "
        f"{threshold.interval_text()})",
        file=sys.stderr,
    )
    if threshold.warning:
        print(f"warning: {threshold.warning}", file=sys.stderr)
    print(json.dumps({"product": args.product, "version": str(args.version), **threshold.to_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
