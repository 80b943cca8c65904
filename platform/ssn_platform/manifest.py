"""The dataset manifest: what a dataset version in S3 is, and how its version is computed.

Layout in the bucket (one prefix per dataset version)::

    s3://<bucket>/datasets/<product>/<version>/objects/<relative path>   the files, at the paths the model package
                                                                          reads them from (browsable, diffable)
    s3://<bucket>/datasets/<product>/<version>/manifest.json              written LAST: a version exists when this does
    s3://<bucket>/datasets/<product>/latest                               text file holding the newest version

The manifest (schema ``ssn-dataset-manifest`` version 1) holds one record per sample::

    {"image": "test/defective/001.png", "image_key": "objects/test/defective/001.png",
     "image_sha256": "...", "image_bytes": 1234,
     "mask": "ground_truth/defective/001.png" | null, "mask_key": "objects/..." | null,
     "mask_sha256": "..." | null, "mask_bytes": 567 | null,
     "label": 1, "split": "test", "segmented": true, "defect_type": "defective"}

Keys in records are relative to the version prefix (so records do not depend on the version). ``version`` is the
first 16 hex digits of the sha256 of the canonical JSON of the records (sorted by image path, sorted keys, no
whitespace): the same files with the same labels always give the same version, any change gives a new one. Layout
metadata (layout name, category, source folder, reader options) sits beside the records and is not hashed.

``empty_masks`` records what the ingest did with defective images whose mask decoded to all zeros
(``{"policy": "error" | "label-only" | "drop", "images": [their image paths]}``; `supersimplenet.validation`). Under
``error`` (the default, and what a manifest without the field means) no such image exists and the version is the
hash of the records alone, as above. Under ``label-only`` or ``drop`` the version is the hash of
``{"empty_masks": ..., "records": [...]}``, so the choice is part of the version: the same folder ingested with
another choice is another version.

`ssn_platform.ingest` publishes versions; `ssn_platform.datasets.DatasetReader` reads them back.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from supersimplenet.samples import EMPTY_MASK_POLICIES, Sample
from ssn_platform.s3keys import join_key, validate_key
from ssn_platform.storage import StorageError
from ssn_platform.names import PRODUCT_RE as _PRODUCT_RE

SCHEMA = "ssn-dataset-manifest"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
LATEST_NAME = "latest"
OBJECTS_DIR = "objects"
DATASETS_ROOT = "datasets"
_VERSION_RE = re.compile(r"^[0-9a-f]{16}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_RECORD_FIELDS = (
    "image",
    "image_key",
    "image_sha256",
    "image_bytes",
    "mask",
    "mask_key",
    "mask_sha256",
    "mask_bytes",
    "label",
    "split",
    "segmented",
    "defect_type",
)


class DatasetError(StorageError):
    """A dataset in object storage is missing, incomplete or inconsistent."""


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def compute_version(records: Sequence[Mapping[str, Any]], empty_masks: Mapping[str, Any] | None = None) -> str:
    """First 16 hex digits of sha256(canonical JSON of the records sorted by image path), with the empty-mask choice
    when it is not the default ``error`` (module docstring)."""
    ordered = sorted(records, key=lambda r: r["image"])
    if empty_masks is None or empty_masks.get("policy") == "error":
        return hashlib.sha256(canonical_json(ordered)).hexdigest()[:16]
    return hashlib.sha256(canonical_json({"empty_masks": dict(empty_masks), "records": ordered})).hexdigest()[:16]


def empty_masks_entry(policy: str, images: Sequence[str] = ()) -> dict[str, Any]:
    """The manifest's ``empty_masks`` field: the policy and the (sorted) images it applied to."""
    return _check_empty_masks({"policy": policy, "images": sorted(images)}, "empty_masks")


def _check_empty_masks(entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, Mapping) or set(entry) != {"policy", "images"}:
        raise DatasetError(f"{where}: empty_masks must be {{'policy': ..., 'images': [...]}}, got {entry!r}")
    policy, images = entry["policy"], entry["images"]
    if policy not in EMPTY_MASK_POLICIES:
        raise DatasetError(f"{where}: empty_masks.policy must be one of {EMPTY_MASK_POLICIES}, got {policy!r}")
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise DatasetError(f"{where}: empty_masks.images must be a list of image paths, got {images!r}")
    if policy == "error" and images:
        raise DatasetError(f"{where}: empty_masks.policy 'error' admits no images with an empty mask, got {images}")
    return {"policy": policy, "images": list(images)}


def dataset_prefix(product: str, version: str) -> str:
    _check_product(product)
    if not _VERSION_RE.match(version):
        raise ValueError(f"invalid dataset version {version!r} (16 lowercase hex digits)")
    return join_key(DATASETS_ROOT, product, version)


def _check_product(product: str) -> str:
    if not isinstance(product, str) or not _PRODUCT_RE.match(product) or product in {LATEST_NAME, OBJECTS_DIR}:
        raise ValueError(
            f"invalid product name {product!r}: 1-100 characters of letters, digits, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return product


def _check_record(rec: Mapping[str, Any], where: str) -> None:
    missing = [f for f in _RECORD_FIELDS if f not in rec]
    if missing:
        raise DatasetError(f"{where}: record for {rec.get('image')!r} lacks {missing}")
    for prefix in ("image", "mask"):
        path, key, sha, size = (rec[prefix], rec[f"{prefix}_key"], rec[f"{prefix}_sha256"], rec[f"{prefix}_bytes"])
        if prefix == "mask" and path is None:
            if key is not None or sha is not None or size is not None:
                raise DatasetError(f"{where}: record {rec['image']!r} has mask fields without a mask")
            continue
        try:
            validate_key(path, what=f"{prefix} path")
            validate_key(key, what=f"{prefix} key")
        except ValueError as exc:
            raise DatasetError(f"{where}: {exc}") from None
        if not key.startswith(OBJECTS_DIR + "/"):
            raise DatasetError(f"{where}: {prefix} key {key!r} is not under {OBJECTS_DIR}/")
        if not isinstance(sha, str) or not _SHA_RE.match(sha):
            raise DatasetError(f"{where}: bad {prefix}_sha256 {sha!r} for {path!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise DatasetError(f"{where}: bad {prefix}_bytes {size!r} for {path!r}")


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A parsed, verified dataset manifest."""

    product: str
    version: str
    records: tuple[Mapping[str, Any], ...]
    layout: Mapping[str, Any]
    created_at: str = ""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    empty_masks: Mapping[str, Any] = dataclasses.field(default_factory=lambda: empty_masks_entry("error"))

    @classmethod
    def build(
        cls,
        *,
        product: str,
        records: Sequence[Mapping[str, Any]],
        layout: Mapping[str, Any],
        empty_masks: Mapping[str, Any] | None = None,
    ) -> Manifest:
        ordered = tuple(sorted((dict(r) for r in records), key=lambda r: r["image"]))
        created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
        entry = _check_empty_masks(empty_masks or empty_masks_entry("error"), "empty_masks")
        return cls(
            product=_check_product(product),
            version=compute_version(ordered, entry),
            records=ordered,
            layout=dict(layout),
            created_at=created,
            empty_masks=entry,
        )

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, dict[str, int]] = {}
        for r in self.records:
            split = counts.setdefault(r["split"], {"normal": 0, "defective": 0, "segmented": 0})
            split["defective" if r["label"] else "normal"] += 1
            split["segmented"] += int(bool(r["segmented"]))
        objects = self.objects()
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "product": self.product,
            "version": self.version,
            "created_at": self.created_at,
            "layout": dict(self.layout),
            "empty_masks": dict(self.empty_masks),
            "object_layout": f"{OBJECTS_DIR}/<relative path> under the version prefix",
            "counts": {
                "samples": len(self.records),
                "objects": len(objects),
                "bytes": sum(size for _, size in objects.values()),
                "splits": counts,
            },
            **dict(self.extra),
            "records": [dict(r) for r in self.records],
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False, ensure_ascii=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes | str, *, where: str = "manifest") -> Manifest:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{where} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise DatasetError(f"{where} is not an {SCHEMA} document")
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise DatasetError(
                f"{where} has schema_version {doc.get('schema_version')!r}; this reader supports {SCHEMA_VERSION}"
            )
        records = doc.get("records")
        if not isinstance(records, list) or not records:
            raise DatasetError(f"{where} holds no records")
        for rec in records:
            if not isinstance(rec, dict):
                raise DatasetError(f"{where}: a record is not an object")
            _check_record(rec, where)
        empty_masks = _check_empty_masks(doc.get("empty_masks", empty_masks_entry("error")), where)
        version = compute_version(records, empty_masks)
        if version != doc.get("version"):
            raise DatasetError(
                f"{where}: records hash to version {version} but the manifest says {doc.get('version')!r} "
                "(corrupt or edited manifest)"
            )
        known = {
            "schema",
            "schema_version",
            "product",
            "version",
            "created_at",
            "layout",
            "empty_masks",
            "object_layout",
            "counts",
            "records",
        }
        return cls(
            product=_check_product(str(doc.get("product"))),
            version=version,
            records=tuple(sorted(records, key=lambda r: r["image"])),
            layout=doc.get("layout") or {},
            created_at=str(doc.get("created_at", "")),
            extra={k: v for k, v in doc.items() if k not in known},
            empty_masks=empty_masks,
        )

    def objects(self) -> dict[str, tuple[str, int]]:
        """key (relative to the version prefix) -> (sha256, bytes), one entry per distinct object key."""
        out: dict[str, tuple[str, int]] = {}
        for r in self.records:
            for prefix in ("image", "mask"):
                key = r[f"{prefix}_key"]
                if key is None:
                    continue
                entry = (r[f"{prefix}_sha256"], r[f"{prefix}_bytes"])
                if out.setdefault(key, entry) != entry:
                    raise DatasetError(f"manifest lists {key} twice with different content")
        return out

    def samples(self) -> list[Any]:
        """The records as ``supersimplenet.samples.Sample`` objects (paths relative to the dataset root)."""
        return [
            Sample(
                image=r["image"],
                mask=r["mask"],
                label=int(r["label"]),
                split=r["split"],
                segmented=bool(r["segmented"]),
                defect_type=r.get("defect_type") or "",
            )
            for r in self.records
        ]


__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "DatasetError",
    "Manifest",
    "compute_version",
    "canonical_json",
    "dataset_prefix",
    "empty_masks_entry",
]
