"""Drift watch: compare a window of a product's recent scores with its champion's reference distribution.

    python jobs/drift.py --product elpv --table s3://ssn/scores/elpv/v3/table --window-prefix s3://line-3/2026-12-03/
    python jobs/drift.py --product elpv --table s3://ssn/scores/elpv/v3/table --since 2026-12-03T00:00:00 \
        --reference-prefix s3://line-3/2026-11-30/
    ray job submit --working-dir . -- python jobs/drift.py --product elpv --table ... --window-prefix ...
    python jobs/drift.py --smoke-test     # the smoke product trained and scored, its scores against themselves

The window is rows of the batch job's table (`jobs/score.py`) of the version (default: the champion); the reference
is the scores of the normal images the version was calibrated on, or `--reference-prefix` rows of the same table.
Population stability index and a two-sample KS test (`ssn_platform.drift`); the product is marked drifting (the
registered model's ``ssn.drift.*`` tags, shown by ``GET /v1/products``) when PSI >= --psi-limit and the KS p-value
< --ks-alpha. Logs an MLflow run (experiment ``ssn-<product>-drift``), prints the result as JSON on the last line;
exit status 0 when stable, 1 when drifting (for schedulers and alerts), 2 on bad input, 3 when the window is too
small to judge.
"""

from __future__ import annotations

import argparse
import json
import sys

import _bootstrap  # noqa: F401  (puts model/ and platform/ on sys.path for plain checkouts)

EXIT = {"stable": 0, "drifting": 1, "insufficient": 3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--product", help="product (registered model ssn-<product>)")
    parser.add_argument("--version", default=None, help="registered version (default: the champion)")
    parser.add_argument("--table", help="the batch job's table, s3://.../scores/<product>/v<version>/table")
    parser.add_argument("--window-prefix", default=None, help="window: rows whose image URI starts with this")
    parser.add_argument("--since", default=None, help="window: rows scored at or after this ISO time (UTC)")
    parser.add_argument(
        "--reference-prefix",
        default=None,
        help="reference: rows of the table whose image URI starts with this (default: the "
        "version's calibration scores of normal images)",
    )
    parser.add_argument("--psi-limit", type=float, default=0.25)
    parser.add_argument("--ks-alpha", type=float, default=0.01)
    parser.add_argument("--min-window", type=int, default=30)
    parser.add_argument("--dry-run", action="store_true", help="judge only: no MLflow run, no registry tag")
    parser.add_argument("--smoke-test", action="store_true", help="score the smoke product, check it against itself")
    args = parser.parse_args(argv)

    from mlflow.exceptions import MlflowException

    from ssn_platform.drift import check_drift
    from ssn_platform.services import PlatformError
    from ssn_platform.storage import StorageError

    try:
        if args.smoke_test:  # every image of the smoke dataset, scored, judged against itself: stable
            from score import _smoke_version

            from ssn_platform.scoring import ScoreSettings, score_images_job

            dataset, args.version = _smoke_version(None)
            summary = score_images_job(
                ScoreSettings(product="smoke", version=args.version, input=dataset, dataset=True), progress=False
            )
            args.product, args.table, args.min_window = "smoke", summary.table, 2
            args.window_prefix = args.reference_prefix = "s3://"
        if not args.product or not args.table or not (args.window_prefix or args.since):
            parser.error("--product, --table and --window-prefix or --since are required (or --smoke-test)")
        result = check_drift(
            args.product,
            args.table,
            version=args.version,
            window_prefix=args.window_prefix,
            since=args.since,
            reference_prefix=args.reference_prefix,
            psi_limit=args.psi_limit,
            ks_alpha=args.ks_alpha,
            min_window=args.min_window,
            record=not args.dry_run,
        )
    except (ValueError, PlatformError, StorageError, MlflowException) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{result.product} v{result.version}: {result.status} (PSI {result.psi:.3f}, KS p {result.ks_pvalue:.3g}; "
        f"{result.window_size} scores against {result.reference_size} of {result.reference})",
        file=sys.stderr,
    )
    print(json.dumps(result.to_dict()))
    return EXIT[result.status]


if __name__ == "__main__":
    sys.exit(main())
