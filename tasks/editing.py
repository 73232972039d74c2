"""Editing: strokes painted over part of a photo, plus a mask of that part.

Only the masked region changes: outside the mask the output equals the photo exactly (the
sampler pastes the guide back there, SDEdit section 3.3). Simulated edits paint the region
with `tasks.strokes` so a whole dataset can be edited without a human with a brush.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from tasks.presets import Preset
from tasks.regions import (
    THRESHOLD,
    Box,
    binary_mask,
    box_mask,
    centre_square,
    marks_centre_square,
    random_box,
)
from tasks.strokes import PAINT_SIDE, simulate_strokes

PRESET = Preset(
    name="editing",
    t0=(0.4, 0.5),
    repeats=1,
    samples=1,
    requires_mask=True,
    metrics=("l2_to_guide", "change_outside_mask"),
    description="photo with strokes over a region + mask -> edited photo",
)


def edit_guide(
    photo: Image.Image,
    region: Box | Image.Image | None = None,
    stroke_size: int = 9,
    palette_size: int = 6,
    seed: int = 0,
    min_fraction: float = 0.25,
    max_fraction: float = 0.5,
    paint_side: int | None = PAINT_SIDE,
) -> tuple[Image.Image, Image.Image]:
    """(guide, mask) for a photo: strokes painted over `region`, the photo untouched elsewhere.

    `region` is a box, a mask image (white = paint and synthesize) or None for a box drawn
    from `seed`. The strokes are painted at `paint_side` (see `simulate_strokes`). The guide is
    RGB; the mask is "L" with 255 = synthesize, 0 = keep.
    """
    photo = photo.convert("RGB")
    mask = region_mask(photo.size, region, np.random.default_rng(seed), min_fraction, max_fraction)
    strokes = simulate_strokes(photo, stroke_size=stroke_size, palette_size=palette_size, seed=seed,
                               paint_side=paint_side)
    guide = photo.copy()
    guide.paste(strokes, (0, 0), mask)
    return guide, mask


def region_mask(
    size: tuple[int, int],
    region: Box | Image.Image | None,
    rng: np.random.Generator,
    min_fraction: float,
    max_fraction: float,
) -> Image.Image:
    """The binary mask of `region` for an image of `size` (a drawn box when region is None).

    A mask image with no pixel to synthesize is an error: its guide would edit nothing."""
    width, height = size
    if isinstance(region, Image.Image):
        if region.size != size:
            raise ValueError(
                f"mask is {region.size[0]}x{region.size[1]}, image is "
                f"{width}x{height}; they must match"
            )
        mask = binary_mask(region)
        if not mask.getbbox():
            raise ValueError(f"the mask has no pixel above {THRESHOLD} (white = synthesize; "
                             f"0-{THRESHOLD} keep), so the edit would change nothing")
        _check_in_square(mask, "the mask's white region")
        return mask
    box = region or random_box(width, height, rng, min_fraction, max_fraction)
    if not box.fits(width, height):
        raise ValueError(f"box {box.as_tuple()} does not fit a {width}x{height} image")
    mask = box_mask(width, height, box)
    _check_in_square(mask, f"box {box.as_tuple()}")
    return mask


def _check_in_square(mask: Image.Image, what: str) -> None:
    """`sdedit run` keeps only the centre square of a guide: a mask wholly off it would be
    refused there (its output would be the guide unchanged)."""
    if not marks_centre_square(mask):
        square = centre_square(*mask.size)
        raise ValueError(f"{what} lies outside the centre square {square.as_tuple()} of the "
                         f"{mask.width}x{mask.height} image that `sdedit run` keeps, so the edit "
                         "would change nothing")
