"""Helpers for the task tests: real photos (scikit-image) and fake `sdedit run` OUTPUT folders."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from skimage import data

PHOTOS = {
    "astronaut": data.astronaut,
    "chelsea": data.chelsea,
    "coffee": data.coffee,
    "rocket": data.rocket,
}


def photo(name: str, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A real photo from scikit-image's sample data, resized small for speed."""
    return Image.fromarray(PHOTOS[name]()).convert("RGB").resize(size, Image.Resampling.BICUBIC)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_output(
    root: Path,
    outputs: list[dict],
    errors: list[dict] | None = None,
    summary: dict | None = None,
    files: int = 2,
) -> Path:
    """A fake `sdedit run` OUTPUT folder as the pipeline lays it out.

    `outputs` rows need id, t0, sample, image (PIL), and may carry l2_to_guide, guide, mask.
    They are split over `files` shards; a hidden temporary file is added that readers must skip.
    """
    (root / "data").mkdir(parents=True, exist_ok=True)
    records = [output_record(row) for row in outputs]
    for index in range(files):
        part = records[index::files]
        if part:
            pq.write_table(pa.Table.from_pylist(part), root / "data" / f"part-{index:x}.parquet")
    (root / "data" / ".tmp-shard.parquet").write_bytes(b"partial garbage")
    if errors is not None:
        (root / "errors").mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(errors), root / "errors" / "part-0.parquet")
    if summary is not None:
        (root / "summary.json").write_text(json.dumps(summary))
    return root


def output_record(row: dict) -> dict:
    image = row["image"]
    return {
        "id": row["id"],
        "t0": float(row["t0"]),
        "sample": int(row.get("sample", 0)),
        "seed": 1234,
        "image": png_bytes(image),
        "image_format": "png",
        "width": image.width,
        "height": image.height,
        "model": "builtin:tiny",
        "model_digest": "sha256:test",
        "steps": 2,
        "repeats": 1,
        "l2_to_guide": row.get("l2_to_guide", 0.0),
        "guide": row.get("guide"),
        "mask": row.get("mask"),
        "label": row.get("label", "x"),
    }


def flat(value: int | tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Image.Image:
    """A single-colour RGB image."""
    colour = (value, value, value) if isinstance(value, int) else value
    return Image.new("RGB", size, colour)


def distinct_colours(image: Image.Image) -> int:
    return len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0))


def centre_square(size: tuple[int, int]) -> np.ndarray:
    """True over the centred min(w, h) square of an image of `size`: what `sdedit run` keeps."""
    width, height = size
    side = min(size)
    top, left = (height - side) // 2, (width - side) // 2
    inside = np.zeros((height, width), bool)
    inside[top:top + side, left:left + side] = True
    return inside
