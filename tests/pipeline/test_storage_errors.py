"""Storage failures outside a row (refused credentials, unreachable endpoints, workers without
credentials) stop the run with one StorageError naming what could not be used. Ray is started
by the runs here, not by the module-wide `ray_local` runtime, so workers see this environment."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from run_helpers import write_manifest

from pipeline.config import RunConfig
from pipeline.job import run
from tasks.images import StorageError

pytestmark = pytest.mark.slow


@pytest.fixture
def signed_out():
    """No s3fs client cached from earlier (as in a new process), and none left behind: one
    signed with a wrong secret must not serve later tests."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def test_refused_credentials_stop_the_run_with_one_clear_error(s3_server, bucket_manifest,
                                                                monkeypatch, tmp_path,
                                                                signed_out):
    bucket, _ = bucket_manifest
    wrong = "not-the-secret-" + os.environ["AWS_SECRET_ACCESS_KEY"][:8]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    config = RunConfig(manifest=f"{bucket}/inputs/manifest.parquet", output=str(tmp_path / "out"),
                       model="builtin:tiny", storage_options=s3_server.storage_options)
    with pytest.raises(StorageError) as error:
        run(config)
    message = str(error.value)
    assert message.startswith(f"cannot read manifest {bucket}/inputs/manifest.parquet: ")
    assert wrong not in message
    assert not (tmp_path / "out").exists()  # stopped before OUTPUT was touched


def test_workers_without_credentials_stop_the_run_with_one_clear_error(
        s3_server, bucket_manifest, monkeypatch, tmp_path):
    import ray

    bucket, _ = bucket_manifest
    assert not ray.is_initialized()  # run() starts Ray, so its workers get the environment below
    # The driver's client signed in before the secret changed (fsspec keeps it), as on a
    # driver node with credentials; Ray workers start with a wrong one, as on worker nodes
    # without them.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    config = RunConfig(manifest=f"{bucket}/inputs/manifest.parquet", output=str(tmp_path / "out"),
                       model="builtin:tiny", steps=2, t0=(0.4,), batch_size=4, model_batch=4,
                       storage_options=s3_server.storage_options)
    with pytest.raises(StorageError) as error:
        run(config)
    message = str(error.value)
    assert message.startswith("the run stopped when a task could not use storage (manifest "
                              f"{bucket}/inputs/manifest.parquet, OUTPUT {tmp_path / 'out'}); "
                              "rerun to resume: PermissionError: ")
    assert "not-the-secret" not in message and "Traceback" not in message


def test_credentials_the_store_refuses_for_guides_stop_the_run(s3_server, bucket_manifest,
                                                                 monkeypatch, tmp_path,
                                                                 signed_out):
    """S3 answers s3fs's HEAD with a bare 403 for refused credentials and for a refused object
    alike: every guide became a `read` error row and the run exited 0."""
    import ray

    bucket, _ = bucket_manifest
    assert not ray.is_initialized()  # run() starts Ray, so its workers get the environment below
    manifest = write_manifest(tmp_path / "m.parquet", {
        "id": ["a", "b"], "guide": [f"{bucket}/inputs/img0.png", f"{bucket}/inputs/img1.png"]})
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    config = RunConfig(manifest=str(manifest), output=str(tmp_path / "out"), model="builtin:tiny",
                       steps=2, storage_options=s3_server.storage_options)
    with pytest.raises(StorageError) as error:
        run(config)
    message = str(error.value)
    assert message.startswith("the run stopped when a task could not use storage (manifest "
                              f"{manifest}, OUTPUT {tmp_path / 'out'}); rerun to resume: "
                              "PermissionError: The request signature we calculated does not "
                              "match the signature you provided")
    assert not (tmp_path / "out" / "errors").exists() or not any(
        (tmp_path / "out" / "errors").glob("*.parquet"))


@pytest.mark.parametrize("command, failure", [
    (["run", "MANIFEST", "s3://bucket/out", "--model", "builtin:tiny"],
     "cannot prepare OUTPUT s3://bucket/out: "),
    (["inspect", "s3://bucket/out"], "cannot inspect s3://bucket/out: "),
    (["evaluate", "s3://bucket/out"], "cannot evaluate s3://bucket/out: "),
    (["manifest", "s3://bucket/images", "MANIFEST"],
     "cannot write a manifest of s3://bucket/images to "),
])
def test_unreachable_endpoint_is_one_line_from_the_cli(command, failure, monkeypatch, tmp_path,
                                                       closed_port):
    from click.testing import CliRunner

    from pipeline.cli import main

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "sdedit-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sdedit-test-secret")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    closed = closed_port
    manifest = write_manifest(tmp_path / "m.parquet", {"id": ["a"], "guide": ["a.png"]})
    arguments = [str(manifest) if word == "MANIFEST" else word for word in command]
    result = CliRunner().invoke(main, [
        *arguments, "--storage-option", f"endpoint_url=http://127.0.0.1:{closed}"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: {failure}")
    assert f"127.0.0.1:{closed}" in result.output and "Traceback" not in result.output
    assert "sdedit-test-secret" not in result.output



def test_a_storage_option_the_file_system_does_not_take_is_one_clear_error(tmp_path):
    """s3fs hands options it does not know to botocore's session, whose TypeError was a
    traceback from the driver and a task's failure from the workers."""
    from click.testing import CliRunner

    from pipeline.cli import main

    hint = "(a --storage-option this file system does not take?)"
    unknown = "TypeError: AioSession.__init__() got an unexpected keyword argument 'bogus'"
    manifest = write_manifest(tmp_path / "m.parquet",
                              {"id": ["a", "b"], "guide": ["s3://bucket/a.png", "s3://b/b.png"]})
    result = CliRunner().invoke(main, ["run", "--dry-run", str(manifest), "s3://bucket/out",
                                       "--storage-option", "bogus=1"])
    assert result.exit_code == 1, result.output
    assert result.output == f"Error: cannot read OUTPUT s3://bucket/out: {unknown} {hint}\n"
    config = RunConfig(manifest=str(manifest), output=str(tmp_path / "out"), model="builtin:tiny",
                       steps=2, storage_options={"bogus": "1"})
    with pytest.raises(StorageError) as error:  # the guides' reads, in the fetch tasks
        run(config)
    message = str(error.value)
    assert message.startswith("the run stopped when a task could not use storage")
    assert message.endswith(f"{unknown} {hint}")  # without Ray Data's advice on its retries


@pytest.mark.parametrize("command, failure", [
    (["run", "MANIFEST", "OUT", "--model", "builtin:tiny", "--steps", "2"],
     "the run stopped when a task could not use storage"),
    (["guides", "strokes", "MANIFEST", "OUT"], "cannot build synthesis guides from "),
])
def test_a_failed_task_is_one_error_line_on_the_console_not_ray_datas_traceback(
        command, failure, tmp_path):
    """Ray Data logged its traceback of the failed task (212 lines on stderr for `run`) before
    the command's own `Error:` line, and `guides` ended in a traceback of Ray's wrapper
    (`UserCodeException: UDF failed to process a data block`). The traceback stays in Ray
    Data's log file."""
    manifest = write_manifest(tmp_path / "m.parquet",
                              {"id": ["a", "b"], "guide": ["s3://bucket/a.png", "s3://b/b.png"]})
    places = {"MANIFEST": str(manifest), "OUT": str(tmp_path / "out")}
    done = subprocess.run(
        [sys.executable, "-c", "from pipeline.cli import main; main()",
         *[places.get(word, word) for word in command], "--storage-option", "bogus=1"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert lines[-1].startswith(f"Error: {failure}")
    assert lines[-1].endswith("TypeError: AioSession.__init__() got an unexpected keyword "
                              "argument 'bogus' (a --storage-option this file system does not "
                              "take?)")
    assert "Traceback" not in done.stderr and "max_map_retries" not in done.stderr
    assert len(lines) < 20, done.stderr  # the command's lines and Ray's few start-up lines


def test_two_storage_options_that_set_one_argument_are_one_clear_error(tmp_path):
    """`token` and `client_kwargs.aws_session_token` both become botocore's session token: s3fs
    passed both, and the TypeError was a traceback from the driver."""
    from click.testing import CliRunner

    from pipeline.cli import main

    manifest = write_manifest(tmp_path / "m.parquet", {"id": ["a"], "guide": ["a.png"]})
    result = CliRunner().invoke(main, [
        "run", "--dry-run", str(manifest), "s3://bucket/out", "--storage-option", "token=X",
        "--storage-option", "client_kwargs.aws_session_token=Y"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: cannot read OUTPUT s3://bucket/out: TypeError: ")
    assert result.output.endswith("got multiple values for keyword argument "
                                  "'aws_session_token' (two storage options that set one "
                                  "argument?)\n")
    assert "Traceback" not in result.output


def test_a_keyword_typo_in_the_projects_own_code_is_not_taken_for_a_storage_option():
    from tasks.images import storage_step

    def write_shard(compression=None):
        return compression

    with (pytest.raises(TypeError, match="unexpected keyword argument 'compresion'"),
          storage_step("cannot write OUTPUT")):
        write_shard(compresion="zstd")


def _forward_later(port: int, target: int, after: float) -> threading.Thread:
    """From `after` seconds on, forward loopback `port` to `target` (the store comes back)."""
    def pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def serve() -> None:
        time.sleep(after)
        listener = socket.create_server(("127.0.0.1", port))
        while True:
            client, _ = listener.accept()
            server = socket.create_connection(("127.0.0.1", target))
            for pair in ((client, server), (server, client)):
                threading.Thread(target=pump, args=pair, daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_outage_of_the_store_is_waited_out_by_commits_and_lease_reads(
        s3_server, closed_port, monkeypatch, signed_out):
    """botocore's EndpointConnectionError is no OSError: a commit gave up at its first
    attempt, and the lease read before each commit had no retry at all, so a store down for a
    few seconds stopped the whole run (botocore's own retries off here; guide reads: below)."""
    from urllib.parse import urlsplit

    import s3fs

    from pipeline.lease import Lease, _write, confirm_held
    from pipeline.writers import commit
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    bucket = s3_server.new_bucket()
    target = urlsplit(s3_server.endpoint_url).port
    store = s3fs.S3FileSystem(endpoint_url=s3_server.endpoint_url)
    lease = Lease("run1", "host", 1, 0.0, 0.0)
    _write(f"{bucket}/out", lease, s3_server.storage_options)

    down = {"endpoint_url": f"http://127.0.0.1:{closed_port}"}  # up in 2 s
    _forward_later(closed_port, target, after=2.0)
    started = time.monotonic()
    commit(f"{bucket}/out/data", "part-0a.parquet", b"shard", down)  # waits, then uploads
    assert time.monotonic() - started >= 2.0
    assert store.cat_file(f"{bucket}/out/data/part-0a.parquet") == b"shard"

    other = _closed_port()  # a second outage, for the lease read alone
    _forward_later(other, target, after=2.0)
    started = time.monotonic()
    confirm_held(f"{bucket}/out", "run1", {"endpoint_url": f"http://127.0.0.1:{other}"})
    assert time.monotonic() - started >= 2.0


def test_a_guide_read_waits_out_a_short_outage(s3_server, closed_port, monkeypatch, signed_out):
    from urllib.parse import urlsplit

    import s3fs

    from tasks.images import read_bytes

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    bucket = s3_server.new_bucket()
    s3fs.S3FileSystem(endpoint_url=s3_server.endpoint_url).pipe_file(f"{bucket}/g.png", b"g")
    _forward_later(closed_port, urlsplit(s3_server.endpoint_url).port, after=0.5)
    started = time.monotonic()
    assert read_bytes(f"{bucket}/g.png", {"endpoint_url": f"http://127.0.0.1:{closed_port}"}
                      ) == b"g"
    assert time.monotonic() - started >= 0.5
