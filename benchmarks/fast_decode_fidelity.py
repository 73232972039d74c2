"""How far `--fast-decode` guides lie from full-decode ones, by photo size and EXIF orientation.

    python benchmarks/fast_decode_fidelity.py [--sizes 1003x517 777x777 1024x768 2000x1337]
        [--resolutions 64 256] [--quality 95]

Resizes the bundled example photos (pipeline/examples/photos) to each size, saves them as JPEG
with every EXIF orientation (1-8), and prepares each guide as `sdedit run` does, once decoded in
full and once at libjpeg's reduced scale. Prints, per size and resolution, the mean and largest
difference in 8-bit levels over all photos and orientations, and the spread of the per
orientation means (a guide cropped off its place shows as a large mean, or one orientation
apart from the others). Sizes the DCT scale divides are the easy case.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.fetch import prepare

PHOTOS = Path(__file__).resolve().parents[1] / "pipeline" / "examples" / "photos"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1003x517", "777x777", "1024x768",
                                                       "2000x1337"])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--quality", type=int, default=95)
    args = parser.parse_args()
    photos = [Image.open(path).convert("RGB") for path in sorted(PHOTOS.glob("*.png"))]
    with tempfile.TemporaryDirectory(prefix="sdedit-fast-") as scratch:
        for size in args.sizes:
            width, height = map(int, size.split("x"))
            for resolution in args.resolutions:
                print(json.dumps(compare(photos, (width, height), resolution, args.quality,
                                         Path(scratch))))


def compare(photos: list[Image.Image], size: tuple[int, int], resolution: int, quality: int,
            scratch: Path) -> dict:
    by_orientation = {orientation: [] for orientation in range(1, 9)}
    largest = 0
    for index, photo in enumerate(photos):
        resized = photo.resize(size, Image.Resampling.LANCZOS)
        for orientation in by_orientation:
            exif = Image.Exif()
            exif[0x0112] = orientation
            path = scratch / f"p{index}-{orientation}.jpg"
            resized.save(path, quality=quality, exif=exif.tobytes())
            full, _ = prepare(str(path), None, resolution, {}, 40_000_000)
            fast, _ = prepare(str(path), None, resolution, {}, 40_000_000, fast_decode=True)
            levels = np.abs(np.frombuffer(full, np.uint8).astype(np.int16)
                            - np.frombuffer(fast, np.uint8).astype(np.int16))
            by_orientation[orientation].append(float(levels.mean()))
            largest = max(largest, int(levels.max()))
    means = [float(np.mean(values)) for values in by_orientation.values()]
    return {"size": f"{size[0]}x{size[1]}", "resolution": resolution, "photos": len(photos),
            "mean_levels": round(float(np.mean(means)), 2), "max_levels": largest,
            "orientation_means": [round(min(means), 2), round(max(means), 2)]}


if __name__ == "__main__":
    main()
