"""What a (re)start costs to learn what OUTPUT already holds: every shard read vs the index.

    python benchmarks/bench_resume.py [--shards 1000] [--rows 2] [--output URI]
        [--storage-option KEY=VALUE ...] [--threads 16]

Commits `--shards` data shards of `--rows` rows (key columns plus a 3 kB image each) under
OUTPUT (a temporary folder by default; an s3:// URI with `--storage-option endpoint_url=...`
for an S3-compatible server, credentials from the environment), then times `read_committed`
without an index (every shard's key columns read), `write_index`, and `read_committed` again
(the index answers). Prints seconds per step as JSON. `--threads` sets how many unlisted
shards are read at once (`pipeline.resume.READ_THREADS`), to see what it buys on a store with
high latency.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import pyarrow as pa

import pipeline.resume
from pipeline.config import parse_storage_options
from pipeline.resume import INDEXES, output_fs, read_committed, write_index
from pipeline.writers import DATA_DIR, ParquetShardWriter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=2, help="rows per shard")
    parser.add_argument("--output", help="OUTPUT URI (default: a temporary folder)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=pipeline.resume.READ_THREADS)
    args = parser.parse_args()
    pipeline.resume.READ_THREADS = args.threads
    options = parse_storage_options(args.storage_option)
    with tempfile.TemporaryDirectory(prefix="sdedit-resume-") as scratch:
        output = args.output or scratch
        seconds = timed(lambda: commit_shards(output, args.shards, args.rows, options))
        print(json.dumps({"shards": args.shards, "rows": args.shards * args.rows,
                          "threads": args.threads,
                          "commit_s": seconds, **measure(output, options)}, indent=2))


def timed(step) -> float:
    started = time.perf_counter()
    step()
    return round(time.perf_counter() - started, 3)


def commit_shards(output: str, shards: int, rows: int, options: dict) -> None:
    """`shards` committed data shards, named by their keys as the pipeline names them."""
    for shard in range(shards):
        ids = [f"s{shard:06d}-{row}" for row in range(rows)]
        writer = ParquetShardWriter(f"{output.rstrip('/')}/{DATA_DIR}", options)
        writer.write(pa.table({"id": ids, "t0": [0.5] * rows, "sample": [0] * rows,
                               "image": [bytes(3000)] * rows}))
        writer.close()


def measure(output: str, options: dict) -> dict:
    """Seconds of each resume step, and the keys found each time (they must agree)."""
    fs, root = output_fs(output, options)
    for name in INDEXES.values():  # start without an index
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}")
    found = {}
    without = timed(lambda: found.update(shards=read_committed(output, "parquet", options)))
    indexing = timed(lambda: write_index(output, found["shards"], options))
    indexed = timed(lambda: found.update(index=read_committed(output, "parquet", options)))
    return {"read_every_shard_s": without, "write_index_s": indexing,
            "read_with_index_s": indexed,
            "keys": [found["shards"].data_rows, found["index"].data_rows]}


if __name__ == "__main__":
    main()
