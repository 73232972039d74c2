"""SIGKILL the driver (then rerun) or an actor (the run goes on) mid-run: every key exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pyarrow.parquet as pq
import pytest
from run_helpers import read_dataset, write_images, write_manifest

from pipeline.lease import LEASE, Lease, read_lease
from pipeline.progress import RAY_PROGRESS_VARIABLE
from pipeline.resume import recorded_manifest
from pipeline.writers import commit
from tasks.inspect import sheet_rows
from tasks.outputs import OutputFolder

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


def start_run(tmp_path, log_name: str,
              env: dict | None = None) -> tuple[subprocess.Popen, object, object]:
    """(run, manifest, output): `sdedit run` on ROWS images in its own session, once its first
    shard is committed; output goes to tmp_path/log_name."""
    inputs = tmp_path / "inputs"
    names = write_images(inputs, ROWS)
    manifest = write_manifest(inputs / "m.parquet",
                              {"id": [f"r{i:02d}" for i in range(ROWS)], "guide": names})
    output = tmp_path / "out"
    with open(tmp_path / log_name, "wb") as log:
        run = subprocess.Popen(command(manifest, output), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, env=env)
    wait_for_first_shard(run, output / "data")
    return run, manifest, output


def test_killed_run_resumes_to_exactly_once(tmp_path):
    quiet = {k: v for k, v in os.environ.items() if k != RAY_PROGRESS_VARIABLE}
    first, manifest, output = start_run(tmp_path, "first.log",
                                        env={**quiet, RAY_PROGRESS_VARIABLE: "0"})
    kill_run(first)
    assert "Total Progress" in (tmp_path / "first.log").read_text()  # Ray Data's, asked for
    # No summary.json yet: the killed run recorded which manifest its relative guides
    # resolve against, so inspect shows them without --manifest (it drew "no guide").
    assert recorded_manifest(str(output), {}) == str(manifest)
    assert not (output / "summary.json").exists()
    drawn, _ = sheet_rows(OutputFolder(str(output)))
    assert drawn and all(row.guide is not None for row in drawn)
    survivors = {p.name: p.stat().st_mtime_ns for p in (output / "data").glob("part-*")}
    for shard in survivors:  # every visible shard is complete
        assert pq.read_table(output / "data" / shard).num_rows >= 1
    assert 0 < sum(pq.read_table(output / "data" / s).num_rows for s in survivors) < ROWS
    second = subprocess.run(command(manifest, output), capture_output=True, timeout=600,
                            start_new_session=True, env=quiet)
    assert second.returncode == 0, second.stderr.decode()[-3000:]
    assert b"sdedit: " in second.stderr and b"Total Progress" not in second.stderr
    table = read_dataset(output)
    assert table["id"].to_pylist() == [f"r{i:02d}" for i in range(ROWS)]
    after = {p.name: p.stat().st_mtime_ns for p in (output / "data").glob("part-*")}
    assert {name: after[name] for name in survivors} == survivors  # not recomputed
    assert not list((output / "data").glob(".tmp-*"))


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGHUP,),
                                     (signal.SIGINT, signal.SIGINT)],
                         ids=["sigterm", "sighup", "ctrl-c-twice"])
def test_a_terminated_run_unwinds_and_releases_output(tmp_path, signals):
    """SIGTERM (a pod stopped, `ray job stop`), SIGHUP (the terminal closed) or Ctrl-C: Ray
    shut down and the lease released, so a run from another host need not wait for it to
    expire; committed shards stay, and are whole. SIGHUP killed the driver with nothing of
    that; Ctrl-C exited 1 with "Aborted!", and a second one during Ray's shutdown gave a
    traceback and left Ray's processes running."""
    run, _, output = start_run(tmp_path, "run.log")
    for index, signum in enumerate(signals):
        if index:
            time.sleep(1.0)  # the second while the first unwinds
        run.send_signal(signum)
    name = signal.Signals(signals[0]).name + (" (Ctrl-C)" if signals[0] == signal.SIGINT else "")
    try:
        assert run.wait(timeout=120) == 128 + signals[0]
        deadline = time.monotonic() + 30
        while session_processes(run.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session_processes(run.pid) == []  # Ray's processes are gone too
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    log = (tmp_path / "run.log").read_text()
    assert f"sdedit: stopped by {name}; what was committed stays in {output}, rerun" in log
    assert "Traceback" not in log and "Aborted!" not in log
    assert not (output / LEASE).exists()
    shards = list((output / "data").glob("part-*.parquet"))
    assert shards and all(pq.read_table(shard).num_rows >= 1 for shard in shards)  # whole
    # A write cut short may leave a hidden .tmp- file: readers skip it, the next run removes it.


def test_a_run_whose_output_was_taken_over_commits_nothing_more(tmp_path):
    """Another run takes OUTPUT over (as a rerun does once this driver is gone or its lease
    expired): this run's workers stop committing and the run stops, naming the new holder."""
    run, _, output = start_run(tmp_path, "run.log")
    ours = read_lease(str(output), {})
    now = time.time()
    other = Lease("otherrun", "node-7", 4242, now, now)
    commit(str(output), LEASE, json.dumps(asdict(other)).encode(), {})
    try:
        assert run.wait(timeout=600) == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    log = (tmp_path / "run.log").read_text()
    last = log.splitlines()[-1]
    assert last.startswith(f"Error: run {ours.run} no longer holds {output}: run otherrun (host "
                           "node-7, pid 4242), started ")
    assert last.endswith("This run stopped committing, so that no output is written twice; what "
                         "it committed stays in OUTPUT")
    assert read_lease(str(output), {}) == other  # neither renewed over nor released
    shards = list((output / "data").glob("part-*.parquet"))
    assert sum(pq.read_table(shard).num_rows for shard in shards) < ROWS
    late = [s.name for s in shards if s.stat().st_mtime > now + 1]  # 1 s: a commit in flight
    assert late == []


def session_processes(session: int) -> list[int]:
    """Pids of live processes in a session (zombies excluded)."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
            if os.getsid(int(entry)) == session and state != "Z":
                pids.append(int(entry))
    return pids


def actor_processes(session: int) -> list[int]:
    """Pids of the run's SDEdit actors (Ray titles them after the callable class)."""
    pids = []
    for pid in session_processes(session):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            if b"SDEditActor" in cmdline.read():
                pids.append(pid)
    return pids


def wait_for_replacement(run: subprocess.Popen, victims: list[int]) -> bool:
    """Whether an actor other than the killed ones starts before the run ends."""
    deadline = time.monotonic() + START_SECONDS
    while run.poll() is None and time.monotonic() < deadline:
        if set(actor_processes(run.pid)) - set(victims):
            return True
        time.sleep(0.2)
    return False


def test_a_killed_actor_is_replaced_and_its_work_redone_once(tmp_path):
    run, _, output = start_run(tmp_path, "run.log")
    victims = actor_processes(run.pid)
    assert victims, "no SDEdit actor process found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    try:
        assert wait_for_replacement(run, victims), "no new actor replaced the killed one"
        assert run.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    table = read_dataset(output)
    assert table["id"].to_pylist() == [f"r{i:02d}" for i in range(ROWS)]  # each exactly once
    summary = json.loads((output / "summary.json").read_text())
    assert summary["reconciled"] and summary["errors"] == 0


def test_sigterm_while_ray_starts_unwinds_as_any_other_sigterm(tmp_path):
    """While ray.init runs, Ray's own SIGTERM handler (sys.exit(15)) is in force: a run stopped
    then exited 15 without its 'stopped by SIGTERM' line. The signal comes 1 s into init_ray
    (Ray takes several seconds to start here); wherever it lands, the caller's handler answers."""
    script = tmp_path / "start.py"
    script.write_text(
        "import os, signal, sys, threading, time\n"
        "from pipeline.job import init_ray\n"
        "from pipeline.run_cli import Terminated, stopping_on_signals\n"
        "threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()\n"
        "try:\n"
        "    with stopping_on_signals():\n"
        "        init_ray(None)\n"
        "        time.sleep(60)\n"
        "except Terminated:\n"
        "    print('terminated', flush=True)\n"
        "    sys.exit(143)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, start_new_session=True)
    assert (done.returncode, done.stdout) == (143, "terminated\n"), done.stderr[-2000:]
