"""What `sdedit inspect` reads to draw a contact sheet of a few ids of a large OUTPUT.

    python benchmarks/bench_inspect.py [--shards 200] [--rows 50] [--format parquet|webdataset]
        [--ids 4] [--output URI] [--storage-option KEY=VALUE ...]

Commits `--shards` data shards of `--rows` rows (a distinct 96x96 noise PNG of about 28 kB
each), the ids shuffled over the shards as a manifest in random order leaves them, under OUTPUT
(a temporary folder by default; an s3:// URI with `--storage-option endpoint_url=...` for an
S3-compatible server, credentials from the environment). Then times `write_contact_sheet` of
`--ids` ids spread over the id range (Parquet statistics cannot rule a shard out for those)
and the bytes the process read meanwhile (Linux `rchar`: what local files gave). Prints JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.config import parse_storage_options
from pipeline.writers import DATA_TYPES, WRITERS
from tasks.inspect import write_contact_sheet
from tasks.outputs import OutputFolder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--rows", type=int, default=50, help="rows per shard")
    parser.add_argument("--format", choices=sorted(WRITERS), default="parquet")
    parser.add_argument("--ids", type=int, default=4, help="ids on the sheet")
    parser.add_argument("--output", help="OUTPUT URI (default: a temporary folder)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    options = parse_storage_options(args.storage_option)
    with tempfile.TemporaryDirectory(prefix="sdedit-inspect-") as scratch:
        output = args.output or f"{scratch}/out"
        ids = commit_shards(output, args.format, args.shards, args.rows, options)
        chosen = [ids[len(ids) * (k + 1) // (args.ids + 1)] for k in range(args.ids)]
        read_before = read_bytes()
        started = time.perf_counter()
        write_contact_sheet(OutputFolder(output, options), f"{scratch}/sheet", ids=chosen)
        seconds = time.perf_counter() - started
        print(json.dumps({"format": args.format, "shards": args.shards,
                          "rows": args.shards * args.rows, "ids": chosen,
                          "inspect_s": round(seconds, 2),
                          "read_mib": round((read_bytes() - read_before) / 2**20, 1)}, indent=2))


def commit_shards(output: str, data_format: str, shards: int, rows: int, options: dict
                  ) -> list[str]:
    """The shards, committed as the pipeline commits them; returns the ids, sorted."""
    ids = [f"img{index:07d}" for index in range(shards * rows)]
    order = random.Random(0).sample(ids, len(ids))
    noise = np.random.default_rng(0)
    schema = pa.schema(list(DATA_TYPES.items()))
    for shard in range(shards):
        part = order[shard * rows:(shard + 1) * rows]
        table = pa.Table.from_pylist([
            {"id": row_id, "t0": 0.5, "sample": 0, "seed": 1, "image": noise_png(noise),
             "image_format": "png", "width": 96, "height": 96, "model": "builtin:tiny",
             "model_digest": "sha256:bench", "steps": 2, "repeats": 1, "l2_to_guide": 0.1}
            for row_id in part], schema)
        writer = WRITERS[data_format](f"{output.rstrip('/')}/data", options)
        writer.write(table)
        writer.close()
    return ids


def noise_png(noise: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise.integers(0, 256, (96, 96, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def read_bytes() -> int:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])


if __name__ == "__main__":
    main()
