"""Fixtures for the task tests: a folder of real photos.

Ray (`ray_local`) and the S3 server (`s3_server`) come from tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from task_fixtures import photo


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    """photos/animals/chelsea.png, photos/objects/{coffee.jpg,rocket.png}, photos/astronaut.png."""
    root = tmp_path / "photos"
    (root / "animals").mkdir(parents=True)
    (root / "objects").mkdir()
    photo("chelsea").save(root / "animals" / "chelsea.png")
    photo("coffee").save(root / "objects" / "coffee.jpg", quality=95)
    photo("rocket", (48, 64)).save(root / "objects" / "rocket.png")
    photo("astronaut", (64, 64)).save(root / "astronaut.png")
    return root
