"""Rebuild the bundled example, 64x64: four public-domain / CC0 photos from scikit-image, four
Twemoji (CC-BY 4.0) held out from the default prior's training set, and one masked edit.

    python pipeline/examples/make_example.py

Writes photos/ (the real images), guides/ (simulated stroke paintings: median filter + colour
quantisation, `tasks.strokes.simulate_strokes`), masks/ (white = synthesize) and
manifest.parquet with paths relative to this folder. Deterministic: same files every time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFilter, ImageOps

HERE = Path(__file__).parent
SIZE = 64
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # licences: see CREDITS.md
# Twemoji (CC-BY 4.0) held out from the default prior's training set, stored in photos/ on
# white; in the prior's own domain, so its SDEdit outputs are worth looking at.
EMOJI = ("1f60d", "1f98a", "1f345", "1f338")
EMOJI_STROKE_SIZE, EMOJI_PALETTE_SIZE = 13, 5  # flat graphics need coarser strokes
STROKE_SIZE, PALETTE_SIZE, SEED = 5, 8, 0


def load_photo(name: str) -> Image.Image:
    """A scikit-image sample photo, center-cropped and resized to SIZE x SIZE."""
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    return ImageOps.fit(image, (SIZE, SIZE), method=Image.Resampling.LANCZOS)


def strokes(image: Image.Image, size: int = STROKE_SIZE, palette: int = PALETTE_SIZE
            ) -> Image.Image:
    """A stroke painting of `image` (tasks.strokes when available, else the same recipe)."""
    try:
        from tasks.strokes import simulate_strokes
    except ImportError:
        smooth = image.filter(ImageFilter.MedianFilter(size))
        return smooth.quantize(palette, method=Image.Quantize.MEDIANCUT).convert("RGB")
    return simulate_strokes(image, size, palette, SEED)


def edit_region(photo: Image.Image) -> tuple[Image.Image, Image.Image]:
    """The photo with strokes painted over its central square, and the mask of that square."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[SIZE // 4: 3 * SIZE // 4, SIZE // 4: 3 * SIZE // 4] = 255
    painted = np.where(mask[..., None] > 0, np.asarray(strokes(photo)), np.asarray(photo))
    return Image.fromarray(painted.astype(np.uint8)), Image.fromarray(mask, "L")


def main() -> None:
    """Write the example files next to this script."""
    for folder in ("photos", "guides", "masks"):
        (HERE / folder).mkdir(exist_ok=True)
    rows = []
    for name in PHOTOS:
        photo = load_photo(name)
        photo.save(HERE / "photos" / f"{name}.png")
        strokes(photo).save(HERE / "guides" / f"{name}.png")
        rows.append(dict(id=name, guide=f"guides/{name}.png", mask=None, task="synthesis",
                         source=f"photos/{name}.png"))
    for code in EMOJI:
        name = f"emoji-{code}"
        emoji = Image.open(HERE / "photos" / f"{name}.png").convert("RGB")
        strokes(emoji, EMOJI_STROKE_SIZE, EMOJI_PALETTE_SIZE).save(HERE / "guides" / f"{name}.png")
        rows.append(dict(id=name, guide=f"guides/{name}.png", mask=None, task="synthesis",
                         source=f"photos/{name}.png"))
    edited, mask = edit_region(load_photo("chelsea"))
    edited.save(HERE / "guides" / "chelsea-edit.png")
    mask.save(HERE / "masks" / "chelsea-edit.png")
    rows.append(dict(id="chelsea-edit", guide="guides/chelsea-edit.png",
                     mask="masks/chelsea-edit.png", task="editing", source="photos/chelsea.png"))
    pq.write_table(pa.Table.from_pylist(rows), HERE / "manifest.parquet")


if __name__ == "__main__":
    main()
