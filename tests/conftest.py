"""Shared fixtures.

``shared``: the real data folder ``../shared/data`` (next to the checkout).
Under ``CI=true`` a missing folder is a test *failure*; elsewhere the test is
skipped with a clear reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("MUSEPAYNE_SHARED")
    return Path(env) if env else ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        msg = f"real data folder {d} is missing (set MUSEPAYNE_SHARED or place ../shared/data)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + " -- required in CI")
        pytest.skip(msg)
    return d


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every test that uses the real data (the ``shared`` fixture, directly or through another
    fixture) carries the ``shared`` marker, so ``-m "not shared"`` selects exactly the tests that
    need nothing but the package."""
    for item in items:
        if "shared" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared)
