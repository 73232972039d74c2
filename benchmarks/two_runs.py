"""Two `sdedit run`s into one OUTPUT at once, as when a scheduled run starts before the last ends.

    python benchmarks/two_runs.py [--rows 40] [--work DIR] [-- OPTIONS FOR THE SECOND RUN]

Starts `sdedit run` on `--rows` generated images (builtin:tiny, 10 steps, 2 rows per shard),
starts the same command again once the first has committed a shard (with any options given
after `--`, e.g. `-- --rows-per-shard 3`: not an output-deciding option, so a second run is not
refused for it), waits for both and prints as JSON their exit codes, how long the second ran,
and what OUTPUT holds: data rows, distinct ids, summary.json's duplicate_rows and reconciled.
With the OUTPUT lease the second run stops at once and OUTPUT holds every id exactly once.

    python benchmarks/two_runs.py --take-over

Instead of starting a second run, takes OUTPUT's lease over as a rerun does once the first
run's lease is stale (its driver killed while its Ray workers go on for a moment, or stalled
past the lease's expiry) and prints the first run's exit code, its last error and the data rows
it committed after the takeover, which a rerun would commit a second time. Each shard commit
checks the lease first, so the first run stops and commits none.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.bench_cli import write_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--work", type=Path, help="folder for inputs, OUTPUT and logs")
    parser.add_argument("--take-over", action="store_true",
                        help="take OUTPUT over (write another run's lease) instead of starting "
                             "a second run; print what the first commits afterwards")
    parser.add_argument("second", nargs="*", help="extra options of the second run (after --)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="two-runs-"))
    command = run_command(work, args.rows)
    output = work / "out"
    first = start(command, work / "first.log")
    wait_for_a_shard(first, output / "data")
    if args.take_over:
        taken = take_over(output)
        print(json.dumps({"first_exit": first.wait(),
                          "rows_committed_after_take_over": rows_since(output, taken),
                          "first_error": last_error(work / "first.log")}, indent=2))
        return
    started = time.monotonic()
    second = start(command + args.second, work / "second.log")
    second_exit = second.wait()
    second_seconds = time.monotonic() - started
    print(json.dumps({"first_exit": first.wait(), "second_exit": second_exit,
                      "second_seconds": round(second_seconds, 1), **held(output),
                      "second_error": last_error(work / "second.log")}, indent=2))


def run_command(work: Path, rows: int) -> list[str]:
    manifest = write_inputs(work / "inputs", rows, size=40)
    return [sys.executable, "-c", "from pipeline.cli import main; main()", "run", str(manifest),
            str(work / "out"), "--model", "builtin:tiny", "--steps", "10", "--t0", "0.5",
            "--batch-size", "2", "--model-batch", "2", "--rows-per-shard", "2",
            "--progress-interval", "0"]


def start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as stream:
        return subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT)


def wait_for_a_shard(run: subprocess.Popen, data: Path) -> None:
    while not (data.exists() and any(data.glob("part-*"))):
        if run.poll() is not None:
            sys.exit(f"the first run ended ({run.returncode}) before it committed a shard")
        time.sleep(0.2)


def take_over(output: Path) -> float:
    """Write the lease a rerun on another host writes; returns when."""
    from dataclasses import asdict

    from pipeline.lease import LEASE, Lease
    from pipeline.writers import commit

    now = time.time()
    lease = Lease("takeover", "another-host", 1, now, now)
    commit(str(output), LEASE, json.dumps(asdict(lease)).encode(), {})
    return now


def rows_since(output: Path, since: float) -> int:
    """Data rows of the shards committed after `since` (a write already past its lease check
    when the lease changed hands lands within a second)."""
    shards = [s for s in (output / "data").glob("part-*.parquet") if s.stat().st_mtime > since + 1]
    return sum(pq.read_metadata(s).num_rows for s in shards)


def held(output: Path) -> dict:
    """Data rows, distinct ids and the summary's duplicate count in OUTPUT."""
    shards = sorted((output / "data").glob("part-*.parquet"))
    ids = pa.concat_tables([pq.read_table(s, columns=["id"]) for s in shards])["id"].to_pylist()
    summary = json.loads((output / "summary.json").read_text())
    return {"data_rows": len(ids), "distinct_ids": len(set(ids)),
            "duplicate_rows": summary["duplicate_rows"], "reconciled": summary["reconciled"]}


def last_error(log: Path) -> str | None:
    errors = [line for line in log.read_text().splitlines() if line.startswith("Error:")]
    return errors[-1] if errors else None


if __name__ == "__main__":
    main()
