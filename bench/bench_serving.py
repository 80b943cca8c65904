"""Serving benchmark: requests/s and p50/p95/p99 latency of the inspection endpoint, batching on and off.

    eval "$(infra/local/stack env)"                            # MLflow, RAY_ADDRESS (GCS), SSN_SERVE_PORT
    python bench/bench_serving.py                              # product bench-demo (registered on first use)
    python bench/bench_serving.py --product battery-weld --clients 1 4 16 --requests 300

Deploys the app as its own Serve application (``ssn-bench`` under ``/bench``) once with ``batching: true`` and once
with ``batching: false`` (everything else equal), warms it up, then runs concurrent clients (threads, one HTTP
session each, 127.0.0.1 only) that POST real weld seam PNGs until ``--requests`` answers or ``--max-seconds`` per
run. Latency is measured by the client (request sent -> answer read). Prints a table and writes
bench_results/serving.json; removes the bench application afterwards (``--keep`` leaves it).

``bench-demo``: an EfficientNet-Lite0 SuperSimpleNet at the battery-weld size (256 x 128) with seeded random heads,
its threshold calibrated on the weld training images (normal only, false_alarm 1%), champion by alias. Speed does
not depend on the weights, so this measures serving without a training run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _stdlib_platform
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
for _folder in ("platform", "model"):
    if str(REPO / _folder) not in sys.path:
        sys.path.insert(0, str(REPO / _folder))
WELD = REPO.parent / "shared" / "data" / "battery_weld" / "denoised"
DEMO = "bench-demo"
APP, PREFIX = "ssn-bench", "/bench"


def ensure_demo_product() -> str:
    """Registers bench-demo (once) and makes it champion; returns its version."""
    import numpy as np
    import torch
    from mlflow import MlflowClient
    from PIL import Image

    from supersimplenet.backbones import load_backbone_weights
    from supersimplenet.config import ModelConfig, to_dict
    from supersimplenet.inference import predict_images
    from ssn_platform.jobconfig import build_job_config
    from ssn_platform.registry import log_and_register
    from ssn_platform.services import experiment_id
    from ssn_platform.thresholds import calibrate, record_threshold

    client = MlflowClient()
    name = f"ssn-{DEMO}"
    try:
        champion = (client.get_registered_model(name).aliases or {}).get("champion")
        if champion:
            return str(champion)
    except Exception:  # noqa: BLE001 - not registered yet
        pass
    config = ModelConfig(backbone="efficientnet_lite0", image_size=(256, 128), noise_std=1.0, noise_std_mode="relative")
    torch.manual_seed(0)
    from supersimplenet.model import build_model

    model = build_model(config)
    load_backbone_weights(model.feature_extractor.backbone, config.backbone, "default")
    with torch.no_grad():
        model.classification_head.fc.weight.mul_(0.05)
    model.eval()
    job = build_job_config({"product": DEMO, "dataset": "s3://ssn/datasets/battery-weld/latest",
                            "model": to_dict(config), "scaling": {"num_workers": 1}})
    run = client.create_run(experiment_id(client, job.experiment_name), run_name="bench-demo")
    version = log_and_register(job, model, run_id=run.info.run_id, metrics={}, provenance="bench: random heads")
    client.set_terminated(run.info.run_id)
    normal = sorted((WELD / "train" / "good").iterdir())
    scores, _ = predict_images(model, [Image.open(p) for p in normal])
    threshold = calibrate(np.asarray(scores), np.zeros(len(normal)), method="false_alarm", false_alarm_rate=0.01,
                          split="train (normal images; demo product)")
    record_threshold(DEMO, version, threshold, run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", version)  # a demo product: no promotion policy
    return version


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def run_clients(url: str, bodies: list[bytes], *, clients: int, total: int, max_seconds: float) -> dict:
    import requests

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    issued = [0]
    deadline = time.monotonic() + max_seconds

    from ssn_platform.apikeys import client_headers

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
                with lock:
                    if answer.status_code == 200:
                        latencies.append(elapsed)
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
        "clients": clients, "completed": len(latencies), "errors": len(errors), "error_kinds": sorted(set(errors)),
        "seconds": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 2) if wall else 0.0,
        "p50_ms": round(1000 * percentile(latencies, 50), 1), "p95_ms": round(1000 * percentile(latencies, 95), 1),
        "p99_ms": round(1000 * percentile(latencies, 99), 1),
        "mean_ms": round(1000 * sum(latencies) / max(1, len(latencies)), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--product", default=DEMO, help=f"product to inspect (default {DEMO}, registered if missing)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients per run")
    parser.add_argument("--requests", type=int, default=200, help="answers per run (default 200)")
    parser.add_argument("--max-seconds", type=float, default=90.0, help="time limit per run (default 90)")
    parser.add_argument("--warmup", type=int, default=10, help="requests before each configuration")
    parser.add_argument("--address", default=None, help="Ray GCS address (default SSN_RAY_ADDRESS / RAY_ADDRESS)")
    parser.add_argument("--port", type=int, default=None, help="Serve HTTP port (default SSN_SERVE_PORT or 8000)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "serving.json")
    parser.add_argument("--keep", action="store_true", help="leave the bench application running")
    args = parser.parse_args(argv)

    from ray import serve

    from ssn_platform.serving.deployment import deploy, wait_ready
    from ssn_platform.services import check_mlflow

    check_mlflow()
    version = ensure_demo_product() if args.product == DEMO else None
    images = sorted((WELD / "test" / "good").iterdir())[:8] + sorted((WELD / "test" / "defective").iterdir())[:8]
    bodies = [p.read_bytes() for p in images]
    base_settings = {"torch_threads": args.torch_threads, "max_batch_size": args.max_batch_size,
                     "batch_wait_timeout_s": args.batch_wait_ms / 1000.0, "max_ongoing_requests": 64,
                     "refresh_s": 30.0}
    results = []
    try:
        for batching in (True, False):
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
                print(f"batching={'on' if batching else 'off'} clients={clients}: {row['requests_per_s']} req/s, "
                      f"p50 {row['p50_ms']} ms, p95 {row['p95_ms']} ms, p99 {row['p99_ms']} ms, "
                      f"errors {row['errors']}", file=sys.stderr)
    finally:
        if not args.keep:
            try:
                serve.delete(APP)
            except Exception:  # noqa: BLE001 - best effort
                pass

    header = (f"{'batching':<9}{'clients':>8}{'answers':>9}{'errors':>8}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}"
              f"{'p99 ms':>9}")
    print(header)
    print("-" * len(header))
    for row in results:
        print(f"{'on' if row['batching'] else 'off':<9}{row['clients']:>8}{row['completed']:>9}{row['errors']:>8}"
              f"{row['requests_per_s']:>9.2f}{row['p50_ms']:>9.1f}{row['p95_ms']:>9.1f}{row['p99_ms']:>9.1f}")
    payload = {
        "benchmark": "serving", "product": args.product, "version": version,
        "image": "battery_weld test PNGs (256 x 120), model input 256 x 128 (EfficientNet-Lite0)",
        "settings": base_settings, "requests_per_run": args.requests, "max_seconds": args.max_seconds,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": _stdlib_platform.platform()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
