"""SIGKILL the driver mid-run, run the same command again: every key exactly once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from run_helpers import read_dataset, write_images, write_manifest

pytestmark = pytest.mark.slow

ROWS = 40
START_SECONDS = 240


def command(manifest, output) -> list[str]:
    return [sys.executable, "-c", "from pipeline.cli import main; main()", "run",
            str(manifest), str(output), "--model", "builtin:tiny", "--steps", "10",
            "--t0", "0.5", "--batch-size", "2", "--model-batch", "2", "--rows-per-shard", "2"]


def wait_for_first_shard(process: subprocess.Popen, data) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {process.returncode}")
        if data.exists() and any(data.glob("part-*.parquet")):
            return
        time.sleep(0.2)
    pytest.fail("no shard appeared in time")


def kill_run(process: subprocess.Popen) -> None:
    """SIGKILL the driver, then the Ray processes it started (its own process group)."""
    process.send_signal(signal.SIGKILL)
    process.wait()
    with contextlib.suppress(ProcessLookupError):  # already gone with the driver
        os.killpg(process.pid, signal.SIGKILL)
    time.sleep(1)


def test_killed_run_resumes_to_exactly_once(tmp_path):
    inputs = tmp_path / "inputs"
    names = write_images(inputs, ROWS)
    manifest = write_manifest(inputs / "m.parquet",
                              {"id": [f"r{i:02d}" for i in range(ROWS)], "guide": names})
    output = tmp_path / "out"
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(command(manifest, output), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        wait_for_first_shard(first, output / "data")
        kill_run(first)
    survivors = {p.name: p.stat().st_mtime_ns for p in (output / "data").glob("part-*")}
    for shard in survivors:  # every visible shard is complete
        assert pq.read_table(output / "data" / shard).num_rows >= 1
    assert 0 < sum(pq.read_table(output / "data" / s).num_rows for s in survivors) < ROWS
    second = subprocess.run(command(manifest, output), capture_output=True, timeout=600,
                            start_new_session=True)
    assert second.returncode == 0, second.stderr.decode()[-3000:]
    table = read_dataset(output)
    assert table["id"].to_pylist() == [f"r{i:02d}" for i in range(ROWS)]
    after = {p.name: p.stat().st_mtime_ns for p in (output / "data").glob("part-*")}
    assert {name: after[name] for name in survivors} == survivors  # not recomputed
    assert not list((output / "data").glob(".tmp-*"))
