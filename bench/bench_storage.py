"""Storage benchmark: ingest, cold read and warm read throughput of the S3 dataset layer.

    python bench/bench_storage.py                 # the stack in the environment: eval "$(infra/local/stack env)"
    python bench/bench_storage.py --private       # a throwaway SeaweedFS on free ports, stopped afterwards

For each dataset: ingest into a fresh bucket (validate + hash + upload + manifest), re-ingest (nothing to upload),
cold read (empty cache: download + verify + view of hard links) and warm read (everything cached: verify + view).
Prints a table and writes bench_results/storage.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _stdlib_platform
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ssn_platform.datasets import DatasetReader
from ssn_platform.ingest import ingest
from ssn_platform.storage import S3Settings, ensure_bucket, make_client

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DATASETS = {
    "battery_weld/denoised": (SHARED / "battery_weld" / "denoised", "mvtec"),
    "mpdd_metal_plate": (SHARED / "mpdd_metal_plate" / "data_supervised" / "metal_plate", "folder"),
}


def _free_block(count: int) -> int:
    for _ in range(200):
        base = random.randrange(30000, 31900 - count)
        ok = True
        for p in [*range(base, base + count), base + 4 + 10000]:  # + SeaweedFS's admin gRPC port
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free ports")


class PrivateS3:
    """A throwaway SeaweedFS started with infra/local/stack from a temporary state dir."""

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="ssn-bench-")
        base = _free_block(10)
        self.env = {
            **os.environ,
            "SSN_STACK_DIR": self.tmp.name,
            "SSN_S3_PORT": str(base),
            "SSN_WEED_MASTER_PORT": str(base + 1),
            "SSN_WEED_VOLUME_PORT": str(base + 2),
            "SSN_WEED_FILER_PORT": str(base + 3),
            "SSN_WEED_ADMIN_PORT": str(base + 4),
            "SSN_WEED_GRPC_OFFSET": "5",
        }
        self.stack = str(REPO / "infra" / "local" / "stack")

    def __enter__(self) -> dict[str, str]:
        subprocess.run([self.stack, "up", "s3"], env=self.env, check=True, capture_output=True)
        out = subprocess.run([self.stack, "env"], env=self.env, check=True, capture_output=True, text=True).stdout
        env = {}
        for line in out.splitlines():
            name, _, value = line[len("export ") :].partition("=")
            env[name] = value
        return env

    def __exit__(self, *exc: object) -> None:
        subprocess.run([self.stack, "down"], env=self.env, check=False, capture_output=True)
        self.tmp.cleanup()


def _rate(nbytes: int, files: int, seconds: float) -> dict[str, float]:
    return {
        "seconds": round(seconds, 3),
        "MB_per_s": round(nbytes / 1e6 / seconds, 2) if seconds > 0 else float("inf"),
        "files_per_s": round(files / seconds, 1) if seconds > 0 else float("inf"),
    }


def bench_dataset(name: str, root: Path, layout: str, settings, client, workers: int, repeats: int) -> dict:
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    ensure_bucket(client, bucket)
    product = name.split("/")[0]
    try:
        t0 = time.perf_counter()
        res = ingest(
            root, product=product, layout=layout, bucket=bucket, settings=settings, workers=workers, progress=False
        )
        t_ingest = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = ingest(
            root, product=product, layout=layout, bucket=bucket, settings=settings, workers=workers, progress=False
        )
        t_reingest = time.perf_counter() - t0
        assert again.uploaded == 0, again

        cold, warm = [], []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(prefix="ssn-bench-cache-") as cache:
                reader = DatasetReader(res.uri, cache_dir=cache, settings=settings, workers=workers)
                t0 = time.perf_counter()
                reader.materialize()
                cold.append(time.perf_counter() - t0)
                assert reader.stats.downloaded > 0
                unique_bytes = reader.stats.bytes_downloaded
                unique_files = reader.stats.downloaded
                reader2 = DatasetReader(res.uri, cache_dir=cache, settings=settings, workers=workers)
                t0 = time.perf_counter()
                reader2.materialize()
                warm.append(time.perf_counter() - t0)
                assert reader2.stats.downloaded == 0
        return {
            "dataset": name,
            "layout": layout,
            "samples": res.samples,
            "objects": res.objects,
            "bytes": res.bytes_total,
            "unique_objects": unique_files,
            "unique_bytes": unique_bytes,
            "version": res.version,
            "ingest": _rate(res.bytes_total, res.objects, t_ingest),
            "reingest_noop": _rate(res.bytes_total, res.objects, t_reingest),
            "cold_read": _rate(res.bytes_total, res.objects, min(cold)),
            "warm_read": _rate(res.bytes_total, res.objects, min(warm)),
            "cold_read_all_s": [round(v, 3) for v in cold],
            "warm_read_all_s": [round(v, 3) for v in warm],
        }
    finally:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objs:
                client.delete_objects(Bucket=bucket, Delete={"Objects": objs})
        client.delete_bucket(Bucket=bucket)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--private", action="store_true", help="start a throwaway SeaweedFS instead of using the env")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="cold/warm read repetitions (best is reported)")
    ap.add_argument("--out", type=Path, default=REPO / "bench_results" / "storage.json")
    args = ap.parse_args(argv)

    # torch & co. load here, after argument parsing (`--help` answers at once) and before any timing.
    import supersimplenet.loading  # noqa: F401, PLC0415 (imported for that side effect, see the comment above)

    private = args.private or not (os.environ.get("SSN_S3_ENDPOINT") and os.environ.get("AWS_ACCESS_KEY_ID"))
    ctx = PrivateS3() if private else None
    env = ctx.__enter__() if ctx else dict(os.environ)
    try:
        settings = S3Settings.from_env(env)
        client = make_client(settings)
        rows = []
        for name, (root, layout) in DATASETS.items():
            if not root.is_dir():
                print(f"skipping {name}: {root} not found", file=sys.stderr)
                continue
            rows.append(bench_dataset(name, root, layout, settings, client, args.workers, args.repeats))
    finally:
        if ctx:
            ctx.__exit__(None, None, None)

    header = f"{'dataset':<24}{'files':>7}{'MB':>8}  {'phase':<15}{'s':>8}{'MB/s':>9}{'files/s':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        for phase in ("ingest", "reingest_noop", "cold_read", "warm_read"):
            m = r[phase]
            print(
                f"{r['dataset']:<24}{r['objects']:>7}{r['bytes'] / 1e6:>8.1f}  {phase:<15}{m['seconds']:>8.2f}"
                f"{m['MB_per_s']:>9.1f}{m['files_per_s']:>9.0f}"
            )
    result = {
        "benchmark": "storage",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "system": _stdlib_platform.platform()},
        "endpoint": settings.endpoint_label,
        "server": "SeaweedFS (private, infra/local/stack)" if private else "from the environment",
        "workers": args.workers,
        "repeats": args.repeats,
        "notes": "MB = 1e6 bytes over all objects of the dataset (duplicates included); cold read = empty cache "
        "(download, sha256 verify, hard-link view); warm read = cached (sha256 verify + view check); "
        "ingest includes validation (PIL) and hashing.",
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
