"""Fixtures for pipeline tests."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from run_helpers import write_images, write_manifest


@pytest.fixture
def small_manifest(tmp_path) -> Path:
    """Four photos-like images with a pass-through label column."""
    names = write_images(tmp_path / "inputs", 4)
    return write_manifest(tmp_path / "inputs" / "manifest.parquet", {
        "id": [f"item{i}" for i in range(4)], "guide": names, "label": ["a", "b", "c", "d"],
    })


@pytest.fixture
def bucket_manifest(s3_server, tmp_path):
    """Three images and a manifest with relative guide paths, uploaded to a new bucket."""
    import s3fs

    bucket = s3_server.new_bucket()
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    names = write_images(tmp_path, 3)
    for name in names:
        fs.put_file(str(tmp_path / name), f"{bucket}/inputs/{name}")
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": ["a", "b", "c"], "guide": names,
                             "split": ["train", "train", "val"]}), buffer)
    fs.pipe_file(f"{bucket}/inputs/manifest.parquet", buffer.getvalue())
    return bucket, fs
