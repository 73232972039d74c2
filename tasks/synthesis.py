"""Synthesis: a stroke painting in, a realistic image out; no mask.

Guides are stroke paintings, hand-made or simulated from photos by `tasks.strokes`.
SDEdit reports the best realism/faithfulness trade-off for t0 in 0.4-0.6.
"""

from __future__ import annotations

from PIL import Image

from tasks.presets import Preset
from tasks.strokes import PAINT_SIDE, simulate_strokes

PRESET = Preset(
    name="synthesis",
    t0=(0.4, 0.5, 0.6),
    repeats=1,
    samples=1,
    requires_mask=False,
    metrics=("l2_to_guide",),
    description="stroke painting -> realistic image",
)


def stroke_guide(
    photo: Image.Image, stroke_size: int = 9, palette_size: int = 12, seed: int = 0,
    paint_side: int | None = PAINT_SIDE,
) -> Image.Image:
    """The synthesis guide for a photo: its simulated stroke painting (RGB, same size)."""
    return simulate_strokes(photo, stroke_size=stroke_size, palette_size=palette_size, seed=seed,
                            paint_side=paint_side)
