"""Shared fixtures. Tests read the real Push-T demonstrations from ../shared/data (or $ROBODIFF_DATA)."""

from __future__ import annotations

import pytest

from data.pusht import resolve_pusht_path


@pytest.fixture(scope="session")
def pusht_path():
    try:
        return resolve_pusht_path()
    except FileNotFoundError as err:
        pytest.skip(f"Push-T data not available: {err}")
