"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


def pytest_collection_finish(session: pytest.Session) -> None:
    """Ray must not be imported while tests are collected: it reads its settings (address, auth mode and token)
    when first imported, before the ``live_stack`` fixture applies the stack's, and every later in-process
    connection of the session then fails ("Failed to connect to Ray cluster"). Import Ray-using platform modules
    inside tests and fixtures."""
    import sys

    if "ray" in sys.modules and session.items:
        raise pytest.UsageError("a test module imported ray at collection time (directly or through an "
                                "ssn_platform module): import it inside the test or fixture instead")
