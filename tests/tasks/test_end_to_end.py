"""Photos -> `sdedit guides strokes` -> `sdedit run` -> `sdedit inspect`, as a user types it.

Needs the pipeline (`sdedit run`, issue 3). Each command runs in its own process, as from a
shell, with the builtin tiny model and two steps so it stays small on a CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.inspect import PLACEHOLDER, cell_origin, sheet_size

CELL = 64
T0S = ("0.3", "0.6")


def sdedit(*args: str, cwd) -> str:
    """Run `sdedit ARGS` in a fresh process; fail with its output if it exits non-zero."""
    command = [sys.executable, "-c", "from pipeline.cli import main; main()", *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"sdedit {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_photos_to_contact_sheet(photo_folder, tmp_path):
    guides, output = tmp_path / "guides", tmp_path / "output"
    sdedit("guides", "strokes", str(photo_folder), str(guides), "--palette-size", "8", cwd=tmp_path)
    run_args = [
        "run",
        str(guides / "manifest.parquet"),
        str(output),
        "--model",
        "builtin:tiny",
        "--steps",
        "2",
    ]
    for t0 in T0S:
        run_args += ["--t0", t0]
    sdedit(*run_args, cwd=tmp_path)
    written = pq.read_table(output / "data", columns=["id", "t0", "sample"]).to_pylist()
    assert len(written) == 4 * len(T0S)

    printed = sdedit("inspect", str(output), "-n", "3", "--cell", str(CELL), cwd=tmp_path)
    assert "written           8  (4 ids, 2 t0 values, 1 sample)" in printed
    sheet = Image.open(output / "inspect" / "contact_sheet.png")
    assert sheet.size == sheet_size(3, 2 + len(T0S), CELL)
    pixels = np.asarray(sheet)
    for row in range(3):
        for column in (0, 2, 3):  # the guide and both outputs are images, not placeholders
            x, y = cell_origin(row, column, CELL)
            assert tuple(pixels[y + CELL // 2, x + CELL // 2]) != PLACEHOLDER
    assert (output / "inspect" / "contact_sheet.html").stat().st_size > 10_000

    sdedit("evaluate", str(output), cwd=tmp_path)
    report = json.loads((output / "evaluation.json").read_text())
    assert [group["t0"] for group in report["by_t0"]] == [0.3, 0.6]
    assert report["outputs_scored"] == 8


@pytest.mark.slow
def test_guides_without_an_address_run_locally_whatever_ray_address_says(photo_folder, tmp_path,
                                                                         closed_port):
    """As `sdedit run`: no --address is a local runtime. Ray alone would join the cluster in
    RAY_ADDRESS (or the last one `ray start` recorded) and wait minutes for one that is gone."""
    command = [sys.executable, "-c", "from pipeline.cli import main; main()", "guides", "strokes",
               str(photo_folder), str(tmp_path / "guides"), "--palette-size", "8"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "RAY_ADDRESS": f"127.0.0.1:{closed_port}"}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote 4 synthesis guides" in done.stdout
