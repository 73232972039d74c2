"""Encode edited pixels as image files (PNG lossless by default, JPEG q95, WebP lossless)."""

from __future__ import annotations

import io

import pyarrow as pa
from PIL import Image

from pipeline.config import ImageFormat
from pipeline.manifest import INTERNAL

# format -> Pillow save arguments; deterministic settings so reruns give identical bytes.
ENCODERS: dict[str, dict] = {
    "png": {"format": "PNG", "compress_level": 6},
    "jpeg": {"format": "JPEG", "quality": 95, "subsampling": 0},
    "webp": {"format": "WEBP", "lossless": True, "quality": 80, "method": 4},
}


def encode_image(pixels: bytes, width: int, height: int, image_format: ImageFormat) -> bytes:
    """uint8 RGB pixels (row-major HWC) to encoded image bytes."""
    image = Image.frombytes("RGB", (width, height), pixels)
    buffer = io.BytesIO()
    image.save(buffer, **ENCODERS[image_format])
    return buffer.getvalue()


def encode_batch(table: pa.Table, image_format: ImageFormat) -> pa.Table:
    """Ray Data step: add `image` and `image_format`; an encoder failure becomes an error row."""
    stages = table[INTERNAL + "stage"].to_pylist()
    errors = table[INTERNAL + "error"].to_pylist()
    rows = zip(table[INTERNAL + "pixels"].to_pylist(), table["width"].to_pylist(),
               table["height"].to_pylist(), table["id"].to_pylist(), strict=True)
    images = []
    for index, (pixels, width, height, row_id) in enumerate(rows):
        image = None
        if stages[index] is None:
            try:
                image = encode_image(pixels, width, height, image_format)
            except (OSError, ValueError) as error:
                stages[index] = "encode"
                errors[index] = f"cannot encode id {row_id!r} as {image_format}: {error}"
        images.append(image)
    table = table.drop_columns([INTERNAL + "pixels", INTERNAL + "stage", INTERNAL + "error"])
    table = table.append_column("image", pa.array(images, pa.binary()))
    table = table.append_column("image_format", pa.array([image_format] * len(images)))
    table = table.append_column(INTERNAL + "stage", pa.array(stages, pa.string()))
    return table.append_column(INTERNAL + "error", pa.array(errors, pa.string()))
