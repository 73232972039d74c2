"""One run at a time per OUTPUT: the lease a running driver holds, renews and releases."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import ray
from run_helpers import write_images, write_manifest

from pipeline.config import RunConfig
from pipeline.job import preview, run
from pipeline.lease import (
    EXPIRE_SECONDS,
    LEASE,
    Lease,
    LeaseLostError,
    OutputInUseError,
    acquire,
    confirm_held,
    holding,
    read_lease,
    release,
)


def put_lease(output, host: str, pid: int, renewed_ago: float, run_id: str = "other") -> Lease:
    """Write the lease another run would have left in OUTPUT."""
    now = time.time()
    lease = Lease(run_id, host, pid, now - renewed_ago - 60, now - renewed_ago)
    output.mkdir(parents=True, exist_ok=True)
    (output / LEASE).write_text(json.dumps(asdict(lease)))
    return lease


def gone_pid() -> int:
    """The pid of a process of this host that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_run_holds_the_lease_and_releases_it(tmp_path, monkeypatch):
    import tempfile

    output, temp = tmp_path / "out", tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    lines = []
    with holding(str(output), {}, lines.append) as lease:
        stored = read_lease(str(output), {})
        assert stored == lease
        assert (stored.host, stored.pid) == (socket.gethostname(), os.getpid())
        assert stored.renewed_at == stored.started_at == pytest.approx(time.time(), abs=5)
    assert not (output / LEASE).exists()
    assert lines == []
    assert list(temp.iterdir()) == []  # the local lock's file went with the lock (one stayed
    # in the temporary folder per OUTPUT ever written)


def test_a_live_lease_refuses_a_second_run_with_who_holds_it(tmp_path):
    output = tmp_path / "out"
    with holding(str(output), {}, print), pytest.raises(OutputInUseError) as refused:
        acquire(str(output), {})
    message = str(refused.value)
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in message
    assert re.search(rf"its lease expires in ({EXPIRE_SECONDS:.0f}|{EXPIRE_SECONDS - 1:.0f}) s",
                     message) and LEASE in message
    put_lease(output, "node-7", 4242, renewed_ago=30)
    with pytest.raises(OutputInUseError, match=r"host node-7, pid 4242\).*renewed 3[01] s ago.*"
                                               r"expires in (90|89) s"):
        acquire(str(output), {})
    assert read_lease(str(output), {}).host == "node-7"  # left as it was


def test_a_killed_driver_on_this_host_is_taken_over_at_once(tmp_path):
    output = tmp_path / "out"
    dead = put_lease(output, socket.gethostname(), gone_pid(), renewed_ago=1)
    lines = []
    with holding(str(output), {}, lines.append) as lease:
        assert lease.run != dead.run and read_lease(str(output), {}) == lease
    assert len(lines) == 1 and lines[0].startswith(f"taking over {output} from run other")
    assert lines[0].endswith(f"its process {dead.pid} on this host is gone")


def test_a_lease_from_another_host_expires(tmp_path):
    output = tmp_path / "out"
    put_lease(output, "node-7", 4242, renewed_ago=EXPIRE_SECONDS + 80)
    lease, replaced = acquire(str(output), {})
    assert replaced.host == "node-7"
    assert replaced.stale_reason(lease.started_at) == f"not renewed for {EXPIRE_SECONDS + 80:.0f} s"
    assert read_lease(str(output), {}) == lease


def test_a_run_may_wait_for_a_lease_to_expire_or_be_released(tmp_path):
    output = tmp_path / "out"
    put_lease(output, "node-7", 4242, renewed_ago=EXPIRE_SECONDS - 1)
    lines = []
    started = time.monotonic()
    lease, replaced = acquire(str(output), {}, wait_seconds=10, report=lines.append)
    # taken once the lease expired (1 s), not at the end of the 10 s it may wait
    assert 0.9 < time.monotonic() - started < 9 and replaced.host == "node-7"
    assert len(lines) == 1 and re.search(r"in use by run other \(host node-7, pid 4242\).*; "
                                         r"waiting up to (10|9) s for it to end", lines[0])
    release(str(output), lease, {})
    with holding(str(output), {}, print, renew_seconds=0.05) as holder:
        started = time.monotonic()
        with pytest.raises(OutputInUseError, match=f"in use by run {holder.run}"):
            acquire(str(output), {}, wait_seconds=0.5)
        assert time.monotonic() - started >= 0.5  # it waited, then refused a live lease
    released = threading.Timer(0.5, (output / LEASE).unlink)
    put_lease(output, "node-7", 4242, renewed_ago=0)
    released.start()
    lease, replaced = acquire(str(output), {}, wait_seconds=10)  # sees it go within a poll
    assert replaced is None and read_lease(str(output), {}) == lease


def test_the_holder_renews_and_never_deletes_a_lease_it_lost(tmp_path):
    output = tmp_path / "out"
    lines = []
    with holding(str(output), {}, lines.append, renew_seconds=0.05) as lease:
        time.sleep(0.5)
        renewed = read_lease(str(output), {})
        assert renewed.run == lease.run and renewed.renewed_at > lease.renewed_at + 0.2
        assert renewed.started_at == lease.started_at
        usurper = put_lease(output, "node-7", 4242, renewed_ago=0, run_id="usurper")
        time.sleep(0.3)
    assert read_lease(str(output), {}) == usurper  # not renewed over, not released
    assert len(lines) == 1 and lines[0].startswith(f"another run took over the lease on {output}")


def test_a_run_that_lost_the_lease_may_not_commit(tmp_path):
    """What every shard commit checks first (the run's own workers are fenced off)."""
    output = tmp_path / "out"
    with holding(str(output), {}, print) as lease:
        confirm_held(str(output), lease.run, {})
        put_lease(output, "node-7", 4242, renewed_ago=0, run_id="usurper")
        with pytest.raises(LeaseLostError, match=(
                rf"^run {lease.run} no longer holds {output}: run usurper \(host node-7, pid "
                r"4242\), started 60 s ago, renewed 0 s ago holds it now\. This run stopped")):
            confirm_held(str(output), lease.run, {})
    (output / LEASE).unlink()
    with pytest.raises(LeaseLostError, match=f"no longer holds {output}: its lease is gone"):
        confirm_held(str(output), lease.run, {})


def test_a_lease_no_run_could_have_written_is_replaced(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / LEASE).write_text('{"run": "x"}')
    lease, replaced = acquire(str(output), {})
    assert replaced is None and read_lease(str(output), {}) == lease


# `--race` mode: one process that takes OUTPUT o<N> under its folder at each trial's instant
RACER = Path(__file__).resolve().parents[2] / "benchmarks" / "lease_race.py"


def test_two_runs_that_reach_a_local_output_at_once_do_not_both_take_it(tmp_path):
    """Both read the lease (none, or a stale one), both wrote theirs, and each read its own
    back: both went on, in 17 of 40 tries (two retried jobs waiting on one stale lease wake at
    the same moment). On a local disk the read, the write and the read-back are one process
    at a time now: the second finds the first's live lease."""
    trials = 12
    for trial in range(0, trials, 2):  # half of them replace a stale lease
        put_lease(tmp_path / f"o{trial}", "node-7", 4242, renewed_ago=EXPIRE_SECONDS + 1)
    start = time.time() + 3.0  # both started and imported by then
    temp = tmp_path / "tmp"  # where their locks' files are, and are removed
    temp.mkdir()
    racers = [subprocess.Popen([sys.executable, str(RACER), "--trials", str(trials), "--race",
                                str(start), str(tmp_path)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "TMPDIR": str(temp)})
              for _ in range(2)]
    results = [racer.communicate(timeout=120)[0].split() for racer in racers]
    assert all(len(result) == trials for result in results), results
    assert [sorted(pair) for pair in zip(*results, strict=True)] == [["held", "refused"]] * trials
    assert list(temp.iterdir()) == []


@pytest.mark.slow
def test_the_lease_works_on_an_object_store(s3_server):
    output = f"{s3_server.new_bucket()}/out"
    options = s3_server.storage_options
    with holding(output, options, print, renew_seconds=0.1) as lease:
        time.sleep(0.5)
        assert read_lease(output, options).renewed_at > lease.renewed_at
        with pytest.raises(OutputInUseError, match=f"in use by run {lease.run}"):
            acquire(output, options)
    assert read_lease(output, options) is None


@pytest.mark.parametrize("before", ["none", "stale"])
def test_a_run_does_not_write_over_a_lease_written_after_it_read_on_s3(s3_server, monkeypatch,
                                                                        before):
    """Another run writes its lease between this run's read and its write (as when both
    start at once: 9 of 40 tries of 4 runs ended with two or three holders on SeaweedFS).
    The write is conditional on what was read, so it is refused; the read-back finds the
    other run's lease and this run stops."""
    import types
    import uuid

    import fsspec

    import pipeline.lease

    output, options = f"{s3_server.new_bucket()}/out", s3_server.storage_options
    fs = fsspec.filesystem("s3", **options)
    now = time.time()
    if before == "stale":
        stale = Lease("stale", "node-7", 4242, now - 500, now - EXPIRE_SECONDS - 60)
        fs.pipe_file(f"{output}/{LEASE}", json.dumps(asdict(stale)).encode())
    rival = Lease("rival", "node-8", 4343, now, now)

    def rival_writes_first() -> uuid.UUID:  # acquire draws its run id after reading
        fs.pipe_file(f"{output}/{LEASE}", json.dumps(asdict(rival)).encode())
        return uuid.uuid4()

    monkeypatch.setattr(pipeline.lease, "uuid", types.SimpleNamespace(uuid4=rival_writes_first))
    with pytest.raises(OutputInUseError, match="in use by run rival"):
        acquire(output, options)
    assert read_lease(output, options) == rival


@pytest.mark.parametrize("answer", [(412, "PreconditionFailed"), (501, "NotImplemented"),
                                    (None, "an old botocore")])
def test_a_store_that_does_not_judge_conditional_writes_still_gives_the_lease(s3_server,
                                                                              monkeypatch,
                                                                              answer):
    """S3-compatible stores that refuse the conditions (501), or refuse every conditional PUT
    (412 while the lease is still the one read, which no other run's write explains), and a
    botocore too old to send them (older than 2024; s3fs 2024.2 may come with one): the lease is
    written as on stores without conditional writes, and the run goes on. The client below
    answers conditional PUTs so; every other request reaches SeaweedFS."""
    import s3fs
    from botocore.exceptions import ClientError, ParamValidationError

    status, code = answer
    plain = s3fs.S3FileSystem.call_s3

    def refusing(self, method, *args, **kwargs):
        if method == "put_object" and ({"IfMatch", "IfNoneMatch"} & kwargs.keys()):
            if status is None:
                raise ParamValidationError(report='Unknown parameter in input: "IfNoneMatch"')
            error = ClientError({"Error": {"Code": code, "Message": code},
                                 "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
            raise OSError(code) from error
        return plain(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", refusing)
    output, options = f"{s3_server.new_bucket()}/out", s3_server.storage_options
    with holding(output, options, print, renew_seconds=0.1) as lease:
        time.sleep(0.3)
        held = read_lease(output, options)
        assert held.run == lease.run and held.renewed_at > lease.renewed_at
    assert read_lease(output, options) is None


def test_a_renewal_does_not_write_over_a_lease_written_after_it_read_on_s3(s3_server,
                                                                          monkeypatch):
    """A run that stalled past its lease's expiry is taken over between its renewal's read
    (its own lease still) and its write: the write is refused, the rival's lease stays."""
    import dataclasses

    import fsspec

    import pipeline.lease

    output, options = f"{s3_server.new_bucket()}/out", s3_server.storage_options
    fs = fsspec.filesystem("s3", **options)
    rival = Lease("rival", "node-8", 4343, time.time(), time.time())

    def rival_writes_first(lease: Lease, **changes) -> Lease:  # the renewal's new lease
        if lease.run != "rival":
            fs.pipe_file(f"{output}/{LEASE}", json.dumps(asdict(rival)).encode())
        return dataclasses.replace(lease, **changes)

    lines = []
    with holding(output, options, lines.append, renew_seconds=0.05):
        monkeypatch.setattr(pipeline.lease, "replace", rival_writes_first)
        time.sleep(0.5)
        assert read_lease(output, options) == rival
    assert read_lease(output, options) == rival
    assert len(lines) == 1 and lines[0].startswith(f"another run took over the lease on {output}")


def test_an_output_that_names_an_object_is_refused_and_nothing_written_beside_it(
        s3_server, tmp_path):
    """S3 has no folders: `s3://b/report.txt` as OUTPUT, an object already, was taken for a
    folder and the run wrote report.txt/data/... beside it (a disk refused it, with a
    NotADirectoryError about the lease file)."""
    import fsspec

    from tasks.images import StorageError

    bucket, options = s3_server.new_bucket(), s3_server.storage_options
    fs = fsspec.filesystem("s3", **options)
    fs.pipe_file(f"{bucket}/report.txt", b"the user's")
    names = write_images(tmp_path / "inputs", 1)
    manifest = write_manifest(tmp_path / "inputs" / "m.parquet", {"id": ["a"], "guide": names})
    (tmp_path / "report.txt").write_text("the user's")
    for output in (f"{bucket}/report.txt", str(tmp_path / "report.txt")):
        config = RunConfig(manifest=str(manifest), output=output, model="builtin:tiny",
                           steps=2, t0=(0.5,), storage_options=options)
        message = (f"{output} is a file, not a folder (OUTPUT is the folder the run writes "
                   "its shards and records in)")
        with pytest.raises(StorageError, match=re.escape(f"cannot read OUTPUT {output}: "
                                                         f"NotADirectoryError: {message}")):
            preview(config)
        with pytest.raises(StorageError, match=re.escape(f"cannot prepare OUTPUT {output}: "
                                                         f"NotADirectoryError: {message}")):
            run(config)
    fs.invalidate_cache()
    assert fs.find(bucket) == [f"{bucket.removeprefix('s3://')}/report.txt"]
    assert (tmp_path / "report.txt").read_text() == "the user's" and not ray.is_initialized()


def test_run_refuses_an_output_in_use_and_touches_nothing(tmp_path):
    names = write_images(tmp_path / "inputs", 2)
    manifest = write_manifest(tmp_path / "inputs" / "m.parquet", {"id": ["a", "b"],
                                                                  "guide": names})
    output = tmp_path / "out"
    holder = put_lease(output, "node-7", 4242, renewed_ago=10)
    (output / "data").mkdir()
    in_flight = output / "data" / ".tmp-part-0.parquet.0123"  # the holder writing a shard
    in_flight.write_bytes(b"half a shard")
    config = RunConfig(manifest=str(manifest), output=str(output), model="builtin:tiny",
                       steps=2, t0=(0.5,))
    planned = preview(config)
    assert planned["todo"] == 2
    assert planned["in_use_by"].startswith("run other (host node-7, pid 4242)")
    for overwrite in (False, True):
        with pytest.raises(OutputInUseError, match="in use by run other"):
            run(replace(config, overwrite=overwrite))
    assert sorted(p.name for p in output.rglob("*")) == sorted([LEASE, "data", in_flight.name])
    assert in_flight.read_bytes() == b"half a shard"
    assert read_lease(str(output), {}) == holder and not ray.is_initialized()


def test_the_lease_keeps_the_fields_earlier_versions_read_and_ignores_later_ones(tmp_path):
    """A field added to the lease made the version before it read the lease as none (its
    `Lease(**json)` refused the key) and take a live run's OUTPUT over; a lease with a key a
    later version adds must still be read here."""
    with holding(str(tmp_path), {}, print) as lease:
        written = json.loads((tmp_path / LEASE).read_text())
        assert set(written) == {"run", "host", "pid", "started_at", "renewed_at"}
        (tmp_path / LEASE).write_text(json.dumps({**written, "added_later": 1}))
        assert read_lease(str(tmp_path), {}) == lease
