"""Promote a registered version to champion of its product (or roll the champion back).

    python jobs/promote.py --product battery-weld --version 4
    python jobs/promote.py --product battery-weld --version 4 --margin 0.01 --floor 0.7 --metric pixel_auroc
    python jobs/promote.py --product battery-weld --version 4 --require-seeds 3
    python jobs/promote.py --product battery-weld --rollback

Promotion evaluates the candidate and the current champion on the evaluation split (``--split``, default test) of
the candidate's dataset (or ``--data``) with the same code, and moves the ``champion`` alias (the old champion
becomes ``previous``) only when the candidate is not worse than the champion by more than ``--margin`` on the
product's primary metric (``--metric``, else the registered model's ``primary_metric`` tag, else image_auroc) and
reaches ``--floor``. ``--require-seeds N`` also needs a multi-seed evaluation of the version's recipe (same config
and dataset version, any seeds: ``jobs/evaluate.py --config ... --seeds 0 1 2``) whose mean reaches the floor. A
version without a calibrated threshold or without a test evaluation is refused. Every
decision is recorded in the MLflow experiment ``ssn-<product>-promotions`` and as tags on the version.
``--rollback`` makes ``previous`` the champion again.

Prints the decision as JSON on its last line. Exit status: 0 promoted (or rolled back), 1 refused, 2 error.
"""

from __future__ import annotations

import argparse
import json
import sys

import _bootstrap  # noqa: F401  (puts model/ and platform/ on sys.path for plain checkouts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--product", required=True, help="product name (registered model ssn-<product>)")
    parser.add_argument("--version", help="candidate version to promote")
    parser.add_argument("--rollback", action="store_true", help="make the 'previous' version the champion again")
    parser.add_argument("--margin", type=float, default=0.005, help="tolerated drop vs the champion (default 0.005)")
    parser.add_argument("--floor", type=float, default=0.6, help="absolute minimum of the metric (default 0.6)")
    parser.add_argument("--metric", default=None, help="primary metric (default: the product's, else image_auroc)")
    parser.add_argument("--data", default=None, help="dataset URI (default: the candidate's dataset tag)")
    parser.add_argument("--split", default="test", help="evaluation split (default: test)")
    parser.add_argument(
        "--require-seeds",
        type=int,
        default=0,
        metavar="N",
        help="also require a multi-seed evaluation (jobs/evaluate.py) of the version's recipe over "
        ">= N seeds whose mean clears --floor (default 0: not required)",
    )
    args = parser.parse_args(argv)
    if args.rollback == (args.version is not None):
        parser.error("give either --version V or --rollback")

    from mlflow.exceptions import MlflowException

    from supersimplenet.checkpoint import CheckpointError
    from ssn_platform.promotion import PromotionError, promote, rollback
    from ssn_platform.storage import StorageError
    from ssn_platform.services import PlatformError

    try:
        if args.rollback:
            result = rollback(args.product)
            print(
                f"{result.registered_model}: champion is v{result.champion_version} again "
                f"(previous: v{result.previous_version})",
                file=sys.stderr,
            )
            print(json.dumps({"rollback": True, **result.__dict__}))
            return 0
        decision = promote(
            args.product,
            args.version,
            margin=args.margin,
            floor=args.floor,
            metric=args.metric,
            data_uri=args.data,
            split=args.split,
            require_seeds=args.require_seeds,
        )
    except (
        PromotionError,
        PlatformError,
        StorageError,
        CheckpointError,
        MlflowException,
        ValueError,
        OSError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    word = "PROMOTED" if decision.promoted else "REFUSED"
    print(f"{decision.registered_model} v{decision.candidate_version}: {word}: {decision.reason}", file=sys.stderr)
    print(json.dumps(decision.to_dict(), default=str))
    return 0 if decision.promoted else 1


if __name__ == "__main__":
    sys.exit(main())
