"""The fetch step's cost per work row: how often each source image is read and decoded.

    python benchmarks/bench_fetch.py [--rows 256] [--t0 3] [--samples 1] [--source-size 512]
        [--resolution 256] [--batch-size 32] [--steps 20] [--fast-decode] [--workdir DIR]

Writes `--rows` JPEG photos-like images of `--source-size` pixels and a manifest, expands it
as a read task does (`--t0` values and `--samples` per row; `--steps 0` stands for the full
schedule), cuts the work rows into blocks of `--batch-size` as the job does, and runs
`fetch_batch` (read, decode, crop, resize to `--resolution`) on each block in this process,
counting reads. A source image whose work rows land in several blocks is read once per block.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

import pipeline.fetch
from pipeline.manifest import KEY_SCHEMA, Plan, expand_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--t0", type=int, default=3, help="t0 values per row")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--source-size", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="0: the full schedule")
    parser.add_argument("--fast-decode", action="store_true",
                        help="JPEGs decode at a reduced scale, as `sdedit run --fast-decode`")
    parser.add_argument("--workdir", help="keep the images here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdedit-fetch-") as scratch:
        folder = Path(args.workdir or scratch)
        names = write_sources(folder, args.rows, args.source_size)
        print(json.dumps(measure(folder, names, args), indent=2))


def write_sources(folder: Path, rows: int, size: int) -> list[str]:
    """`rows` smooth random JPEG images of size x size pixels (kept between runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for index in range(rows):
        name = f"source-{size}-{index:05d}.jpg"
        if not (folder / name).exists():
            coarse = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
            image.save(folder / name, quality=90)
        names.append(name)
    return names


def measure(folder: Path, names: list[str], args: argparse.Namespace) -> dict:
    """Reads and seconds of `fetch_batch` over the expanded manifest, block by block."""
    t0 = tuple(round(0.2 + 0.1 * i, 1) for i in range(args.t0))
    plan = Plan(base=str(folder), seed=0, t0=t0, samples=args.samples,
                order_by_t0=not args.steps)  # as `sdedit run` plans it
    manifest = pa.table({"id": [n[:-4] for n in names], "guide": names})
    work = expand_table(manifest, plan, KEY_SCHEMA.empty_table())
    reads = 0
    read_bytes = pipeline.fetch.read_bytes

    def counting_read(uri, options, **limits):
        nonlocal reads
        reads += 1
        return read_bytes(uri, options, **limits)

    pipeline.fetch.read_bytes = counting_read
    started = time.perf_counter()
    for start in range(0, work.num_rows, args.batch_size):
        block = work.slice(start, args.batch_size)
        pipeline.fetch.fetch_batch(block, args.resolution, {}, 10**9, args.fast_decode)
    seconds = time.perf_counter() - started
    return {"sources": len(names), "work_rows": work.num_rows, "steps": args.steps or None,
            "source_size": args.source_size, "fast_decode": args.fast_decode,
            "reads": reads, "reads_per_source": round(reads / len(names), 2),
            "fetch_seconds": round(seconds, 2),
            "work_rows_per_s": round(work.num_rows / seconds, 1)}


if __name__ == "__main__":
    main()
