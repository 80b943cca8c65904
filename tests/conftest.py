"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

# The repository's sibling folder `shared` (../shared/data): real data sets that are never committed and
# that CI lays out read-only. Tests must copy files to tmp_path before changing anything.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the shared real data sets; skips the test where they are not laid out (a fresh clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
