"""Actor counts on a cluster with GPUs: one actor per GPU unless told otherwise. Ray is given
two logical GPUs on this CPU machine; the actors ask for them and run on the CPU."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from run_helpers import read_dataset, write_images, write_manifest

from pipeline.config import RunConfig
from pipeline.job import actor_remote_args, actor_resources, describe_actors, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_two_gpus():
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
             object_store_memory=256 * 1024**2, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


def sdedit_actors() -> int:
    """SDEdit actors this Ray runtime has started (alive or finished)."""
    from ray._private import state  # the public state API needs the dashboard

    return sum("SDEditActor" in actor["ActorClassName"] for actor in state.actors().values())


def config(**overrides) -> RunConfig:
    return RunConfig(**{"manifest": "m", "output": "o", **overrides})


def test_the_default_is_one_actor_per_gpu(ray_two_gpus, tmp_path):
    names = write_images(tmp_path / "inputs", 8)
    manifest = write_manifest(tmp_path / "inputs" / "m.parquet",
                              {"id": [f"r{i}" for i in range(8)], "guide": names})
    summary = run(RunConfig(manifest=str(manifest), output=str(tmp_path / "out"),
                            model="builtin:tiny", steps=2, t0=(0.5,), batch_size=2,
                            model_batch=2, cpus_per_actor=0.25))
    assert (summary["written"], summary["this_run"]["actors"]) == (8, [2, 2])
    assert sdedit_actors() == 2
    assert read_dataset(tmp_path / "out")["id"].to_pylist() == [f"r{i}" for i in range(8)]


def test_gpus_per_actor_and_explicit_counts_decide_the_pool(ray_two_gpus):
    assert actor_resources(config()) == (1.0, 1.0, None, (2, 2))
    assert actor_resources(config(gpus_per_actor=0.5)) == (0.5, 1.0, None, (4, 4))
    assert actor_resources(config(gpus_per_actor=2.0)).actors == (1, 1)
    assert actor_resources(config(actors=(1, 3))).actors == (1, 3)
    assert actor_resources(config(gpus_per_actor=0.0)) == (0.0, 0.5, 2, (1, 1))  # CPU actors


def test_the_progress_line_names_the_pool(ray_two_gpus):
    assert describe_actors(actor_resources(config())) == "2 SDEdit actors (1 GPU, 1 CPU each)"
    assert describe_actors(actor_resources(config(gpus_per_actor=0.0, actors=(1, 4)))) == (
        "1-4 SDEdit actors (0.5 CPU, 1 thread each)")
    assert describe_actors(actor_resources(config(gpus_per_actor=0.0))) == (
        "1 SDEdit actor (0.5 CPU, 2 threads each)")


def test_a_one_cpu_gpu_actor_leaves_the_cpu_to_rays_default(ray_two_gpus):
    # this Ray reserves 1 CPU for a GPU map step that names none (ray-project/ray#66202)
    at_drivers_niceness = {"runtime_env": {"env_vars": {"RAY_worker_niceness": "0"}}}
    assert actor_remote_args(actor_resources(config())) == {
        "num_gpus": 1.0, **at_drivers_niceness}
    assert actor_remote_args(actor_resources(config(cpus_per_actor=0.25))) == {
        "num_gpus": 1.0, "num_cpus": 0.25, **at_drivers_niceness}
    assert actor_remote_args(actor_resources(config(gpus_per_actor=0.0))) == {
        "num_gpus": 0.0, "num_cpus": 0.5, **at_drivers_niceness}


def test_actors_run_at_the_drivers_niceness_and_cpu_steps_at_rays(ray_two_gpus):
    """Ray starts workers at niceness 15: the driver and Ray's own processes preempted a CPU
    actor whenever they woke, and its torch threads waited for the one preempted."""
    import ray

    def niceness(batch: dict) -> dict:  # local: Ray's workers cannot import a test module
        return {"niceness": np.full(len(batch["id"]), os.nice(0))}

    class Niceness:
        def __call__(self, batch: dict) -> dict:
            return niceness(batch)

    args = actor_remote_args(actor_resources(config(gpus_per_actor=0.0)))
    actors = ray.data.range(4, override_num_blocks=2).map_batches(
        Niceness, compute=ray.data.ActorPoolStrategy(size=1), **args)
    steps = ray.data.range(4, override_num_blocks=2).map_batches(niceness, num_cpus=0.25)
    driver = os.nice(0)
    assert {row["niceness"] for row in actors.take_all()} == {driver}
    assert min(row["niceness"] for row in steps.take_all()) > driver


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_gpu_run_has_no_experimental_resources_warning(ray_two_gpus, tmp_path):
    names = write_images(tmp_path / "inputs", 4)
    manifest = write_manifest(tmp_path / "inputs" / "m.parquet",
                              {"id": [f"r{i}" for i in range(4)], "guide": names})
    logger = logging.getLogger("ray.data._internal.execution.operators.map_operator")
    handler = Lines()
    logger.addHandler(handler)
    try:
        summary = run(RunConfig(manifest=str(manifest), output=str(tmp_path / "out"),
                                model="builtin:tiny", steps=2, t0=(0.5,), batch_size=2,
                                model_batch=2, actors=(1, 1)))
    finally:
        logger.removeHandler(handler)
    assert (summary["written"], summary["this_run"]["actors"]) == (4, [1, 1])
    assert not [line for line in handler.lines if "num_cpus and num_gpus" in line]
