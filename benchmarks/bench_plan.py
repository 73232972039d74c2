"""Planning cost of a large manifest: what the driver and each read task spend on work keys.

    python benchmarks/bench_plan.py [--rows 1000000] [--t0 3] [--own-t0] [--committed 0.5]
        [--chunk-rows 500000] [--row-group 100000] [--workdir DIR]

Writes a manifest of `--rows` rows (ids and guide paths only; no images are needed to plan),
then times, as `sdedit run` does them: finding and reading the manifest and planning (duplicate
ids, presets), then `count_work`: every work key, `--chunk-rows` manifest rows at a time,
anti-joined against the committed keys of a `--committed` fraction of the rows (the resume
case; `--chunk-rows` at least `--rows` counts all keys at once, as runs did before). Last, one
read task's `expand_table` of one row group (per-sample seeds included) against the same
committed keys. With `--own-t0` every row gives its own list of `--t0` values (drawn per row, as
augmentation jobs do) instead of the run's `--t0`. Prints seconds, the driver's memory before
counting and its peak while counting (Linux: /proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RunConfig
from pipeline.job import make_plan
from pipeline.manifest import (
    COUNT_CHUNK_ROWS,
    count_work,
    expand_table,
    find_files,
    key_table,
    read_plan_columns,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--t0", type=int, default=3, help="t0 values per row")
    parser.add_argument("--own-t0", action="store_true",
                        help="each row gives its own t0 list (distinct values per row)")
    parser.add_argument("--committed", type=float, default=0.5,
                        help="fraction of the rows whose keys are already committed")
    parser.add_argument("--chunk-rows", type=int, default=COUNT_CHUNK_ROWS,
                        help="manifest rows whose keys are counted at once")
    parser.add_argument("--row-group", type=int, default=100_000)
    parser.add_argument("--workdir", help="keep the manifest here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdedit-plan-") as scratch:
        manifest = write_manifest(Path(args.workdir or scratch), args.rows, args.row_group,
                                  args.t0 if args.own_t0 else 0)
        print(json.dumps(measure(manifest, args), indent=2))


def write_manifest(folder: Path, rows: int, row_group: int, own_t0: int = 0) -> Path:
    """A manifest of `rows` ids and relative guide paths, plus a pass-through label and, with
    `own_t0`, a t0 list of that many values per row, different on every row."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"manifest-{rows}{f'-own{own_t0}' if own_t0 else ''}.parquet"
    if not path.exists():
        columns = {"id": [f"img-{i:09d}" for i in range(rows)],
                   "guide": [f"guides/{i:09d}.png" for i in range(rows)],
                   "label": [i % 10 for i in range(rows)]}
        if own_t0:
            values = np.random.default_rng(0).uniform(0.05, 0.95, (rows, own_t0)).round(6)
            columns["t0"] = values.tolist()
        pq.write_table(pa.table(columns), path, row_group_size=row_group)
    return path


def measure(manifest: Path, args: argparse.Namespace) -> dict:
    """Seconds per planning step, in the order `pipeline.job.run` takes them."""
    t0 = tuple(round(0.2 + 0.1 * i, 1) for i in range(args.t0))
    config = RunConfig(manifest=str(manifest), output=str(manifest.parent / "out"), t0=t0)
    clock = time.perf_counter()
    files = find_files(config.manifest, {})
    columns = read_plan_columns(files, {})
    plan = make_plan(config, files, columns)
    read_s, clock = time.perf_counter() - clock, time.perf_counter()
    committed = key_table(columns.slice(0, int(columns.num_rows * args.committed)), plan)
    committed = committed.select(["id", "t0", "sample"])  # what read_committed gives
    held = reset_peak_rss()
    clock = time.perf_counter()
    expected, todo = count_work(columns, plan, committed, args.chunk_rows)
    count_s = time.perf_counter() - clock
    driver_peak = peak_rss_mib()
    group = pq.ParquetFile(manifest).read_row_group(0)
    clock = time.perf_counter()
    expanded = expand_table(group, plan, committed)
    return {"rows": columns.num_rows, "keys": expected, "committed": committed.num_rows,
            "todo": todo, "chunk_rows": args.chunk_rows, "read_and_plan_s": round(read_s, 2),
            "count_work_s": round(count_s, 2),
            "driver_rss_mib_before_count": held,
            "driver_peak_rss_mib_while_counting": driver_peak,
            "read_task_row_group_rows": group.num_rows,
            "read_task_expand_s": round(time.perf_counter() - clock, 2),
            "read_task_rows_out": expanded.num_rows}


def reset_peak_rss() -> int:
    """Reset this process's peak resident memory to its current one (Linux), which it returns
    in MiB, so the next peak is that of what follows."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def peak_rss_mib() -> int:
    """This process's peak resident memory since the last reset, in MiB (Linux)."""
    return _status_mib("VmHWM")


def _status_mib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


if __name__ == "__main__":
    main()
