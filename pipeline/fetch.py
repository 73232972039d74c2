"""Fetch and decode guides and masks: fsspec reads with retries, Pillow decoding with clear errors.

Conversions (documented, never silent failures):
- guides become 8-bit RGB: grayscale, 1-bit and palette images are expanded; 16-bit images are
  scaled to 8 bits (value / 257); CMYK and YCbCr go through Pillow's conversion; images with
  transparency (RGBA, LA, PA, palette with a transparent colour) are composited over white;
  EXIF orientation is applied. Other modes (32-bit float, LAB, HSV) are decode errors.
- masks become 8-bit grayscale read as [0, 1]: white (1) = synthesize, black (0) = keep;
  colour masks use their luminance, 16-bit masks are scaled like guides, alpha is ignored.
- images larger than `max_pixels` (width x height) are rejected before decoding their pixels
  (decompression-bomb guard).
- guide and mask are center-cropped to a square and resized (bicubic for guides, bilinear for
  masks) to the model resolution; outputs keep that resolution.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from pipeline.manifest import INTERNAL, is_local

Stage = str  # "read" | "decode" | "validate"
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
TRANSPARENT = ("RGBA", "RGBa", "LA", "La", "PA")
READ_ATTEMPTS = 4


class InputError(Exception):
    """A guide or mask cannot be used; `stage` says where it failed, the message says why."""

    def __init__(self, stage: Stage, message: str) -> None:
        super().__init__(message)
        self.stage = stage


def read_bytes(uri: str, storage_options: Mapping, attempts: int = READ_ATTEMPTS) -> bytes:
    """The bytes at a URI; transient I/O errors are retried with exponential backoff."""
    import fsspec

    options = {} if is_local(uri) else dict(storage_options)
    for attempt in range(attempts):
        try:
            with fsspec.open(uri, "rb", **options) as stream:
                return stream.read()
        except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
            raise InputError("read", f"cannot read {uri}: {_reason(error)}") from error
        except OSError as error:  # network and object-store hiccups
            if attempt == attempts - 1:
                raise InputError("read", f"cannot read {uri} after {attempts} attempts: "
                                 f"{_reason(error)}") from error
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def open_image(data: bytes, uri: str, max_pixels: int) -> Image.Image:
    """Decode an image fully, refusing oversized and truncated files."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise InputError("decode", f"{uri} is {width}x{height} = {width * height} pixels, "
                             f"over the limit of {max_pixels} (decompression-bomb guard; "
                             "raise --max-pixels to allow it)")
        image.load()
        return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as error:
        raise InputError("decode", f"{uri} is too large to decode safely: {error}") from error
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InputError("decode", f"cannot decode {uri} as an image ({_reason(error)}); "
                         "expected a complete PNG, JPEG, WebP or other Pillow format") from error


def to_rgb(image: Image.Image, uri: str) -> Image.Image:
    """8-bit RGB following the conversions in the module docstring."""
    if image.mode in SIXTEEN_BIT:
        image = _sixteen_to_eight(image)
    if image.mode in TRANSPARENT or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode in ("RGB", "L", "1", "P", "CMYK", "YCbCr"):
        return image.convert("RGB")
    raise InputError("decode", f"{uri} has unsupported image mode {image.mode!r}; expected RGB, "
                     "grayscale, palette, 16-bit, CMYK or images with alpha")


def to_mask(image: Image.Image, uri: str) -> Image.Image:
    """8-bit grayscale mask (white = synthesize)."""
    if image.mode in SIXTEEN_BIT:
        image = _sixteen_to_eight(image)
    if image.mode in ("F", "LAB", "HSV"):
        raise InputError("decode", f"mask {uri} has unsupported mode {image.mode!r}")
    return image.convert("L")  # luminance; alpha is ignored


def _sixteen_to_eight(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), "L")


def fit(image: Image.Image, resolution: int, resample: int) -> Image.Image:
    """Center-crop to a square and resize to resolution x resolution."""
    return ImageOps.fit(image, (resolution, resolution), method=resample)


def load_guide(uri: str, options: Mapping, max_pixels: int) -> Image.Image:
    """Read and decode a guide to 8-bit RGB at its own size."""
    return to_rgb(open_image(read_bytes(uri, options), uri, max_pixels), uri)


def load_mask(uri: str, guide_uri: str, size: tuple[int, int], options: Mapping,
              max_pixels: int) -> Image.Image:
    """Read and decode a mask; it must have the guide's size."""
    mask = to_mask(open_image(read_bytes(uri, options), uri, max_pixels), uri)
    if mask.size != size:
        raise InputError("validate", f"mask {uri} is {mask.size[0]}x{mask.size[1]} but guide "
                         f"{guide_uri} is {size[0]}x{size[1]}; they must match")
    return mask


def prepare(guide_uri: str, mask_uri: str | None, resolution: int, options: Mapping,
            max_pixels: int) -> tuple[bytes, bytes | None]:
    """Guide (RGB) and mask (L) pixels at the model resolution, as raw uint8 bytes."""
    guide = load_guide(guide_uri, options, max_pixels)
    mask = None
    if mask_uri:
        mask = load_mask(mask_uri, guide_uri, guide.size, options, max_pixels)
        mask = fit(mask, resolution, Image.Resampling.BILINEAR).tobytes()
    return fit(guide, resolution, Image.Resampling.BICUBIC).tobytes(), mask


def fetch_batch(table: pa.Table, resolution: int, storage_options: Mapping,
                max_pixels: int) -> pa.Table:
    """Ray Data step: add guide and mask pixels; failures become the row's error."""
    guides, masks = [], []
    stages = table[INTERNAL + "stage"].to_pylist()
    errors = table[INTERNAL + "error"].to_pylist()
    cache: dict[tuple, tuple] = {}
    uris = zip(table[INTERNAL + "guide_uri"].to_pylist(),
               table[INTERNAL + "mask_uri"].to_pylist(), strict=True)
    for index, (guide_uri, mask_uri) in enumerate(uris):
        pixels = (None, None)
        if stages[index] is None:
            if (guide_uri, mask_uri) not in cache:
                cache[(guide_uri, mask_uri)] = _prepare_or_error(
                    guide_uri, mask_uri, resolution, storage_options, max_pixels)
            pixels, failure = cache[(guide_uri, mask_uri)]
            if failure:
                stages[index], errors[index] = failure
        guides.append(pixels[0])
        masks.append(pixels[1])
    return _with_pixels(table, guides, masks, stages, errors)


def _prepare_or_error(guide_uri, mask_uri, resolution, options, max_pixels) -> tuple:
    try:
        return prepare(guide_uri, mask_uri, resolution, options, max_pixels), None
    except InputError as error:
        return (None, None), (error.stage, str(error))


def _with_pixels(table, guides, masks, stages, errors) -> pa.Table:
    for name, values, kind in (("guide_pixels", guides, pa.binary()),
                               ("mask_pixels", masks, pa.binary()),
                               ("stage", stages, pa.string()),
                               ("error", errors, pa.string())):
        column = INTERNAL + name
        if column in table.column_names:
            table = table.drop_columns([column])
        table = table.append_column(column, pa.array(values, kind))
    return table
