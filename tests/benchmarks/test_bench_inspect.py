"""`benchmarks/bench_inspect.py` commits a shuffled OUTPUT and draws a sheet of its middle ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_inspect.py"


@pytest.mark.parametrize("data_format", ["parquet", "webdataset"])
def test_bench_inspect_draws_the_ids_spread_over_the_range(tmp_path, data_format):
    output = tmp_path / "out"
    command = [sys.executable, str(BENCH), "--shards", "5", "--rows", "4", "--ids", "3",
               "--format", data_format, "--output", str(output)]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True,
                                       cwd=BENCH.parents[1]).stdout)
    assert (result["format"], result["shards"], result["rows"]) == (data_format, 5, 20)
    assert result["ids"] == ["img0000005", "img0000010", "img0000015"]
    assert result["inspect_s"] > 0 and result["read_mib"] > 0
    assert len(list((output / "data").iterdir())) == 5
