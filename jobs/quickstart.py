"""The whole platform on this machine with real images; run by `make quickstart` after the stack is up.

    make quickstart                         # install, stack up, then this script
    python jobs/quickstart.py --smoke-test  # a smaller variant (fewer trials and epochs), used by CI

Prints each step, the endpoint's answers for held-back test images, and the URLs of the MLflow UI, the Ray
dashboard, the endpoint's API docs and the HTML report.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import _bootstrap  # noqa: F401  (puts model/ and platform/ on sys.path for plain checkouts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke-test", action="store_true", help="fewer trials and epochs")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="also train the recipe over N seeds and print their test mean +- std (N >= 2); without it the "
        "figure is printed only where no seed can change it (the patch memory's score)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the search and training jobs")
    args = parser.parse_args(argv)

    from ssn_platform.quickstart import QuickstartSettings, run
    from ssn_platform.services import PlatformError

    settings = QuickstartSettings(overrides=tuple(args.overrides))
    if args.smoke_test:
        # smoke-sized models are near chance: the floor is off so the run still exercises promotion and serving
        settings = QuickstartSettings(
            trials=2,
            trial_epochs=1,
            epochs=2,
            held_back=6,
            floor=0.0,
            overrides=("model.image_size=[96,96]", *args.overrides),
        )
    if args.seeds is not None and args.seeds < 2:
        parser.error("--seeds: at least 2 (a mean +- std needs several seeds)")
    if args.trials is not None or args.epochs is not None or args.seeds is not None:
        settings = replace(
            settings,
            trials=args.trials or settings.trials,
            epochs=args.epochs or settings.epochs,
            seeds=args.seeds or settings.seeds,
        )
    try:
        run(settings)
    except PlatformError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
