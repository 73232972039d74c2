"""`benchmarks/bench_fetch.py` runs and counts reads per source image as the job's order gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_fetch.py"


def _bench(tmp_path: Path, steps: int) -> dict:
    command = [sys.executable, str(BENCH), "--rows", "12", "--t0", "3", "--samples", "2",
               "--source-size", "48", "--resolution", "32", "--batch-size", "12",
               "--steps", str(steps), "--workdir", str(tmp_path)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def test_steps_runs_read_each_source_once_full_schedule_runs_once_per_t0(tmp_path):
    # 12 sources x 3 t0 x 2 samples = 72 work rows in blocks of 12: with --steps a source's
    # 6 rows sit side by side (two sources per block); ordered by t0 they are 24 rows apart.
    with_steps, full_schedule = _bench(tmp_path, 20), _bench(tmp_path, 0)
    assert (with_steps["work_rows"], with_steps["reads"]) == (72, 12)
    assert (full_schedule["work_rows"], full_schedule["reads"]) == (72, 36)
