"""The Serve application: the replica class, its FastAPI routes and the deployment made of them.

Which version each product is served with, and the champion switch that follows promotions without failing a
request, are `ssn_platform.serving.champions.ChampionSwitch`, which the replica inherits (as it inherits the review
routes, `ssn_platform.serving.review.ReviewRoutes`).

Serve pickles the ingress class by value: whatever its methods use (annotations included: no `from __future__ import
annotations` in this module) must be defined or imported at module level.
"""

import asyncio
import contextlib
import functools
import logging
import math
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from supersimplenet.visualize import colorize, mask_png
from ssn_platform.drift import drift_of
from ssn_platform.serving.auth import ApiKeys
from ssn_platform.serving.batching import ContinuousBatcher
from ssn_platform.serving.champions import ChampionSwitch
from ssn_platform.serving.metrics import InspectionMetrics, StageTimer
from ssn_platform.serving.review import ReviewRoutes
from ssn_platform.serving.requests import (
    ERROR_RESPONSES,
    INSPECT_BODY,
    MULTIPART_OVERHEAD,
    RAW_CONTENT_TYPES,
    ApiError,
    InspectionResult,
    decode_image,
    error_response,
    image_size,
    media_type,
    parse_multipart,
    png_base64,
    read_body,
)
from ssn_platform.serving.settings import ServeSettings
from ssn_platform.serving.versions import (
    CHAMPION,
    PREVIOUS,
    LoadedVersion,
    ProductModel,
    _mlflow_client,
    decision,
    inference_info,
    run_items,
)

log = logging.getLogger("ray.serve")


def _torch_threads() -> int:
    import torch  # noqa: PLC0415 (torch: loads in the replica, not where Serve builds the app)

    return torch.get_num_threads()


def _registry_health() -> tuple[bool, str]:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return False, "MLFLOW_TRACKING_URI is not an http(s) tracking server"
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=3) as response:
            return response.status == 200, f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as error:
        return False, f"unreachable: {type(error).__name__}"


def _timed_run_items(items: list[tuple[LoadedVersion, np.ndarray]]) -> list[tuple[Any, float, int]]:
    """`run_items` with each item's (result, ms the batch took, batch size)."""
    started = time.perf_counter()
    results = run_items(items)
    model_ms = (time.perf_counter() - started) * 1000.0
    return [(result, model_ms, len(items)) for result in results]


class InspectorReplica(ChampionSwitch, ReviewRoutes):
    """One replica: several products' champions (LRU), batched inference, champion polling.

    The Serve deployment (`inspector_deployment`) subclasses it: the subclass adds the routes, which call the methods
    below, and `get_product_model`, the multiplexed loader, whose LRU size is fixed when the class is defined."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        self.settings = ServeSettings.from_dict(settings)
        for key, value in (
            ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),
            ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20"),
            ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
        ):
            os.environ.setdefault(key, value)
        if self.settings.mlflow_tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = self.settings.mlflow_tracking_uri
        import torch  # noqa: PLC0415 (torch: loads in the replica, not where Serve builds the app)

        Image.MAX_IMAGE_PIXELS = self.settings.max_pixels
        if self.settings.torch_threads > 0:
            torch.set_num_threads(self.settings.torch_threads)
        self.api_keys = ApiKeys.from_settings(self.settings.api_keys_file)
        self._holders: dict[str, ProductModel] = {}
        self._absent: dict[str, tuple[float, ApiError]] = {}
        self._failed: dict[str, tuple[float, str, ApiError]] = {}  # product -> (until, version, answer): load_backoff_s
        self._infer_pool = ThreadPoolExecutor(self.settings.inference_threads, thread_name_prefix="ssn-infer")
        self._work_pool = ThreadPoolExecutor(2, thread_name_prefix="ssn-decode")
        self._io_pool = ThreadPoolExecutor(4, thread_name_prefix="ssn-io")
        self._refresher: asyncio.Task | None = None
        self._ready_cache: tuple[float, bool, str] = (0.0, False, "")
        self._started = time.time()
        self._switches = 0
        self._pixels_in_flight = 0  # decoded pixels held by requests in progress (_pixel_budget)
        self._metrics = InspectionMetrics()
        self._batcher = ContinuousBatcher(
            _timed_run_items,
            self._infer_pool,
            max_batch_size=self.settings.max_batch_size,
            wait_s=self.settings.batch_wait_timeout_s,
            concurrency=self.settings.inference_threads,
        )

    # -- inference -------------------------------------------------------------------------------------------------
    async def _predict(self, loaded: LoadedVersion, array: np.ndarray, timing: StageTimer) -> tuple[float, np.ndarray]:
        """Score and map of one image; `timing` gets the model's share of the wait and the batch size."""
        if self.settings.batching:
            result, model_ms, batch = await self._batcher.submit((loaded, array))
        else:
            result, model_ms, batch = (
                await asyncio.get_running_loop().run_in_executor(self._infer_pool, _timed_run_items, [(loaded, array)])
            )[0]
        timing.model(model_ms, batch)
        if isinstance(result, BaseException):
            raise result
        return result

    @contextlib.contextmanager
    def _pixel_budget(self, pixels: int):
        """Holds `pixels` of the replica's `max_pixels_in_flight` while a request's image is decoded and scored;
        503 + Retry-After when they are not free. Runs on the event loop only, so the counter needs no lock."""
        if self._pixels_in_flight + pixels > self.settings.max_pixels_in_flight:
            raise ApiError(
                503,
                "pixel_budget_full",
                f"the replica holds {self._pixels_in_flight} decoded pixels; "
                f"{pixels} more would exceed max_pixels_in_flight ({self.settings.max_pixels_in_flight})",
                headers={"Retry-After": str(max(1, math.ceil(self.settings.retry_after_s)))},
            )
        self._pixels_in_flight += pixels
        try:
            yield
        finally:
            self._pixels_in_flight -= pixels

    # -- what the routes answer -----------------------------------------------------------------------------------
    async def _inspect(
        self, product: str, request: Request, return_map: bool, return_mask: bool, map_resolution: str = "model"
    ) -> Any:
        started = time.perf_counter()
        timing = StageTimer(started)
        try:
            self.api_keys.check(request.headers, product)
            content_type = request.headers.get("content-type")
            kind = media_type(content_type)
            if kind == "multipart/form-data":
                body = await read_body(request, self.settings.max_bytes + MULTIPART_OVERHEAD)
                data = parse_multipart(body, content_type or "")
            elif kind in RAW_CONTENT_TYPES:
                data = await read_body(request, self.settings.max_bytes)
            elif not kind:
                raise ApiError(
                    415,
                    "unsupported_media_type",
                    "missing Content-Type; send image/png, image/jpeg, image/bmp, image/tiff or multipart/form-data",
                )
            else:
                raise ApiError(
                    415,
                    "unsupported_media_type",
                    f"unsupported Content-Type {kind[:80]!r}; send "
                    "image/png, image/jpeg, image/bmp, image/tiff, "
                    "application/octet-stream or multipart/form-data",
                )
            if len(data) > self.settings.max_bytes:
                raise ApiError(
                    413, "body_too_large", f"image of {len(data)} bytes exceeds the limit of {self.settings.max_bytes}"
                )
            if not data:
                raise ApiError(400, "empty_body", "the image is empty (zero bytes)")
            timing.mark("read")
            loaded = await self._serving_version(product)
            timing.mark("model_lookup")
            loop = asyncio.get_running_loop()
            limits = {"max_pixels": self.settings.max_pixels, "max_side": self.settings.max_side}
            width, height = await loop.run_in_executor(self._work_pool, lambda: image_size(data, **limits))
            with self._pixel_budget(width * height):
                array, _ = await loop.run_in_executor(self._work_pool, lambda: decode_image(data, **limits))
                timing.mark("decode")
                score, anomaly_map = await self._predict(loaded, array, timing)
                timing.mark("infer")
                del array
                result = await loop.run_in_executor(
                    self._work_pool,
                    lambda: self._result(
                        loaded, score, anomaly_map, width, height, return_map, return_mask, map_resolution
                    ),
                )
            timing.mark("post")
            result["latency_ms"] = round((time.perf_counter() - started) * 1000.0, 3)
            self._metrics.answered(
                loaded.product, score, result["is_anomalous"], result["latency_ms"], stages=timing.stages
            )
            self._maybe_keep(loaded, data, result, anomaly_map)
            return JSONResponse(result, headers={"Server-Timing": timing.header()})
        except ApiError as error:
            self._metrics.failed(product if product in self._holders else "-", error.code)
            return error.response()
        except Exception as error:  # noqa: BLE001 - a bug, not bad input: logged, answered as JSON
            log.exception("inspect %s failed", product)
            self._metrics.failed(product if product in self._holders else "-", "internal_error")
            return error_response(500, "internal_error", f"{type(error).__name__}")

    @staticmethod
    def _result(
        loaded: LoadedVersion,
        score: float,
        anomaly_map: np.ndarray,
        width: int,
        height: int,
        return_map: bool,
        return_mask: bool,
        map_resolution: str = "model",
    ) -> dict[str, Any]:
        decided = decision(loaded, score, anomaly_map, width=width, height=height, resolution=map_resolution)
        result: dict[str, Any] = {
            "product": loaded.product,
            "registered_model": loaded.registered_model,
            "model_version": loaded.version,
            "score": score,
            "threshold": loaded.threshold,
            "threshold_method": loaded.threshold_method,
            "is_anomalous": decided["is_anomalous"],
            "defect_area_percent": decided["defect_area_percent"],
            "image_width": width,
            "image_height": height,
            "map_resolution": map_resolution,
            "map_width": int(decided["map"].shape[1]),
            "map_height": int(decided["map"].shape[0]),
            "regions": decided["regions"],
            "regions_total": decided["regions_total"],
            "anomaly_map_png": png_base64(colorize(decided["map"])) if return_map else None,
            "mask_png": png_base64(np.asarray(mask_png(decided["mask"]))) if return_mask else None,
        }
        if not math.isfinite(score):
            raise ValueError("non-finite score")
        return result

    async def _products(self, request: Request) -> Any:
        try:
            self.api_keys.check(request.headers)
        except ApiError as error:
            return error.response()

        def listing() -> list[dict[str, Any]]:
            client = _mlflow_client()
            out, token = [], None
            while True:
                page = client.search_registered_models(
                    filter_string="name LIKE 'ssn-%'", max_results=200, page_token=token
                )
                for registered in page:
                    aliases = registered.aliases or {}
                    if CHAMPION not in aliases:
                        continue
                    product = registered.name[len("ssn-") :]
                    holder = self._holders.get(product)
                    loaded = holder.current if holder is not None and not holder.evicted else None
                    out.append(
                        {
                            "product": product,
                            "registered_model": registered.name,
                            "champion_version": str(aliases[CHAMPION]),
                            "previous_version": str(aliases[PREVIOUS]) if PREVIOUS in aliases else None,
                            "loaded_version": loaded.version if loaded else None,
                            "threshold": loaded.threshold if loaded else None,
                            "inference": inference_info(loaded.model) if loaded else None,
                            "drift": drift_of(registered.tags or {}),
                        }
                    )
                token = page.token
                if not token:
                    return sorted(out, key=lambda p: p["product"])

        try:
            items = await asyncio.get_running_loop().run_in_executor(self._io_pool, listing)
        except Exception as error:  # noqa: BLE001
            return error_response(503, "registry_unavailable", f"model registry unreachable: {type(error).__name__}")
        return {"products": items}

    async def _healthz(self) -> Any:
        return {
            "status": "ok",
            "uptime_s": round(time.time() - self._started, 1),
            "loaded": {p: h.current.version for p, h in self._holders.items() if h.current and not h.evicted},
        }

    async def _readyz(self) -> Any:
        now = time.monotonic()
        checked_at, ok, detail = self._ready_cache
        if now - checked_at > 2.0:
            ok, detail = await asyncio.get_running_loop().run_in_executor(self._io_pool, _registry_health)
            self._ready_cache = (now, ok, detail)
        # Loaded champions answer without the registry: a replica that holds one stays ready while MLflow is down
        # (it cannot load new products or follow promotions meanwhile, which "registry" says).
        serving = sorted(p for p, h in self._holders.items() if not h.evicted and h.current is not None)
        ok = ok or bool(serving)
        body = {
            "status": "ready" if ok else "not_ready",
            "registry": detail,
            "serving": serving,
            "settings": {k: v for k, v in self.settings.to_dict().items() if k != "mlflow_tracking_uri"},
            "torch_threads": _torch_threads(),
            "switches": self._switches,
        }
        return JSONResponse(body, status_code=200 if ok else 503)


def _fastapi_app() -> FastAPI:
    """The service's FastAPI app, with its errors answered as JSON bodies ``{"error": {...}}``."""
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

    return app


@functools.lru_cache(maxsize=None)
def inspector_deployment(max_models_per_replica: int = 4):
    """The Serve deployment (FastAPI app + replica class). `@serve.multiplexed` fixes its LRU size when the class
    is defined, so the class is made per size (and cached)."""
    app = _fastapi_app()

    @serve.deployment(name="inspector", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32)
    @serve.ingress(app)
    class Inspector(InspectorReplica):
        """The replica with its routes and its multiplexed model loader."""

        @serve.multiplexed(max_num_models_per_replica=max_models_per_replica)
        async def get_product_model(self, product: str) -> ProductModel:
            return await self._load_product_model(product)

        @app.post(
            "/v1/products/{product}/inspect",
            response_model=InspectionResult,
            responses=ERROR_RESPONSES,
            openapi_extra=INSPECT_BODY,
            summary="Inspect one image with the product's champion model",
        )
        async def inspect(
            self,
            product: str,
            request: Request,
            return_map: bool = Query(False, description="include the colourised anomaly heatmap (base64 PNG)"),
            return_mask: bool = Query(False, description="include the binary defect mask (base64 PNG)"),
            map_resolution: Literal["model", "original"] = Query(
                "model",
                description="size of the returned map and mask, and of the grid the defect area and "
                "regions are measured on: the model's input size, or the image's own",
            ),
        ) -> Any:
            return await self._inspect(product, request, return_map, return_mask, map_resolution)

        @app.get("/v1/products", summary="Products with a champion, and the versions served")
        async def products(self, request: Request) -> Any:
            return await self._products(request)

        @app.get("/review/{product}", summary="The review page (HTML)", include_in_schema=False)
        async def review_page(self, product: str, request: Request) -> Any:
            return await self._review_page(product, request)

        @app.post("/review/{product}/login", include_in_schema=False)
        async def review_login(self, product: str, request: Request) -> Any:
            return await self._review_login(product, request)

        @app.get("/review/{product}/items/{item_id}/{name}", include_in_schema=False)
        async def review_file(self, product: str, item_id: str, name: str, request: Request) -> Any:
            return await self._review_file(product, item_id, name, request)

        @app.post("/review/{product}/items/{item_id}/label", summary="Label a kept image normal or defective")
        async def review_label(self, product: str, item_id: str, request: Request) -> Any:
            return await self._review_label(product, item_id, request)

        @app.post("/review/{product}/publish", summary="Publish the labels as a new dataset version")
        async def review_publish(self, product: str, request: Request) -> Any:
            return await self._review_publish(product, request)

        @app.get("/healthz", summary="Liveness: the replica answers")
        async def healthz(self) -> Any:
            return await self._healthz()

        @app.get("/readyz", summary="Readiness: the replica reaches the model registry")
        async def readyz(self) -> Any:
            return await self._readyz()

    return Inspector


__all__ = [
    "InspectorReplica",
    "inspector_deployment",
]
