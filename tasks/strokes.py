"""Stroke paintings simulated from real photos, as SDEdit evaluated stroke-based synthesis.

SDEdit (Meng et al. 2021, appendix on stroke-based generation) turns a photo into a "painting"
by smoothing it with a median filter and then reducing it to a handful of flat colours. The
reference code never released this step; this is that recipe: median filter of `stroke_size`,
then k-means quantisation to at most `palette_size` colours, fitted on a seeded pixel sample.
A photo larger than `paint_side` (short side, pixels) is painted at that size and the painting
scaled back, so `stroke_size` is in pixels of a `paint_side`-pixel image and a painting looks
the same whatever the photo's resolution (a 9-pixel window left a 2048-pixel photo a photo).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

PAINT_SIDE = 64  # short side (pixels) photos are painted at: SDEdit's look for 9-pixel strokes
PALETTE_FIT_PIXELS = 8192  # pixels sampled to fit the palette; enough for a dozen colours
KMEANS_ITERATIONS = 12


def simulate_strokes(
    image: Image.Image, stroke_size: int = 9, palette_size: int = 12, seed: int = 0,
    paint_side: int | None = PAINT_SIDE,
) -> Image.Image:
    """A stroke painting of `image`: median filter, then at most `palette_size` flat colours.

    Follows SDEdit's stroke simulation (median filter + colour quantisation). An image whose
    short side exceeds `paint_side` is painted at that short side and the painting scaled back
    (nearest neighbour, so it keeps its flat colours); None paints at the image's own size. The
    same image, parameters and seed always give the same painting; the seed picks the pixels
    the palette is fitted on and the k-means initialisation. Returns an RGB image of the
    input's size.
    """
    if stroke_size < 1:
        raise ValueError(f"stroke_size must be >= 1, got {stroke_size}")
    if palette_size < 1:
        raise ValueError(f"palette_size must be >= 1, got {palette_size}")
    if paint_side is not None and paint_side < 1:
        raise ValueError(f"paint_side must be >= 1, got {paint_side}")
    photo = image.convert("RGB")
    smooth = median_smooth(shrunk(photo, paint_side), stroke_size)
    pixels = np.asarray(smooth, dtype=np.float32).reshape(-1, 3)
    palette = fit_palette(pixels, palette_size, np.random.default_rng(seed))
    indices = nearest_colour(pixels, palette)
    painted = palette.round().clip(0, 255).astype(np.uint8)[indices]
    painting = Image.fromarray(painted.reshape(smooth.height, smooth.width, 3), "RGB")
    if painting.size == photo.size:
        return painting
    return painting.resize(photo.size, Image.Resampling.NEAREST)


def shrunk(image: Image.Image, side: int | None) -> Image.Image:
    """`image` with its short side cut to `side` pixels (aspect kept); as it is if not larger."""
    short = min(image.size)
    if side is None or short <= side:
        return image
    width, height = (max(1, round(length * side / short)) for length in image.size)
    return image.resize((width, height), Image.Resampling.LANCZOS)


def median_smooth(image: Image.Image, stroke_size: int) -> Image.Image:
    """Median filter with an odd window of about `stroke_size` pixels (even sizes round up)."""
    window = stroke_size if stroke_size % 2 == 1 else stroke_size + 1
    return image if window == 1 else image.filter(ImageFilter.MedianFilter(window))


def fit_palette(pixels: np.ndarray, palette_size: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `palette_size` RGB colours (float [K, 3]) by k-means on a seeded pixel sample."""
    sample = pixels
    if len(pixels) > PALETTE_FIT_PIXELS:
        sample = pixels[rng.choice(len(pixels), PALETTE_FIT_PIXELS, replace=False)]
    distinct = np.unique(sample, axis=0)
    if len(distinct) <= palette_size:
        return distinct
    centres = distinct[rng.choice(len(distinct), palette_size, replace=False)]
    for _ in range(KMEANS_ITERATIONS):
        labels = nearest_colour(sample, centres)
        for k in range(len(centres)):
            members = sample[labels == k]
            if len(members):
                centres[k] = members.mean(axis=0)
    return centres


def nearest_colour(pixels: np.ndarray, palette: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Index of the nearest palette colour (squared RGB distance) for each pixel."""
    out = np.empty(len(pixels), dtype=np.int64)
    for start in range(0, len(pixels), chunk):
        block = pixels[start : start + chunk]
        distances = ((block[:, None, :] - palette[None, :, :]) ** 2).sum(axis=2)
        out[start : start + chunk] = distances.argmin(axis=1)
    return out
