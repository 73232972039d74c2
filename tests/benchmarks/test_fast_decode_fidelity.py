"""`benchmarks/fast_decode_fidelity.py` compares fast and full decodes of the bundled photos."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "fast_decode_fidelity.py"


def test_fast_and_full_decodes_stay_within_a_level_at_a_size_the_scale_does_not_divide():
    command = [sys.executable, str(BENCH), "--sizes", "777x777", "--resolutions", "64"]
    done = subprocess.run(command, check=True, capture_output=True, text=True,
                          cwd=BENCH.parents[1])
    (result,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert (result["size"], result["resolution"], result["photos"]) == ("777x777", 64, 8)
    assert 0 < result["mean_levels"] < 1.0  # 4.22 when the padded column was cropped as image
    low, high = result["orientation_means"]
    assert high - low < 0.05
