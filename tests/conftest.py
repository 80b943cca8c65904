"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

# Ray reads these when first imported; a test that imports ray before a stack fixture applies its environment must
# still never bind to the machine's interface address (only 127.0.0.1 is ours) nor report usage.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# The repository's sibling folder `shared` (../shared/data): real data sets that are never committed and
# that CI lays out read-only. Tests must copy files to tmp_path before changing anything.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the shared real data sets; a test that needs them fails loudly where they are missing."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}: lay out ../shared beside the repository")
    return SHARED_DATA


@pytest.fixture(scope="session")
def weld_root(shared_data: Path) -> Path:
    return shared_data / "battery_weld" / "denoised"


@pytest.fixture(scope="session")
def mpdd_root(shared_data: Path) -> Path:
    return shared_data / "mpdd_metal_plate" / "data_supervised" / "metal_plate"


@pytest.fixture
def small_weld(weld_root: Path, tmp_path: Path) -> Path:
    """A small MVTec-layout copy of battery_weld/denoised in tmp_path: 3 train/good, 2 test/good and 3
    test/defective images with their masks (real files; change them freely)."""
    dest = tmp_path / "small_weld"
    for sub, count in (("train/good", 3), ("test/good", 2), ("test/defective", 3)):
        (dest / sub).mkdir(parents=True)
        for src in sorted((weld_root / sub).iterdir())[:count]:
            shutil.copy(src, dest / sub / src.name)
            if sub == "test/defective":
                (dest / "ground_truth/defective").mkdir(parents=True, exist_ok=True)
                shutil.copy(weld_root / "ground_truth/defective" / src.name, dest / "ground_truth/defective")
    return dest


def _reencode(path: Path, fmt: str, suffix: str) -> Path:
    out = path.with_suffix(suffix)
    Image.open(path).convert("RGB").save(out, format=fmt)
    path.unlink()
    return out


def _truncate(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _blank_mask(path: Path) -> Path:
    size = Image.open(path).size
    Image.new("L", size, 0).save(path)
    return path


@pytest.fixture(scope="session")
def damage() -> SimpleNamespace:
    """Changes real image files in place: ``reencode(path, "JPEG", ".jpg")`` saves the image in another format
    under the same stem (the original goes), ``truncate(path, keep=0.6)`` cuts its bytes, ``blank_mask(path)``
    makes a mask all black at its size. Each returns the file's path."""
    return SimpleNamespace(reencode=_reencode, truncate=_truncate, blank_mask=_blank_mask)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Ray must not be imported while tests are collected: it reads its settings (address, auth mode and token)
    when first imported, before the ``live_stack`` fixture applies the stack's, and every later in-process
    connection of the session then fails ("Failed to connect to Ray cluster"). Import Ray-using platform modules
    inside tests and fixtures."""
    import sys

    if "ray" in sys.modules and session.items:
        raise pytest.UsageError(
            "a test module imported ray at collection time (directly or through an "
            "ssn_platform module): import it inside the test or fixture instead"
        )
