"""Fixtures for pipeline tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from run_helpers import write_images, write_manifest


@pytest.fixture
def small_manifest(tmp_path) -> Path:
    """Four photos-like images with a pass-through label column."""
    names = write_images(tmp_path / "inputs", 4)
    return write_manifest(tmp_path / "inputs" / "manifest.parquet", {
        "id": [f"item{i}" for i in range(4)], "guide": names, "label": ["a", "b", "c", "d"],
    })
