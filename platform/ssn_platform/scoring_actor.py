"""The actor side of batch scoring (`ssn_platform.scoring`): one loaded version per Ray Data actor, a batch of raw
image bytes in, rows of the results table out.

`Scorer` loads the pinned version once, with the Serve replica's loader (`ssn_platform.serving.versions.load_version`),
decodes each image with the endpoint's decoder (within the Serve defaults' image limits) and scores the decoded ones
together through `run_items`, so a batch score equals the endpoint's. Every input becomes one row (`COLUMNS` plus
the partition column ``status``, typed by `TABLE_SCHEMA`): ``ok`` with the score, the decision at the version's
threshold, the defect regions and area on the ``model`` or ``original`` grid, or ``error`` with the reason (an image
that does not decode, or a failed inference), so a bad image never stops the job. With a masks prefix the actor
writes each ``ok`` image's mask as a PNG next to its relative path and records the URI in ``mask``.

Limits: the image limits are `ServeSettings`' defaults, not a deployed endpoint's settings; a mask write that fails
raises out of the whole batch, unlike a bad image, which only becomes an error row.

The serving modules are imported inside the actor's methods: the ssn_platform.serving package imports the app,
which imports `ssn_platform.scoring` (through drift), which imports this module.
"""

from __future__ import annotations

import datetime
import io
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa

from supersimplenet.visualize import mask_png
from ssn_platform.s3keys import format_s3_uri, join_key
from ssn_platform.storage import make_client, put_bytes

# The table's columns (besides the partition column `status`); `error` is null on status=ok rows, the score columns
# are null on status=error rows.
COLUMNS = (
    "image",
    "relative_path",
    "score",
    "is_anomalous",
    "threshold",
    "defect_area_percent",
    "regions",
    "regions_total",
    "image_width",
    "image_height",
    "map_resolution",
    "mask",
    "registered_model",
    "model_version",
    "error",
    "run",
    "scored_at",
)


class Scorer:
    """A Ray Data actor: loads the pinned version once (the Serve replica's loader) and scores batches of images."""

    def __init__(
        self,
        product: str,
        name: str,
        version: str,
        tags: dict[str, str],
        *,
        device: str,
        precision: str,
        threads: int,
        masks_prefix: tuple[str, str] | None,
        run: str,
        root: str,
        resolution: str = "model",
    ) -> None:
        import torch  # noqa: PLC0415 (torch: kept off the Serve app's import)

        # import cycle: the ssn_platform.serving package imports the app, which imports this module (drift, scoring)
        from ssn_platform.serving.settings import ServeSettings  # noqa: PLC0415 (import cycle, see above)
        from ssn_platform.serving.versions import load_version  # noqa: PLC0415 (import cycle, see above; torch)

        torch.set_num_threads(max(1, threads))
        self.loaded = load_version(product, name, version, tags, device=device, precision=precision)
        defaults = ServeSettings()
        self.limits = {"max_pixels": defaults.max_pixels, "max_side": defaults.max_side}
        self.masks_prefix = masks_prefix
        self.run = run
        self.root = root  # the input's URI prefix: what an image's path is relative to
        self.resolution = resolution
        self._client = None

    def _put_mask(self, relative_path: str, mask) -> str:
        bucket, prefix = self.masks_prefix
        if self._client is None:
            self._client = make_client()
        buffer = io.BytesIO()
        mask_png(mask).save(buffer, format="PNG")
        key = join_key(prefix, str(PurePosixPath(relative_path).with_suffix(".png")))
        put_bytes(self._client, bucket, key, buffer.getvalue(), content_type="image/png")
        return format_s3_uri(bucket, key)

    def __call__(self, batch: dict[str, Any]) -> Any:
        # import cycle: the ssn_platform.serving package imports the app, which imports this module (drift, scoring)
        from ssn_platform.serving.requests import ApiError, decode_image  # noqa: PLC0415 (import cycle, see above)
        from ssn_platform.serving.versions import decision, run_items  # noqa: PLC0415 (import cycle, see above)

        loaded = self.loaded
        images = [f"s3://{path}" for path in batch["path"]]
        arrays: dict[int, Any] = {}
        sizes: dict[int, tuple[int, int]] = {}
        errors: dict[int, str] = {}
        for index, data in enumerate(batch["bytes"]):
            try:
                arrays[index], sizes[index] = decode_image(bytes(data), **self.limits)
            except ApiError as error:
                errors[index] = f"{error.code}: {error.message}"
        order = sorted(arrays)
        results = dict(zip(order, run_items([(loaded, arrays.pop(i)) for i in order]))) if order else {}
        rows: dict[str, list[Any]] = {column: [] for column in (*COLUMNS, "status")}
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for index, image in enumerate(images):
            relative_path = image[len(self.root) :] if image.startswith(self.root) else image.rsplit("/", 1)[-1]
            row: dict[str, Any] = dict.fromkeys(COLUMNS)
            row.update(
                image=image,
                relative_path=relative_path,
                registered_model=loaded.registered_model,
                model_version=loaded.version,
                run=self.run,
                scored_at=now,
            )
            result = results.get(index)
            if isinstance(result, BaseException):
                errors[index] = f"inference_failed: {type(result).__name__}: {result}"
            if index in errors:
                row.update(error=errors[index][:1000], status="error")
            else:
                score, anomaly_map = result
                width, height = sizes[index]
                fields = decision(loaded, score, anomaly_map, width=width, height=height, resolution=self.resolution)
                row.update(
                    score=score,
                    is_anomalous=fields["is_anomalous"],
                    threshold=loaded.threshold,
                    defect_area_percent=fields["defect_area_percent"],
                    regions=fields["regions"],
                    regions_total=fields["regions_total"],
                    image_width=width,
                    image_height=height,
                    map_resolution=self.resolution,
                    status="ok",
                    mask=self._put_mask(relative_path, fields["mask"]) if self.masks_prefix else None,
                )
            for column in rows:
                rows[column].append(row[column])
        return pa.table(rows, schema=TABLE_SCHEMA)


def _table_schema():
    region = pa.struct(
        [
            ("x0", pa.int32()),
            ("y0", pa.int32()),
            ("x1", pa.int32()),
            ("y1", pa.int32()),
            ("area_pixels", pa.float64()),
            ("area_percent", pa.float64()),
            ("max_score", pa.float64()),
            ("mean_score", pa.float64()),
        ]
    )
    return pa.schema(
        [
            ("image", pa.string()),
            ("relative_path", pa.string()),
            ("score", pa.float64()),
            ("is_anomalous", pa.bool_()),
            ("threshold", pa.float64()),
            ("defect_area_percent", pa.float64()),
            ("regions", pa.list_(region)),
            ("regions_total", pa.int32()),
            ("image_width", pa.int32()),
            ("image_height", pa.int32()),
            ("map_resolution", pa.string()),
            ("mask", pa.string()),
            ("registered_model", pa.string()),
            ("model_version", pa.string()),
            ("error", pa.string()),
            ("run", pa.string()),
            ("scored_at", pa.string()),
            ("status", pa.string()),
        ]
    )


TABLE_SCHEMA = _table_schema()
