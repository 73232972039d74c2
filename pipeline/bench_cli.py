"""`sdedit bench`: model-only throughput against end-to-end pipeline throughput, same settings.

Model-only: decoded guides already in memory, `sdedit.edit` in chunks of `--model-batch` with
per-sample generators, exactly as the actor calls it, in as many processes as `--actors`, each with
an actor's threads (the machine's cores shared among them) used as the actor uses them: on a CPU,
that many chunks at once on one torch thread each, as many as memory holds
(`pipeline.actor.workers_for`). End to end:
`sdedit run` on the same images written as PNG files plus a manifest, from reading the manifest to
committed shards (actor start-up included). Model-only runs before and after the pipeline and the
two are averaged, because other work on the machine changes its speed. The ratio says how much the
CPU stages and scheduling cost. The run's time is split into start-up (pipeline start to the first
edit: Ray workers, actor imports and model load, first fetch), editing and drain (last edit to the
end); `steady_state_ratio` compares the editing window alone with model-only, which is what CPU
stages that keep the actors fed should reach. `actor_start_seconds` is what no scheduling can
remove from start-up: a fresh process with Ray imported (as Ray's prestarted workers are) importing
Ray Data and building the actor (torch, diffusers, model), on a quiet machine; `best_case_ratio` is
the ratio the run would reach if that were its only overhead. One run's ratio moves by several
points with this machine's load: `--repeat N` makes N runs, each on a new Ray runtime (as every
`sdedit run` without `--address` starts one), with model-only measured before, between and after
them, and reports every ratio and their median.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

POSITIVE = click.IntRange(min=1)


class UnitInterval(click.FloatRange):
    """A t0 in (0, 1]: click's FloatRange lets NaN through (every comparison with it is false),
    which the sampler then refused with a traceback after the benchmark had started."""

    def __init__(self) -> None:
        super().__init__(0, 1, min_open=True)

    def convert(self, value, param, ctx) -> float:
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{number} is not in the range 0<x<=1.", param, ctx)
        return number


def check_out(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--out's folder, made now if missing: a file in the way or a folder that cannot be made
    or written is refused before the benchmark runs, not after it."""
    if value is None:
        return None
    from tasks.cli import nearest_existing

    folder = Path(value).absolute().parent
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise click.BadParameter(f"{value}: {existing} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = f"{value}: cannot make folder {folder}: {error.strerror}"
        raise click.BadParameter(reason) from error
    if not os.access(folder, os.W_OK):
        raise click.BadParameter(f"{value}: folder {folder} is not writable")
    return value


@click.command()
@click.option("--model", default="builtin:tiny", show_default=True)
@click.option("--images", "count", default=256, show_default=True, type=POSITIVE,
              help="Images to edit.")
@click.option("--size", default=64, show_default=True, type=POSITIVE,
              help="Generated image side (pixels).")
@click.option("--t0", default=0.5, show_default=True, type=UnitInterval())
@click.option("--steps", default=20, show_default=True, type=POSITIVE)
@click.option("--batch-size", default=32, show_default=True, type=POSITIVE,
              help="Rows per actor call.")
@click.option("--model-batch", default=32, show_default=True, type=POSITIVE,
              help="Samples per model call.")
@click.option("--actors", default=1, show_default=True, type=POSITIVE,
              help="SDEdit actors of the pipeline, each with the cores over N threads; "
                   "model-only runs as many processes at once.")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "float16", "bfloat16"]),
              help="The network's dtype, for model-only and the pipeline alike.")
@click.option("--compile", is_flag=True,
              help="torch.compile the network (model-only compiles before timing; the "
                   "pipeline's start-up includes the compile).")
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep inputs/outputs here.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), callback=check_out,
              help="Also write the JSON result to this file (its folder is made if missing).")
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(min=1),
              help="Pipeline runs, each on a new Ray runtime; prints each ratio and the median.")
def bench(model: str, count: int, size: int, t0: float, steps: int, batch_size: int,
          model_batch: int, actors: int, dtype: str, compile: bool, workdir: str | None,
          out_path: str | None, repeat: int) -> None:
    """Print model-only and end-to-end images/s on --images generated images, and their ratio."""
    with tempfile.TemporaryDirectory(prefix="sdedit-bench-") as scratch:
        root = Path(workdir or scratch)
        manifest = write_inputs(root / "inputs", count, size)
        measure = (root / "inputs", model, count, t0, steps, model_batch, actors, dtype, compile)
        actor_start = actor_start_seconds(model, steps, model_batch, actors, dtype, compile)
        model_runs, runs = [model_throughput(*measure)], []
        for _ in range(repeat):
            pipeline = pipeline_throughput(manifest, root / "output", model, t0, steps,
                                           batch_size, model_batch, actors, dtype, compile)
            model_runs.append(model_throughput(*measure))
            runs.append(compare(pipeline, model_runs[-2], model_runs[-1]))
    result = {"images": count, "size": size, "t0": t0, "steps": steps, "model": model,
              "dtype": dtype, "compile": compile, "runs": runs,
              "ratios": [run["ratio"] for run in runs],
              "ratio": median(run["ratio"] for run in runs),
              "steady_state_ratio": median(run["steady_state_ratio"] for run in runs
                                           if run["steady_state_ratio"] is not None),
              "actor_start_seconds": actor_start,
              "best_case_ratio": best_case_ratio(count, median(model_runs), actor_start)}
    click.echo(json.dumps(result, indent=2))
    if out_path:
        Path(out_path).write_text(json.dumps(result, indent=2) + "\n")


def compare(pipeline: dict, before: float, after: float) -> dict:
    """One pipeline run against model-only measured just before and just after it (averaged:
    other work on the machine changes its speed)."""
    model_only = (before + after) / 2
    return {"model_only_images_per_s": round(model_only, 3),
            "model_only_before_after": [round(before, 3), round(after, 3)], **pipeline,
            "ratio": round(pipeline["pipeline_images_per_s"] / model_only, 3),
            "steady_state_ratio": steady_state_ratio(pipeline, model_only)}


def median(values) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    middle = len(ordered) // 2
    return round(ordered[middle] if len(ordered) % 2 else
                 (ordered[middle - 1] + ordered[middle]) / 2, 3)


def steady_state_ratio(pipeline: dict, model_only: float) -> float | None:
    """Images/s over the window in which the actors edit (first edit start to last edit end,
    i.e. without actor start-up and the final write), over model-only images/s."""
    if not pipeline.get("editing_seconds"):
        return None
    return round(pipeline["written"] / pipeline["editing_seconds"] / model_only, 3)


def best_case_ratio(count: int, model_only: float, actor_start: float) -> float:
    """The ratio of a run whose only overhead is the actor's own start-up: model time over
    model time plus `actor_start` seconds."""
    model_seconds = count / model_only
    return round(model_seconds / (model_seconds + actor_start), 3)


def actor_start_seconds(model: str, steps: int, model_batch: int, actors: int,
                        dtype: str = "float32", compile: bool = False) -> float:
    """Seconds a fresh process with Ray already imported takes to import Ray Data and build the
    SDEdit actor as the pipeline does (torch, diffusers, model load; a compile happens later,
    on the first batch)."""
    settings = dict(model=model, steps=steps, model_batch=model_batch, actors=actors,
                    dtype=dtype, compile=compile)
    code = "from pipeline.bench_cli import _time_actor_start; _time_actor_start()"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(settings)],
                          capture_output=True, text=True)
    if done.returncode:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise click.ClickException(f"the actor could not start for {model}: {reason}")
    return round(float(done.stdout.split()[-1]), 3)


def _time_actor_start() -> None:
    import ray  # noqa: F401  (a Ray worker has it before it is given the actor)

    settings = json.loads(sys.argv[1])
    started = time.perf_counter()
    import ray.data  # noqa: F401  (Ray Data's actor wrapper imports it)

    from pipeline.actor import SDEditActor

    SDEditActor(settings["model"], settings["dtype"], {}, settings["model_batch"],
                settings["steps"], threads=actor_threads(settings["actors"]),
                compile=settings["compile"])
    print(time.perf_counter() - started)


def actor_threads(actors: int) -> int:
    """Threads of each of `actors` CPU actors sharing this machine's cores."""
    return max(1, (os.cpu_count() or 1) // actors)


def write_inputs(folder: Path, count: int, size: int) -> Path:
    """`count` smooth random PNG images and a manifest pointing at them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for index in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC).save(
            folder / f"{index:05d}.png")
        names.append(f"{index:05d}.png")
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.table({"id": [n[:-4] for n in names], "guide": names}), manifest)
    return manifest


def model_throughput(folder: Path, model: str, count: int, t0: float, steps: int,
                     model_batch: int, actors: int, dtype: str = "float32",
                     compile: bool = False) -> float:
    """Images/s through `sdedit.edit` alone in `actors` processes at once, as many as the
    pipeline's actors and with their threads (chunk workers on a CPU), the chunks of
    `--model-batch` dealt out among them: the images over the time from the first process's
    start to the last one's end. Each process loads the model and decodes its guides (and
    compiles, on an untimed chunk) before all are told to start."""
    code = "from pipeline.bench_cli import _model_only_process; _model_only_process()"
    processes = []
    for share in dealt(count, model_batch, actors):
        settings = dict(folder=str(folder), model=model, t0=t0, steps=steps, dtype=dtype,
                        compile=compile, threads=actor_threads(actors), chunks=share)
        processes.append(subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(settings)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        ready = [process.stdout.readline().strip() == "ready" for process in processes]
        for process in processes if all(ready) else ():
            process.stdin.write("go\n")
            process.stdin.flush()
        outputs = [process.communicate() for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, ok, (_, errors) in zip(processes, ready, outputs, strict=True):
        if not ok or process.returncode:
            reason = (errors.strip().splitlines() or ["no output"])[-1]
            raise click.ClickException(f"model-only could not run {model}: {reason}")
    spans = [[float(value) for value in out.split()] for out, _ in outputs]
    return count / (max(end for _, end in spans) - min(start for start, _ in spans))


def dealt(count: int, model_batch: int, processes: int) -> list[list[list[int]]]:
    """Images 0..count-1 in chunks of `model_batch`, dealt out in turn to `processes`."""
    chunks = [list(range(first, min(first + model_batch, count)))
              for first in range(0, count, model_batch)]
    return [chunks[index::processes] for index in range(processes)]


def _model_only_process() -> None:
    """One model-only process: load, decode its guides, print `ready`, wait for `go` on stdin,
    edit its chunks and print its start and end on the machine's monotonic clock."""
    import torch

    import sdedit
    from pipeline.actor import prefer_deterministic_cuda, to_tensor, workers_for
    from pipeline.fetch import prepare

    settings = json.loads(sys.argv[1])
    if torch.cuda.is_available():
        prefer_deterministic_cuda()  # as the actor does, so both use the same kernels
    prior = sdedit.load(settings["model"], dtype=settings["dtype"], compile=settings["compile"])
    model_batch = len(settings["chunks"][0]) if settings["chunks"] else 1
    workers = workers_for(prior, settings["threads"], model_batch, settings["compile"],
                          report=lambda line: print(line, file=sys.stderr))  # as the actor
    folder = Path(settings["folder"])
    guides = {i: prepare(str(folder / f"{i:05d}.png"), None, prior.resolution, {}, 10**9)[0]
              for chunk in settings["chunks"] for i in chunk}

    def edit(chunk: list[int]) -> None:
        guide = to_tensor([guides[i] for i in chunk], prior.resolution, 3).to(prior.device)
        generators = sdedit.generators(chunk)  # on the CPU, as the actor
        prior.edit(guide, t0=settings["t0"], steps=settings["steps"], generator=generators)

    if settings["compile"] and settings["chunks"]:
        edit(settings["chunks"][0])
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    started = time.monotonic()
    if workers is None:
        for chunk in settings["chunks"]:
            edit(chunk)
    else:  # the actor's chunk workers: model batches at once, one torch thread each
        list(workers.map(edit, settings["chunks"]))
    if prior.device.type == "cuda":
        torch.cuda.synchronize()
    print(started, time.monotonic(), flush=True)


def pipeline_throughput(manifest: Path, output: Path, model: str, t0: float, steps: int,
                        batch_size: int, model_batch: int, actors: int,
                        dtype: str = "float32", compile: bool = False) -> dict:
    """Images/s of a full `sdedit run` on a new local Ray runtime, shut down after it (Ray
    start excluded, actor start-up included)."""
    import ray

    from pipeline.config import RunConfig
    from pipeline.job import init_ray, run

    config = RunConfig(manifest=str(manifest), output=str(output), model=model, t0=(t0,),
                       steps=steps, batch_size=batch_size, model_batch=model_batch,
                       actors=(actors, actors), rows_per_shard=max(batch_size, 64),
                       dtype=dtype, compile=compile, overwrite=True)
    started_ray = init_ray(None)
    try:
        summary = run(config)
    finally:
        if started_ray:
            ray.shutdown()
    run_stats = summary["this_run"]
    return {
        "pipeline_images_per_s": run_stats["images_per_second"],
        "pipeline_seconds": run_stats["pipeline_seconds"],
        "run_wall_seconds": summary["timings"]["wall_seconds"],
        "actor_images_per_s": round(run_stats["written"] / run_stats["actor_edit_seconds"], 3),
        **{name: run_stats.get(name) for name in
           ("startup_seconds", "editing_seconds", "drain_seconds")},
        "written": summary["written"],
    }
