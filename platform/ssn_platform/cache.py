"""The node-local dataset cache: where it lives, its bound, its locks and its pruning.

`ssn_platform.datasets.DatasetReader` keeps a content-addressed cache per node:
``<cache>/objects/<sha256[:2]>/<sha256>`` (read-only files) and views of hard links into it,
``<cache>/views/<bucket>/<version prefix>/``.

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
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ssn_platform.manifest import DATASETS_ROOT

if TYPE_CHECKING:
    from supersimplenet.feature_store import FeatureStore

log = logging.getLogger(__name__)


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The node-local cache: ``SSN_CACHE_DIR``, default ``$TMPDIR/ssn-cache`` (datasets, fetched weights and the
    feature store)."""
    return Path((os.environ if env is None else env).get("SSN_CACHE_DIR") or Path(tempfile.gettempdir()) / "ssn-cache")


def _gib_bytes(raw: str, name: str, *, zero_allowed: bool) -> int:
    """A size in GiB from environment variable `name`, in bytes; ValueError naming the variable otherwise."""
    try:
        gib = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of GiB, got {raw!r}") from None
    if not (0 <= gib if zero_allowed else 0 < gib) or gib == float("inf"):  # nan fails both comparisons
        kind = ">= 0 GiB (0: off)" if zero_allowed else "a positive number of GiB"
        raise ValueError(f"{name} must be {kind}, got {raw!r}")
    return int(gib * (1 << 30))


def cache_limit_bytes(env: Mapping[str, str] | None = None) -> int | None:
    """``SSN_CACHE_MAX_GB`` in bytes (GiB), or None when unset: the bound :func:`prune_cache` keeps the cache to."""
    raw = (os.environ if env is None else env).get("SSN_CACHE_MAX_GB", "").strip()
    return _gib_bytes(raw, "SSN_CACHE_MAX_GB", zero_allowed=False) if raw else None


# default bound of the feature store (`feature_store`): a Lite0 cache of 200 cells at 256x256 in bf16 is about 28 MiB
FEATURE_STORE_DEFAULT_GB = 4.0


def feature_store(env: Mapping[str, str] | None = None) -> FeatureStore | None:
    """The node's store of training and validation feature caches (`supersimplenet.feature_store`):
    ``<cache>/features``, bounded by ``SSN_FEATURE_STORE_MAX_GB`` (default 4 GiB; 0 turns it off: None)."""
    env = os.environ if env is None else env
    raw = env.get("SSN_FEATURE_STORE_MAX_GB", "").strip() or str(FEATURE_STORE_DEFAULT_GB)
    max_bytes = _gib_bytes(raw, "SSN_FEATURE_STORE_MAX_GB", zero_allowed=True)
    if max_bytes == 0:
        return None
    from supersimplenet.feature_store import FeatureStore  # noqa: PLC0415 (torch: kept off the dataset reader's import)

    return FeatureStore(default_cache_dir(env) / "features", max_bytes=max_bytes)


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
                if not _delete_view(cache, marker):
                    continue
                stats.views_deleted += 1
                marker.unlink(missing_ok=True)
            finally:
                os.close(held)
            drop_unlinked(every=True)  # an evicted view goes with the objects only it linked
        stats.bytes_after = total
    finally:
        os.close(fd)
    if stats.objects_deleted or stats.views_deleted:
        log.info(
            "dataset cache %s: deleted %d views and %d objects, %d -> %d bytes (bound %d)",
            cache,
            stats.views_deleted,
            stats.objects_deleted,
            stats.bytes_before,
            stats.bytes_after,
            max_bytes,
        )
    if stats.bytes_after > max_bytes:
        log.warning(
            "dataset cache %s holds %d bytes, above its bound of %d: %d views past their turn are in use",
            cache,
            stats.bytes_after,
            max_bytes,
            stats.views_in_use,
        )
    return stats


def _delete_view(cache: Path, marker: Path) -> bool:
    """Deletes the view a use marker names, with the empty product/bucket folders above it (the caller holds the
    marker's lock). False when the view is not gone: a marker that names no view is deleted itself, and a view only
    partly deleted keeps its marker, so a later prune tries again."""
    views_root = cache / "views"
    view = (cache / marker.read_text().strip()).resolve()
    if not view.is_relative_to(views_root) or view == views_root:
        log.warning("dataset cache %s: %s names %s, not a view: ignored", cache, marker, view)
        marker.unlink(missing_ok=True)
        return False
    if view.exists():
        _make_writable(view)
        shutil.rmtree(
            view, onerror=lambda _fn, path, exc: log.warning("dataset cache: could not delete %s: %s", path, exc[1])
        )
    if view.exists():
        return False  # partly deleted: the marker stays, so a later prune tries again
    for parent in view.parents:  # the empty product/bucket folders above it
        if parent == views_root or not parent.is_relative_to(views_root):
            break
        try:
            parent.rmdir()
        except OSError:
            break
    return True


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


__all__ = [
    "default_cache_dir",
    "cache_limit_bytes",
    "prune_cache",
    "PruneStats",
]
