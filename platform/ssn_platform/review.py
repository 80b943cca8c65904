"""The review-and-relabel loop's storage: images the endpoint kept, operators' labels, and publishing them as a new
dataset version.

Layout under ``s3://<bucket>/review/<product>/``:

* ``items/<id>/image.<ext>`` (the bytes the endpoint received), ``items/<id>/map.png`` (the colourised anomaly map)
  and ``items/<id>/item.json`` (score, threshold, decision, version, why it was kept, when), written last;
* ``labels/<id>.json`` (``normal`` or ``defective``, who, when) and ``labels/<id>.mask.png`` (the painted defect,
  optional, at the image's size);
* ``published/<dataset version>.json``: which labelled items a published version added.

Ids sort by time (``<UTC yyyymmddThhmmss>-<8 hex>``). `ReviewStore.keep` is what the endpoint calls (in a worker
thread, after answering); the label and publish calls are the review page's (`ssn_platform.serving.review`).

`ReviewStore.publish` makes the labels a new dataset version of the product: the product's ``latest`` dataset
version (or the champion's training data when the product has none) plus every labelled item not published yet,
in split `split` (default ``val``: what the next calibration and promotion score, and training validates on), then
checked like any ingest (every file decoded; a painted mask must have the image's size) and published by
`ssn_platform.ingest.publish_checked` (manifest last, then ``latest``): the next train, calibrate or promote that
reads ``latest`` uses it. Labelled items are named ``review/<id>.<ext>`` in the dataset.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import re
import uuid
from typing import Any

from PIL import Image

from ssn_platform.names import PRODUCT_RE
from ssn_platform.s3keys import join_key
from ssn_platform.storage import ObjectNotFoundError, get_bytes, make_client, put_bytes

LABELS = ("normal", "defective")
ID_RE = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{8}$")
IMAGE_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "TIFF": "tif"}


class ReviewError(ValueError):
    """A bad review request: the message names it; `status` is its HTTP answer (400 bad input, 404 unknown item,
    409 nothing to publish)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class PublishResult:
    dataset_uri: str
    version: str
    base_version: str | None
    added: dict[str, int]  # label -> images added
    items: tuple[str, ...]
    split: str


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class ReviewStore:
    """Review items and labels of one product in one bucket (module docstring)."""

    def __init__(self, bucket: str, product: str, client: Any = None) -> None:
        if not PRODUCT_RE.match(product or ""):
            raise ReviewError(f"invalid product name {product!r}")
        self.bucket, self.product = bucket, product
        self.prefix = join_key("review", product)
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client()
        return self._client

    def _put(self, key: str, data: bytes, content_type: str) -> None:
        put_bytes(self.client, self.bucket, join_key(self.prefix, key), data, content_type=content_type)

    def _get(self, key: str) -> bytes:
        return get_bytes(self.client, self.bucket, join_key(self.prefix, key))

    def _keys(self, under: str) -> list[str]:
        base = join_key(self.prefix, under) + "/"
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            keys += [entry["Key"][len(base) :] for entry in page.get("Contents", [])]
        return keys

    # -- the endpoint's side --------------------------------------------------------------------------------------
    def keep(self, image: bytes, image_format: str, map_png: bytes, record: dict[str, Any]) -> str:
        """Stores one inspected image with its map and record; returns its id. item.json last: listed when whole."""
        item_id = f"{_now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        ext = IMAGE_EXTENSIONS.get(image_format.upper(), "png")
        self._put(f"items/{item_id}/image.{ext}", image, f"image/{'jpeg' if ext == 'jpg' else ext}")
        self._put(f"items/{item_id}/map.png", map_png, "image/png")
        record = {**record, "id": item_id, "image": f"image.{ext}", "kept_at": _now().isoformat(timespec="seconds")}
        self._put(f"items/{item_id}/item.json", json.dumps(record).encode(), "application/json")
        return item_id

    # -- the review page's side -----------------------------------------------------------------------------------
    def items(self, limit: int = 200) -> list[dict[str, Any]]:
        """Kept items, newest first, each with its label (None when not labelled yet)."""
        ids = sorted({k.split("/", 1)[0] for k in self._keys("items") if k.endswith("/item.json")}, reverse=True)
        labels = {k[: -len(".json")] for k in self._keys("labels") if k.endswith(".json")}
        out = []
        for item_id in ids[:limit]:
            record = json.loads(self._get(f"items/{item_id}/item.json"))
            record["label"] = json.loads(self._get(f"labels/{item_id}.json")) if item_id in labels else None
            out.append(record)
        return out

    def item(self, item_id: str) -> dict[str, Any]:
        if not ID_RE.match(item_id or ""):
            raise ReviewError(f"invalid review item id {item_id!r}")
        try:
            return json.loads(self._get(f"items/{item_id}/item.json"))
        except ObjectNotFoundError:
            raise ReviewError(f"no review item {item_id!r} for product {self.product!r}", 404) from None

    def file(self, item_id: str, name: str) -> tuple[bytes, str]:
        """(bytes, media type) of the kept image (``image``) or map (``map``) of an item."""
        record = self.item(item_id)
        if name == "map":
            return self._get(f"items/{item_id}/map.png"), "image/png"
        ext = record["image"].rsplit(".", 1)[-1]
        media = {"jpg": "image/jpeg", "tif": "image/tiff"}.get(ext, f"image/{ext}")
        return self._get(f"items/{item_id}/{record['image']}"), media

    def label(self, item_id: str, label: str, *, by: str, mask_png: bytes | None = None) -> dict[str, Any]:
        """Records an operator's label (and painted mask, for a defective image); returns the label record."""
        record = self.item(item_id)
        if label not in LABELS:
            raise ReviewError(f"label must be one of {LABELS}, got {label!r}")
        if mask_png is not None:
            if label != "defective":
                raise ReviewError("a painted mask is only for a defective image")
            try:
                with Image.open(io.BytesIO(mask_png), formats=["PNG"]) as mask:
                    binary = mask.convert("L").point(lambda v: 255 if v else 0)  # painted (any colour) -> 255
                    size = mask.size
            except Exception as error:  # noqa: BLE001 - the client's bytes
                raise ReviewError(f"the mask is not a PNG image: {type(error).__name__}") from None
            if not binary.getbbox():
                raise ReviewError("the painted mask is empty")
            buffer = io.BytesIO()
            binary.save(buffer, format="PNG")
            mask_png = buffer.getvalue()
            if size != (record.get("image_width"), record.get("image_height")):
                raise ReviewError(
                    f"the mask is {size[0]}x{size[1]}; the image is "
                    f"{record.get('image_width')}x{record.get('image_height')}"
                )
            self._put(f"labels/{item_id}.mask.png", mask_png, "image/png")
        entry = {
            "id": item_id,
            "label": label,
            "mask": mask_png is not None,
            "by": by,
            "at": _now().isoformat(timespec="seconds"),
        }
        self._put(f"labels/{item_id}.json", json.dumps(entry).encode(), "application/json")
        return entry

    def published_items(self) -> set[str]:
        done: set[str] = set()
        for key in self._keys("published"):
            done.update(json.loads(self._get(f"published/{key}"))["items"])
        return done

    def publish(self, *, dataset_bucket: str = "ssn", split: str = "val", base_uri: str | None = None) -> PublishResult:
        """The labelled items not published yet, added to the product's latest dataset version (module docstring)."""
        from ssn_platform.review_publish import publish_labels  # noqa: PLC0415 (import cycle with review_publish)

        return publish_labels(self, dataset_bucket=dataset_bucket, split=split, base_uri=base_uri)


__all__ = ["LABELS", "PublishResult", "ReviewError", "ReviewStore"]
