"""Shared fixtures.

Real data lives in ``../shared/data`` (from the repository root) or ``$BITRO_SC_DATA``. Tests that
need it skip with a reason when it is absent, and fail when it is absent under ``CI=true``.
The data is read-only: never write into it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path | None:
    env = os.environ.get("BITRO_SC_DATA")
    for candidate in ([Path(env)] if env else []) + [REPO_ROOT.parent / "shared" / "data"]:
        if candidate.is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the shared real data; skip (or fail under CI) when it is absent."""
    root = _shared_data_dir()
    if root is None:
        msg = "real data not found: set $BITRO_SC_DATA or place it at ../shared/data"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def her2st_dir(shared_data: Path) -> Path:
    path = shared_data / "her2st"
    if not path.is_dir():
        pytest.fail(f"{path} is missing from the shared data")
    return path


@pytest.fixture(scope="session")
def visium_sr1_dir(shared_data: Path) -> Path:
    path = shared_data / "visium_spaceranger1"
    if not path.is_dir():
        pytest.fail(f"{path} is missing from the shared data")
    return path
