"""Reading a dataset version back from S3 through the node-local cache: `DatasetReader`.

The reader keeps a content-addressed cache per node: ``<cache>/objects/<sha256[:2]>/<sha256>`` (read-only files),
one download per object per node (``fcntl`` lock per object, temp file + atomic rename), sha256 verified after each
download and again on every use (a corrupt entry is downloaded again). ``materialize()`` builds
``<cache>/views/<bucket>/<version prefix>/`` of hard links (copies where links fail) at the samples' relative paths
and returns ``(root, samples)`` for ``supersimplenet.loading.DefectDataset(root=root, samples=samples, ...)``.

The manifest and the bucket layout are described in `ssn_platform.manifest`, publishing in `ssn_platform.ingest`,
the cache's location, bound, locks and pruning in `ssn_platform.cache`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ssn_platform import storage
from ssn_platform.cache import (
    PruneStats,
    _cache_lock,
    _file_lock,
    _hold_view,
    _view_lock_path,
    cache_limit_bytes,
    default_cache_dir,
    prune_cache,
)
from ssn_platform.manifest import (
    _SHA_RE,
    _VERSION_RE,
    DATASETS_ROOT,
    LATEST_NAME,
    MANIFEST_NAME,
    OBJECTS_DIR,
    DatasetError,
    Manifest,
)
from ssn_platform.s3keys import format_s3_uri, join_key, parse_s3_uri
from ssn_platform.storage import ObjectNotFoundError, S3Settings, make_client


def _progress(total: int, desc: str, enabled: bool | None, unit: str = "B") -> Any:
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024,
        disable=(None if enabled is None else not enabled),
        leave=False,
    )


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
                    rel_path = rel_key[len(OBJECTS_DIR) + 1 :]
                    dest = view.joinpath(*rel_path.split("/"))
                    if not dest.resolve().is_relative_to(view.resolve()):  # belt and braces: keys are validated
                        raise DatasetError(f"{rel_path!r} escapes the dataset view")
                    self._place(paths[sha], dest, sha, size)
        return view, self.manifest.samples()


def select_split(
    samples: list[Any], split: str, where: str, hint: str, error: type[Exception] = DatasetError
) -> list[Any]:
    """The samples (objects with ``.split``, or manifest records) of `split`. None: `error` naming `where`, the
    splits present and `hint` (what to do about it). Never falls back to another split."""

    def split_of(sample: Any) -> str:
        return sample.get("split") if isinstance(sample, Mapping) else sample.split

    chosen = [s for s in samples if split_of(s) == split]
    if not chosen:
        present = sorted({split_of(s) for s in samples})
        raise error(f"{where} has no {split!r} split (splits present: {present}); {hint}")
    return chosen


def materialize_split(
    uri: str, split: str, hint: str, error: type[Exception] = DatasetError
) -> tuple[DatasetReader, Path, list[Any]]:
    """``(reader, root, samples of split)`` of dataset `uri`: `select_split` on the manifest first, so a dataset
    without the split is refused before anything is downloaded, then `DatasetReader.materialize`."""
    reader = DatasetReader(uri)
    where = f"{uri} (dataset version {reader.version})"
    select_split(reader.manifest.records, split, where, hint, error)
    root, samples = reader.materialize()
    return reader, root, select_split(samples, split, where, hint, error)


__all__ = [
    "DatasetReader",
    "ReaderStats",
    "materialize_split",
    "select_split",
]
