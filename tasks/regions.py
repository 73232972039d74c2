"""Rectangular regions and their masks: the parts of an image a task synthesizes.

Masks follow the project contract: mode "L", 255 (white) = synthesize, 0 (black) = keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

SYNTHESIZE = 255
KEEP = 0
THRESHOLD = 127  # a mask's grey levels above it synthesize, the others keep


@dataclass(frozen=True)
class Box:
    """A pixel rectangle, PIL order: left, top, right (exclusive), bottom (exclusive)."""

    left: int
    top: int
    right: int
    bottom: int

    def __post_init__(self) -> None:
        if self.right <= self.left or self.bottom <= self.top:
            raise ValueError(f"empty box {self}: right/bottom must exceed left/top")

    @property
    def size(self) -> tuple[int, int]:
        """Width and height in pixels."""
        return self.right - self.left, self.bottom - self.top

    def as_tuple(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), as PIL's crop and paste take it."""
        return self.left, self.top, self.right, self.bottom

    def fits(self, width: int, height: int) -> bool:
        """Whether the box lies inside a width x height image."""
        return self.left >= 0 and self.top >= 0 and self.right <= width and self.bottom <= height

    @classmethod
    def parse(cls, text: str) -> Box:
        """A box from "left,top,right,bottom" (pixels)."""
        parts = text.split(",")
        if len(parts) != 4:
            raise ValueError(f"box must be 'left,top,right,bottom', got {text!r}")
        return cls(*(int(part) for part in parts))


def centre_square(width: int, height: int) -> Box:
    """The centred min(width, height) square of an image: all of a guide that `sdedit run`
    keeps, as it centre-crops guides to a square (`tasks.images.fit`), to the pixel."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return Box(left, top, left + side, top + side)


def marks_centre_square(mask: Image.Image) -> bool:
    """Whether `mask` marks a pixel (any non-zero value) inside its `centre_square`, the part
    `sdedit run` keeps: one that marks only outside it edits nothing there."""
    return mask.crop(centre_square(*mask.size).as_tuple()).getbbox() is not None


def random_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    min_fraction: float = 0.25,
    max_fraction: float = 0.5,
) -> Box:
    """A box inside the image's `centre_square`, its sides min..max_fraction of the square's
    side, at a random place: a region outside it would be cropped away by `sdedit run`."""
    if not 0.0 < min_fraction <= max_fraction <= 1.0:
        raise ValueError(
            f"need 0 < min_fraction <= max_fraction <= 1, got {min_fraction}, {max_fraction}"
        )
    square = centre_square(width, height)
    side = square.size[0]
    box_w = max(1, round(side * rng.uniform(min_fraction, max_fraction)))
    box_h = max(1, round(side * rng.uniform(min_fraction, max_fraction)))
    left, top = random_place((box_w, box_h), square, rng)
    return Box(left, top, left + box_w, top + box_h)


def random_place(size: tuple[int, int], area: Box, rng: np.random.Generator) -> tuple[int, int]:
    """A random top-left corner that puts a box of `size` inside `area`."""
    left = area.left + int(rng.integers(0, area.size[0] - size[0] + 1))
    top = area.top + int(rng.integers(0, area.size[1] - size[1] + 1))
    return left, top


def box_mask(width: int, height: int, box: Box) -> Image.Image:
    """An "L" mask of the image's size: white inside `box` (synthesize), black elsewhere."""
    mask = Image.new("L", (width, height), KEEP)
    mask.paste(SYNTHESIZE, box.as_tuple())
    return mask


def binary_mask(mask: Image.Image) -> Image.Image:
    """A mask reduced to pure black/white ("L"): any pixel above mid-grey synthesizes."""
    return mask.convert("L").point(lambda value: SYNTHESIZE if value > THRESHOLD else KEEP)
