"""The Ray Serve inspection app on the real local stack, over real HTTP on 127.0.0.1.

Scores equal the offline `predict_images` scores, the champion switches (and rolls back) under load without a failed
request, several products share a replica (LRU), and >= 500 generated bad requests never get a 5xx.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import struct
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from listeners import listeners  # tests/platform/listeners.py

pytestmark = [pytest.mark.stack, pytest.mark.heavy]

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {
    "refresh_s": 1.0,
    "max_bytes": 2 * 1024 * 1024,
    "max_pixels": 4_000_000,
    "max_side": 8192,
    "max_models_per_replica": 2,
    "max_batch_size": 8,
    "batch_wait_timeout_s": 0.01,
    "negative_cache_s": 2.0,
    "torch_threads": 2,
    "load_backoff_s": 4.0,
}
LOAD_ALLOWANCE_S = 45.0  # a switch is served within refresh_s + one model load (download + build + warm-up)


# ---------------------------------------------------------------------------------------------------------
# Helpers (the registry fixtures random_head_model / register_version / weld_val_dataset are in conftest.py)
# ---------------------------------------------------------------------------------------------------------
def copy_as_champion(source_name: str, version: str, product: str, *, keep_threshold: bool = True) -> None:
    """Registers the same logged model as the champion of another product (no upload: same artifacts)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    source = client.get_model_version(source_name, version)
    tags = {k: v for k, v in source.tags.items() if keep_threshold or not k.startswith("threshold")}
    client.create_registered_model(f"ssn-{product}")
    copy = client.create_model_version(
        f"ssn-{product}",
        source=source.source,
        run_id=source.run_id,
        tags=tags,
        model_id=source.source.rsplit("/", 1)[-1],
    )
    client.set_registered_model_alias(f"ssn-{product}", "champion", copy.version)


def ray_address(stack) -> str:
    """The GCS address of the live stack's Ray head."""
    for name in ("SSN_RAY_ADDRESS", "RAY_ADDRESS"):
        if os.environ.get(name) and not os.environ[name].startswith("http"):
            return os.environ[name]
    ports = dict(line.split("=", 1) for line in (stack.state_dir / "ports.env").read_text().split())
    return f"127.0.0.1:{ports['SSN_RAY_PORT']}"


def weld_test_images(weld_root: Path, count: int = 6) -> list[Path]:
    good = sorted((weld_root / "test" / "good").iterdir())[-count:]
    bad = sorted((weld_root / "test" / "defective").iterdir())[-count:]
    return [p for pair in zip(good, bad) for p in pair]


def key_headers() -> dict[str, str]:
    """The local stack's API key (infra/local/stack writes it, 0600; `stack env` names the file)."""
    from ssn_platform.apikeys import client_headers

    return client_headers()


def inspect(base: str, product: str, body: bytes, content_type: str = "image/png", **params) -> requests.Response:
    return requests.post(
        f"{base}/v1/products/{product}/inspect",
        data=body,
        timeout=120,
        params=params,
        headers={"Content-Type": content_type, **key_headers()},
    )


# ---------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(live_stack, weld_val_dataset, random_head_model, register_version):
    from mlflow import MlflowClient
    from ray import serve

    from ssn_platform.datasets import DatasetReader
    from ssn_platform.promotion import evaluate_model, promote
    from ssn_platform.serving.deployment import deploy, wait_ready
    from ssn_platform.thresholds import calibrate_version

    uri = weld_val_dataset
    root, samples = DatasetReader(uri).materialize()
    test = [s for s in samples if s.split == "test"]
    product = f"weld-serve-{uuid.uuid4().hex[:6]}"
    name = f"ssn-{product}"
    versions = []
    for seed in (1, 2):
        model = random_head_model(seed)
        versions.append(register_version(product, uri, model, evaluate_model(model, root, test)))
        calibrate_version(product, versions[-1])
    decision = promote(product, versions[0], margin=1.0, floor=0.0)
    assert decision.promoted, decision.reason
    MlflowClient().create_registered_model(f"ssn-{product}-idle")  # a product without a champion
    copy_as_champion(name, versions[0], f"{product}-nothr", keep_threshold=False)  # champion without threshold
    for suffix in ("b", "c"):
        copy_as_champion(name, versions[0], f"{product}-{suffix}")

    base = deploy(SETTINGS, address=ray_address(live_stack), port=int(os.environ["SSN_SERVE_PORT"]))
    try:
        wait_ready(base, timeout=180)
        yield {"base": base, "product": product, "name": name, "versions": versions, "root": root}
    finally:
        serve.shutdown()


def test_served_scores_equal_offline_scores(served, weld_root):
    import torch

    from ssn_platform.serving.metrics import parse_server_timing
    from PIL import Image

    from supersimplenet.inference import predict_images, preprocess
    from ssn_platform.registry import load_model

    base, product, version = served["base"], served["product"], served["versions"][0]
    model, _ = load_model(f"models:/{served['name']}/{version}")
    paths = weld_test_images(weld_root)
    offline = {p: predict_images(model, [Image.open(p)]) for p in paths}
    for path in paths[:3]:  # offline evaluation runs the fast path: within 1e-5 of the reference forward
        batch = preprocess(model, [Image.open(path)])
        with torch.inference_mode():
            reference = float(model.eval()(batch).score[0])
        assert abs(reference - float(offline[path][0][0])) <= 1e-5

    answers = {p: inspect(base, product, p.read_bytes(), return_map="true", return_mask="true") for p in paths}
    with ThreadPoolExecutor(6) as pool:  # concurrent requests are batched together: same scores
        concurrent = dict(zip(paths, pool.map(lambda p: inspect(base, product, p.read_bytes()), paths)))
    for path in paths:
        answer = answers[path]
        assert answer.status_code == 200, answer.text
        body = answer.json()
        scores, maps = offline[path]
        assert body["model_version"] == version and body["product"] == product
        assert abs(body["score"] - float(scores[0])) <= 1e-5, (path.name, body["score"], float(scores[0]))
        assert abs(concurrent[path].json()["score"] - float(scores[0])) <= 1e-5
        assert 0.0 <= body["score"] <= 1.0
        assert body["is_anomalous"] == (body["score"] >= body["threshold"])
        heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["anomaly_map_png"]))))
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
        size = tuple(model.config.image_size)
        assert heat.shape == (*size, 3) and mask.shape == size and set(np.unique(mask)) <= {0, 255}
        assert body["defect_area_percent"] == pytest.approx(100.0 * np.mean(mask > 0))
        assert body["defect_area_percent"] == pytest.approx(100.0 * np.mean(maps[0] >= body["threshold"]), abs=0.5)
        assert (body["image_width"], body["image_height"]) == Image.open(path).size
        assert body["latency_ms"] > 0
        for served_answer in (answer, concurrent[path]):  # where the time went, stage by stage (Server-Timing)
            stages = parse_server_timing(served_answer.headers["Server-Timing"])
            assert {"read", "model_lookup", "decode", "model", "queue", "infer", "post", "total"} <= set(stages)
            assert all(ms >= 0 for ms in stages.values()) and stages["model"] > 0
            assert stages["queue"] + stages["model"] == pytest.approx(stages["infer"], abs=0.02)
            replica = sum(stages[k] for k in ("read", "model_lookup", "decode", "infer", "post"))
            assert replica <= stages["total"] + 0.05 and stages["total"] <= served_answer.elapsed.total_seconds() * 1e3

    from mlflow import MlflowClient

    threshold = float(MlflowClient().get_model_version(served["name"], version).tags["threshold"])
    assert answers[paths[0]].json()["threshold"] == threshold
    assert len({answers[p].json()["score"] for p in paths}) > 1  # the scores are not saturated

    # the other formats and multipart: decoded by the same code as offline
    image = Image.open(paths[1])
    for fmt, content_type in (("JPEG", "image/jpeg"), ("BMP", "image/bmp"), ("TIFF", "image/tiff")):
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format=fmt)
        expected = float(predict_images(model, [Image.open(io.BytesIO(buffer.getvalue()))])[0][0])
        answer = inspect(base, product, buffer.getvalue(), content_type)
        assert answer.status_code == 200, answer.text
        assert abs(answer.json()["score"] - expected) <= 1e-5, fmt
    octet = inspect(base, product, paths[1].read_bytes(), "application/octet-stream")
    multipart = requests.post(
        f"{base}/v1/products/{product}/inspect",
        timeout=60,
        headers=key_headers(),
        files={"image": (paths[1].name, paths[1].read_bytes(), "image/png")},
    )
    for answer in (octet, multipart):
        assert answer.status_code == 200, answer.text
        assert abs(answer.json()["score"] - float(offline[paths[1]][0][0])) <= 1e-5


def test_inspection_needs_a_key_for_the_product_and_keys_rotate_without_a_restart(served, weld_root):
    from ssn_platform.apikeys import new_key

    base, product = served["base"], served["product"]
    url, png = f"{base}/v1/products/{product}/inspect", weld_test_images(weld_root, 1)[0].read_bytes()

    def status(key: str | None) -> int:
        headers = {"Content-Type": "image/png", **({"Authorization": f"Bearer {key}"} if key else {})}
        return requests.post(url, data=png, headers=headers, timeout=120).status_code

    def wait_for(key: str, expected: int) -> None:  # the replica re-reads the keys file when it changes
        deadline = time.monotonic() + 120
        while (seen := status(key)) != expected:
            assert time.monotonic() < deadline, f"still {seen}, expected {expected} after the keys file changed"
            time.sleep(0.5)

    refused = requests.post(url, data=png, headers={"Content-Type": "image/png"}, timeout=120)
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer", refused.text
    assert refused.json()["error"]["code"] == "unauthorized"
    assert requests.get(f"{base}/v1/products", timeout=30).status_code == 401
    assert requests.get(f"{base}/healthz", timeout=30).status_code == 200  # probes stay open
    keys_file = Path(os.environ["SSN_SERVE_KEYS_FILE"])
    original = keys_file.read_text()
    assert "sha256" in original and Path(os.environ["SSN_SERVE_API_KEY_FILE"]).read_text().strip() not in original
    own_key, own = new_key("this-line", [product])
    other_key, other = new_key("other-line", ["another-product"])

    def write(entries: list[dict]) -> None:
        data = yaml.safe_load(original)
        data["keys"] += entries
        tmp = keys_file.with_name(".keys.tmp")
        tmp.write_text(yaml.safe_dump(data))
        os.replace(tmp, keys_file)

    try:
        assert status(own_key) == 401
        write([own, other])
        wait_for(own_key, 200)  # a new key works without a restart
        assert status(other_key) == 403  # a key of another product
        write([other])
        wait_for(own_key, 401)  # a removed key is refused without a restart
        assert status(None) == 401 and inspect(base, product, png).status_code == 200
    finally:
        keys_file.write_text(original)


def _grpc_status_without_token(port: int) -> str:
    """The status a gRPC call to 127.0.0.1:`port` gets without Ray's token (Serve's request method, empty body)."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            channel.unary_unary("/ray.serve.ASGIService/HandleRequest")(b"", timeout=30)
        except grpc.RpcError as error:
            return error.code().name
    return "OK"


def test_products_health_and_docs_and_every_listener_on_loopback(served, weld_root, live_stack):
    base, product = served["base"], served["product"]
    assert inspect(base, product, weld_test_images(weld_root)[0].read_bytes()).status_code == 200  # loaded now
    # while a replica serves: Serve's proxy, controller and replicas, like every process of the stack, listen on
    # 127.0.0.1 only (the proxy's HTTP port among them). One exception is Ray's, not ours: each Serve replica's
    # inter-deployment gRPC server binds [::]:0 and Ray offers no setting to change it (ray-project/ray#64544);
    # Ray's token interceptor guards it, so a call without the cluster's token is refused (docs/security.md).
    listening = listeners(live_stack.processes())
    assert any(listener.port == int(base.rsplit(":", 1)[1].split("/")[0]) for listener in listening)
    replica_grpc = {listener for listener in listening if "ServeReplica" in listener.name and listener.wildcard}
    assert replica_grpc, sorted(map(str, listening))
    for listener in replica_grpc:
        assert _grpc_status_without_token(listener.port) == "UNAUTHENTICATED"
    assert not [str(listener) for listener in listening - replica_grpc if listener.address != "127.0.0.1"]
    listing = requests.get(f"{base}/v1/products", headers=key_headers(), timeout=30).json()["products"]
    entry = {p["product"]: p for p in listing}[product]
    assert entry["champion_version"] == served["versions"][0] and entry["registered_model"] == served["name"]
    assert entry["loaded_version"] == served["versions"][0]
    # the replica serves the folded fast path (folded heads for Lite0's 152 channels), float32 by default
    assert entry["inference"] == {
        "engine": "FastSuperSimpleNet",
        "heads": "folded",
        "precision": "fp32",
        "device": "cpu",
    }
    assert f"{product}-idle" not in {p["product"] for p in listing}  # no champion: not served
    assert requests.get(f"{base}/healthz", timeout=30).json()["status"] == "ok"
    ready = requests.get(f"{base}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["settings"]["refresh_s"] == SETTINGS["refresh_s"]
    schema = requests.get(f"{base}/openapi.json", timeout=30).json()
    assert "/v1/products/{product}/inspect" in schema["paths"]
    body = schema["paths"]["/v1/products/{product}/inspect"]["post"]["requestBody"]["content"]
    assert {"image/png", "multipart/form-data"} <= set(body)
    docs = requests.get(f"{base}/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def _alias_moved_at(name: str, version: str, *, timeout: float = 300.0) -> dict:
    """Starts a thread that notes (monotonic time) when the champion alias of `name` becomes `version`."""
    from mlflow import MlflowClient

    result: dict = {}

    def watch() -> None:
        client = MlflowClient()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = time.monotonic()
            if str((client.get_registered_model(name).aliases or {}).get("champion")) == version:
                result["at"] = before  # moved at or before the start of this successful poll
                return
            time.sleep(0.1)

    result["thread"] = threading.Thread(target=watch, daemon=True)
    result["thread"].start()
    return result


def test_champion_switch_and_rollback_under_load(served, weld_root):
    from ssn_platform.promotion import promote, rollback

    base, product, name = served["base"], served["product"], served["name"]
    first, second = served["versions"]
    images = [p.read_bytes() for p in weld_test_images(weld_root, 2)]
    log: list[tuple[float, float, int | None, str | None]] = []  # sent, received, status, version
    stop = threading.Event()

    def client(offset: int) -> None:
        session = requests.Session()
        i = offset
        while not stop.is_set():
            sent = time.monotonic()
            try:
                answer = session.post(
                    f"{base}/v1/products/{product}/inspect",
                    data=images[i % len(images)],
                    headers={"Content-Type": "image/png", **key_headers()},
                    timeout=120,
                )
                version = answer.json().get("model_version") if answer.status_code == 200 else answer.text[:200]
                log.append((sent, time.monotonic(), answer.status_code, version))
            except requests.RequestException as error:
                log.append((sent, time.monotonic(), None, repr(error)))
            i += 1

    def first_answer(version: str, after: float, deadline_s: float) -> tuple[float, float]:
        """(sent, received) of the first request sent after `after` that `version` answered."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            hits = [
                (sent, received)
                for sent, received, status, v in list(log)
                if status == 200 and v == version and sent >= after
            ]
            if hits:
                return min(hits)
            time.sleep(0.1)
        raise AssertionError(f"version {version} not served within {deadline_s:.0f}s")

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2.0)
        watch = _alias_moved_at(name, second)
        decision = promote(product, second, margin=1.0, floor=0.0)  # evaluates both, then moves the alias
        assert decision.promoted, decision.reason
        watch["thread"].join(timeout=60)
        moved = watch["at"]
        switched = first_answer(second, moved, SETTINGS["refresh_s"] + LOAD_ALLOWANCE_S)
        time.sleep(2.0)
        watch_back = _alias_moved_at(name, first)
        assert rollback(product).champion_version == first
        watch_back["thread"].join(timeout=60)
        moved_back = watch_back["at"]
        switched_back = first_answer(first, moved_back, SETTINGS["refresh_s"] + LOAD_ALLOWANCE_S)
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=150)

    failures = [entry for entry in log if entry[2] != 200]
    assert not failures, failures[:5]
    assert len(log) >= 10
    # One replica swaps once per move: requests answered before the alias moved got the old version; requests
    # sent after the new version first answered get the new one (until the rollback moved the alias back).
    assert {v for _, received, _, v in log if received < moved} == {first}
    assert {v for sent, received, _, v in log if sent > switched[1] and received < moved_back} == {second}
    assert {v for sent, _, _, v in log if sent > switched_back[1]} == {first}
    assert switched[0] - moved <= SETTINGS["refresh_s"] + LOAD_ALLOWANCE_S, switched[0] - moved
    # a recently served version is kept loaded: rolling back to it needs no download
    assert switched_back[0] - moved_back <= SETTINGS["refresh_s"] + 10.0, switched_back[0] - moved_back


def test_several_products_share_a_replica_lru(served, weld_root):
    base, product = served["base"], served["product"]
    body = weld_test_images(weld_root, 1)[0].read_bytes()
    for name in (product, f"{product}-b", f"{product}-c"):
        answer = inspect(base, name, body)
        assert answer.status_code == 200, answer.text
    loaded = requests.get(f"{base}/healthz", timeout=30).json()["loaded"]
    assert set(loaded) == {f"{product}-b", f"{product}-c"}  # max_models_per_replica 2: the oldest is evicted
    assert inspect(base, product, body).status_code == 200  # and loaded again on demand
    loaded = requests.get(f"{base}/healthz", timeout=30).json()["loaded"]
    assert set(loaded) == {f"{product}-c", product}
    answer = inspect(base, f"{product}-nothr", body)
    assert answer.status_code == 409 and answer.json()["error"]["code"] == "no_threshold"


# ---------------------------------------------------------------------------------------------------------
# Fuzz: bad requests never get a 5xx
# ---------------------------------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (valid CRCs, a few bytes of pixel data)."""
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


def bmp_claiming(width: int, height: int) -> bytes:
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(header) + 16, 0, 0, 14 + len(header)) + header + b"\x00" * 16


def tiff_claiming(width: int, height: int) -> bytes:
    entries = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, 8),
        (277, 3, 1, 1),
        (278, 4, 1, height),
        (279, 4, 1, min(width * height, 2**32 - 1)),
    ]
    packed = [
        struct.pack("<HHII", tag, kind, count, value)
        if kind == 4
        else struct.pack("<HHIHH", tag, kind, count, value, 0)
        for tag, kind, count, value in entries
    ]
    ifd = struct.pack("<H", len(entries)) + b"".join(packed) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 32


def jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    at = jpeg.find(b"\xff\xc0")
    assert at > 0, "no baseline SOF marker"
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


def multipart(parts: list[tuple[str, bytes]], boundary: str = "ssnfuzzboundary", *, close: bool = True) -> bytes:
    out = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="x.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in parts
    )
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


def bad_requests(
    base: str, product: str, real_png: bytes, rng: random.Random
) -> list[tuple[str, str, str, dict, bytes]]:
    """(category, method, url, headers, body): >= 500 requests that are all wrong in some way."""
    from PIL import Image

    inspect_url = f"{base}/v1/products/{product}/inspect"
    image = Image.open(io.BytesIO(real_png)).convert("RGB")
    encoded = {}
    for fmt in ("JPEG", "BMP", "TIFF", "GIF", "WEBP"):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        encoded[fmt] = buffer.getvalue()
    bomb = io.BytesIO()
    Image.new("L", (2100, 2100)).save(bomb, format="PNG")  # 4.4 Mpx of zeros in a few KB
    max_bytes = SETTINGS["max_bytes"]
    png = {"Content-Type": "image/png"}
    out: list[tuple[str, str, str, dict, bytes]] = []

    def add(category, body, headers=png, url=inspect_url, method="POST"):
        out.append((category, method, url, dict(headers), body))

    for _ in range(90):
        add(
            "random_bytes",
            rng.randbytes(rng.randint(1, 5000)),
            {"Content-Type": rng.choice(["image/png", "image/jpeg", "application/octet-stream", "image/tiff"])},
        )
    image_data_end = real_png.rfind(b"IEND") - 16  # cut inside the pixel data (a missing IEND alone still decodes)
    for _ in range(70):
        add("truncated_png", real_png[: rng.randint(1, image_data_end)])
    for fmt, content_type in (("JPEG", "image/jpeg"), ("BMP", "image/bmp"), ("TIFF", "image/tiff")):
        data = encoded[fmt]
        for _ in range(25):
            add(f"truncated_{fmt.lower()}", data[: rng.randint(1, len(data) - 1)], {"Content-Type": content_type})
    for _ in range(40):
        corrupt = bytearray(real_png)
        for _ in range(rng.randint(1, 20)):
            corrupt[rng.randrange(8, len(corrupt))] = rng.randrange(256)  # keeps the signature, breaks CRCs
        add("corrupt_png", bytes(corrupt))
    for _ in range(15):
        add("zero_bytes", b"", {"Content-Type": rng.choice(["image/png", "application/octet-stream"])})
    for size in (100_000, 65_535, 30_000, 5_000, 2_001):
        add("huge_png_header", png_claiming(size, size))
        add("long_png_header", png_claiming(size, 1))
        add("huge_bmp_header", bmp_claiming(size, size), {"Content-Type": "image/bmp"})
        add("huge_tiff_header", tiff_claiming(size, size), {"Content-Type": "image/tiff"})
        add(
            "huge_jpeg_header",
            jpeg_claiming(encoded["JPEG"], min(size, 65_535), min(size, 65_535)),
            {"Content-Type": "image/jpeg"},
        )
    for _ in range(5):
        add("decompression_bomb", bomb.getvalue())
    for extra in (1, 1000, max_bytes // 2):
        add("oversized_body", rng.randbytes(max_bytes + extra))
    add(
        "oversized_multipart",
        multipart([("image", rng.randbytes(max_bytes + 100))]),
        {"Content-Type": "multipart/form-data; boundary=ssnfuzzboundary"},
    )
    for content_type in (
        "text/plain",
        "application/json",
        "image/gif",
        "image/webp",
        "text/html; charset=utf-8",
        "application/x-www-form-urlencoded",
        "video/mp4",
        "image/svg+xml",
        "*/*",
        "garbage",
    ):
        add("wrong_content_type", real_png, {"Content-Type": content_type})
    for _ in range(10):
        add("missing_content_type", real_png, {})
    add("gif_as_png", encoded["GIF"])
    add("webp_as_png", encoded["WEBP"])
    for _ in range(10):
        add("text_as_png", rng.choice([b"hello", b"<svg></svg>", b'{"image": 1}', b"GIF89a" + b"\x00" * 20]))
    for _ in range(90):
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789-_."
        name = rng.choice("abcdefghijklmnopqrstuvwxyz") + "".join(
            rng.choice(alphabet) for _ in range(rng.randint(0, 30))
        )
        add("unknown_product", real_png, url=f"{base}/v1/products/{name}/inspect")
    for name in ("%2e%2e", "a%20b", "%C3%A9t%C3%A9", "x" * 150, "-leading", ".hidden", "a%2Fb", "%00", "%ff%fe"):
        add("invalid_product_name", real_png, url=f"{base}/v1/products/{name}/inspect")
    for _ in range(10):
        add("no_champion", real_png, url=f"{base}/v1/products/{product}-idle/inspect")
    boundary_header = {"Content-Type": "multipart/form-data; boundary=ssnfuzzboundary"}
    for _ in range(3):
        add("multipart_no_boundary", multipart([("image", real_png)]), {"Content-Type": "multipart/form-data"})
        add("multipart_wrong_boundary", multipart([("image", real_png)], "otherboundary"), boundary_header)
        add("multipart_not_closed", multipart([("image", real_png)], close=False), boundary_header)
        add("multipart_missing_field", multipart([("file", real_png)]), boundary_header)
        add("multipart_two_images", multipart([("image", real_png), ("image", real_png)]), boundary_header)
        add("multipart_empty_image", multipart([("image", b"")]), boundary_header)
        add("multipart_not_an_image", multipart([("image", rng.randbytes(300))]), boundary_header)
        add("multipart_truncated", multipart([("image", real_png)])[: rng.randint(10, 400)], boundary_header)
        add("multipart_garbage", rng.randbytes(500), boundary_header)
        add(
            "multipart_no_headers",
            b"--ssnfuzzboundary\r\n\r\n" + real_png + b"\r\n--ssnfuzzboundary--\r\n",
            boundary_header,
        )
        add(
            "multipart_bad_header",
            b"--ssnfuzzboundary\r\nno colon here\r\n\r\nxx\r\n--ssnfuzzboundary--\r\n",
            boundary_header,
        )
        add(
            "multipart_long_boundary",
            multipart([("image", real_png)], "b" * 300),
            {"Content-Type": "multipart/form-data; boundary=" + "b" * 300},
        )
    for value in ("maybe", "2", "", "yes please"):
        add("bad_query", real_png, url=f"{inspect_url}?return_map={value}")
        add("bad_query", real_png, url=f"{inspect_url}?return_mask={value}")
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        for _ in range(3):
            add("wrong_method", real_png, method=method)
    for path in ("/v1/products/x", "/v1/inspect", "/v2/products/x/inspect", "/", "/v1/products/x/inspect/extra"):
        add("unknown_route", real_png, url=f"{base}{path}")
    for _ in range(4):  # every other case carries the stack's key (send): these carry none, or a wrong one
        add("no_api_key", real_png)
        add("unknown_api_key", real_png, {**png, "Authorization": "Bearer " + "x" * rng.randrange(1, 80)})
        add("unknown_api_key", real_png, {**png, "X-API-Key": "not-a-key"})
        add("unknown_api_key", real_png, {**png, "Authorization": "Basic dXNlcjpwYXNz"})
    return out


def test_fuzz_bad_requests_never_get_a_5xx(served, weld_root):
    base, product = served["base"], served["product"]
    real_png = weld_test_images(weld_root, 1)[0].read_bytes()
    cases = bad_requests(base, product, real_png, random.Random(20261129))
    assert len(cases) >= 500

    def send(case):
        category, method, url, headers, body = case
        if category not in ("no_api_key", "unknown_api_key"):
            headers = {**headers, **key_headers()}
        try:
            answer = requests.request(method, url, headers=headers, data=body, timeout=120)
        except requests.RequestException as error:
            return category, None, repr(error)
        return category, answer.status_code, answer.text if answer.status_code != 200 else ""

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, cases))
    server_errors = [r for r in results if r[1] is None or r[1] >= 500]
    assert not server_errors, server_errors[:10]
    by_category: dict[str, set[int]] = {}
    for category, status, _ in results:
        by_category.setdefault(category, set()).add(status)
    for category, statuses in by_category.items():
        if category == "corrupt_png":  # a flipped byte in pixel data can still decode: a 200 is fine there
            continue
        assert all(400 <= s < 500 for s in statuses), (category, statuses)
    for category, status, text in results:
        if status != 200:
            assert "error" in json.loads(text), (category, text)  # a JSON error body
    assert by_category["huge_png_header"] == {413} and by_category["decompression_bomb"] == {413}
    assert by_category["oversized_body"] == {413} and by_category["unknown_product"] == {404}
    assert by_category["no_champion"] == {404} and by_category["zero_bytes"] == {400}
    assert by_category["wrong_content_type"] == {415} and by_category["wrong_method"] == {405}
    assert by_category["no_api_key"] == {401} and by_category["unknown_api_key"] == {401}

    assert requests.get(f"{base}/healthz", timeout=30).json()["status"] == "ok"
    answer = inspect(base, product, real_png)
    assert answer.status_code == 200, answer.text


# ---------------------------------------------------------------------------------------------------------
# Bounded serving: failed loads remembered, readiness without the registry, a bounded queue
# ---------------------------------------------------------------------------------------------------------
def _checkpoint_key(name: str, version: str) -> str:
    """The key of a registered version's model.pt in the stack's `mlflow` bucket (artifacts proxied to S3)."""
    from mlflow import MlflowClient

    from ssn_platform.storage import make_client

    client = MlflowClient()
    source = client.get_model_version(name, version).source
    location = client.get_logged_model(source.rsplit("/", 1)[-1]).artifact_location  # mlflow-artifacts:/<path>
    prefix = "artifacts/" + location.split(":", 1)[1].lstrip("/")
    pages = make_client().get_paginator("list_objects_v2").paginate(Bucket="mlflow", Prefix=prefix)
    keys = [o["Key"] for page in pages for o in page.get("Contents", []) if o["Key"].endswith("/model.pt")]
    assert len(keys) == 1, (prefix, keys)
    return keys[0]


def _replica_log_count(live_stack, text: str) -> int:
    ray_temp = Path((live_stack.state_dir / "run" / "ray.tempdir").read_text().strip())
    paths = {path.resolve() for path in ray_temp.glob("session_*/logs/serve/replica_*inspector*.log")}  # and _latest
    return sum(path.read_text(errors="replace").count(text) for path in paths)


def test_a_champion_that_fails_to_load_is_answered_from_memory_until_its_back_off_ends(
    served, live_stack, weld_root, weld_val_dataset, random_head_model, register_version
):
    from mlflow import MlflowClient

    from ssn_platform.storage import get_bytes, make_client, put_bytes
    from ssn_platform.thresholds import calibrate_version

    product = f"weld-corrupt-{uuid.uuid4().hex[:6]}"
    version = register_version(product, weld_val_dataset, random_head_model(5), {})
    calibrate_version(product, version)
    MlflowClient().set_registered_model_alias(f"ssn-{product}", "champion", version)
    s3, key = make_client(), _checkpoint_key(f"ssn-{product}", version)
    good = get_bytes(s3, "mlflow", key)
    put_bytes(s3, "mlflow", key, b"not a checkpoint" * 64)
    body = weld_test_images(weld_root, 1)[0].read_bytes()
    marker = f"loading the champion of {product} failed"

    first = inspect(served["base"], product, body)
    assert first.status_code == 503 and first.json()["error"]["code"] == "model_unavailable", first.text
    assert int(first.headers["Retry-After"]) >= 1 and version in first.json()["error"]["message"]
    assert _replica_log_count(live_stack, marker) == 1
    for _ in range(3):  # within the back-off: the same answer, and no download or load attempt
        again = inspect(served["base"], product, body)
        assert again.status_code == 503 and again.json() == first.json()
    assert _replica_log_count(live_stack, marker) == 1

    put_bytes(s3, "mlflow", key, good)  # repaired: served once the back-off has passed
    deadline = time.monotonic() + SETTINGS["load_backoff_s"] + LOAD_ALLOWANCE_S
    while (answer := inspect(served["base"], product, body)).status_code != 200:
        assert answer.status_code == 503 and time.monotonic() < deadline, answer.text
        time.sleep(0.5)
    assert answer.json()["model_version"] == version


def test_a_replica_with_a_loaded_champion_stays_ready_and_answers_while_mlflow_is_down(served, live_stack, weld_root):
    base, product = served["base"], served["product"]
    body = weld_test_images(weld_root, 1)[0].read_bytes()
    assert inspect(base, product, body).status_code == 200  # loaded
    live_stack.run("down", "mlflow", timeout=120)
    try:
        deadline = time.monotonic() + 60
        while (ready := requests.get(f"{base}/readyz", timeout=30)).json()["registry"] == "HTTP 200":
            assert time.monotonic() < deadline, ready.text  # the registry check is cached for 2 s
            time.sleep(0.5)
        assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
        assert product in ready.json()["serving"]
        answer = inspect(base, product, body)
        assert answer.status_code == 200, answer.text
    finally:
        live_stack.run("up", "mlflow", timeout=300)


def test_requests_beyond_the_queue_get_503_with_retry_after_and_the_rest_are_answered(served, live_stack, weld_root):
    from ray import serve

    from ssn_platform.serving.deployment import build_app

    tight = {**SETTINGS, "max_ongoing_requests": 1, "max_queued_requests": 1, "retry_after_s": 2.0, "batching": False}
    serve.run(build_app(tight), name="tight", route_prefix="/tight", blocking=False)
    base = served["base"] + "/tight"
    try:
        from ssn_platform.serving.deployment import wait_ready

        wait_ready(base, timeout=180)
        body = weld_test_images(weld_root, 1)[0].read_bytes()
        assert inspect(base, served["product"], body).status_code == 200  # the model is loaded before the flood
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: inspect(base, served["product"], body), range(48)))
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(503) >= 1 and codes.count(200) >= 2, codes
        assert all(a.headers.get("Retry-After") == "2" for a in answers if a.status_code == 503)
    finally:
        serve.delete("tight")


def _real_png_on_canvas(path: Path, width: int, height: int) -> bytes:
    """A real image pasted at the centre of a width x height grey canvas, as PNG (compresses to a few hundred KB
    however large the canvas: a cheap body that decodes to many pixels)."""
    from PIL import Image

    canvas = Image.new("RGB", (width, height), (118, 118, 118))
    with Image.open(path) as seam:
        canvas.paste(seam.convert("RGB"), ((width - seam.width) // 2, (height - seam.height) // 2))
    out = io.BytesIO()
    canvas.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_flood_of_4096_pixel_pngs_keeps_the_replica_within_its_pixel_budget(served, weld_root):
    from ray import serve
    from ray.util.state import list_actors

    from ssn_platform.serving.deployment import build_app, wait_ready

    side = 4096
    budget = 2 * side * side  # two full-size images decoded at once (~20 bytes per pixel while converted)
    flood = {
        **SETTINGS,
        "max_bytes": 16 * 1024 * 1024,
        "max_pixels": side * side,
        "max_side": side,
        "max_pixels_in_flight": budget,
        "max_ongoing_requests": 32,
        "max_queued_requests": 16,
        "retry_after_s": 1.0,
    }
    serve.run(build_app(flood), name="flood", route_prefix="/flood", blocking=False)
    base, product = served["base"] + "/flood", served["product"]
    try:
        wait_ready(base, timeout=180)
        seam = weld_test_images(weld_root, 1)[0]
        assert inspect(base, product, seam.read_bytes()).status_code == 200  # the model is loaded before the flood
        (replica,) = [
            a.pid
            for a in list_actors(filters=[("state", "=", "ALIVE")])
            if a.class_name.startswith("ServeReplica:flood")
        ]
        full, over = _real_png_on_canvas(seam, side, side), _real_png_on_canvas(seam, side + 1, side)
        bodies = [full] * 32 + [over] * 8
        random.Random(7).shuffle(bodies)
        baseline, peak, done = _rss_bytes(replica), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss_bytes(replica))
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            with ThreadPoolExecutor(32) as pool:
                answers = list(pool.map(lambda body: (body is over, inspect(base, product, body)), bodies))
        finally:
            done.set()
            sampler.join()
        assert all(a.status_code == 413 for is_over, a in answers if is_over)  # refused from the header
        codes = [a.status_code for is_over, a in answers if not is_over]
        assert set(codes) <= {200, 503}, [a.text for _, a in answers if a.status_code not in (200, 413, 503)]
        refused = [a for _, a in answers if a.status_code == 503]
        assert all(int(a.headers["Retry-After"]) >= 1 for a in refused)
        assert codes.count(200) >= 2 and any(a.json()["error"]["code"] == "pixel_budget_full" for a in refused)
        served_ok = [a.json() for _, a in answers if a.status_code == 200]
        assert all(r["image_width"] == side and r["image_height"] == side for r in served_ok)
        # 32 images decoded at once would take ~6 GB; the budget holds two (~0.7 GB) plus the process's own churn
        assert peak[0] - baseline < budget * 24 + 512 * 1024 * 1024, (baseline, peak[0])
    finally:
        serve.delete("flood")
