"""Does a run's memory stay flat as its manifest grows? Peak memory of `sdedit run` by rows.

    python benchmarks/bench_stream.py [--rows 2000 10000] [--size 64] [--steps 1]
        [--model builtin:tiny] [--images 64]

For each `--rows` count, writes a manifest of that many rows (distinct ids; guides cycle over
`--images` generated PNGs, so the inputs stay small on disk), runs `sdedit run` on it in a
subprocess (its own local Ray runtime) and samples, every 0.25 s, the resident memory of the
driver and of every Ray process (workers, actors, raylet, GCS; shared pages are counted in each
process, so the total over-counts what the machine holds; every Ray process on the machine
counts, so run it where no other Ray runtime is running). Prints a JSON line per count: wall
seconds, outputs/s, the driver's peak RSS, the peak of the sum over all processes, and the
raylet's peak resident shared memory (the object store's pages it has touched: a high-water
mark, as freed pages stay mapped). Streaming means these stay
about flat from one count to the next while the rows grow; what may grow with rows is the
driver's (its key columns, Ray Data's bookkeeping of the blocks it has seen).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.bench_cli import write_inputs

RAY_PROCESSES = ("ray::", "raylet", "gcs_server", "default_worker", "ray/dashboard",
                 "log_monitor", "monitor.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--size", type=int, default=64, help="generated image side (pixels)")
    parser.add_argument("--images", type=int, default=64, help="distinct guide files")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--model", default="builtin:tiny")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdedit-stream-") as scratch:
        root = Path(scratch)
        write_inputs(root / "inputs", args.images, args.size)
        for rows in args.rows:
            print(json.dumps(measure(root, rows, args)), flush=True)  # one line per count


def measure(root: Path, rows: int, args: argparse.Namespace) -> dict:
    manifest = root / "inputs" / f"manifest-{rows}.parquet"
    pq.write_table(pa.table({"id": [f"row{i:07d}" for i in range(rows)],
                             "guide": [f"{i % args.images:05d}.png" for i in range(rows)]}),
                   manifest)
    command = [sys.executable, "-c", "from pipeline.cli import main; main()", "run",
               str(manifest), str(root / f"out-{rows}"),
               "--model", args.model, "--t0", "0.5", "--steps", str(args.steps),
               "--progress-interval", "0"]
    started = time.perf_counter()
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    peaks = {"driver": 0, "total": 0, "object_store": 0}
    done = threading.Event()
    sampler = threading.Thread(target=sample, args=(driver.pid, peaks, done), daemon=True)
    sampler.start()
    _, stderr = driver.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - started
    if driver.returncode:
        raise SystemExit(f"sdedit run failed ({driver.returncode}):\n{stderr[-3000:]}")
    summary = json.loads((root / f"out-{rows}" / "summary.json").read_text())
    mib = 1 << 20
    return {"rows": rows, "written": summary["written"], "wall_seconds": round(wall, 1),
            "outputs_per_second": round(summary["written"] / wall, 1),
            "driver_peak_rss_mib": round(peaks["driver"] / mib),
            "all_processes_peak_rss_mib": round(peaks["total"] / mib),
            "object_store_peak_mib": round(peaks["object_store"] / mib)}


def sample(driver: int, peaks: dict, done: threading.Event) -> None:
    while not done.wait(0.25):
        total = store = 0
        for pid, command in processes():
            rss, shared = memory(pid)
            if pid == driver:
                peaks["driver"] = max(peaks["driver"], rss)
            if pid == driver or any(name in command for name in RAY_PROCESSES):
                total += rss
            if "raylet" in command and "ray::" not in command:
                store = max(store, shared)
        peaks["total"] = max(peaks["total"], total)
        peaks["object_store"] = max(peaks["object_store"], store)


def processes():
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            yield int(entry), command.decode(errors="replace")


def memory(pid: int) -> tuple[int, int]:
    """(resident, resident shared) bytes of a process; 0s once it is gone."""
    try:
        resident, shared = Path(f"/proc/{pid}/statm").read_text().split()[1:3]
    except (OSError, ValueError):
        return 0, 0
    page = os.sysconf("SC_PAGE_SIZE")
    return int(resident) * page, int(shared) * page


if __name__ == "__main__":
    main()
