"""Compare the images of two `sdedit run` OUTPUT folders key by key (id, t0, sample).

    python benchmarks/compare_outputs.py OUTPUT_A OUTPUT_B

For runs of the same manifest and configuration on two machines (a GPU run against a CPU run,
say): how many keys both hold, how many images are pixel-identical, the largest and mean
absolute difference in 8-bit levels, and the PSNR over all shared keys. Either format.
"""

from __future__ import annotations

import io
import json
import sys

import numpy as np
from PIL import Image

from tasks.outputs import OutputFolder, iter_shards


def images(output: str) -> dict[tuple, np.ndarray]:
    """(id, t0, sample) -> decoded RGB pixels, from every committed shard."""
    found = {}
    for _, table in iter_shards(OutputFolder(output), ["id", "t0", "sample", "image"]):
        for row in table.to_pylist():
            pixels = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
            found[(row["id"], row["t0"], row["sample"])] = pixels
    return found


def compare(first: dict, second: dict) -> dict:
    shared = sorted(first.keys() & second.keys())
    diffs = [np.abs(first[k].astype(np.int16) - second[k].astype(np.int16)) for k in shared]
    mse = float(np.mean([(d.astype(np.float64) ** 2).mean() for d in diffs])) if diffs else 0.0
    return {"keys_a": len(first), "keys_b": len(second), "shared": len(shared),
            "identical": sum(int(d.max() == 0) for d in diffs),
            "max_abs_diff": max((int(d.max()) for d in diffs), default=0),
            "mean_abs_diff": round(float(np.mean([d.mean() for d in diffs])), 4) if diffs else 0,
            "psnr_db": round(10 * np.log10(255**2 / mse), 2) if mse else None}


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(json.dumps(compare(images(sys.argv[1]), images(sys.argv[2])), indent=2))


if __name__ == "__main__":
    main()
