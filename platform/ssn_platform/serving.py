"""The inspection service: a Ray Serve application with a FastAPI ingress serving every product's champion.

Endpoints (OpenAPI at ``/openapi.json``, docs at ``/docs``):

* ``POST /v1/products/{product}/inspect``: the image as the raw body (``Content-Type`` image/png, image/jpeg,
  image/bmp, image/tiff or application/octet-stream) or as ``multipart/form-data`` field ``image``. Query options
  ``return_map`` (colourised anomaly heatmap, base64 PNG) and ``return_mask`` (binary mask, base64 PNG). Answers
  product, registered model and version, score in [0, 1], threshold, is_anomalous (``score >= threshold``),
  defect_area_percent (share of anomaly-map pixels ``>= threshold``, at the model's resolution) and latency_ms.
* ``GET /v1/products``: products with a champion (champion, previous and loaded version).
* ``GET /healthz`` (the replica answers) and ``GET /readyz`` (and reaches the MLflow registry).

Models: ``models:/ssn-<product>@champion`` resolved to an explicit version, loaded through `@serve.multiplexed`
with the product as model id (several products per replica, least recently used evicted). Requests are batched
with `@serve.batch`; a batch may mix products and is run per (product, version) group through
`supersimplenet.inference.predict_images`, the code of offline evaluation, so a served score equals the offline one.

Champion switch: every ``refresh_s`` seconds a background task reads each loaded product's ``champion`` alias (and
its threshold tag); when either changed, it loads the new version completely (warm-up included) and only then swaps
it in. A request uses the version it started with, so no request fails during a switch, and the new version is
served at most ``refresh_s`` plus one load time after the alias moved. A product whose alias disappears answers 404.

Bad input never reaches the model: body size is capped while reading, the content type and multipart structure
are checked, only PNG/JPEG/BMP/TIFF decoders are enabled, the dimensions are read from the header and checked
against ``max_pixels``/``max_side`` before anything is decoded (Pillow's bomb limit is set too), and decoding
errors (truncated files, unsupported modes) become 4xx answers with a JSON body ``{"error": {...}}``.

Deployment: `build_app` (``serve deploy jobs/configs/serve.yaml``, import path ``ssn_platform.serving:build_app``)
and `deploy` (``jobs/deploy.py``). Locally the replica reserves no CPU (``num_cpus: 0``) so training jobs keep both
cores; see ``infra/serve/README.md`` for GPU replicas and autoscaling.
"""

import asyncio
import base64
import dataclasses
import functools
import io
import logging
import math
import os
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ssn_platform.thresholds import threshold_from_tags

log = logging.getLogger("ray.serve")

CHAMPION = "champion"
PREVIOUS = "previous"
PRODUCT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # as jobconfig.PRODUCT_PATTERN
RAW_CONTENT_TYPES = frozenset({
    "image/png", "image/jpeg", "image/jpg", "image/pjpeg", "image/bmp", "image/x-bmp", "image/x-ms-bmp",
    "image/tiff", "image/tif", "application/octet-stream",
})
PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")  # the only decoders Pillow may try
MULTIPART_OVERHEAD = 64 * 1024
# Non-secret environment a replica needs (read when the app is built; passed through the deployment's
# runtime_env, which Ray logs: credentials come from the nodes' environment, never from here).
SERVE_ENV = (
    "MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION",
    "SSN_CACHE_DIR", "SSN_CACHE_MAX_GB",
)


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeSettings:
    """Options of the application (``args`` of `build_app`, the Serve config file, or `deploy`).

    Request limits: max_bytes (body), max_pixels (width x height, decompression bombs), max_side (either side).
    Models: max_models_per_replica (LRU), refresh_s (champion polling), negative_cache_s (how long an unknown
    product or missing champion is remembered), device ("auto", "cpu", "cuda"), torch_threads (0: leave as is).
    Batching: batching on/off, max_batch_size, batch_wait_timeout_s.
    Deployment: num_replicas (an int, or "auto" with min_replicas/max_replicas/target_ongoing_requests),
    max_ongoing_requests, num_cpus and num_gpus per replica, mlflow_tracking_uri (default: the environment's).
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_side: int = 16384
    max_models_per_replica: int = 4
    refresh_s: float = 10.0
    negative_cache_s: float = 2.0
    device: str = "auto"
    precision: str = "fp32"
    torch_threads: int = 0
    batching: bool = True
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.005
    num_replicas: int | str = 1
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 4.0
    max_ongoing_requests: int = 32
    num_cpus: float = 0.0
    num_gpus: float = 0.0
    mlflow_tracking_uri: str | None = None

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"serving settings: {message}")

        check(self.max_bytes > 0, f"max_bytes must be > 0, got {self.max_bytes}")
        check(self.max_pixels > 0 and self.max_side > 0, "max_pixels and max_side must be > 0")
        check(self.max_models_per_replica >= 1, "max_models_per_replica must be >= 1")
        check(self.refresh_s > 0, f"refresh_s must be > 0, got {self.refresh_s}")
        check(self.negative_cache_s >= 0, "negative_cache_s must be >= 0")
        check(self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}")
        check(self.precision in ("fp32", "bf16"), f"precision must be fp32 or bf16, got {self.precision!r}")
        check(self.max_batch_size >= 1, "max_batch_size must be >= 1")
        check(self.batch_wait_timeout_s >= 0, "batch_wait_timeout_s must be >= 0")
        check(self.num_replicas == "auto" or (isinstance(self.num_replicas, int) and self.num_replicas >= 1),
              f"num_replicas must be a positive int or 'auto', got {self.num_replicas!r}")
        check(1 <= self.min_replicas <= self.max_replicas, "need 1 <= min_replicas <= max_replicas")
        check(self.max_ongoing_requests >= 1, "max_ongoing_requests must be >= 1")
        check(self.num_cpus >= 0 and self.num_gpus >= 0, "num_cpus and num_gpus must be >= 0")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "ServeSettings":
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"serving settings: unknown option(s) {unknown}; known: {sorted(known)}")
        for f in dataclasses.fields(cls):  # strings from a config file or the command line
            kind = {int: "int", float: "float", bool: "bool"}.get(f.type, f.type)
            if f.name in values and isinstance(values[f.name], str) and kind in ("int", "float", "bool"):
                raw = values[f.name]
                try:
                    values[f.name] = (raw.lower() in ("1", "true", "yes", "on") if kind == "bool"
                                      else int(raw) if kind == "int" else float(raw))
                except ValueError:
                    article = "an" if kind == "int" else "a"
                    raise ValueError(f"serving settings: {f.name} must be {article} {kind}, got {raw!r}") from None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Errors and schemas
# ---------------------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An answer other than 200: HTTP status, a stable code and a message (JSON body ``{"error": {...}}``)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message)


def error_response(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"status": status, "code": code, "message": message,
                                                               **extra}})


class ErrorDetail(BaseModel):
    status: int
    code: str = Field(description="stable machine-readable code, e.g. unknown_product, image_too_large")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class InspectionResult(BaseModel):
    product: str
    registered_model: str
    model_version: str
    score: float = Field(description="image anomaly score in [0, 1]")
    threshold: float = Field(description="the version's calibrated decision threshold")
    threshold_method: str | None = None
    is_anomalous: bool = Field(description="score >= threshold")
    defect_area_percent: float = Field(description="share of anomaly-map pixels >= threshold, in percent")
    image_width: int
    image_height: int
    map_width: int
    map_height: int
    anomaly_map_png: str | None = Field(None, description="colourised heatmap, base64 PNG (return_map=true)")
    mask_png: str | None = Field(None, description="binary mask 0/255, base64 PNG (return_mask=true)")
    latency_ms: float


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in {
        400: "empty body, undecodable or truncated image, malformed multipart",
        404: "unknown product, or a product without a champion",
        409: "the champion has no calibrated threshold",
        413: "body larger than max_bytes, or image larger than max_pixels / max_side",
        415: "unsupported content type or image format",
        422: "invalid query parameter",
        503: "model registry unreachable, or the model could not be loaded",
    }.items()
}

INSPECT_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image: raw bytes, or multipart/form-data with the file in field `image`.",
        "content": {
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in
               ("image/png", "image/jpeg", "image/bmp", "image/tiff", "application/octet-stream")},
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                "image": {"type": "string", "format": "binary"}}}},
        },
    }
}


# ---------------------------------------------------------------------------------------------------------
# Input handling (pure functions; unit-testable without Serve)
# ---------------------------------------------------------------------------------------------------------
def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _header_params(value: str, header: str = "content-type") -> Message:
    message = Message()
    message[header] = value
    return message


def parse_multipart(body: bytes, content_type: str, field_name: str = "image") -> bytes:
    """The content of form field `field_name` of a multipart/form-data body (RFC 7578); ApiError 400 otherwise."""
    try:
        boundary = _header_params(content_type).get_param("boundary")
    except Exception:  # noqa: BLE001 - malformed header parameters
        boundary = None
    if isinstance(boundary, tuple):  # RFC 2231 encoded parameter
        boundary = boundary[2]
    if not boundary or not isinstance(boundary, str) or len(boundary) > 200:
        raise ApiError(400, "bad_multipart", "multipart/form-data without a valid boundary parameter")
    try:
        delimiter = b"--" + boundary.encode("latin-1")
    except UnicodeEncodeError:
        raise ApiError(400, "bad_multipart", "multipart boundary is not ASCII") from None
    data = b"\r\n" + body  # the first delimiter may start the body
    parts = data.split(b"\r\n" + delimiter)
    if len(parts) < 3:
        raise ApiError(400, "bad_multipart", "multipart body has no complete part (boundary not found)")
    found = None
    closed = False
    for part in parts[1:]:
        if part.startswith(b"--"):
            closed = True
            break
        line_end = part.find(b"\r\n")
        if line_end < 0:
            raise ApiError(400, "bad_multipart", "multipart part without headers")
        if part[:line_end].strip(b" \t"):
            raise ApiError(400, "bad_multipart", "garbage after a multipart boundary")
        head_end = part.find(b"\r\n\r\n", line_end)
        if head_end < 0:
            if part[line_end:] == b"\r\n":
                raise ApiError(400, "bad_multipart", "multipart part without a Content-Disposition header")
            raise ApiError(400, "bad_multipart", "multipart part headers are not terminated")
        headers = part[line_end + 2:head_end].decode("latin-1").split("\r\n")
        disposition = None
        for line in headers:
            key, sep, value = line.partition(":")
            if not sep:
                raise ApiError(400, "bad_multipart", f"malformed multipart header line {line[:60]!r}")
            if key.strip().lower() == "content-disposition":
                disposition = value.strip()
        if disposition is None:
            raise ApiError(400, "bad_multipart", "multipart part without a Content-Disposition header")
        parsed = _header_params(disposition, "content-disposition")
        if parsed.get_content_disposition() != "form-data":
            raise ApiError(400, "bad_multipart", "multipart part is not form-data")
        name = parsed.get_param("name", header="content-disposition")
        if isinstance(name, tuple):
            name = name[2]
        if name == field_name:
            if found is not None:
                raise ApiError(400, "bad_multipart", f"more than one {field_name!r} field")
            found = part[head_end + 4:]
    if not closed:
        raise ApiError(400, "bad_multipart", "multipart body is not terminated by its closing boundary")
    if found is None:
        raise ApiError(400, "missing_image", f"multipart/form-data without a field {field_name!r}")
    return found


def decode_image(data: bytes, *, max_pixels: int, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes -> HxWx3 float32 in [0, 1] by the model library's conversion, and (width, height).

    Dimensions come from the header and are checked before any pixel is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    from supersimplenet.loading import image_array

    if not data:
        raise ApiError(400, "empty_body", "the request body is empty: send the image bytes")
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow refuses > 2x this at open and warns above it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ApiError(413, "image_too_large", f"image has too many pixels (limit {max_pixels}): {error}") from None
    except UnidentifiedImageError:
        raise ApiError(415, "unsupported_image", "the body is not a PNG, JPEG, BMP or TIFF image") from None
    except Exception as error:  # noqa: BLE001 - any header parse failure is the client's data
        raise ApiError(400, "invalid_image", f"cannot read the image header: {type(error).__name__}: {error}") from None
    try:
        width, height = image.size
        if width < 1 or height < 1:
            raise ApiError(400, "invalid_image", f"image has no pixels ({width}x{height})")
        if width * height > max_pixels or max(width, height) > max_side:
            raise ApiError(413, "image_too_large", f"image is {width}x{height}; the limit is {max_pixels} pixels "
                                                   f"and {max_side} per side")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
                array = image_array(image)
        except MemoryError:
            raise ApiError(413, "image_too_large", "image too large to decode") from None
        except ApiError:
            raise
        except Exception as error:  # noqa: BLE001 - truncated data, bad chunks, unsupported modes
            raise ApiError(400, "invalid_image", f"cannot decode the image: {type(error).__name__}: {error}") from None
    finally:
        image.close()
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[:2] != (height, width):
        raise ApiError(400, "invalid_image", f"decoded image has an unexpected shape {array.shape}")
    if not np.isfinite(array).all():
        raise ApiError(400, "invalid_image", "decoded image holds non-finite values")
    return array, (width, height)


def png_base64(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it exceeds `limit` bytes (declared or received)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, "body_too_large", f"body of {int(declared)} bytes exceeds the limit of {limit}")
        except ValueError:
            raise ApiError(400, "bad_request", "invalid Content-Length header") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------
@dataclass
class LoadedVersion:
    """One registered version ready to serve (immutable once built; a switch replaces the whole object)."""

    product: str
    registered_model: str
    version: str
    model: Any
    threshold: float
    threshold_method: str | None
    loaded_at: float = field(default_factory=time.time)


class ProductModel:
    """What the multiplexed loader returns for a product: the version currently served, swapped atomically."""

    def __init__(self, product: str, current: LoadedVersion) -> None:
        self.product = product
        self.current: LoadedVersion | None = current
        self.cache: dict[str, LoadedVersion] = {current.version: current}  # recent versions: instant rollback
        self.evicted = False

    def swap(self, loaded: LoadedVersion | None, *, keep: int = 2) -> None:
        if loaded is not None:
            self.cache[loaded.version] = loaded
            while len(self.cache) > keep:
                oldest = min(self.cache.values(), key=lambda v: v.loaded_at)
                if oldest is loaded:
                    break
                self.cache.pop(oldest.version, None)
        self.current = loaded  # one attribute assignment: requests see the old or the new version

    def __del__(self) -> None:
        # Serve's multiplexer calls this on LRU eviction (in a worker thread): only mark; the event loop cleans up.
        self.evicted = True
        self.cache = {}


def _mlflow_client():
    from mlflow import MlflowClient

    return MlflowClient()


def champion_info(product: str) -> tuple[str, str, dict[str, str]]:
    """(registered model, champion version, version tags); ApiError 404/503 when there is none or no registry."""
    from mlflow.exceptions import MlflowException

    name = f"ssn-{product}"
    client = _mlflow_client()
    try:
        registered = client.get_registered_model(name)
        version = (registered.aliases or {}).get(CHAMPION)
        if version is None:
            raise ApiError(404, "no_champion", f"product {product!r} has no champion version (alias '{CHAMPION}' "
                                               f"of {name}); promote one with jobs/promote.py")
        tags = dict(client.get_model_version(name, str(version)).tags or {})
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ApiError(404, "unknown_product",
                           f"unknown product {product!r} (no registered model {name})") from None
        raise ApiError(503, "registry_unavailable", f"model registry error: {error.message[:300]}") from None
    except ApiError:
        raise
    except Exception as error:  # noqa: BLE001 - connection errors and the like
        raise ApiError(503, "registry_unavailable", f"model registry unreachable: {type(error).__name__}") from None
    return name, str(version), tags


def load_version(product: str, name: str, version: str, tags: dict[str, str], *, device: str,
                 precision: str = "fp32") -> LoadedVersion:
    """Downloads one registered version, folds it into the fast inference model, warms it up, reads its threshold.

    Like `ssn_platform.registry.load_model`, but the download goes to a temporary directory that is removed: a
    long-running replica would otherwise keep one copy of the artifacts per switch. Only the folded model is kept
    (`supersimplenet.inference.inference_model`, the path offline evaluation runs): fp32 serves the offline scores
    within 1e-5; bf16 trades that for speed (BENCHMARKS.md)."""
    import tempfile
    from pathlib import Path

    import mlflow
    import torch

    from supersimplenet.checkpoint import load_checkpoint
    from supersimplenet.inference import inference_model, predict_images

    threshold = threshold_from_tags(tags)
    if threshold is None:
        raise ApiError(409, "no_threshold", f"champion version {version} of {name} has no calibrated threshold; "
                                            f"run jobs/calibrate.py --product {product} --version {version}")
    with tempfile.TemporaryDirectory(prefix="ssn-serve-") as directory:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=directory)
        found = sorted(Path(local).rglob("model.pt"))
        if not found:
            raise ApiError(503, "model_unavailable", f"{name} version {version} holds no SuperSimpleNet checkpoint")
        model, _ = load_checkpoint(found[0])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = inference_model(model.to(device), precision=precision)
    height, width = model.config.image_size
    predict_images(model, [np.zeros((height, width, 3), dtype=np.float32)])  # warm-up before it serves
    return LoadedVersion(product=product, registered_model=name, version=version, model=model, threshold=threshold,
                         threshold_method=tags.get("threshold_method"))


def inference_info(model: Any) -> dict[str, str]:
    """How a loaded (folded) model computes: heads layout, precision and device, for the products listing."""
    precision = {"torch.float32": "fp32", "torch.bfloat16": "bf16"}.get(str(model.dtype), str(model.dtype))
    return {"engine": type(model).__name__, "heads": model.heads, "precision": precision,
            "device": str(model.fc_weight.device)}


def run_items(items: list[tuple[LoadedVersion, np.ndarray]]) -> list[Any]:
    """Scores and maps of a batch that may mix products and versions: one `predict_images` call per version.

    A failing group yields its exception for its own items only."""
    from supersimplenet.inference import predict_images

    results: list[Any] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for index, (loaded, _) in enumerate(items):
        groups.setdefault(id(loaded), []).append(index)
    for indices in groups.values():
        loaded = items[indices[0]][0]
        try:
            scores, maps = predict_images(loaded.model, [items[i][1] for i in indices])
            for j, i in enumerate(indices):
                results[i] = (float(scores[j]), maps[j])
        except Exception as error:  # noqa: BLE001 - reported to the callers of this group
            for i in indices:
                results[i] = error
    return results


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _registry_health() -> tuple[bool, str]:
    import urllib.error
    import urllib.request

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return False, "MLFLOW_TRACKING_URI is not an http(s) tracking server"
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=3) as response:
            return response.status == 200, f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as error:
        return False, f"unreachable: {type(error).__name__}"


# ---------------------------------------------------------------------------------------------------------
# The application. Serve pickles the ingress class by value: whatever its methods use (annotations included:
# no `from __future__ import annotations` in this module) must be defined above.
# ---------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def inspector_deployment(max_models_per_replica: int = 4):
    """The Serve deployment (FastAPI app + replica class). `@serve.multiplexed` fixes its LRU size when the class
    is defined, so the class is made per size (and cached)."""
    app = FastAPI(
        title="SuperSimpleNet inspection",
        version="1",
        description="Surface-defect inspection per product: the champion model of each product scores an image.",
    )

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(map(str, e.get("loc", ()))), "msg": str(e.get("msg", ""))} for e in error.errors()]
        return error_response(422, "invalid_request", "invalid request parameters", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return error_response(error.status_code, code, str(error.detail))

    @serve.deployment(name="inspector", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32)
    @serve.ingress(app)
    class Inspector:
        """One replica: several products' champions (LRU), batched inference, champion polling."""

        def __init__(self, settings: dict[str, Any] | None = None) -> None:
            self.settings = ServeSettings.from_dict(settings)
            for key, value in (("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20"),
                               ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")):
                os.environ.setdefault(key, value)
            if self.settings.mlflow_tracking_uri:
                os.environ["MLFLOW_TRACKING_URI"] = self.settings.mlflow_tracking_uri
            import torch
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = self.settings.max_pixels
            if self.settings.torch_threads > 0:
                torch.set_num_threads(self.settings.torch_threads)
            self._holders: dict[str, ProductModel] = {}
            self._absent: dict[str, tuple[float, ApiError]] = {}
            self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix="ssn-infer")
            self._work_pool = ThreadPoolExecutor(2, thread_name_prefix="ssn-decode")
            self._io_pool = ThreadPoolExecutor(4, thread_name_prefix="ssn-io")
            self._refresher: asyncio.Task | None = None
            self._ready_cache: tuple[float, bool, str] = (0.0, False, "")
            self._started = time.time()
            self._switches = 0
            self._infer_batch.set_max_batch_size(self.settings.max_batch_size)
            self._infer_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

        # -- models --------------------------------------------------------------------------------------------
        @serve.multiplexed(max_num_models_per_replica=max_models_per_replica)
        async def get_product_model(self, product: str) -> ProductModel:
            loop = asyncio.get_running_loop()
            name, version, tags = await loop.run_in_executor(self._io_pool, champion_info, product)
            loaded = await loop.run_in_executor(
                self._io_pool, lambda: load_version(product, name, version, tags, device=self.settings.device,
                                     precision=self.settings.precision))
            holder = ProductModel(product, loaded)
            self._holders[product] = holder
            self._ensure_refresher()
            log.info("loaded %s version %s (threshold %.6g)", name, version, loaded.threshold)
            return holder

        async def _serving_version(self, product: str) -> LoadedVersion:
            if not PRODUCT_RE.match(product or ""):
                raise ApiError(404, "unknown_product", "invalid product name (letters, digits, '.', '_', '-'; "
                                                       "at most 100 characters)")
            holder = self._holders.get(product)
            if holder is None or holder.evicted:
                absent = self._absent.get(product)
                if absent is not None and absent[0] > time.monotonic():
                    raise absent[1]
                try:  # only servable champions reach the loader, so a bad product never evicts a served one
                    _, version, tags = await asyncio.get_running_loop().run_in_executor(
                        self._io_pool, champion_info, product)
                    if threshold_from_tags(tags) is None:
                        raise ApiError(409, "no_threshold", f"champion version {version} of product {product!r} has "
                                                            "no calibrated threshold; run jobs/calibrate.py")
                except ApiError as error:
                    if error.status == 404:
                        if len(self._absent) > 4096:
                            self._absent.clear()
                        self._absent[product] = (time.monotonic() + self.settings.negative_cache_s, error)
                    raise
                self._absent.pop(product, None)
            try:
                holder = await self.get_product_model(product)
            except ApiError:
                raise
            except Exception as error:  # noqa: BLE001 - download or build failure: not the client's fault
                log.exception("loading the champion of %s failed", product)
                raise ApiError(503, "model_unavailable", f"the champion of {product!r} could not be loaded: "
                                                         f"{type(error).__name__}") from None
            loaded = holder.current
            if loaded is None:
                raise ApiError(404, "no_champion", f"product {product!r} has no champion version any more")
            return loaded

        def _ensure_refresher(self) -> None:
            if self._refresher is None or self._refresher.done():
                self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

        async def _refresh_loop(self) -> None:
            while True:
                await asyncio.sleep(self.settings.refresh_s)
                for product, holder in list(self._holders.items()):
                    if holder.evicted:
                        if self._holders.get(product) is holder:
                            del self._holders[product]
                        continue
                    try:
                        await self._refresh(holder)
                    except Exception:  # noqa: BLE001 - keep serving what is loaded; try again next round
                        log.warning("champion refresh of %s failed; still serving %s", product,
                                    holder.current.version if holder.current else None, exc_info=True)

        async def _refresh(self, holder: ProductModel) -> None:
            loop = asyncio.get_running_loop()
            try:
                name, version, tags = await loop.run_in_executor(self._io_pool, champion_info, holder.product)
            except ApiError as error:
                if error.status == 404:
                    if holder.current is not None:
                        log.warning("%s: %s; no longer served", holder.product, error.message)
                    holder.swap(None)
                    return
                raise
            current = holder.current
            threshold = threshold_from_tags(tags)
            if current is not None and current.version == version and current.threshold == threshold:
                return
            cached = holder.cache.get(version)
            if cached is not None and threshold is not None:
                loaded = dataclasses.replace(cached, threshold=threshold, threshold_method=tags.get("threshold_method"),
                                             loaded_at=time.time())
            else:
                loaded = await loop.run_in_executor(
                    self._io_pool,
                    lambda: load_version(holder.product, name, version, tags, device=self.settings.device,
                                         precision=self.settings.precision))
            if holder.evicted:
                return
            holder.swap(loaded)
            self._switches += 1
            log.info("%s: now serving version %s (threshold %.6g)", name, version, loaded.threshold)

        # -- inference -----------------------------------------------------------------------------------------
        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
        async def _infer_batch(self, items: list[tuple[LoadedVersion, np.ndarray]]) -> list[Any]:
            return await asyncio.get_running_loop().run_in_executor(self._infer_pool, run_items, items)

        async def _predict(self, loaded: LoadedVersion, array: np.ndarray) -> tuple[float, np.ndarray]:
            if self.settings.batching:
                result = await self._infer_batch((loaded, array))
            else:
                result = (await asyncio.get_running_loop().run_in_executor(
                    self._infer_pool, run_items, [(loaded, array)]))[0]
            if isinstance(result, BaseException):
                raise result
            return result

        # -- routes --------------------------------------------------------------------------------------------
        @app.post("/v1/products/{product}/inspect", response_model=InspectionResult, responses=ERROR_RESPONSES,
                  openapi_extra=INSPECT_BODY, summary="Inspect one image with the product's champion model")
        async def inspect(
            self,
            product: str,
            request: Request,
            return_map: bool = Query(False, description="include the colourised anomaly heatmap (base64 PNG)"),
            return_mask: bool = Query(False, description="include the binary defect mask (base64 PNG)"),
        ) -> Any:
            started = time.perf_counter()
            try:
                content_type = request.headers.get("content-type")
                kind = media_type(content_type)
                if kind == "multipart/form-data":
                    body = await read_body(request, self.settings.max_bytes + MULTIPART_OVERHEAD)
                    data = parse_multipart(body, content_type or "")
                elif kind in RAW_CONTENT_TYPES:
                    data = await read_body(request, self.settings.max_bytes)
                elif not kind:
                    raise ApiError(415, "unsupported_media_type", "missing Content-Type; send image/png, image/jpeg, "
                                                                  "image/bmp, image/tiff or multipart/form-data")
                else:
                    raise ApiError(415, "unsupported_media_type", f"unsupported Content-Type {kind[:80]!r}; send "
                                                                  "image/png, image/jpeg, image/bmp, image/tiff, "
                                                                  "application/octet-stream or multipart/form-data")
                if len(data) > self.settings.max_bytes:
                    raise ApiError(413, "body_too_large", f"image of {len(data)} bytes exceeds the limit of "
                                                          f"{self.settings.max_bytes}")
                if not data:
                    raise ApiError(400, "empty_body", "the image is empty (zero bytes)")
                loaded = await self._serving_version(product)
                loop = asyncio.get_running_loop()
                array, (width, height) = await loop.run_in_executor(
                    self._work_pool, lambda: decode_image(data, max_pixels=self.settings.max_pixels,
                                                          max_side=self.settings.max_side))
                score, anomaly_map = await self._predict(loaded, array)
                result = await loop.run_in_executor(
                    self._work_pool, lambda: self._result(loaded, score, anomaly_map, width, height, return_map,
                                                          return_mask))
                result["latency_ms"] = round((time.perf_counter() - started) * 1000.0, 3)
                return JSONResponse(result)
            except ApiError as error:
                return error.response()
            except Exception as error:  # noqa: BLE001 - a bug, not bad input: logged, answered as JSON
                log.exception("inspect %s failed", product)
                return error_response(500, "internal_error", f"{type(error).__name__}")

        @staticmethod
        def _result(loaded: LoadedVersion, score: float, anomaly_map: np.ndarray, width: int, height: int,
                    return_map: bool, return_mask: bool) -> dict[str, Any]:
            from supersimplenet.visualize import colorize, mask_png

            mask = anomaly_map >= loaded.threshold
            result: dict[str, Any] = {
                "product": loaded.product,
                "registered_model": loaded.registered_model,
                "model_version": loaded.version,
                "score": score,
                "threshold": loaded.threshold,
                "threshold_method": loaded.threshold_method,
                "is_anomalous": bool(score >= loaded.threshold),
                "defect_area_percent": float(100.0 * mask.mean()),
                "image_width": width,
                "image_height": height,
                "map_width": int(anomaly_map.shape[1]),
                "map_height": int(anomaly_map.shape[0]),
                "anomaly_map_png": png_base64(colorize(anomaly_map)) if return_map else None,
                "mask_png": png_base64(np.asarray(mask_png(mask))) if return_mask else None,
            }
            if not math.isfinite(score):
                raise ValueError("non-finite score")
            return result

        @app.get("/v1/products", summary="Products with a champion, and the versions served")
        async def products(self) -> Any:
            def listing() -> list[dict[str, Any]]:
                client = _mlflow_client()
                out, token = [], None
                while True:
                    page = client.search_registered_models(filter_string="name LIKE 'ssn-%'", max_results=200,
                                                           page_token=token)
                    for registered in page:
                        aliases = registered.aliases or {}
                        if CHAMPION not in aliases:
                            continue
                        product = registered.name[len("ssn-"):]
                        holder = self._holders.get(product)
                        loaded = holder.current if holder is not None and not holder.evicted else None
                        out.append({"product": product, "registered_model": registered.name,
                                    "champion_version": str(aliases[CHAMPION]),
                                    "previous_version": str(aliases[PREVIOUS]) if PREVIOUS in aliases else None,
                                    "loaded_version": loaded.version if loaded else None,
                                    "threshold": loaded.threshold if loaded else None,
                                    "inference": inference_info(loaded.model) if loaded else None})
                    token = page.token
                    if not token:
                        return sorted(out, key=lambda p: p["product"])

            try:
                items = await asyncio.get_running_loop().run_in_executor(self._io_pool, listing)
            except Exception as error:  # noqa: BLE001
                return error_response(503, "registry_unavailable",
                                      f"model registry unreachable: {type(error).__name__}")
            return {"products": items}

        @app.get("/healthz", summary="Liveness: the replica answers")
        async def healthz(self) -> Any:
            return {"status": "ok", "uptime_s": round(time.time() - self._started, 1),
                    "loaded": {p: h.current.version for p, h in self._holders.items() if h.current and not h.evicted}}

        @app.get("/readyz", summary="Readiness: the replica reaches the model registry")
        async def readyz(self) -> Any:
            now = time.monotonic()
            checked_at, ok, detail = self._ready_cache
            if now - checked_at > 2.0:
                ok, detail = await asyncio.get_running_loop().run_in_executor(self._io_pool, _registry_health)
                self._ready_cache = (now, ok, detail)
            body = {"status": "ready" if ok else "not_ready", "registry": detail,
                    "settings": {k: v for k, v in self.settings.to_dict().items() if k != "mlflow_tracking_uri"},
                    "torch_threads": _torch_threads(), "switches": self._switches}
            return JSONResponse(body, status_code=200 if ok else 503)

    return Inspector


# ---------------------------------------------------------------------------------------------------------
# Building and deploying
# ---------------------------------------------------------------------------------------------------------
def replica_env(settings: ServeSettings) -> dict[str, str]:
    """Environment of the replicas: what the current Ray job already passes to its workers, plus SERVE_ENV."""
    env: dict[str, str] = {}
    try:
        import ray

        if ray.is_initialized():
            env.update((ray.get_runtime_context().runtime_env or {}).get("env_vars") or {})
    except Exception:  # noqa: BLE001 - outside a Ray worker or driver
        pass
    env.update({name: os.environ[name] for name in SERVE_ENV if os.environ.get(name)})
    if settings.mlflow_tracking_uri:
        env["MLFLOW_TRACKING_URI"] = settings.mlflow_tracking_uri
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return env


def build_app(args: dict[str, Any] | None = None):
    """Serve application builder (``import_path: ssn_platform.serving:build_app``); `args` are `ServeSettings`."""
    settings = ServeSettings.from_dict(args)
    runtime_env: dict[str, Any] = {}
    try:
        import ray

        if ray.is_initialized():
            runtime_env = {k: v for k, v in (ray.get_runtime_context().runtime_env or {}).items()
                           if k in ("working_dir", "py_modules", "pip", "uv", "conda", "env_vars")}
    except Exception:  # noqa: BLE001
        runtime_env = {}
    runtime_env["env_vars"] = replica_env(settings)
    actor_options: dict[str, Any] = {"num_cpus": settings.num_cpus, "runtime_env": runtime_env}
    if settings.num_gpus:
        actor_options["num_gpus"] = settings.num_gpus
    options: dict[str, Any] = {"ray_actor_options": actor_options,
                               "max_ongoing_requests": settings.max_ongoing_requests}
    if settings.num_replicas == "auto":
        options["num_replicas"] = "auto"
        options["autoscaling_config"] = {"min_replicas": settings.min_replicas, "max_replicas": settings.max_replicas,
                                         "target_ongoing_requests": settings.target_ongoing_requests}
    else:
        options["num_replicas"] = settings.num_replicas
    return inspector_deployment(settings.max_models_per_replica).options(**options).bind(settings.to_dict())


def serve_port() -> int:
    return int(os.environ.get("SSN_SERVE_PORT") or 8000)


def deploy(settings: dict[str, Any] | None = None, *, address: str | None = None, name: str = "ssn",
           route_prefix: str = "/", host: str = "127.0.0.1", port: int | None = None,
           log_to_driver: bool = True) -> str:
    """Starts Serve on the cluster (HTTP on host:port, default 127.0.0.1:SSN_SERVE_PORT) and deploys the app
    without blocking. Returns the base URL. `log_to_driver=False` keeps the replicas' logs and the INFO lines of
    Ray and Serve out of this process's output (the replicas' logs: when this call makes the Ray connection)."""
    from ssn_platform.training import check_mlflow, connect_ray

    check_mlflow(ServeSettings.from_dict(settings).mlflow_tracking_uri)
    connect_ray(address, log_to_driver=log_to_driver)
    if not log_to_driver:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    port = port or serve_port()
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings), name=name, route_prefix=route_prefix, blocking=False)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def wait_ready(url: str, *, timeout: float = 120.0) -> dict[str, Any]:
    """Polls ``<url>/readyz`` until it answers 200; returns its body."""
    import json
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            last = f"HTTP {error.code}"
        except (urllib.error.URLError, OSError) as error:
            last = str(error)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/readyz not ready after {timeout:.0f}s ({last})")
