"""Shared fixtures: the real series of ../shared/data when present (unpacked once into a cache)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VOXARC_SHARED_DATA", REPO.parent / "shared" / "data"))
CACHE = Path(os.environ.get("VOXARC_DATA_CACHE", Path.home() / ".cache" / "voxarc-data"))


def _unpacked(role: str, name: str) -> Path | None:
    target = CACHE / role / name
    if target.is_dir() and any(target.rglob("*")):
        return target
    script = SHARED_DATA / "unpack.py"
    if not script.exists():
        return None
    subprocess.run([sys.executable, str(script), str(CACHE), "--role", role], check=True,
                   capture_output=True)
    return target if target.is_dir() else None


@pytest.fixture(scope="session")
def shared_series():
    """Return a function ``(role, name) -> Path`` of an unpacked series folder, or skip when the
    shared data is absent (a fresh machine); tests that need it also have a generated twin."""

    def get(role: str, name: str) -> Path:
        path = _unpacked(role, name)
        if path is None:
            pytest.skip(f"shared data not available ({SHARED_DATA})")
        return path

    return get


@pytest.fixture
def http_public() -> bool:
    """Whether the admin server of ``admin_helpers.admin_site`` has its ``http_public_url``
    set (a test module overrides this fixture to set it)."""
    return False
