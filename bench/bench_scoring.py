"""Batch scoring benchmark: images/s per core of `jobs/score.py` (Ray Data) beside the single-process fast path.

    eval "$(infra/local/stack env)"                  # S3, MLflow, RAY_ADDRESS of the local stack
    python bench/bench_scoring.py                    # bench-demo product (bench_serving.py registers it), 512 images
    python bench/bench_scoring.py --images 1024 --configs 1x1 1x2 2x1

The same real weld PNGs (256 x 120, repeated under distinct names up to ``--images``) are uploaded once to
``s3://ssn-bench-scoring/<run>/``. Then, for each configuration:

* **fast path**: one process, ``T`` torch threads, the version loaded by the Serve replica's loader, every image
  decoded by the endpoint's decoder and scored by `predict_images` in batches of ``--batch-size`` (bytes already in
  memory: no S3, no Ray): the ceiling.
* **job** ``AxC``: `score_images_job` with ``A`` actors of ``C`` CPUs (and threads) each, reading from S3 and writing
  the Parquet table (a fresh output prefix per run, so nothing is skipped), once on half the images and once on all:
  "whole" is all the images over the whole job's time (actor start-up and model load included), "steady" the
  second half's images over the difference of the two times (start-up cancels out).

"per core" divides by ``T`` (fast path) or ``A x C`` (job). Prints a table, writes bench_results/scoring.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _stdlib_platform
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _folder in ("platform", "model", "bench"):
    if str(REPO / _folder) not in sys.path:
        sys.path.insert(0, str(REPO / _folder))

from bench_serving import DEMO, ensure_demo_product  # noqa: E402 (after the sys.path setup above)
from ssn_platform.scoring import ScoreSettings, pin_version, score_images_job  # noqa: E402 (after the sys.path setup above)
from ssn_platform.services import check_mlflow  # noqa: E402 (after the sys.path setup above)
from ssn_platform.storage import ensure_bucket, make_client  # noqa: E402 (after the sys.path setup above)

# torch and Ray (seconds to import, each) load inside fast_path, after argument parsing: `--help` and a bad argument
# answer at once, as in jobs/. Every ssn_platform.serving module loads Ray (the package imports serving.deployment).
WELD = REPO.parent / "shared" / "data" / "battery_weld" / "denoised"
BUCKET = "ssn-bench-scoring"


def fast_path(product: str, bodies: list[bytes], *, threads: int, batch_size: int) -> float:
    """Images/s of decode + predict_images in one process (the ceiling the job is compared with)."""
    import torch  # noqa: PLC0415 (torch: see the comment at the top)

    from ssn_platform.serving.requests import decode_image  # noqa: PLC0415 (Ray: see the comment at the top)
    from ssn_platform.serving.settings import ServeSettings  # noqa: PLC0415 (Ray: see the comment at the top)
    from ssn_platform.serving.versions import load_version, run_items  # noqa: PLC0415 (Ray: see the comment at the top)

    torch.set_num_threads(threads)
    name, version, tags, _ = pin_version(product, None)
    loaded = load_version(product, name, version, tags, device="cpu")
    limits = {"max_pixels": ServeSettings().max_pixels, "max_side": ServeSettings().max_side}
    started = time.perf_counter()
    for start in range(0, len(bodies), batch_size):
        run_items([(loaded, decode_image(body, **limits)[0]) for body in bodies[start : start + batch_size]])
    return len(bodies) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--product", default="bench-demo", help="product (bench-demo: registered if missing)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["1x1", "1x2", "2x1"],
        help="job configurations AxC: A actors of C CPUs (fast path with A*C threads beside each)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "scoring.json")
    args = parser.parse_args(argv)

    check_mlflow()
    if args.product == DEMO:
        ensure_demo_product()
    paths = sorted((WELD / "test" / "good").iterdir()) + sorted((WELD / "test" / "defective").iterdir())
    bodies = [paths[i % len(paths)].read_bytes() for i in range(args.images)]
    client = make_client()
    ensure_bucket(client, BUCKET)
    prefix = f"{uuid.uuid4().hex[:8]}/images"
    for i, body in enumerate(bodies):
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{i:05d}.png", Body=body)

    rows = []
    for config in args.configs:
        actors, cpus = (int(x) for x in config.lower().split("x"))
        cores = actors * cpus
        fast = fast_path(args.product, bodies, threads=cores, batch_size=args.batch_size)
        seconds = {}
        for count in (args.images // 2, args.images):  # marginal rate: start-up (actors, model load) cancels out
            settings = ScoreSettings(
                product=args.product,
                input=f"s3://{BUCKET}/{prefix}/",
                actors=actors,
                cpus_per_actor=cpus,
                batch_size=args.batch_size,
                limit=count,
                output=f"s3://{BUCKET}/out-{uuid.uuid4().hex[:6]}",
            )
            summary = score_images_job(settings, progress=False)
            if summary.scored != count:
                raise SystemExit(f"{config}: the job scored {summary.scored} of {count} images")
            seconds[count] = summary.seconds
        whole = args.images / seconds[args.images]
        steady = (args.images - args.images // 2) / (seconds[args.images] - seconds[args.images // 2])
        row = {
            "config": config,
            "actors": actors,
            "cpus_per_actor": cpus,
            "cores": cores,
            "fast_img_s": round(fast, 2),
            "job_img_s": round(whole, 2),
            "job_steady_img_s": round(steady, 2),
            "fast_per_core": round(fast / cores, 2),
            "job_steady_per_core": round(steady / cores, 2),
            "job_seconds": seconds,
            "ratio": round(whole / fast, 3),
            "steady_ratio": round(steady / fast, 3),
        }
        rows.append(row)
        print(
            f"{config}: fast {row['fast_img_s']} img/s, job {row['job_img_s']} img/s whole, "
            f"{row['job_steady_img_s']} steady ({row['steady_ratio']:.0%})",
            file=sys.stderr,
        )

    header = (
        f"{'config':<8}{'cores':>6}{'fast img/s':>12}{'job whole':>11}{'job steady':>12}{'fast/core':>11}"
        f"{'steady/core':>13}{'steady/fast':>13}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['config']:<8}{r['cores']:>6}{r['fast_img_s']:>12.2f}{r['job_img_s']:>11.2f}"
            f"{r['job_steady_img_s']:>12.2f}{r['fast_per_core']:>11.2f}{r['job_steady_per_core']:>13.2f}"
            f"{r['steady_ratio']:>13.1%}"
        )
    payload = {
        "benchmark": "scoring",
        "product": args.product,
        "images": args.images,
        "batch_size": args.batch_size,
        "image": "battery_weld test PNGs (256 x 120), model input 256 x 128 (EfficientNet-Lite0), fp32",
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": _stdlib_platform.platform()},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
