"""`sdedit run --address`: the job on a Ray cluster started apart from the driver (`ray start
--head`, on loopback), as cluster jobs run it, and a clear error when no cluster answers. A run
that is a Ray job's entrypoint joins the job's cluster without `--address`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
from run_helpers import read_dataset, write_images, write_manifest

from pipeline.config import RunConfig
from pipeline.job import (
    JOB_ENTRYPOINT_VARIABLE,
    ClusterUnreachable,
    check_listening,
    describe_runtime,
    job_cluster,
    run,
)

pytestmark = pytest.mark.slow
START_SECONDS = 120


@pytest.fixture
def ray_head(closed_port, tmp_path):
    """GCS address of a one-node Ray cluster (2 CPUs) in its own session, stopped afterwards.
    Token authentication is off on both sides, as on a machine without a Ray token. Its files,
    and the address `ray start` records for `ray.init()` to find, stay in a temporary folder
    (short: Ray's socket paths must fit 107 bytes), not in /tmp/ray."""
    yield from start_head(closed_port, tmp_path, cpus=2)


def start_head(port: int, tmp_path, cpus: int):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    temp_dir = tempfile.mkdtemp(prefix="ray-")
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               "--port", str(port), "--num-cpus", str(cpus), "--node-ip-address", "127.0.0.1",
               "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", temp_dir]
    with open(tmp_path / "head.log", "wb") as log:
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until_listening(head, port)
        yield f"127.0.0.1:{port}", env
    finally:
        stop_node(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_node(node: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop a `ray start --block` node and every process of its session. Its own SIGTERM
    shutdown took 33 s per node here; after `grace` seconds the rest is killed. Ray's workers
    leave the node's process group but not its session, so the session is what is killed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.wait(timeout=grace)
    for pid in session_members(node.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    node.wait(timeout=60)
    deadline = time.monotonic() + 60
    while session_members(node.pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def session_members(session: int) -> list[int]:
    """Live processes of session `session` (field 6 of /proc/PID/stat)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after the command, which may hold spaces
            if int(fields[3]) == session and fields[0] != "Z":
                members.append(int(entry))
    return members


def wait_until_listening(head: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail("the Ray head did not start in time")


def sdedit_run(manifest, output, *extra: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from pipeline.cli import main; main()", "run", str(manifest),
         str(output), "--model", "builtin:tiny", "--steps", "4", "--t0", "0.3", "--t0", "0.6",
         "--batch-size", "3", "--model-batch", "3", "--progress-interval", "0", *extra],
        capture_output=True, text=True, timeout=600, env=env)


def test_a_run_on_a_ray_cluster_writes_what_a_local_run_writes(ray_head, tmp_path):
    address, env = ray_head
    names = write_images(tmp_path / "inputs", 5)
    manifest = write_manifest(tmp_path / "inputs" / "m.parquet",
                              {"id": [f"r{i}" for i in range(5)], "guide": names})
    on_cluster = sdedit_run(manifest, tmp_path / "cluster", "--address", address, env=env)
    assert on_cluster.returncode == 0, on_cluster.stderr[-3000:]
    assert '"written": 10' in on_cluster.stdout and '"reconciled": true' in on_cluster.stdout
    local = sdedit_run(manifest, tmp_path / "local")
    assert local.returncode == 0, local.stderr[-3000:]
    runtimes = [json.loads((tmp_path / name / "summary.json").read_text())["this_run"]["ray"]
                for name in ("cluster", "local")]
    assert [(r["address"] == address, r["started_by_this_run"]) for r in runtimes] == [
        (True, False), (False, True)]
    cluster_rows, local_rows = read_dataset(tmp_path / "cluster"), read_dataset(tmp_path / "local")
    assert cluster_rows.num_rows == 10
    for column in ("id", "t0", "sample", "seed", "image", "l2_to_guide"):
        assert cluster_rows[column].to_pylist() == local_rows[column].to_pylist(), column
    # The driver only disconnected: the cluster still runs and takes new work. (In a process of
    # its own: Ray keeps a process's first RAY_AUTH_MODE, which later local runtimes would use.)
    probe = subprocess.run(
        [sys.executable, "-c", f"import ray; ray.init(address={address!r}); "
         "print(ray.get(ray.remote(lambda: 'ran').remote()))"],
        capture_output=True, text=True, timeout=120, env=env)
    assert probe.stdout.split() == ["ran"], probe.stderr[-2000:]


@pytest.fixture
def ray_nodes(ray_head_without_cpus, tmp_path):
    """A three-node cluster on loopback, as on Kubernetes: a head that runs no work (0 CPUs)
    and two worker nodes of 1 CPU each, so every task and actor runs away from the driver's
    node and blocks travel between nodes."""
    address, env = ray_head_without_cpus
    workers = []
    try:
        for number in range(2):  # one at a time: two raylets starting at once on one host hang
            workers.append(start_worker(address, env, tmp_path / f"worker{number}.log",
                                        "--num-cpus", "1"))
        yield address, env
    finally:
        for worker in workers:
            stop_node(worker)


@pytest.fixture
def ray_head_without_cpus(closed_port, tmp_path):
    yield from start_head(closed_port, tmp_path, cpus=0)


def test_a_run_on_worker_nodes_away_from_the_driver_writes_what_a_local_run_writes(ray_nodes,
                                                                                   tmp_path):
    address, env = ray_nodes
    names = write_images(tmp_path / "inputs", 5)
    manifest = write_manifest(tmp_path / "inputs" / "m.parquet",
                              {"id": [f"r{i}" for i in range(5)], "guide": names})
    on_nodes = sdedit_run(manifest, tmp_path / "nodes", "--address", address, "--threads", "1",
                          "--progress-interval", "30", env=env)
    assert on_nodes.returncode == 0, on_nodes.stderr[-3000:]
    assert f"sdedit: Ray: the cluster at {address} (3 nodes, 2 CPUs, 0 GPUs)" in on_nodes.stderr
    assert "starting 1 SDEdit actor (0.5 CPU, 1 thread each)" in on_nodes.stderr
    local = sdedit_run(manifest, tmp_path / "local", "--threads", "1")
    assert local.returncode == 0, local.stderr[-3000:]
    summary = json.loads((tmp_path / "nodes" / "summary.json").read_text())
    assert summary["written"] == 10 and summary["reconciled"]
    nodes, here = read_dataset(tmp_path / "nodes"), read_dataset(tmp_path / "local")
    for column in ("id", "t0", "sample", "seed", "image", "l2_to_guide"):
        assert nodes[column].to_pylist() == here[column].to_pylist(), column


def start_worker(address: str, env: dict, log_path, *resources: str) -> subprocess.Popen:
    """A worker node joining the cluster at `address`, once `ray start` says it runs."""
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--address",
             address, "--node-ip-address", "127.0.0.1", "--disable-usage-stats", *resources],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_SECONDS
    while b"Ray runtime started" not in log_path.read_bytes():
        if worker.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the worker node did not start: {log_path.read_text()}")
        time.sleep(0.2)
    return worker


def test_a_run_waits_for_gpu_workers_that_join_after_it_starts(ray_head, tmp_path):
    """GPU workers that scale from zero join after the driver starts: with --wait-for-gpus the
    run asks the autoscaler and waits for them instead of refusing the cluster (it got CPU
    actors by default, or a refusal with --gpus-per-actor). Ray is told the new node has a
    GPU; the actor asks for it and runs on this machine's CPU."""
    address, env = ray_head
    names = write_images(tmp_path / "inputs", 3)
    manifest = write_manifest(tmp_path / "inputs" / "m.parquet",
                              {"id": [f"r{i}" for i in range(3)], "guide": names})
    gpu = ["--address", address, "--gpus-per-actor", "1", "--cpus-per-actor", "0.25"]
    refused = sdedit_run(manifest, tmp_path / "refused", *gpu, "--wait-for-gpus", "1", env=env)
    assert refused.returncode == 1
    assert "the Ray cluster has no GPUs (none joined in --wait-for-gpus 1 s)" in refused.stderr
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        waiting = subprocess.Popen(
            [sys.executable, "-c", "from pipeline.cli import main; main()", "run",
             str(manifest), str(tmp_path / "out"), "--model", "builtin:tiny", "--steps", "2",
             "--batch-size", "3", "--model-batch", "3", *gpu, "--wait-for-gpus", "300"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    worker = None
    try:
        deadline = time.monotonic() + START_SECONDS
        while b"no GPU in the Ray cluster yet: asked its autoscaler for 1" not in \
                log_path.read_bytes():
            if waiting.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the run did not wait: {log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        worker = start_worker(address, env, tmp_path / "worker.log", "--num-cpus", "1",
                              "--num-gpus", "1")
        assert waiting.wait(timeout=600) == 0, log_path.read_text()[-3000:]
    finally:
        if waiting.poll() is None:
            waiting.kill()
        if worker is not None:
            stop_node(worker)
    text = log_path.read_text()
    assert "GPU(s) joined after" in text
    assert "starting 1 SDEdit actor (1 GPU, 0.25 CPU each)" in text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["written"], summary["this_run"]["ray"]["gpus"]) == (3, 1.0)


def job_environment(address: str, env: dict | None = None) -> dict:
    """What Ray's job supervisor gives a job's entrypoint (`ray job submit -- sdedit run ...`):
    the cluster's GCS address in RAY_ADDRESS and the job's config."""
    return {**(env or os.environ), "RAY_ADDRESS": address,
            JOB_ENTRYPOINT_VARIABLE: json.dumps({"runtime_env": {}, "metadata": {}})}


def test_a_ray_job_entrypoint_joins_the_jobs_cluster_without_address(ray_head, tmp_path):
    address, env = ray_head
    names = write_images(tmp_path / "inputs", 2)
    manifest = write_manifest(tmp_path / "inputs" / "m.parquet", {"id": ["a", "b"],
                                                                  "guide": names})
    result = sdedit_run(manifest, tmp_path / "out", "--progress-interval", "30",
                        env=job_environment(address, env))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"sdedit: Ray: the cluster at {address} (1 node, 2 CPUs, 0 GPUs)" in result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["this_run"]["ray"] == {"address": address, "started_by_this_run": False,
                                          "nodes": 1, "cpus": 2.0, "gpus": 0.0}
    assert summary["written"] == 4 and summary["reconciled"]


def test_only_a_ray_job_entrypoint_follows_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")  # as for `ray job submit`
    monkeypatch.delenv(JOB_ENTRYPOINT_VARIABLE, raising=False)
    assert job_cluster() is None
    monkeypatch.setenv(JOB_ENTRYPOINT_VARIABLE, "{}")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert job_cluster() == "10.0.0.2:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert job_cluster() == "auto"


def test_the_runtime_is_described_as_local_or_as_the_cluster():
    local = {"address": "127.0.0.1:6379", "started_by_this_run": True, "nodes": 1, "cpus": 2.0,
             "gpus": 0.0}
    assert describe_runtime(local) == ("Ray: a local runtime started for this run (1 node, "
                                       "2 CPUs, 0 GPUs)")
    cluster = {**local, "address": "10.0.0.2:6379", "started_by_this_run": False, "nodes": 3,
               "cpus": 48.0, "gpus": 1.0}
    assert describe_runtime(cluster) == ("Ray: the cluster at 10.0.0.2:6379 (3 nodes, 48 CPUs, "
                                         "1 GPU)")


def test_a_job_whose_cluster_does_not_answer_names_ray_address(closed_port, tmp_path,
                                                               monkeypatch):
    names = write_images(tmp_path / "inputs", 1)
    manifest = write_manifest(tmp_path / "inputs" / "m.parquet", {"id": ["a"], "guide": names})
    address = f"127.0.0.1:{closed_port}"
    for name, value in job_environment(address, {}).items():
        monkeypatch.setenv(name, value)
    config = RunConfig(manifest=str(manifest), output=str(tmp_path / "out"),
                       model="builtin:tiny", steps=2)
    with pytest.raises(ClusterUnreachable, match=rf"^cannot join the Ray cluster at {address} "
                                                 r"\(RAY_ADDRESS of this Ray job\): "):
        run(config)
    assert not ray.is_initialized()


def test_a_cluster_that_does_not_answer_is_one_clear_error(closed_port, tmp_path):
    names = write_images(tmp_path / "inputs", 1)
    manifest = write_manifest(tmp_path / "inputs" / "m.parquet", {"id": ["a"], "guide": names})
    address = f"127.0.0.1:{closed_port}"
    config = RunConfig(manifest=str(manifest), output=str(tmp_path / "out"),
                       model="builtin:tiny", steps=2, address=address)
    with pytest.raises(ClusterUnreachable) as error:
        run(config)
    assert str(error.value).startswith(
        f"cannot join the Ray cluster at {address} (--address): ConnectionError: nothing "
        f"accepts connections at {address}: [Errno 111] Connection refused. Is it running "
        f"(`ray status --address {address}`)?")
    assert not ray.is_initialized()


def test_the_address_check_sees_listeners_and_passes_what_it_cannot_probe(closed_port):
    with socket.socket(socket.AF_INET6) as v6, socket.socket() as v4:
        v6.bind(("::1", 0))
        v4.bind(("127.0.0.1", 0))
        v6.listen()
        v4.listen()
        check_listening(f"[::1]:{v6.getsockname()[1]}")
        check_listening(f"127.0.0.1:{v4.getsockname()[1]}")
    for unprobed in ("auto", "ray://127.0.0.1:1", "head-without-port"):
        check_listening(unprobed)
    with pytest.raises(ConnectionError, match=f"^nothing accepts connections at 127.0.0.1:"
                                              f"{closed_port}: "):
        check_listening(f"127.0.0.1:{closed_port}")


def test_an_address_that_answers_http_is_taken_for_the_dashboard_not_a_cluster():
    """The dashboard's port (8265, what `ray job submit` takes) as --address: Ray logged
    "Failed to get cluster ID from GCS server: TimedOut" for minutes (463 s until Ctrl-C)."""
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ConnectionError) as error:
            check_listening(address)
    finally:
        server.shutdown()
        server.server_close()
    assert str(error.value) == (
        f"{address} answers HTTP, as Ray's dashboard does (port 8265 by default), not as Ray's "
        "GCS: --address takes the address `ray start --head` prints (port 6379 by default); "
        "the dashboard's is for `ray job submit`")
