"""Ingest a local defect dataset folder into object storage as a versioned dataset.

    python jobs/ingest.py --source ../shared/data/battery_weld/denoised --product battery_weld
    python jobs/ingest.py --smoke-test                      # a tiny generated dataset, product "smoke"
    ray job submit --working-dir . --runtime-env-json '{"env_vars": {...S3 settings...}}' -- \
        python jobs/ingest.py --source /data/x --product x

The folder is read with the model package's layout readers (mvtec, visa, ksdd2, sensum, folder; detected when
--layout is not given) and validated, every image and mask decoded fully; when any file is bad (missing, truncated,
unreadable, a mask of the wrong size), nothing is uploaded and every bad path is listed. Defective images whose mask
is empty: --empty-masks error (default: refuse, naming them), label-only (keep them as defective images without a
mask) or drop (leave them out); the choice is recorded in the manifest and is part of the dataset version.
S3 settings come from the environment (SSN_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; for the local
stack: eval "$(infra/local/stack env)"). Prints the manifest URI on stdout (nothing else), a summary on stderr.
Needs no Ray: under `ray job submit` it runs as a plain driver process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

try:
    import _bootstrap  # noqa: F401  (puts model/ and platform/ on sys.path for plain checkouts, e.g. a Ray working_dir)
except ImportError:  # pragma: no cover - installed packages are enough
    pass


def make_smoke_dataset(root: Path) -> Path:
    """A tiny deterministic MVTec-layout dataset (same bytes on every run, so re-ingesting uploads nothing)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(20261129)
    size = 32

    def save(path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path, format="PNG", optimize=False)

    def normal() -> np.ndarray:
        base = np.full((size, size, 3), 128, dtype=np.uint8)
        return np.clip(base + rng.integers(-10, 11, size=base.shape), 0, 255).astype(np.uint8)

    for i in range(4):
        save(root / "train" / "good" / f"{i:03d}.png", normal())
    for i in range(2):
        save(root / "test" / "good" / f"{i:03d}.png", normal())
    for i in range(2):
        image = normal()
        mask = np.zeros((size, size), dtype=np.uint8)
        y, x = 8 + 8 * i, 10
        image[y : y + 6, x : x + 6] = 255
        mask[y : y + 6, x : x + 6] = 255
        save(root / "test" / "scratch" / f"{i:03d}.png", image)
        save(root / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mask)
    return root


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from supersimplenet.samples import EMPTY_MASK_POLICIES  # light: no torch

    p = argparse.ArgumentParser(
        prog="jobs/ingest.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--source", type=Path, help="local dataset folder")
    p.add_argument("--product", help="product name (datasets/<product>/<version>/ in the bucket)")
    p.add_argument("--layout", choices=["mvtec", "visa", "ksdd2", "sensum", "folder"], help="default: detected")
    p.add_argument("--category", help="category sub-folder / VisA object / SensumSODF category")
    p.add_argument("--split-file", type=Path, help="file of '<split> <image>' lines (any layout)")
    p.add_argument("--labels-file", type=Path, help="labels CSV (folder layout)")
    p.add_argument("--fold", type=int, help="SensumSODF fold (0, 1, 2)")
    p.add_argument(
        "--empty-masks",
        choices=EMPTY_MASK_POLICIES,
        default="error",
        help="defective images whose mask is empty: refuse the dataset (default), keep them as defective "
        "images without a mask (label-only), or leave them out (drop)",
    )
    p.add_argument("--bucket", default="ssn")
    p.add_argument("--workers", type=int, default=8, help="parallel uploads (default 8)")
    p.add_argument("--no-latest", action="store_true", help="do not move datasets/<product>/latest")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the full result as JSON instead of the URI")
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help="ingest a tiny generated dataset (product 'smoke' unless --product is given)",
    )
    args = p.parse_args(argv)
    if args.smoke_test:
        if args.source is not None:
            p.error("--smoke-test generates its own data; do not pass --source")
        args.product = args.product or "smoke"
    elif args.source is None or args.product is None:
        p.error("--source and --product are required (or use --smoke-test)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ssn_platform.ingest import ingest
    from ssn_platform.storage import StorageError
    from supersimplenet.samples import DataError

    options = {}
    if args.split_file is not None:
        options["split_file"] = str(args.split_file)
    if args.labels_file is not None:
        options["labels_file"] = str(args.labels_file)
    if args.fold is not None:
        options["fold"] = args.fold

    with tempfile.TemporaryDirectory(prefix="ssn-smoke-") as tmp:
        source = make_smoke_dataset(Path(tmp) / "smoke") if args.smoke_test else args.source
        try:
            result = ingest(
                source,
                product=args.product,
                layout=args.layout,
                bucket=args.bucket,
                category=args.category,
                options=options,
                workers=args.workers,
                progress=False if args.no_progress else None,
                update_latest=not args.no_latest,
                empty_masks=args.empty_masks,
            )
        except DataError as exc:
            print(f"ingest: invalid dataset: {exc}", file=sys.stderr)
            return 2
        except (StorageError, ValueError) as exc:
            print(f"ingest: {exc}", file=sys.stderr)
            return 1

    print(
        f"ingest: {args.product}@{result.version}: {result.samples} samples, {result.objects} objects "
        f"({result.bytes_total} bytes); uploaded {result.uploaded} ({result.bytes_uploaded} bytes), "
        f"already present {result.skipped}; manifest {'written' if result.manifest_written else 'unchanged'}",
        file=sys.stderr,
    )
    if result.empty_mask_images:
        what = "left out" if result.empty_masks == "drop" else "kept as defective without a mask"
        print(
            f"ingest: {len(result.empty_mask_images)} defective image(s) with an empty mask {what} "
            f"(--empty-masks {result.empty_masks})",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=1))
    else:
        print(result.uri)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
