"""Versioned defect datasets in S3: ingest from a local folder, read back through a node-local cache.

Layout in the bucket (one prefix per dataset version)::

    s3://<bucket>/datasets/<product>/<version>/objects/<relative path>   the files, at the paths the model package
                                                                          reads them from (browsable, diffable)
    s3://<bucket>/datasets/<product>/<version>/manifest.json              written LAST: a version exists when this does
    s3://<bucket>/datasets/<product>/latest                               text file holding the newest version

Every object carries its sha256 in its user metadata (``x-amz-meta-sha256``); ingest skips objects whose metadata
already matches, so re-running an ingest uploads nothing.

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

The reader keeps a content-addressed cache per node: ``<cache>/objects/<sha256[:2]>/<sha256>`` (read-only files),
one download per object per node (``fcntl`` lock per object, temp file + atomic rename), sha256 verified after each
download and again on every use (a corrupt entry is downloaded again). ``materialize()`` builds
``<cache>/views/<bucket>/<version prefix>/`` of hard links (copies where links fail) at the samples' relative paths
and returns ``(root, samples)`` for ``supersimplenet.loading.DefectDataset(root=root, samples=samples, ...)``.

The cache lives in ``SSN_CACHE_DIR`` (default ``$TMPDIR/ssn-cache``) and is bounded by ``SSN_CACHE_MAX_GB`` (unset:
unbounded). Past the bound, :func:`prune_cache` deletes objects no view links, then the views least recently
materialized with the objects only they linked, never a view that a live process is using: ``materialize()`` holds
a shared ``flock`` on its view until the process ends, and pruning skips every view it cannot lock exclusively. It
waits for no one: while another process fetches or materializes it does nothing (that process prunes after).
The bound counts the objects: where the file system refuses hard links, views hold copies it does not count.
``flock`` locks belong to open file descriptions, which ``fork()`` shares: a forked child (a DataLoader worker)
keeps its parent's views held while it lives. On NFS, where ``flock`` is emulated, keep the cache on a local disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import logging
import mimetypes
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from supersimplenet.samples import DataError, Sample
from ssn_platform import storage
from ssn_platform.storage import (
    ObjectNotFoundError,
    S3Settings,
    StorageError,
    format_s3_uri,
    join_key,
    make_client,
    parse_s3_uri,
    validate_key,
)

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "DatasetError",
    "Manifest",
    "IngestResult",
    "ReaderStats",
    "DatasetReader",
    "ingest",
    "compute_version",
    "canonical_json",
    "dataset_prefix",
    "default_cache_dir",
    "cache_limit_bytes",
    "prune_cache",
    "PruneStats",
]

log = logging.getLogger(__name__)

SCHEMA = "ssn-dataset-manifest"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
LATEST_NAME = "latest"
OBJECTS_DIR = "objects"
DATASETS_ROOT = "datasets"
_VERSION_RE = re.compile(r"^[0-9a-f]{16}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_PRODUCT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
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


# ------------------------------------------------------------------------------------------------ manifest
def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def compute_version(records: Sequence[Mapping[str, Any]]) -> str:
    """First 16 hex digits of sha256(canonical JSON of the records sorted by image path)."""
    ordered = sorted(records, key=lambda r: r["image"])
    return hashlib.sha256(canonical_json(ordered)).hexdigest()[:16]


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

    @classmethod
    def build(cls, *, product: str, records: Sequence[Mapping[str, Any]], layout: Mapping[str, Any]) -> Manifest:
        ordered = tuple(sorted((dict(r) for r in records), key=lambda r: r["image"]))
        created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
        return cls(product=_check_product(product), version=compute_version(ordered), records=ordered,
                   layout=dict(layout), created_at=created)

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
        version = compute_version(records)
        if version != doc.get("version"):
            raise DatasetError(
                f"{where}: records hash to version {version} but the manifest says {doc.get('version')!r} "
                "(corrupt or edited manifest)"
            )
        known = {"schema", "schema_version", "product", "version", "created_at", "layout", "object_layout",
                 "counts", "records"}
        return cls(
            product=_check_product(str(doc.get("product"))),
            version=version,
            records=tuple(sorted(records, key=lambda r: r["image"])),
            layout=doc.get("layout") or {},
            created_at=str(doc.get("created_at", "")),
            extra={k: v for k, v in doc.items() if k not in known},
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


# ------------------------------------------------------------------------------------------------ ingest
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

    def __iter__(self) -> Iterator[str]:  # `uri, version = ingest(...)`
        return iter((self.uri, self.version))


def _progress(total: int, desc: str, enabled: bool | None, unit: str = "B") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024,
                disable=(None if enabled is None else not enabled), leave=False)


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
) -> IngestResult:
    """Validate a local dataset folder, upload it in parallel and write its manifest last.

    Reads the folder with ``supersimplenet.layouts.read_layout(local_root, layout, category=..., **options)`` and
    checks it with ``validate_samples``; when anything is wrong, nothing is uploaded and ``DataError`` lists every
    offending path. Objects already stored with the same sha256 are skipped; the manifest is written only after
    every object is in place, then the ``latest`` pointer.

    Returns an :class:`IngestResult` (``uri, version = ingest(...)`` also works).
    """
    # imported here: the layout readers pull in torch, which `--help` and the manifest helpers do not need
    from supersimplenet.layouts import detect_layout, read_layout
    from supersimplenet.loading import validate_samples

    _check_product(product)
    root = Path(local_root).resolve()
    options = dict(options or {})
    layout_name = layout or detect_layout(root)
    samples = read_layout(root, layout_name, category=category, **options)
    problems = _local_problems(root, samples)
    try:
        validate_samples(root, samples)
    except DataError as exc:
        problems.append(str(exc))
    if problems:
        raise DataError(
            f"dataset at {root} is invalid; nothing was uploaded:\n" + "\n".join(problems)
        )

    # hash every file (content of record = what gets uploaded)
    paths = sorted({p for s in samples for p in (s.image, s.mask) if p is not None})
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        hashed = dict(zip(paths, pool.map(lambda p: storage.sha256_file(root / p), paths)))
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
    layout_meta = {
        "name": layout_name,
        "category": category,
        "source": str(root),
        "options": {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in options.items()},
    }
    manifest = Manifest.build(product=product, records=records, layout=layout_meta)
    prefix = dataset_prefix(product, manifest.version)
    manifest_key = join_key(prefix, MANIFEST_NAME)
    objects = manifest.objects()

    client = client or make_client(settings or S3Settings.from_env())
    _check_bucket(client, bucket)

    lock = threading.Lock()
    stats = {"uploaded": 0, "skipped": 0, "bytes_uploaded": 0}
    total_bytes = sum(size for _, size in objects.values())

    def _one(item: tuple[str, tuple[str, int]]) -> None:
        rel_key, (sha, size) = item
        key = join_key(prefix, rel_key)
        head = storage.head_object(client, bucket, key)
        if head is not None and head.get("Metadata", {}).get(storage.SHA256_METADATA_KEY) == sha \
                and head.get("ContentLength") == size:
            with lock:
                stats["skipped"] += 1
            bar.update(size)
            return
        local = root / rel_key[len(OBJECTS_DIR) + 1:]
        body = local.read_bytes()
        if len(body) != size or hashlib.sha256(body).hexdigest() != sha:
            raise DataError(f"file changed while it was being ingested: {local}; nothing was published")
        ctype = mimetypes.guess_type(local.name)[0] or "application/octet-stream"
        storage.call_with_retries(
            lambda: client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=ctype,
                                      Metadata={storage.SHA256_METADATA_KEY: sha}),
            client=client, bucket=bucket, key=key, action="upload",
        )
        with lock:
            stats["uploaded"] += 1
            stats["bytes_uploaded"] += size
        bar.update(size)

    with _progress(total_bytes, f"ingest {product}@{manifest.version}", progress) as bar:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for fut in [pool.submit(_one, item) for item in sorted(objects.items())]:
                fut.result()  # first failure propagates; the manifest is not written

    # the manifest last: the version becomes visible only now, and only complete
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
    if update_latest:
        latest_key = join_key(DATASETS_ROOT, product, LATEST_NAME)
        current = storage.head_object(client, bucket, latest_key)
        if current is None or current.get("Metadata", {}).get(storage.SHA256_METADATA_KEY) != hashlib.sha256(
            (manifest.version + "\n").encode()
        ).hexdigest():
            storage.put_bytes(client, bucket, latest_key, (manifest.version + "\n").encode(), content_type="text/plain")

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
    )


def _check_bucket(client: Any, bucket: str) -> None:
    """Fail early with a clear message (bad credentials, missing bucket) before any work is done.

    A GET (not HEAD) so that the server's error code (InvalidAccessKeyId, SignatureDoesNotMatch, NoSuchBucket)
    comes back in the body and the message can say exactly what was wrong.
    """
    storage.call_with_retries(
        lambda: client.list_objects_v2(Bucket=bucket, MaxKeys=1, Prefix=DATASETS_ROOT + "/"),
        client=client, bucket=bucket, action="access the bucket",
    )


# ------------------------------------------------------------------------------------------------ reader
def default_cache_dir() -> Path:
    """The node-local cache: ``SSN_CACHE_DIR``, default ``$TMPDIR/ssn-cache`` (datasets and fetched weights)."""
    return Path(os.environ.get("SSN_CACHE_DIR") or Path(tempfile.gettempdir()) / "ssn-cache")


def cache_limit_bytes(env: Mapping[str, str] | None = None) -> int | None:
    """``SSN_CACHE_MAX_GB`` in bytes (GiB), or None when unset: the bound :func:`prune_cache` keeps the cache to."""
    raw = (os.environ if env is None else env).get("SSN_CACHE_MAX_GB", "").strip()
    if not raw:
        return None
    try:
        gib = float(raw)
    except ValueError:
        raise ValueError(f"SSN_CACHE_MAX_GB must be a number of GiB, got {raw!r}") from None
    if not gib > 0 or gib != gib or gib == float("inf"):
        raise ValueError(f"SSN_CACHE_MAX_GB must be a positive number of GiB, got {raw!r}")
    return int(gib * (1 << 30))


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float | None = None, *, shared: bool = False) -> Iterator[None]:
    """Exclusive (or shared) ``flock`` on ``path`` (its folder must exist); works across processes and across
    threads (each holder opens its own descriptor)."""
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if timeout is None:
            fcntl.flock(fd, mode)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _try_lock(path: Path, mode: int) -> int | None:
    """A descriptor holding ``flock(mode)`` on ``path``, or None when another holder conflicts (never waits)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def _cache_lock(cache_dir: Path) -> Path:
    """Shared by every fetch/materialize, exclusive for pruning: pruning never deletes what one is placing."""
    return cache_dir / "locks" / "cache.lock"


def _view_lock_path(cache_dir: Path, view: Path, suffix: str) -> Path:
    """``<cache>/locks/views/<hash><suffix>``, named after the view's path inside the cache (every spelling of
    the cache folder, through a symlink or not, names the same lock)."""
    name = hashlib.sha256(view.relative_to(cache_dir).as_posix().encode()).hexdigest()
    return cache_dir / "locks" / "views" / f"{name}{suffix}"


def _view_use_marker(cache_dir: Path, view: Path) -> Path:
    """``<cache>/locks/views/<hash>.use``: names the view; its mtime is the view's last use; a live process using
    the view holds a shared ``flock`` on it."""
    return _view_lock_path(cache_dir, view, ".use")


_HELD_VIEWS: dict[str, int] = {}  # view use marker -> descriptor holding its shared lock until this process ends
_HELD_VIEWS_LOCK = threading.Lock()


def _hold_view(cache_dir: Path, view: Path) -> None:
    """Mark ``view`` used now and in use by this process (the lock goes with the process: no stale claims)."""
    marker = _view_use_marker(cache_dir, view)
    with _HELD_VIEWS_LOCK:
        if str(marker) not in _HELD_VIEWS:
            marker.write_text(str(view.relative_to(cache_dir)))
            fd = os.open(marker, os.O_RDWR)
            fcntl.flock(fd, fcntl.LOCK_SH)  # only pruning takes it exclusively, and pruning is excluded meanwhile
            _HELD_VIEWS[str(marker)] = fd
        os.utime(marker)


@dataclasses.dataclass
class PruneStats:
    bytes_before: int = 0  # the cache's objects, in bytes
    bytes_after: int = 0
    objects_deleted: int = 0
    views_deleted: int = 0
    views_in_use: int = 0  # views past their turn that a live process holds: kept
    busy: bool = False  # another process was fetching or materializing: nothing was done


def _object_entries(objects: Path) -> list[tuple[Path, os.stat_result]]:
    out = []
    for path in objects.glob("*/*"):
        if path.name.startswith("."):  # a download in progress (.part)
            continue
        with contextlib.suppress(FileNotFoundError):
            out.append((path, path.stat()))
    return out


def prune_cache(cache_dir: str | os.PathLike[str], max_bytes: int) -> PruneStats:
    """Bring the cache's objects to ``max_bytes`` or less, if it can without touching what a live process uses.

    First objects that no view links (hard-link count 1), oldest first, until under the bound; then, least recently
    materialized first, views that no live process holds, each with every object only it linked. Never waits: when
    another process holds the cache lock (fetching or materializing), returns at once with ``busy`` set.
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    cache = Path(cache_dir).resolve()
    stats = PruneStats()
    objects = cache / "objects"
    if not objects.is_dir():
        return stats
    lock = _cache_lock(cache)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = _try_lock(lock, fcntl.LOCK_EX)
    if fd is None:
        stats.busy = True
        return stats
    try:
        total = sum(st.st_size for _, st in _object_entries(objects))
        stats.bytes_before = total

        def drop_unlinked(*, every: bool) -> None:
            """Objects no view links, oldest first: until under the bound, or ``every`` one of them."""
            nonlocal total
            unlinked = [(path, st) for path, st in _object_entries(objects) if st.st_nlink == 1]
            for path, st in sorted(unlinked, key=lambda item: item[1].st_mtime):
                if total <= max_bytes and not every:
                    return
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    total -= st.st_size
                    stats.objects_deleted += 1

        drop_unlinked(every=False)
        views_root = cache / "views"
        _mark_unmarked_views(cache)
        markers = sorted((cache / "locks" / "views").glob("*.use"), key=lambda m: m.stat().st_mtime)
        for marker in markers:
            if total <= max_bytes:
                break
            held = _try_lock(marker, fcntl.LOCK_EX)
            if held is None:
                stats.views_in_use += 1
                continue
            try:
                view = (cache / marker.read_text().strip()).resolve()
                if not view.is_relative_to(views_root) or view == views_root:
                    log.warning("dataset cache %s: %s names %s, not a view: ignored", cache, marker, view)
                    marker.unlink(missing_ok=True)
                    continue
                if view.exists():
                    _make_writable(view)
                    shutil.rmtree(view, onerror=lambda _fn, path, exc: log.warning(
                        "dataset cache: could not delete %s: %s", path, exc[1]))
                if view.exists():
                    continue  # partly deleted: the marker stays, so a later prune tries again
                for parent in view.parents:  # the empty product/bucket folders above it
                    if parent == views_root or not parent.is_relative_to(views_root):
                        break
                    try:
                        parent.rmdir()
                    except OSError:
                        break
                stats.views_deleted += 1
                marker.unlink(missing_ok=True)
            finally:
                os.close(held)
            drop_unlinked(every=True)  # an evicted view goes with the objects only it linked
        stats.bytes_after = total
    finally:
        os.close(fd)
    if stats.objects_deleted or stats.views_deleted:
        log.info("dataset cache %s: deleted %d views and %d objects, %d -> %d bytes (bound %d)", cache,
                 stats.views_deleted, stats.objects_deleted, stats.bytes_before, stats.bytes_after, max_bytes)
    if stats.bytes_after > max_bytes:
        log.warning("dataset cache %s holds %d bytes, above its bound of %d: %d views past their turn are in use",
                    cache, stats.bytes_after, max_bytes, stats.views_in_use)
    return stats


def _mark_unmarked_views(cache: Path) -> None:
    """Give a use marker, dated by the folder, to every view that has none (built before markers existed), so that
    pruning can reach it. Runs under the exclusive cache lock: no view is being built meanwhile."""
    for view in (cache / "views").glob(f"*/{DATASETS_ROOT}/*/*"):
        if not view.is_dir() or view.is_symlink():
            continue
        marker = _view_use_marker(cache, view)
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(view.relative_to(cache).as_posix())
            mtime = view.stat().st_mtime
            os.utime(marker, (mtime, mtime))


def _make_writable(tree: Path) -> None:
    """Folders of a view must be writable for their entries to be removed (the entries are links to 0444 files,
    which a directory's permissions alone govern)."""
    for folder, _, _ in os.walk(tree):
        with contextlib.suppress(OSError):
            os.chmod(folder, 0o755)


@dataclasses.dataclass
class ReaderStats:
    downloaded: int = 0  # objects fetched from S3 by this reader
    bytes_downloaded: int = 0
    cache_hits: int = 0  # objects found valid in the cache
    repaired: int = 0  # corrupt cache entries detected and replaced
    linked: int = 0  # view entries (re)created
    copied: int = 0  # view entries copied because hard links failed


class DatasetReader:
    """Read a dataset version from S3 through a node-local content-addressed cache.

    ``uri`` may name the manifest (``.../<version>/manifest.json``), the version prefix
    (``s3://ssn/datasets/<product>/<version>``), the product (``s3://ssn/datasets/<product>``: its ``latest``) or
    a ``latest`` pointer. ``on_download(key, size)`` is called after each object download (progress hooks, tests).
    """

    def __init__(
        self,
        uri: str,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        settings: S3Settings | None = None,
        client: Any = None,
        workers: int = 8,
        progress: bool | None = False,
        on_download: Callable[[str, int], None] | None = None,
        verify_on_use: bool = True,
        max_cache_bytes: int | None = None,
    ) -> None:
        self.uri = uri
        self.bucket, self._key = parse_s3_uri(uri)
        # resolved once: views and their locks must not depend on how the cache folder is spelled
        self.cache_dir = (Path(cache_dir) if cache_dir is not None else default_cache_dir()).resolve()
        self.settings = settings
        self._client = client
        self.workers = max(1, workers)
        self.progress = progress
        self.on_download = on_download
        self.verify_on_use = verify_on_use
        # the bound materialize() prunes the cache to (None: SSN_CACHE_MAX_GB, itself unset = unbounded)
        self.max_cache_bytes = max_cache_bytes if max_cache_bytes is not None else cache_limit_bytes()
        self.stats = ReaderStats()
        self._stats_lock = threading.Lock()
        self._manifest: Manifest | None = None
        self._manifest_key: str | None = None
        self._link_ok = True
        self._dirs: set[Path] = set()  # folders known to exist (saves a mkdir system call per file)
        self.last_prune: PruneStats | None = None  # what the last materialize() pruned

    # -- S3 side ---------------------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client(self.settings or S3Settings.from_env())
        return self._client

    def _resolve_manifest_key(self) -> str:
        key = self._key
        if not key:
            raise ValueError(f"{self.uri} names a bucket, not a dataset")
        parts = key.split("/")
        if parts[-1] == MANIFEST_NAME:
            return key
        if parts[-1] == LATEST_NAME:
            return join_key(*parts[:-1], self._read_latest(key), MANIFEST_NAME)
        if len(parts) == 2 and parts[0] == DATASETS_ROOT:  # datasets/<product>
            return join_key(key, self._read_latest(join_key(key, LATEST_NAME)), MANIFEST_NAME)
        if _VERSION_RE.match(parts[-1]):
            return join_key(key, MANIFEST_NAME)
        return join_key(key, self._read_latest(join_key(key, LATEST_NAME)), MANIFEST_NAME)

    def _read_latest(self, key: str) -> str:
        try:
            version = storage.get_bytes(self.client, self.bucket, key).decode("ascii", "replace").strip()
        except ObjectNotFoundError:
            raise DatasetError(
                f"no dataset published at {format_s3_uri(self.bucket, key.rsplit('/', 1)[0])}/ "
                f"({format_s3_uri(self.bucket, key)} does not exist)"
            ) from None
        if not _VERSION_RE.match(version):
            raise DatasetError(f"{format_s3_uri(self.bucket, key)} holds {version[:40]!r}, not a dataset version")
        return version

    def _manifest_cache_path(self, key: str) -> Path:
        return self.cache_dir / "manifests" / self.bucket / Path(*key.split("/"))

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            key = self._resolve_manifest_key()
            uri = format_s3_uri(self.bucket, key)
            # A version's manifest never changes (its name is its content hash), so a verified local copy serves
            # later readers on this node without a request; `latest` pointers are always looked up.
            cacheable = len(key.split("/")) >= 2 and bool(_VERSION_RE.match(key.split("/")[-2]))
            cached = self._manifest_cache_path(key)
            raw = None
            if cacheable and cached.is_file():
                raw = cached.read_bytes()
                try:
                    Manifest.from_json(raw, where=str(cached))
                except DatasetError:
                    raw = None
            if raw is None:
                try:
                    raw = storage.get_bytes(self.client, self.bucket, key)
                except ObjectNotFoundError:
                    raise DatasetError(
                        f"no complete dataset at {uri.rsplit('/', 1)[0]}/: {uri} does not exist "
                        "(never ingested, or the ingest did not finish)"
                    ) from None
            manifest = Manifest.from_json(raw, where=uri)
            dir_version = key.split("/")[-2] if key.count("/") >= 1 else ""
            if _VERSION_RE.match(dir_version) and dir_version != manifest.version:
                raise DatasetError(f"{uri} describes version {manifest.version}, not {dir_version}")
            if cacheable and not cached.is_file():
                self._mkdir(cached.parent)
                tmp = cached.parent / f".{cached.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
                tmp.write_bytes(raw)
                os.replace(tmp, cached)
            self._manifest, self._manifest_key = manifest, key
        return self._manifest

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def prefix(self) -> str:
        _ = self.manifest  # reads the manifest, which sets _manifest_key
        assert self._manifest_key is not None
        return self._manifest_key.rsplit("/", 1)[0]

    @property
    def samples(self) -> list[Any]:
        return self.manifest.samples()

    # -- cache -----------------------------------------------------------------------------------------------
    def object_path(self, sha256: str) -> Path:
        if not _SHA_RE.match(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.cache_dir / "objects" / sha256[:2] / sha256

    def _lock_path(self, name: str) -> Path:
        return self.cache_dir / "locks" / name[:2] / f"{name}.lock"

    def _mkdir(self, path: Path) -> Path:
        if path not in self._dirs:
            path.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path)
        return path

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for k, v in deltas.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    @staticmethod
    def _valid(path: Path, sha256: str, size: int) -> bool:
        try:
            if path.stat().st_size != size:
                return False
            return storage.sha256_file(path)[0] == sha256
        except FileNotFoundError:
            return False

    def _ensure_object(self, rel_key: str, sha256: str, size: int) -> Path:
        """The verified cache entry of an object, downloading it (once per node) or repairing it if needed."""
        path = self.object_path(sha256)
        if path.exists() and (not self.verify_on_use or self._valid(path, sha256, size)):
            self._count(cache_hits=1)
            return path
        lock = self._lock_path(sha256)
        self._mkdir(lock.parent)
        with _file_lock(lock):
            if path.exists():
                if self._valid(path, sha256, size):
                    self._count(cache_hits=1)  # another worker fetched it while we waited
                    return path
                path.unlink()  # corrupt entry: repair by downloading again
                self._count(repaired=1)
            self._mkdir(path.parent)
            # One writer per object at a time (we hold its lock), so a fixed temp name is safe; a file left by a
            # crashed download is simply overwritten.
            tmp = path.parent / f".{sha256}.part"
            key = join_key(self.prefix, rel_key)
            try:
                storage.download_to(self.client, self.bucket, key, tmp, expected_sha256=sha256, expected_size=size)
                os.chmod(tmp, 0o444)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            self._count(downloaded=1, bytes_downloaded=size)
        if self.on_download is not None:
            self.on_download(key, size)
        return path

    @contextlib.contextmanager
    def _using_cache(self) -> Iterator[None]:
        """The cache lock, shared, around placing objects and views (pruning cannot run meanwhile); then a prune
        to the bound, once the lock is released."""
        lock = _cache_lock(self.cache_dir)
        self._mkdir(lock.parent)
        with _file_lock(lock, shared=True):
            yield
        if self.max_cache_bytes is not None:
            self.last_prune = prune_cache(self.cache_dir, self.max_cache_bytes)

    def fetch(self) -> ReaderStats:
        """Make sure every object of the dataset is in the cache and valid. Returns the reader's statistics."""
        with self._using_cache():
            self._fetch()
        return self.stats

    def _fetch(self) -> dict[str, Path]:
        """sha256 -> verified cache path for every object of the dataset (downloading/repairing as needed)."""
        by_sha: dict[str, tuple[str, int]] = {}
        for rel_key, (sha, size) in sorted(self.manifest.objects().items()):
            by_sha.setdefault(sha, (rel_key, size))
        total = sum(size for _, size in by_sha.values())
        paths: dict[str, Path] = {}
        with _progress(total, f"fetch {self.manifest.product}@{self.version}", self.progress) as bar:
            def _one(item: tuple[str, tuple[str, int]]) -> None:
                sha, (rel_key, size) = item
                paths[sha] = self._ensure_object(rel_key, sha, size)
                bar.update(size)

            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                for fut in [pool.submit(_one, item) for item in by_sha.items()]:
                    fut.result()
        return paths

    # -- view ------------------------------------------------------------------------------------------------
    def view_dir(self) -> Path:
        return self.cache_dir / "views" / self.bucket / Path(*self.prefix.split("/"))

    def _place(self, src: Path, dest: Path, sha256: str, size: int) -> None:
        """Make ``dest`` a hard link to ``src`` (or a verified copy), replacing it atomically when stale."""
        try:
            st = dest.stat()
            if os.path.samestat(st, src.stat()):
                return
            if not self._link_ok and self._valid(dest, sha256, size):
                return
        except FileNotFoundError:
            pass
        self._mkdir(dest.parent)
        tmp = dest.parent / f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            if self._link_ok:
                try:
                    os.link(src, tmp)
                    self._count(linked=1)
                except OSError:
                    self._link_ok = False  # other file system, or links not allowed: copy from now on
            if not self._link_ok:
                shutil.copyfile(src, tmp)
                self._count(copied=1)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def materialize(self) -> tuple[Path, list[Any]]:
        """Fetch everything, verify it, and return ``(root_dir, samples)`` for ``DefectDataset``.

        ``root_dir`` is a per-version directory of hard links into the cache at the samples' relative paths.
        """
        view = self.view_dir()
        view_lock = _view_lock_path(self.cache_dir, view, ".lock")
        self._mkdir(view_lock.parent)
        with self._using_cache():
            paths = self._fetch()  # every entry verified (sha256) just now
            _hold_view(self.cache_dir, view)  # before building: a half-built view is prunable after a crash
            with _file_lock(view_lock):
                for rel_key, (sha, size) in sorted(self.manifest.objects().items()):
                    rel_path = rel_key[len(OBJECTS_DIR) + 1:]
                    dest = view.joinpath(*rel_path.split("/"))
                    if not dest.resolve().is_relative_to(view.resolve()):  # belt and braces: keys are validated
                        raise DatasetError(f"{rel_path!r} escapes the dataset view")
                    self._place(paths[sha], dest, sha, size)
        return view, self.manifest.samples()
