"""Finding the newest complete checkpoint in run storage (`ssn_platform.resume`), on a real pyarrow filesystem."""

from __future__ import annotations

import pytest
import torch
from pyarrow import fs as pafs

from ssn_platform import resume


def _store(tmp_path, epochs):
    run_dir = tmp_path / "run"
    for epoch in epochs:
        directory = run_dir / resume.checkpoint_dir_name(epoch)
        directory.mkdir(parents=True)
        resume.write_checkpoint(directory, {"epoch": epoch, "weights": torch.full((64,), float(epoch))})
    return pafs.LocalFileSystem(), str(run_dir)


def test_the_newest_complete_checkpoint_is_found_with_its_state(tmp_path):
    fs, run_dir = _store(tmp_path, [0, 1, 2])
    stored, state = resume.newest_complete(fs, run_dir)
    assert stored.epoch == 2 and stored.path.endswith("/epoch_00002")
    assert torch.equal(state["weights"], torch.full((64,), 2.0))


def test_a_checkpoint_whose_upload_was_cut_is_skipped_for_the_one_before(tmp_path):
    fs, run_dir = _store(tmp_path, [0, 1, 2])
    state_file = tmp_path / "run" / "epoch_00002" / resume.STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[:-100])  # a short upload
    (tmp_path / "run" / "epoch_00001" / resume.COMPLETE_FILE).unlink()  # its record never arrived
    stored, state = resume.newest_complete(fs, run_dir)
    assert stored.epoch == 0 and state["epoch"] == 0


def test_a_checkpoint_with_foreign_bytes_of_the_right_length_is_skipped(tmp_path):
    fs, run_dir = _store(tmp_path, [0, 1])
    state_file = tmp_path / "run" / "epoch_00001" / resume.STATE_FILE
    payload = bytearray(state_file.read_bytes())
    payload[-20] ^= 0xFF
    state_file.write_bytes(bytes(payload))
    assert resume.newest_complete(fs, run_dir)[0].epoch == 0


def test_an_unreadable_record_is_skipped(tmp_path):
    fs, run_dir = _store(tmp_path, [0, 1])
    (tmp_path / "run" / "epoch_00001" / resume.COMPLETE_FILE).write_text("{not json")
    assert resume.newest_complete(fs, run_dir)[0].epoch == 0


def test_no_run_directory_and_foreign_folders_give_no_checkpoint(tmp_path):
    fs = pafs.LocalFileSystem()
    assert resume.newest_complete(fs, str(tmp_path / "missing")) is None
    (tmp_path / "run" / "checkpoint_tmp").mkdir(parents=True)
    (tmp_path / "run" / "epoch_x").mkdir()
    assert resume.stored_checkpoints(fs, str(tmp_path / "run")) == []


class Gadget:
    """Stands for any object whose unpickling would run code of the checkpoint writer's choice."""


def test_checkpoints_load_without_unpickling_code(tmp_path):
    fs, run_dir = _store(tmp_path, [])
    directory = tmp_path / "run" / resume.checkpoint_dir_name(3)
    directory.mkdir(parents=True)
    resume.write_checkpoint(directory, {"epoch": 3, "payload": Gadget()})
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        resume.load_verified(fs, str(directory))
