"""Training checkpoints in run storage that survive any crash, and finding the newest complete one on restart.

Why Ray's own `ray.train.get_checkpoint()` is not enough (Ray Train V2, measured with Ray 2.60): a worker's
`ray.train.report(metrics, checkpoint)` uploads the checkpoint to run storage synchronously, then puts the report on
a queue *inside the worker process*. The controller collects those queues every health-check interval
(`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`, 2 s by default) and registers a checkpoint only once every rank's report for
that step has arrived; only registered checkpoints enter its snapshot (`checkpoint_manager_snapshot.json`) and are
handed to a restarted worker group. A worker that dies within one poll of a report takes the queued report with it:
the checkpoint is complete in storage, but Ray restarts from an older one, or from nothing. With short epochs
(1-2 s) that is most crashes.

So the run directory in storage is the source of truth. Each checkpoint directory `epoch_NNNNN/` holds `state.pt`
and `complete.json` ({"epoch", "sha256", "bytes"}), both written before the upload. A checkpoint counts only when
both are present and the hash of the uploaded `state.pt` matches: an upload cut short by the crash (either file
missing or short) is skipped, and the next older one is used. On start, rank 0 scans the run directory, picks the
newest complete checkpoint (whichever of Ray's handed one and the scan is newer; the scan always includes Ray's),
and broadcasts its epoch, so every rank loads the same one. The same scan serves a resubmitted `run_name`.

Limits: the scan lists the run directory once per start (a few S3 LIST/GET calls); checkpoints Ray never
registered are not pruned by its `num_to_keep` and stay in storage until the run directory is deleted.
Checkpoints load with `torch.load(weights_only=True)`: only tensors and plain containers, never code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pyarrow import fs as pafs

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
COMPLETE_FILE = "complete.json"
_DIR_PATTERN = re.compile(r"^epoch_(\d{5,})$")


def checkpoint_dir_name(epoch: int) -> str:
    return f"epoch_{epoch:05d}"


def write_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Writes `state.pt` and its completion record into `directory` (to be uploaded as one checkpoint)."""
    directory = Path(directory)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    (directory / STATE_FILE).write_bytes(payload)
    record = {"epoch": int(state["epoch"]), "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    (directory / COMPLETE_FILE).write_text(json.dumps(record))
    return directory


@dataclass(frozen=True)
class StoredCheckpoint:
    epoch: int
    path: str  # path of the checkpoint directory on the storage filesystem


def _read(fs, path: str) -> bytes | None:
    try:
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except OSError as error:
        log.warning("cannot read %s from run storage: %s", path, error)
        return None


def load_verified(fs, directory: str) -> dict[str, Any] | None:
    """The state of the checkpoint at `directory`, or None when it is incomplete (missing file, wrong hash)."""
    raw_record = _read(fs, f"{directory}/{COMPLETE_FILE}")
    if raw_record is None:
        return None
    try:
        record = json.loads(raw_record)
        expected, size = str(record["sha256"]), int(record["bytes"])
    except (ValueError, KeyError, TypeError):
        log.warning("skipping checkpoint %s: unreadable %s", directory, COMPLETE_FILE)
        return None
    payload = _read(fs, f"{directory}/{STATE_FILE}")
    if payload is None or len(payload) != size or hashlib.sha256(payload).hexdigest() != expected:
        log.warning("skipping checkpoint %s: %s is missing or not the one its record describes", directory, STATE_FILE)
        return None
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def stored_checkpoints(fs, run_dir: str) -> list[StoredCheckpoint]:
    """Checkpoint directories under `run_dir`, newest first (complete or not: `load_verified` decides)."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    except OSError as error:
        log.warning("cannot list run storage %s: %s", run_dir, error)
        return []
    found = []
    for info in infos:
        match = _DIR_PATTERN.match(info.base_name)
        if match and info.type == pafs.FileType.Directory:
            found.append(StoredCheckpoint(epoch=int(match.group(1)), path=f"{run_dir.rstrip('/')}/{info.base_name}"))
    return sorted(found, key=lambda c: c.epoch, reverse=True)


def newest_complete(fs, run_dir: str) -> tuple[StoredCheckpoint, dict[str, Any]] | None:
    """The newest checkpoint under `run_dir` whose files are complete, with its state; None when there is none."""
    for candidate in stored_checkpoints(fs, run_dir):
        state = load_verified(fs, candidate.path)
        if state is not None:
            return candidate, state
    return None
