"""Ingest: validate a local dataset folder, upload it to S3 in parallel and publish its manifest last.

Before anything is uploaded every image and mask is read once and decoded fully (`supersimplenet.validation`): a
truncated or otherwise unreadable file fails the ingest, and every bad file is named in one error. The sha256 of
the bytes that were decoded is what the manifest records and what the upload checks again, so the objects are
exactly the bytes that decoded. Defective images whose mask is empty follow `empty_masks` ("error", "label-only",
"drop"), recorded in the manifest (`ssn_platform.manifest`).

Every object carries its sha256 in its user metadata (``x-amz-meta-sha256``); ingest skips objects whose metadata
already matches, so re-running an ingest uploads nothing. The bucket layout and the manifest are described in
`ssn_platform.manifest`: the manifest is written only after every object is in place, then the ``latest`` pointer,
so a version is visible only once it is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import mimetypes
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from supersimplenet.samples import EMPTY_MASK_POLICIES, DataError, Sample
from ssn_platform import storage
from ssn_platform.datasets import _progress
from ssn_platform.manifest import (
    DATASETS_ROOT,
    LATEST_NAME,
    MANIFEST_NAME,
    OBJECTS_DIR,
    DatasetError,
    Manifest,
    _check_product,
    dataset_prefix,
    empty_masks_entry,
)
from ssn_platform.s3keys import format_s3_uri, join_key, validate_key
from ssn_platform.storage import S3Settings, make_client

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class IngestResult:
    uri: str  # s3://bucket/datasets/<product>/<version>/manifest.json
    version: str
    dataset_uri: str  # s3://bucket/datasets/<product>/<version>/
    samples: int
    objects: int
    uploaded: int
    skipped: int
    bytes_total: int
    bytes_uploaded: int
    manifest_written: bool
    empty_masks: str = "error"  # the empty-mask policy applied
    empty_mask_images: tuple[str, ...] = ()  # defective images whose mask was empty (kept label-only, or dropped)

    def __iter__(self) -> Iterator[str]:  # `uri, version = ingest(...)`
        return iter((self.uri, self.version))


def _local_problems(root: Path, samples: Sequence[Any]) -> list[str]:
    """Checks beyond the model package's: every path must be a safe object key naming a regular file."""
    problems = []
    for s in samples:
        for path in (s.image, s.mask):
            if path is None:
                continue
            try:
                validate_key(path, what="path")
            except ValueError as exc:
                problems.append(f"{root / path}: {exc}")
                continue
            full = root / path
            if full.exists() and not full.is_file():
                problems.append(f"not a regular file: {full}")
    return problems


def ingest(
    local_root: str | os.PathLike[str],
    *,
    product: str,
    layout: str | None = None,
    bucket: str = "ssn",
    category: str | None = None,
    options: Mapping[str, Any] | None = None,
    settings: S3Settings | None = None,
    client: Any = None,
    workers: int = 8,
    progress: bool | None = None,
    update_latest: bool = True,
    empty_masks: str = "error",
) -> IngestResult:
    """Validate a local dataset folder, upload it in parallel and write its manifest last.

    Reads the folder with ``supersimplenet.layouts.read_layout(local_root, layout, category=..., **options)`` and
    decodes and checks every file with ``supersimplenet.validation.check_samples``; when anything is wrong, nothing
    is uploaded and ``DataError`` lists every offending path. `empty_masks` says what to do with defective images
    whose mask is empty: "error" (refuse), "label-only" (keep them as defective images without a mask) or "drop"
    (leave them out); the choice is recorded in the manifest and is part of the version. Objects already stored
    with the same sha256 are skipped; the manifest is written only after every object is in place, then the
    ``latest`` pointer.

    Returns an :class:`IngestResult` (``uri, version = ingest(...)`` also works).
    """
    _check_product(product)
    if empty_masks not in EMPTY_MASK_POLICIES:
        raise ValueError(f"empty_masks must be one of {', '.join(EMPTY_MASK_POLICIES)}, got {empty_masks!r}")
    root = Path(local_root).resolve()
    options = dict(options or {})
    layout_name, checked = _read_local(root, layout, category, options, empty_masks)
    layout_meta = {
        "name": layout_name,
        "category": category,
        "source": str(root),
        "options": {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in options.items()},
    }
    return publish_checked(
        root,
        checked,
        product=product,
        layout_meta=layout_meta,
        bucket=bucket,
        settings=settings,
        client=client,
        workers=workers,
        progress=progress,
        update_latest=update_latest,
        empty_masks=empty_masks,
    )


def publish_checked(
    root: Path,
    checked: Any,
    *,
    product: str,
    layout_meta: Mapping[str, Any],
    bucket: str = "ssn",
    settings: S3Settings | None = None,
    client: Any = None,
    workers: int = 8,
    progress: bool | None = None,
    update_latest: bool = True,
    empty_masks: str = "error",
) -> IngestResult:
    """The upload half of `ingest`: checked samples (`supersimplenet.validation.check_samples` of files under
    `root`) become a dataset version: objects uploaded, manifest written last, then ``latest``. The review loop
    (`ssn_platform.review`) publishes an existing version plus operator-labelled images through it."""
    records = _records(checked.samples, checked.files)
    manifest = Manifest.build(
        product=product,
        records=records,
        layout=dict(layout_meta),
        empty_masks=empty_masks_entry(empty_masks, checked.empty_masks),
    )
    prefix = dataset_prefix(product, manifest.version)
    manifest_key = join_key(prefix, MANIFEST_NAME)
    objects = manifest.objects()

    client = client or make_client(settings or S3Settings.from_env())
    _check_bucket(client, bucket)
    total_bytes = sum(size for _, size in objects.values())
    stats = _upload_objects(
        client,
        bucket,
        prefix,
        root,
        objects,
        total_bytes=total_bytes,
        workers=workers,
        desc=f"ingest {product}@{manifest.version}",
        progress=progress,
    )

    # the manifest last: the version becomes visible only now, and only complete
    manifest_written = _write_manifest(client, bucket, manifest_key, manifest)
    if update_latest:
        _update_latest(client, bucket, product, manifest.version)

    return IngestResult(
        uri=format_s3_uri(bucket, manifest_key),
        version=manifest.version,
        dataset_uri=format_s3_uri(bucket, prefix) + "/",
        samples=len(manifest.records),
        objects=len(objects),
        uploaded=stats["uploaded"],
        skipped=stats["skipped"],
        bytes_total=total_bytes,
        bytes_uploaded=stats["bytes_uploaded"],
        manifest_written=manifest_written,
        empty_masks=empty_masks,
        empty_mask_images=checked.empty_masks,
    )


def _read_local(
    root: Path, layout: str | None, category: str | None, options: Mapping[str, Any], empty_masks: str
) -> tuple[str, Any]:
    """The layout name and the checked samples (`supersimplenet.validation.CheckedSamples`) of a local dataset
    folder, every file decoded; a `DataError` listing every problem if invalid."""
    # imported here: the layout readers pull in torch, which `--help` and the manifest helpers do not need
    from supersimplenet.layouts import detect_layout, read_layout  # noqa: PLC0415 (torch: see the comment above)
    from supersimplenet.validation import check_samples  # noqa: PLC0415 (torch: see the comment above)

    layout_name = layout or detect_layout(root)
    samples = read_layout(root, layout_name, category=category, **options)
    problems = _local_problems(root, samples)
    checked = None
    try:
        checked = check_samples(root, samples, empty_masks=empty_masks)
    except DataError as exc:
        problems.append(str(exc))
    if problems or checked is None:
        raise DataError(f"dataset at {root} is invalid; nothing was uploaded:\n" + "\n".join(problems))
    if checked.empty_masks:
        verb = "dropped" if empty_masks == "drop" else "kept without their masks (label-only)"
        log.warning(
            "ingest %s: %d defective image(s) with an empty mask %s: %s",
            root,
            len(checked.empty_masks),
            verb,
            ", ".join(checked.empty_masks),
        )
    return layout_name, checked


def _records(samples: Sequence[Sample], hashed: Mapping[str, tuple[str, int]]) -> list[dict[str, Any]]:
    """One manifest record per sample, with the sha256 and size of its files as they were decoded."""
    records = []
    for s in samples:
        rec: dict[str, Any] = {
            "image": s.image,
            "image_key": join_key(OBJECTS_DIR, s.image),
            "image_sha256": hashed[s.image][0],
            "image_bytes": hashed[s.image][1],
            "mask": s.mask,
            "mask_key": join_key(OBJECTS_DIR, s.mask) if s.mask is not None else None,
            "mask_sha256": hashed[s.mask][0] if s.mask is not None else None,
            "mask_bytes": hashed[s.mask][1] if s.mask is not None else None,
            "label": int(s.label),
            "split": s.split,
            "segmented": bool(s.segmented),
            "defect_type": s.defect_type or "",
        }
        records.append(rec)
    return records


def _upload_objects(
    client: Any,
    bucket: str,
    prefix: str,
    root: Path,
    objects: Mapping[str, tuple[str, int]],
    *,
    total_bytes: int,
    workers: int,
    desc: str,
    progress: bool | None,
) -> dict[str, int]:
    """Uploads the objects in parallel, skipping those already stored with the same sha256; returns the counts.
    A file that changed since it was hashed fails the ingest before anything is published."""
    lock = threading.Lock()
    stats = {"uploaded": 0, "skipped": 0, "bytes_uploaded": 0}

    def _one(item: tuple[str, tuple[str, int]]) -> None:
        rel_key, (sha, size) = item
        key = join_key(prefix, rel_key)
        head = storage.head_object(client, bucket, key)
        if (
            head is not None
            and head.get("Metadata", {}).get(storage.SHA256_METADATA_KEY) == sha
            and head.get("ContentLength") == size
        ):
            with lock:
                stats["skipped"] += 1
            bar.update(size)
            return
        local = root / rel_key[len(OBJECTS_DIR) + 1 :]
        body = local.read_bytes()
        if len(body) != size or hashlib.sha256(body).hexdigest() != sha:
            raise DataError(f"file changed while it was being ingested: {local}; nothing was published")
        ctype = mimetypes.guess_type(local.name)[0] or "application/octet-stream"
        storage.call_with_retries(
            lambda: client.put_object(
                Bucket=bucket, Key=key, Body=body, ContentType=ctype, Metadata={storage.SHA256_METADATA_KEY: sha}
            ),
            client=client,
            bucket=bucket,
            key=key,
            action="upload",
        )
        with lock:
            stats["uploaded"] += 1
            stats["bytes_uploaded"] += size
        bar.update(size)

    with _progress(total_bytes, desc, progress) as bar:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for fut in [pool.submit(_one, item) for item in sorted(objects.items())]:
                fut.result()  # first failure propagates; the manifest is not written
    return stats


def _write_manifest(client: Any, bucket: str, manifest_key: str, manifest: Manifest) -> bool:
    """Writes the manifest unless the same one is already there; returns whether it was written."""
    manifest_written = True
    existing = storage.head_object(client, bucket, manifest_key)
    if existing is not None:
        try:
            old = Manifest.from_json(storage.get_bytes(client, bucket, manifest_key))
            manifest_written = not (old.version == manifest.version and old.records == manifest.records)
        except DatasetError:
            manifest_written = True  # unreadable manifest: replace it
    if manifest_written:
        storage.put_bytes(client, bucket, manifest_key, manifest.to_json(), content_type="application/json")
    return manifest_written


def _update_latest(client: Any, bucket: str, product: str, version: str) -> None:
    """Points the product's ``latest`` at `version` (no write when it already does)."""
    latest_key = join_key(DATASETS_ROOT, product, LATEST_NAME)
    current = storage.head_object(client, bucket, latest_key)
    if (
        current is None
        or current.get("Metadata", {}).get(storage.SHA256_METADATA_KEY)
        != hashlib.sha256((version + "\n").encode()).hexdigest()
    ):
        storage.put_bytes(client, bucket, latest_key, (version + "\n").encode(), content_type="text/plain")


def _check_bucket(client: Any, bucket: str) -> None:
    """Fail early with a clear message (bad credentials, missing bucket) before any work is done.

    A GET (not HEAD) so that the server's error code (InvalidAccessKeyId, SignatureDoesNotMatch, NoSuchBucket)
    comes back in the body and the message can say exactly what was wrong.
    """
    storage.call_with_retries(
        lambda: client.list_objects_v2(Bucket=bucket, MaxKeys=1, Prefix=DATASETS_ROOT + "/"),
        client=client,
        bucket=bucket,
        action="access the bucket",
    )


__all__ = [
    "IngestResult",
    "ingest",
]
