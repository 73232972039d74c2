"""`benchmarks/bench_plan.py` runs and counts what `sdedit run` would count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_plan.py"


def test_bench_plan_counts_keys_and_the_uncommitted_ones(tmp_path):
    # 1,000 rows x 3 t0 values; the keys of the first 400 rows are committed; the counting
    # goes 300 rows at a time, so chunks straddle the committed boundary.
    command = [sys.executable, str(BENCH), "--rows", "1000", "--t0", "3", "--committed", "0.4",
               "--chunk-rows", "300", "--row-group", "500", "--workdir", str(tmp_path)]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True,
                                       cwd=BENCH.parents[1]).stdout)
    assert (result["rows"], result["keys"], result["committed"]) == (1000, 3000, 1200)
    assert result["todo"] == 1800
    # The first row group (rows 0-499) has 400 committed rows: 100 rows x 3 t0 values left.
    assert (result["read_task_row_group_rows"], result["read_task_rows_out"]) == (500, 300)
    assert result["driver_peak_rss_mib_while_counting"] >= result["driver_rss_mib_before_count"]


def test_bench_plan_with_a_t0_list_of_its_own_on_every_row(tmp_path):
    """`--own-t0`: the case that took one Arrow table per row to plan (157 s for 1M rows)."""
    command = [sys.executable, str(BENCH), "--rows", "1000", "--t0", "2", "--own-t0",
               "--committed", "0.4", "--chunk-rows", "300", "--row-group", "500",
               "--workdir", str(tmp_path)]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True,
                                       cwd=BENCH.parents[1]).stdout)
    assert (result["rows"], result["keys"], result["committed"], result["todo"]) == (
        1000, 2000, 800, 1200)
    assert (result["read_task_row_group_rows"], result["read_task_rows_out"]) == (500, 200)
