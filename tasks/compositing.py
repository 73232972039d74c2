"""Compositing: a region of one image pasted onto another, with a mask of the pasted region.

SDEdit harmonises the pasted region with its new surroundings (the mask marks it for
synthesis) while the background stays exactly as it was.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from tasks.presets import Preset
from tasks.regions import Box, box_mask, centre_square, random_box, random_place

PRESET = Preset(
    name="compositing",
    t0=(0.4, 0.5),
    repeats=1,
    samples=1,
    requires_mask=True,
    metrics=("l2_to_guide", "change_outside_mask"),
    description="region of one image pasted onto another + mask -> harmonised composite",
)


def composite_guide(
    background: Image.Image,
    foreground: Image.Image,
    box: Box | None = None,
    at: tuple[int, int] | None = None,
    seed: int = 0,
    min_fraction: float = 0.25,
    max_fraction: float = 0.5,
) -> tuple[Image.Image, Image.Image]:
    """(guide, mask): `box` of `foreground` pasted onto `background` with its top-left at `at`.

    The foreground is first resized to the background's size so boxes share one coordinate
    frame. `box` defaults to one drawn from `seed`; `at` defaults to a seeded random place
    inside the background's `centre_square` (`sdedit run` keeps no more), or anywhere for a
    box larger than that square. The mask is white (synthesize) exactly over the pasted pixels.
    """
    background = background.convert("RGB")
    width, height = background.size
    foreground = foreground.convert("RGB").resize(background.size, Image.Resampling.BICUBIC)
    rng = np.random.default_rng(seed)
    box = box or random_box(width, height, rng, min_fraction, max_fraction)
    if not box.fits(width, height):
        raise ValueError(f"box {box.as_tuple()} does not fit a {width}x{height} image")
    box_w, box_h = box.size
    if at is None:
        square = centre_square(width, height)
        fits = square.size[0] >= box_w and square.size[1] >= box_h
        at = random_place(box.size, square if fits else Box(0, 0, width, height), rng)
    target = Box(at[0], at[1], at[0] + box_w, at[1] + box_h)
    if not target.fits(width, height):
        raise ValueError(f"pasting {box_w}x{box_h} at {at} leaves the {width}x{height} image")
    guide = background.copy()
    guide.paste(foreground.crop(box.as_tuple()), at)
    return guide, box_mask(width, height, target)
