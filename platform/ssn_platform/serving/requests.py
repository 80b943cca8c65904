"""Requests and answers of the inspection service: schemas, errors, reading and decoding the image.

Bad input never reaches the model: body size is capped while reading, the content type and multipart structure
are checked, only PNG/JPEG/BMP/TIFF decoders are enabled, the dimensions are read from the header and checked
against ``max_pixels``/``max_side`` before anything is decoded (Pillow's bomb limit is set too), and decoding
errors (truncated files, unsupported modes) become 4xx answers with a JSON body ``{"error": {...}}``.
"""

import base64
import io
import warnings
from email.message import Message
from typing import Any, Literal

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field

RAW_CONTENT_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/bmp",
        "image/x-bmp",
        "image/x-ms-bmp",
        "image/tiff",
        "image/tif",
        "application/octet-stream",
    }
)
PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")  # the only decoders Pillow may try
MULTIPART_OVERHEAD = 64 * 1024


# ---------------------------------------------------------------------------------------------------------
# Errors and schemas
# ---------------------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An answer other than 200: HTTP status, a stable code and a message (JSON body ``{"error": {...}}``)."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        response = error_response(self.status, self.code, self.message)
        response.headers.update(self.headers)
        return response


def error_response(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"status": status, "code": code, "message": message, **extra}}
    )


class ErrorDetail(BaseModel):
    status: int
    code: str = Field(description="stable machine-readable code, e.g. unknown_product, image_too_large")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class DefectRegion(BaseModel):
    x0: int = Field(description="bounding box left edge, image pixels (inclusive)")
    y0: int = Field(description="bounding box top edge, image pixels (inclusive)")
    x1: int = Field(description="bounding box right edge, image pixels (exclusive)")
    y1: int = Field(description="bounding box bottom edge, image pixels (exclusive)")
    area_pixels: float = Field(description="the region's area in image pixels")
    area_percent: float = Field(description="the region's area in percent of the image")
    max_score: float = Field(description="the highest anomaly-map value in the region")
    mean_score: float = Field(description="the mean anomaly-map value in the region")


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
    map_resolution: Literal["model", "original"] = Field(description="the grid of the map, mask, area and regions")
    map_width: int
    map_height: int
    regions: list[DefectRegion] = Field(
        description="connected regions of map >= threshold in image coordinates, highest max_score first, at most 32"
    )
    regions_total: int = Field(description="how many regions there are (regions lists at most 32)")
    anomaly_map_png: str | None = Field(None, description="colourised heatmap, base64 PNG (return_map=true)")
    mask_png: str | None = Field(None, description="binary mask 0/255, base64 PNG (return_mask=true)")
    latency_ms: float


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "empty body, undecodable or truncated image, malformed multipart",
        401: "missing or unknown API key (send 'Authorization: Bearer <key>')",
        403: "the API key may not inspect this product",
        404: "unknown product, or a product without a champion",
        409: "the champion has no calibrated threshold",
        413: "body larger than max_bytes, or image larger than max_pixels / max_side",
        415: "unsupported content type or image format",
        422: "invalid query parameter",
        503: "replicas full or the replica's pixel budget in use (Retry-After), model registry unreachable, or the "
        "model could not be loaded",
    }.items()
}

INSPECT_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image: raw bytes, or multipart/form-data with the file in field `image`.",
        "content": {
            **{
                t: {"schema": {"type": "string", "format": "binary"}}
                for t in ("image/png", "image/jpeg", "image/bmp", "image/tiff", "application/octet-stream")
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"}},
                }
            },
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
        headers = part[line_end + 2 : head_end].decode("latin-1").split("\r\n")
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
            found = part[head_end + 4 :]
    if not closed:
        raise ApiError(400, "bad_multipart", "multipart body is not terminated by its closing boundary")
    if found is None:
        raise ApiError(400, "missing_image", f"multipart/form-data without a field {field_name!r}")
    return found


def _open_checked(data: bytes, *, max_pixels: int, max_side: int):
    """The image opened from its header only, its size checked against the limits (nothing decoded yet)."""
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
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels or max(width, height) > max_side:
        image.close()
        if width < 1 or height < 1:
            raise ApiError(400, "invalid_image", f"image has no pixels ({width}x{height})")
        raise ApiError(
            413,
            "image_too_large",
            f"image is {width}x{height}; the limit is {max_pixels} pixels and {max_side} per side",
        )
    return image


def image_size(data: bytes, *, max_pixels: int, max_side: int) -> tuple[int, int]:
    """(width, height) from the image's header, checked against the limits; no pixel is decoded."""
    image = _open_checked(data, max_pixels=max_pixels, max_side=max_side)
    image.close()
    return image.size


def decode_image(data: bytes, *, max_pixels: int, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes -> HxWx3 float32 in [0, 1] by the model library's conversion, and (width, height).

    Dimensions come from the header and are checked before any pixel is decoded.
    """
    from supersimplenet.loading import image_array  # noqa: PLC0415 (torch: kept off the Serve app's import)

    image = _open_checked(data, max_pixels=max_pixels, max_side=max_side)
    width, height = image.size
    try:
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


__all__ = [
    "ApiError",
    "ERROR_RESPONSES",
    "INSPECT_BODY",
    "InspectionResult",
    "decode_image",
    "error_response",
    "media_type",
    "parse_multipart",
    "png_base64",
    "read_body",
]
