"""Fetch and prepare guides and masks as a Ray Data step: read and decode each (guide, mask)
pair once per batch, center-crop both to a square and resize them (bicubic for guides, bilinear
for masks) to the model resolution; outputs keep that resolution. A failure becomes the row's
error, never a crashed job.

Reading and decoding follow the contract in `tasks.images` (alpha over white, 16-bit scaled,
size limit, errors naming the URI), shared with `sdedit edit`, `sdedit train` and `sdedit guides`.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa
from PIL import Image

from pipeline.manifest import INTERNAL
from tasks.images import (
    InputError,
    drafted_box,
    file_limit,
    fit,
    in_srgb,
    open_image,
    oriented_size,
    read_bytes,
    read_image,
    to_rgb,
)


def load_guide(uri: str, options: Mapping, max_pixels: int,
               draft_to: int | None = None) -> Image.Image:
    """Read and decode a guide to 8-bit RGB at its own size (a JPEG with `draft_to`: at the
    smallest DCT scale whose shorter side is at least `draft_to`)."""
    return decode_guide(read_bytes(uri, options, max_bytes=file_limit(max_pixels)), uri,
                        max_pixels, draft_to)


def decode_guide(data: bytes, uri: str, max_pixels: int,
                 draft_to: int | None = None) -> Image.Image:
    """`load_guide` for bytes already read."""
    return to_rgb(open_image(data, uri, max_pixels, draft_to), uri)


def load_mask(uri: str, guide_uri: str, size: tuple[int, int], options: Mapping,
              max_pixels: int) -> Image.Image:
    """Read and decode a mask; it must have the guide's size."""
    mask = read_image(uri, options, max_pixels, mask=True)
    if mask.size != size:
        raise InputError("validate", f"mask {uri} is {mask.size[0]}x{mask.size[1]} but guide "
                         f"{guide_uri} is {size[0]}x{size[1]}; they must match")
    return mask


def prepare(guide_uri: str, mask_uri: str | None, resolution: int, options: Mapping,
            max_pixels: int, fast_decode: bool = False) -> tuple[bytes, bytes | None]:
    """Guide (RGB) and mask (L) pixels at the model resolution, as raw uint8 bytes. With
    `fast_decode`, a JPEG guide decodes at a reduced scale; its mask still has to match the
    guide's full size, and both are cropped and resized to the resolution on their own."""
    draft_to = resolution if fast_decode else None
    data = read_bytes(guide_uri, options, max_bytes=file_limit(max_pixels))
    decoded = open_image(data, guide_uri, max_pixels, draft_to)
    guide = to_rgb(decoded, guide_uri, deferred=True)  # to sRGB at the model's size, below
    box = drafted_box(data, guide.size) if draft_to else None
    mask = None
    if mask_uri:  # the guide's size at full scale, EXIF orientation applied
        full_size = oriented_size(data) if draft_to else guide.size
        mask = load_mask(mask_uri, guide_uri, full_size, options, max_pixels)
        fitted = fit(mask, resolution, Image.Resampling.BILINEAR)
        if (why := nothing_to_edit(mask, fitted, resolution)) is not None:
            raise InputError("validate", f"mask {mask_uri} leaves nothing to edit in guide "
                                         f"{guide_uri}: {why}; the output would be the guide "
                                         "unchanged")
        mask = fitted.tobytes()
    guide = fit(guide, resolution, Image.Resampling.BICUBIC, box)
    return in_srgb(guide, decoded.info.get("icc_profile")).tobytes(), mask


def nothing_to_edit(mask: Image.Image, fitted: Image.Image, resolution: int) -> str | None:
    """Why a full-size mask, `fitted` to the model's square, would keep every pixel the model
    sees (its output would be the guide itself: an inverted mask, or one drawn off the crop, is
    the user's to see), or None. White (255) marks what to edit. A region that ends at the
    square's edge counts as off it: the resize's filter leaks a faint edge into the square."""
    from tasks.regions import centre_square, marks_centre_square

    crop, marked = centre_square(*mask.size), mask.getbbox()
    if marked is None:
        return "every pixel is 0 (keep); white (255) marks the region to edit"
    if not marks_centre_square(mask):
        return (f"its edit region (pixels {marked[:2]} to {marked[2:]}) lies outside the centre "
                f"square {crop.as_tuple()[:2]} to {crop.as_tuple()[2:]} that the model sees of "
                f"the {mask.width}x{mask.height} guide")
    if fitted.getbbox() is None:
        return f"its edit region is too small or faint to show at the model's {resolution}x" \
               f"{resolution}"
    return None


def fetch_batch(table: pa.Table, resolution: int, storage_options: Mapping,
                max_pixels: int, fast_decode: bool = False) -> pa.Table:
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
                    guide_uri, mask_uri, resolution, storage_options, max_pixels, fast_decode)
            pixels, failure = cache[(guide_uri, mask_uri)]
            if failure:
                stages[index], errors[index] = failure
        guides.append(pixels[0])
        masks.append(pixels[1])
    return _with_pixels(table, guides, masks, stages, errors)


def _prepare_or_error(guide_uri, mask_uri, resolution, options, max_pixels, fast_decode) -> tuple:
    try:
        return prepare(guide_uri, mask_uri, resolution, options, max_pixels, fast_decode), None
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
