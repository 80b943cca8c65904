"""Serving benchmark: requests/s and p50/p95/p99 latency of the inspection endpoint, batching on and off, beside
the model's own throughput, with where each request's time went.

    eval "$(infra/local/stack env)"                            # MLflow, RAY_ADDRESS (GCS), SSN_SERVE_PORT
    python bench/bench_serving.py                              # product bench-demo (registered on first use)
    python bench/bench_serving.py --product battery-weld --clients 1 4 16 --requests 300

Deploys the app as its own Serve application (``ssn-bench`` under ``/bench``) once with ``batching: true`` and once
with ``batching: false`` (everything else equal), warms it up, then runs concurrent clients (threads, one HTTP
session each, 127.0.0.1 only) that POST real weld seam PNGs until ``--requests`` answers or ``--max-seconds`` per
run. Latency is measured by the client (request sent -> answer read). Each answer's ``Server-Timing`` header
(`ssn_platform.serving.metrics.StageTimer`) splits it: the replica's stages (read, decode, queue, model, post) and
``outside``, the client's latency minus the replica's total (Serve's proxy, the Ray hop to the replica, HTTP); the
table shows each stage's median. Before deploying, the same model scores the same images in this process through
`predict_images` at batch 1 and at ``--max-batch-size`` (the model's own img/s, the ceiling of the endpoint on these
cores). Prints tables and writes bench_results/serving.json; removes the bench application afterwards (``--keep``
leaves it).

``bench-demo``: an EfficientNet-Lite0 SuperSimpleNet at the battery-weld size (256 x 128) with seeded random heads,
its threshold calibrated on the weld training images (normal only, false_alarm 1%), champion by alias. Speed does
not depend on the weights, so this measures serving without a training run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _stdlib_platform
import re
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
for _folder in ("platform", "model"):
    if str(REPO / _folder) not in sys.path:
        sys.path.insert(0, str(REPO / _folder))

from ssn_platform.apikeys import client_headers  # noqa: E402 (after the sys.path setup above)
from ssn_platform.services import check_mlflow, experiment_id  # noqa: E402 (after the sys.path setup above)
from ssn_platform.thresholds import calibrate, record_threshold  # noqa: E402 (after the sys.path setup above)
from supersimplenet.config import ModelConfig, to_dict  # noqa: E402 (after the sys.path setup above)

# torch, MLflow and Ray (seconds to import, each) load inside the functions that use them, after argument parsing:
# `--help` and a bad argument answer at once, as in jobs/. Every ssn_platform.serving module loads Ray (the package
# imports serving.deployment).
WELD = REPO.parent / "shared" / "data" / "battery_weld" / "denoised"
DEMO = "bench-demo"
APP, PREFIX = "ssn-bench", "/bench"


def ensure_demo_product() -> str:
    """Registers bench-demo (once) and makes it champion; returns its version."""
    import torch  # noqa: PLC0415 (torch: see the comment at the top)
    from mlflow import MlflowClient  # noqa: PLC0415 (MLflow: see the comment at the top)

    from supersimplenet.backbones import load_backbone_weights  # noqa: PLC0415 (torch: see the comment at the top)
    from supersimplenet.inference import predict_images  # noqa: PLC0415 (torch: see the comment at the top)
    from supersimplenet.model import build_model  # noqa: PLC0415 (torch: see the comment at the top)
    from ssn_platform.jobconfig import build_job_config  # noqa: PLC0415 (torch: see the comment at the top)
    from ssn_platform.registry import log_and_register  # noqa: PLC0415 (MLflow, torch: see the comment at the top)

    client = MlflowClient()
    name = f"ssn-{DEMO}"
    try:
        champion = (client.get_registered_model(name).aliases or {}).get("champion")
        if champion:
            return str(champion)
    except Exception:  # noqa: BLE001 - not registered yet
        pass
    # untrained random heads (no memory to build): the map's score
    config = ModelConfig(
        backbone="efficientnet_lite0",
        image_size=(256, 128),
        noise_std=1.0,
        noise_std_mode="relative",
        image_score="map_top1",
    )
    torch.manual_seed(0)
    model = build_model(config)
    load_backbone_weights(model.feature_extractor.backbone, config.backbone, "default")
    with torch.no_grad():
        model.classification_head.fc.weight.mul_(0.05)
    model.eval()
    job = build_job_config(
        {
            "product": DEMO,
            "dataset": "s3://ssn/datasets/battery-weld/latest",
            "model": to_dict(config),
            "scaling": {"num_workers": 1},
        }
    )
    run = client.create_run(experiment_id(client, job.experiment_name), run_name="bench-demo")
    version = log_and_register(job, model, run_id=run.info.run_id, metrics={}, provenance="bench: random heads")
    client.set_terminated(run.info.run_id)
    normal = sorted((WELD / "train" / "good").iterdir())
    scores, _ = predict_images(model, [Image.open(p) for p in normal])
    threshold = calibrate(
        np.asarray(scores),
        np.zeros(len(normal)),
        method="false_alarm",
        false_alarm_rate=0.01,
        split="train (normal images; demo product)",
    )
    record_threshold(DEMO, version, threshold, run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", version)  # a demo product: no promotion policy
    return version


STAGES = ("read", "model_lookup", "decode", "queue", "model", "post", "outside")


def model_throughput(
    product: str,
    bodies: list[bytes],
    batch_sizes: list[int],
    torch_threads: int,
    precision: str = "fp32",
    seconds: float = 10.0,
) -> list[dict]:
    """The champion's own img/s through `predict_images` (decoded arrays, no HTTP), per batch size."""
    import torch  # noqa: PLC0415 (torch: see the comment at the top)

    from ssn_platform.serving.requests import decode_image  # noqa: PLC0415 (Ray: see the comment at the top)
    from ssn_platform.serving.versions import (  # noqa: PLC0415 (Ray: see the comment at the top)
        champion_info,
        load_version,
        run_items,
    )

    torch.set_num_threads(torch_threads)
    name, version, tags = champion_info(product)
    loaded = load_version(product, name, version, tags, device="cpu", precision=precision)
    arrays = [decode_image(body, max_pixels=1 << 26, max_side=1 << 14)[0] for body in bodies]
    rows = []
    for batch in batch_sizes:
        items = [(loaded, arrays[i % len(arrays)]) for i in range(batch)]
        run_items(items)  # warm-up
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            run_items(items)
            done += batch
        rows.append({"batch": batch, "images_per_s": round(done / (time.perf_counter() - started), 2)})
    return rows


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_clients(url: str, bodies: list[bytes], *, clients: int, total: int, max_seconds: float) -> dict:
    from ssn_platform.serving.metrics import parse_server_timing  # noqa: PLC0415 (Ray: see the comment at the top)

    latencies: list[float] = []
    stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
    batches: list[int] = []  # the batch each answer was scored in
    errors: list[str] = []
    lock = threading.Lock()
    issued = [0]
    deadline = time.monotonic() + max_seconds
    auth = client_headers()  # the local stack's API key

    def worker(offset: int) -> None:
        session = requests.Session()
        while time.monotonic() < deadline:
            with lock:
                if issued[0] >= total:
                    return
                index = issued[0]
                issued[0] += 1
            body = bodies[(index + offset) % len(bodies)]
            started = time.perf_counter()
            try:
                answer = session.post(url, data=body, headers={"Content-Type": "image/png", **auth}, timeout=120)
                elapsed = time.perf_counter() - started
                header = answer.headers.get("Server-Timing", "")
                timing = parse_server_timing(header)
                batch = re.search(r'desc="batch (\d+)"', header)
                with lock:
                    if answer.status_code == 200:
                        latencies.append(elapsed)
                        for stage, ms in timing.items():
                            stages.setdefault(stage, []).append(ms)
                        if "total" in timing:
                            stages["outside"].append(1000.0 * elapsed - timing["total"])
                        if batch:
                            batches.append(int(batch.group(1)))
                    else:
                        errors.append(f"HTTP {answer.status_code}")
            except requests.RequestException as error:
                with lock:
                    errors.append(type(error).__name__)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "clients": clients,
        "completed": len(latencies),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "seconds": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 2) if wall else 0.0,
        "p50_ms": round(1000 * percentile(latencies, 50), 1),
        "p95_ms": round(1000 * percentile(latencies, 95), 1),
        "p99_ms": round(1000 * percentile(latencies, 99), 1),
        "mean_ms": round(1000 * sum(latencies) / max(1, len(latencies)), 1),
        "mean_batch": round(sum(batches) / len(batches), 2) if batches else None,
        "stage_p50_ms": {stage: round(percentile(values, 50), 2) for stage, values in stages.items() if values},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--product", default=DEMO, help=f"product to inspect (default {DEMO}, registered if missing)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per run")
    parser.add_argument("--requests", type=int, default=200, help="answers per run (default 200)")
    parser.add_argument("--max-seconds", type=float, default=90.0, help="time limit per run (default 90)")
    parser.add_argument("--warmup", type=int, default=10, help="requests before each configuration")
    parser.add_argument("--address", default=None, help="Ray GCS address (default SSN_RAY_ADDRESS / RAY_ADDRESS)")
    parser.add_argument("--port", type=int, default=None, help="Serve HTTP port (default SSN_SERVE_PORT or 8000)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--inference-threads",
        type=int,
        default=1,
        help="batches the replica runs at once (ServeSettings.inference_threads); the replica's torch threads are "
        "--torch-threads divided by it (the model alone keeps --torch-threads)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "serving.json")
    parser.add_argument("--keep", action="store_true", help="leave the bench application running")
    parser.add_argument("--batching", choices=["both", "on", "off"], default="both")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="the replica's and the model-alone run's precision (ServeSettings.precision)",
    )
    parser.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Serve's access log of the replica (default: ServeSettings' default)",
    )
    args = parser.parse_args(argv)

    from ray import serve  # noqa: PLC0415 (Ray: see the comment at the top)

    from ssn_platform.serving.deployment import deploy, wait_ready  # noqa: PLC0415 (Ray: see the comment at the top)

    check_mlflow()
    version = ensure_demo_product() if args.product == DEMO else None
    images = sorted((WELD / "test" / "good").iterdir())[:8] + sorted((WELD / "test" / "defective").iterdir())[:8]
    bodies = [p.read_bytes() for p in images]
    base_settings = {
        "torch_threads": max(1, args.torch_threads // args.inference_threads),
        "inference_threads": args.inference_threads,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_ms / 1000.0,
        "max_ongoing_requests": 64,
        "refresh_s": 30.0,
        "precision": args.precision,
    }
    if args.access_log is not None:
        base_settings["access_log"] = args.access_log
    model = model_throughput(
        args.product, bodies, sorted({1, args.max_batch_size, 16}), args.torch_threads, args.precision
    )
    for row in model:
        print(f"model alone, batch {row['batch']}: {row['images_per_s']} img/s", file=sys.stderr)
    results = []
    try:
        for batching in {"both": (True, False), "on": (True,), "off": (False,)}[args.batching]:
            settings = {**base_settings, "batching": batching}
            base = deploy(settings, address=args.address, name=APP, route_prefix=PREFIX, port=args.port)
            if urlparse(base).hostname != "127.0.0.1":
                raise SystemExit(f"refusing to send traffic to {base}: 127.0.0.1 only")
            wait_ready(base, timeout=300)
            url = f"{base}/v1/products/{args.product}/inspect"
            warm = run_clients(url, bodies, clients=2, total=args.warmup, max_seconds=120)
            if warm["completed"] == 0:
                raise SystemExit(f"warm-up failed against {url}: {warm['error_kinds']}")
            for clients in args.clients:
                row = run_clients(url, bodies, clients=clients, total=args.requests, max_seconds=args.max_seconds)
                row["batching"] = batching
                results.append(row)
                print(
                    f"batching={'on' if batching else 'off'} clients={clients}: {row['requests_per_s']} req/s, "
                    f"p50 {row['p50_ms']} ms, p95 {row['p95_ms']} ms, p99 {row['p99_ms']} ms, "
                    f"errors {row['errors']}",
                    file=sys.stderr,
                )
    finally:
        if not args.keep:
            try:
                serve.delete(APP)
            except Exception:  # noqa: BLE001 - best effort
                pass

    header = (
        f"{'batching':<9}{'clients':>8}{'answers':>9}{'errors':>8}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in results:
        print(
            f"{'on' if row['batching'] else 'off':<9}{row['clients']:>8}{row['completed']:>9}{row['errors']:>8}"
            f"{row['requests_per_s']:>9.2f}{row['p50_ms']:>9.1f}{row['p95_ms']:>9.1f}{row['p99_ms']:>9.1f}"
        )
    print("\nmedian ms per stage (Server-Timing; outside = client latency - replica total)")
    print(f"{'batching':<9}{'clients':>8}" + "".join(f"{stage:>13}" for stage in STAGES) + f"{'mean batch':>12}")
    for row in results:
        print(
            f"{'on' if row['batching'] else 'off':<9}{row['clients']:>8}"
            + "".join(f"{row['stage_p50_ms'].get(stage, float('nan')):>13.1f}" for stage in STAGES)
            + f"{row['mean_batch'] or float('nan'):>12.2f}"
        )
    print(
        "\nmodel alone (predict_images, decoded images): "
        + ", ".join(f"batch {row['batch']} {row['images_per_s']} img/s" for row in model)
    )
    payload = {
        "benchmark": "serving",
        "product": args.product,
        "version": version,
        "image": "battery_weld test PNGs (256 x 120), model input 256 x 128 (EfficientNet-Lite0)",
        "settings": base_settings,
        "requests_per_run": args.requests,
        "max_seconds": args.max_seconds,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": _stdlib_platform.platform()},
        "results": results,
        "model_alone": model,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
