"""Helpers for pipeline tests: small images, manifests and output readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def write_images(folder: Path, count: int, size: tuple[int, int] = (40, 32),
                 seed: int = 0) -> list[str]:
    """Smooth random RGB images named img0.png...; returns their file names."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR)
        name = f"img{index}.png"
        image.save(folder / name)
        names.append(name)
    return names


def write_manifest(path: Path, rows: dict) -> Path:
    """A Parquet manifest from a column dict."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return path


def read_dataset(output: Path) -> pa.Table:
    """Every committed data shard under OUTPUT/data, sorted by key."""
    files = sorted((output / "data").glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    return table.sort_by([("id", "ascending"), ("t0", "ascending"), ("sample", "ascending")])


def read_errors(output: Path) -> pa.Table | None:
    files = sorted((output / "errors").glob("part-*.parquet"))
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f) for f in files])
