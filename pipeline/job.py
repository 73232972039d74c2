"""The `sdedit run` job as a recipe: plan on the driver, stream the work through Ray Data.

    manifest files -> read + expand to (id, t0, sample) minus committed keys   (CPU tasks)
                   -> fetch + decode guide and mask at the model resolution     (CPU tasks)
                   -> SDEdit                                                   (actor pool)
                   -> encode + commit digest-named shards                      (CPU tasks)
    then: recount what OUTPUT holds and write OUTPUT/summary.json.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import metadata
from typing import NamedTuple

import pyarrow as pa

from pipeline.config import ConfigError, RunConfig
from pipeline.lease import LeaseLostError, holding, live_holder
from pipeline.manifest import (
    ManifestError,
    ManifestFiles,
    Plan,
    TaskDefaults,
    count_work,
    defaults_in_play,
    duplicate_ids,
    find_files,
    in_manifest,
    new_columns,
    own_t0,
    read_plan_columns,
    shared_key_errors,
    shared_key_guides,
    shared_keys,
    stale_shared_key_errors,
    superseded_errors,
    typed_as_shards,
    undeciding,
)
from pipeline.progress import Progress, Report, quiet, ray_data_errors_held, ray_data_progress
from pipeline.resume import (
    SUMMARY,
    Committed,
    claim_output,
    clean_temporaries,
    forget_error_rows,
    forget_errors,
    read_committed,
    record_manifest,
    recorded,
    refuse_foreign_files,
    shard_schema,
    write_index,
)
from pipeline.writers import DATA_COLUMNS
from tasks.images import options_for, storage_step

CPU_STEP = 0.25  # CPU reserved by each fetch/encode task: small, so they never starve actors
CPU_READ = 0.2  # differs from CPU_STEP so Ray keeps reading and fetching in separate tasks
# Ray starts its workers at niceness 15, so the driver, the raylet and Ray's agents (at 0)
# preempt an actor whenever they wake (measured when a CPU actor's torch threads then waited for
# the one preempted). The actors run at the driver's niceness instead, as Ray's job supervisor runs
# itself; the CPU steps keep Ray's and so yield to them. `sdedit bench` 256 images, three
# interleaved pairs on 2 CPUs: 3.73-3.85 against 3.27-3.87 images/s, start-up 6.3-6.8 s
# against 7.3-8.1 s. A job's own runtime_env is merged with this one (env_vars add up).
ACTOR_RUNTIME_ENV = {"env_vars": {"RAY_worker_niceness": "0"}}
JOB_ENTRYPOINT_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # Ray's job supervisor sets it
GPU_POLL_SECONDS = 2.0  # how often --wait-for-gpus looks at the cluster's resources
PACKAGES = ("sdedit-pipeline", "torch", "diffusers", "ray", "pyarrow", "fsspec", "s3fs",
            "pillow", "numpy")


class ErrorRateExceeded(RuntimeError):
    """More outputs failed than --max-error-rate allows; everything possible was written, and
    `summary` says what (as summary.json)."""

    def __init__(self, message: str, summary: Mapping) -> None:
        super().__init__(message)
        self.summary = summary


class ClusterUnreachable(RuntimeError):
    """`--address` names a Ray cluster this driver cannot join."""


class ActorResources(NamedTuple):
    """What each SDEdit actor asks of Ray, and how many of them (min, max)."""

    gpus: float
    cpus: float
    threads: int | None  # CPU actors' threads (`pipeline.actor.chunk_workers`); None: torch's
    actors: tuple[int, int]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    digest: str
    resolution: int
    config_digest: str | None = None


def run(config: RunConfig, report: Report = quiet) -> dict:
    """Run (or resume) a job; returns the summary also written to OUTPUT/summary.json.
    `report` receives progress lines (the CLI prints them on stderr). OUTPUT is leased to this
    run from before it is touched until the summary is written (`pipeline.lease`)."""
    started = time.time()
    manifest, plan_columns, plan, model = plan_job(config)
    with holding(config.output, config.storage_options, report, config.wait_for_output) as lease:
        manifest, retried, committed = open_output(config, manifest, plan_columns, plan, model,
                                                   report)
        outside = outside_manifest(plan_columns, plan, committed)
        superseded = Committed(failed=committed.failed.filter(pa.array(superseded_errors(
            plan_columns, plan, committed.written, committed.failed))))
        rows = plan_columns.num_rows
        keys = committed.keys  # one copy of every committed key for both counts
        expected, todo = count_work(plan_columns, plan, keys)
        shared = add_shared_key_errors(config, manifest, plan_columns, plan, keys, report)
        del keys
        note = task_note(config, plan_columns)
        del plan_columns  # O(manifest rows), and only the counts are needed while the job runs
        if note:
            report(note)
        report(f"{rows:,} manifest rows make {expected:,} outputs: {todo + shared:,} to do, "
               f"{expected - todo - shared:,} already in {config.output}")
        pipeline_started = time.time()
        progress = Progress(todo + shared, report, config.progress_interval)
        progress.settle(shared)  # the driver's error rows, committed above
        stopped = (f"the run stopped when a task could not use storage (manifest "
                   f"{config.manifest}, OUTPUT {config.output}); rerun to resume")
        with storage_step(stopped), as_raised(LeaseLostError, ManifestError):
            stats = {**(execute(config, manifest, plan, committed, model, progress, lease.run)
                        if todo else {}), "retried_errors": retried,
                     "written": progress.written, "failed": progress.failed}
        finished = time.time()
        del committed  # the recount reads OUTPUT afresh; do not hold two copies of every key
        summary = close_output(config, model, (rows, expected, todo + shared),
                               (outside, superseded), stats, (started, pipeline_started, finished))
    check_error_rate(config, summary)
    return summary


@contextmanager
def as_raised(*kinds: type[Exception]) -> Iterator[None]:
    """Re-raise a Ray task's error of one of `kinds` (errors whose message is one line) as that
    error alone, not Ray's wrapper of it with the task's traceback and Ray Data's retry advice
    after the line: a run that lost OUTPUT (LeaseLostError), a damaged manifest file a read
    task meets (ManifestError; 36 lines before). The dataset raises its tasks' original errors
    (`raise_original_map_exception`) under Ray's wrapper type."""
    try:
        yield
    except Exception as error:
        cause = getattr(error, "cause", None)  # a Ray task's error wraps the original
        if isinstance(cause, kinds):
            raise type(cause)(str(cause).splitlines()[0]) from None
        raise


def add_shared_key_errors(config: RunConfig, manifest: ManifestFiles, plan_columns: pa.Table,
                          plan: Plan, committed: pa.Table, report: Report) -> int:
    """Commit, as one error shard, the error rows still missing for manifest rows that repeat
    an id or have none (`shared_key_errors`: no worker can tell such rows apart), given the
    committed keys; how many."""
    from pipeline.writers import ERRORS_DIR, ParquetShardWriter, commit

    if not shared_keys(plan_columns["id"], plan).any():
        return 0
    with storage_step(f"cannot read manifest {config.manifest}"):
        guides = shared_key_guides(manifest, plan, config.storage_options)
    errors, name = shared_key_errors(plan_columns, plan, committed, guides)
    if errors.num_rows:
        folder = f"{config.output.rstrip('/')}/{ERRORS_DIR}"
        with storage_step(f"cannot write error rows to OUTPUT {config.output}"):
            commit(folder, name, ParquetShardWriter(folder, config.storage_options
                                                    ).serialise(errors), config.storage_options)
        report(f"{errors.num_rows:,} outputs of manifest rows that repeat an id or have none "
               f"are error rows (stage validate) in {folder}")
    return errors.num_rows


def outside_manifest(plan_columns: pa.Table, plan: Plan, committed: Committed) -> Committed:
    """What OUTPUT holds for keys the manifest does not make (rows removed from it, t0 values
    a row no longer lists): kept, but not counted as the manifest's outputs or errors."""
    written = in_manifest(plan_columns, plan, committed.written)
    failed = in_manifest(plan_columns, plan, committed.failed)
    return Committed(committed.written.filter(pa.array(~written)),
                     committed.failed.filter(pa.array(~failed)))


def check_error_rate(config: RunConfig, summary: Mapping) -> None:
    """ErrorRateExceeded when more of this run's outputs failed than --max-error-rate allows.
    A run answers for the work it did: judged by all OUTPUT held, a nightly job passed a night
    whose every output failed (earlier nights' outputs diluted it) and, after one bad night,
    failed every night that had nothing to do."""
    run = summary["this_run"]
    todo, failed = run["todo"], run["errors"]
    if todo and failed > config.max_error_rate * todo:
        raise ErrorRateExceeded(
            f"{failed} of the {todo} outputs this run made failed (rate {failed / todo:.3f} > "
            f"--max-error-rate {config.max_error_rate}; OUTPUT holds {summary['errors']} "
            f"failed of {summary['expected_outputs']}); see "
            f"{config.output.rstrip('/')}/errors/", summary)


def preview(config: RunConfig) -> dict:
    """What `run` would do now, without starting Ray or changing OUTPUT: the counts, the model,
    whether OUTPUT accepts this configuration (ConfigMismatchError if it does not) and which
    live run holds it, if any (`run` would refuse to start)."""
    manifest, plan_columns, plan, model = plan_job(config)
    with storage_step(f"cannot read OUTPUT {config.output}"):
        refuse_foreign_files(config.output, config.storage_options)
        if config.overwrite:
            committed, retried = Committed(), 0
        else:  # refused as `run` would refuse it, then read as `run` would find it
            recorded(config.output, config.output_record(model.digest, model.config_digest),
                     config.storage_options, defaults_in_play(plan), undeciding(plan))
            typed_as_output(config, manifest)
            committed, retried = read_committed(config.output, config.format,
                                                config.storage_options
                                                ).without_failures(config.retry_errors)
            committed, stale = stale_errors(plan_columns, plan, committed)  # as `run` forgets
            retried += stale.num_rows
        now = time.time()
        holder = live_holder(config.output, config.storage_options, now)
    keys = committed.keys
    expected, todo = count_work(plan_columns, plan, keys)
    todo += shared_key_errors(plan_columns, plan, keys)[0].num_rows
    return {"manifest_rows": plan_columns.num_rows, "task_note": task_note(config, plan_columns),
            "expected_outputs": expected, "todo": todo,
            "already_committed": expected - todo, "errors_to_retry": retried,
            "model": {"name": model.name, "digest": model.digest,
                      "resolution": model.resolution},
            "output": config.output, "overwrite": config.overwrite,
            "in_use_by": holder.describe(now) if holder else None}


def plan_job(config: RunConfig) -> tuple[ManifestFiles, pa.Table, Plan, ModelInfo]:
    """Read the manifest's plan columns and the model's description on the driver."""
    with storage_step(f"cannot read manifest {config.manifest}"):
        manifest = find_files(config.manifest, config.storage_options)
        plan_columns = read_plan_columns(manifest, config.storage_options)
    plan = make_plan(config, manifest, plan_columns)
    with storage_step(f"cannot read model {config.model}"):
        model = probe_model(config)
    return manifest, plan_columns, plan, model


def open_output(config: RunConfig, manifest: ManifestFiles, plan_columns: pa.Table, plan: Plan,
                model: ModelInfo, report: Report = quiet) -> tuple[ManifestFiles, int, Committed]:
    """Claim OUTPUT for this configuration, remove what killed runs left, type the manifest's
    pass-through columns as OUTPUT's shards hold them, turn committed failures of the
    --retry-errors stages, and those of ids that fewer rows share now (`stale_errors`), back
    into work; (manifest, failures retried, committed keys)."""
    with storage_step(f"cannot prepare OUTPUT {config.output}"):
        claim_output(config.output, config.output_record(model.digest, model.config_digest),
                     config.overwrite, config.storage_options, defaults_in_play(plan),
                     undeciding(plan))
        record_manifest(config.output, config.manifest, config.storage_options)
        clean_temporaries(config.output, config.storage_options)
        manifest = typed_as_output(config, manifest, report)
        retried = forget_errors(config.output, config.retry_errors, config.storage_options)
        committed = read_committed(config.output, config.format, config.storage_options)
        stale = stale_errors(plan_columns, plan, committed)[1]
        if stale.num_rows:
            forget_error_rows(config.output, stale, config.storage_options)
            report(f"{stale.num_rows:,} error row(s) of ids that fewer manifest rows share now "
                   "are work again (an id on one row is edited; one still repeated gets an "
                   "error row per row)")
            committed = read_committed(config.output, config.format, config.storage_options)
        return manifest, retried + stale.num_rows, committed


def stale_errors(plan_columns: pa.Table, plan: Plan,
                 committed: Committed) -> tuple[Committed, pa.Table]:
    """The committed keys without the error rows of keys whose id fewer manifest rows share
    than when the rows were written (`stale_shared_key_errors`), and those rows: kept, a fixed
    duplicate id stayed failed and its error rows outnumbered its outputs."""
    import pyarrow.compute as pc

    stale = pa.array(stale_shared_key_errors(plan_columns, plan, committed.written,
                                             committed.failed))
    return (Committed(committed.written, committed.failed.filter(pc.invert(stale))),
            committed.failed.filter(stale))


def typed_as_output(config: RunConfig, manifest: ManifestFiles,
                    report: Report = quiet) -> ManifestFiles:
    """The manifest with the columns and types OUTPUT's shards already have (`typed_as_shards`);
    `report` gets a note naming columns only this run's shards will have."""
    held = shard_schema(config.output, config.format, config.storage_options)
    typed = typed_as_shards(manifest.schema, held, DATA_COLUMNS)  # or refused: then no note
    if new := new_columns(manifest.schema, held, DATA_COLUMNS):
        report(f"note: column(s) {', '.join(new)} are new to {config.output}: only this run's "
               "shards will have them, and readers that take one shard's schema for all "
               "(pandas, pyarrow.dataset) may not show them; read OUTPUT/data with the schemas "
               "unified (README)")
    return replace(manifest, schema=typed)


def close_output(config: RunConfig, model: ModelInfo, counts: tuple[int, int, int],
                 uncounted: tuple[Committed, Committed], stats: Mapping,
                 times: tuple[float, float, float]) -> dict:
    """Recount what OUTPUT holds, index it for the next run and write summary.json; `counts`
    is (manifest rows, expected outputs, outputs to do at the start), `uncounted` what OUTPUT
    held at the start for keys the manifest does not make and the error rows superseded by
    data rows (`superseded_errors`): a run adds none of either."""
    with storage_step(f"cannot recount OUTPUT {config.output} after the run"):
        final = read_committed(config.output, config.format, config.storage_options)
        write_index(config.output, final, config.storage_options)
        summary = build_summary(config, model, *counts, final, uncounted, stats, times)
        write_summary(config, summary)
    return summary


def probe_model(config: RunConfig) -> ModelInfo:
    """Read the prior's resolution and digest on the driver from its configs and weights file
    (no network is built), failing before any work when the model URI is wrong."""
    from sdedit.loading import describe

    info = describe(config.model, allow_pickle=config.allow_pickle,
                    storage_options=options_for(config.model, config.storage_options))
    if info.channels != 3:  # the actors would fail on every batch
        raise ConfigError(f"model {info.name} takes {info.channels}-channel images; sdedit run "
                          "edits RGB guides with a 3-channel prior (sdedit edit takes others)")
    return ModelInfo(info.name, info.digest, info.resolution, info.config_digest)


def make_plan(config: RunConfig, manifest: ManifestFiles, plan_columns) -> Plan:
    """Settings every worker needs to expand rows identically."""
    names = set(plan_columns["task"].to_pylist()) if "task" in plan_columns.column_names else set()
    untasked = "task" not in plan_columns.column_names or any(not name for name in names)
    if config.task:
        names.add(config.task)
    presets = {name: preset for name in names if name and (preset := _preset(name))}
    if config.task and config.task not in presets:
        from tasks.presets import task_names

        raise ConfigError(f"unknown task {config.task!r}; known tasks: {', '.join(task_names())}")
    return Plan(base=manifest.base, seed=config.seed, t0=config.t0, samples=config.samples,
                repeats=config.repeats, task=config.task, presets=presets, untasked=untasked,
                duplicates=duplicate_ids(plan_columns["id"]), order_by_t0=config.steps is None,
                member_names=config.format == "webdataset", own_t0=own_t0(plan_columns))


def task_note(config: RunConfig, plan_columns: pa.Table) -> str | None:
    """What --task does not decide: rows whose own `task` names another preset keep it (as a
    row's `t0` list wins over --t0), e.g. every row of `sdedit manifest`'s output names one."""
    import pyarrow.compute as pc

    if not config.task or "task" not in plan_columns.column_names:
        return None
    tasks = plan_columns["task"]
    own = tasks.filter(pc.and_(pc.not_equal(tasks, ""), pc.not_equal(tasks, config.task)))
    if not len(own):
        return None
    counts = ", ".join(f"{row['values']}: {row['counts']:,}" for row in
                       sorted(pc.value_counts(own).to_pylist(), key=lambda r: r["values"]))
    return (f"--task {config.task} applies to {len(tasks) - len(own):,} of {len(tasks):,} rows; "
            f"the others keep the task their manifest row names ({counts})")


def _preset(name: str) -> TaskDefaults | None:
    try:
        from tasks.presets import get_preset
    except ImportError:
        return None
    try:
        preset = get_preset(name)
    except (KeyError, ValueError):
        return None
    return TaskDefaults(tuple(preset.t0), preset.samples, preset.repeats, preset.requires_mask)


def execute(config: RunConfig, manifest: ManifestFiles, plan: Plan, committed: Committed,
            model: ModelInfo, progress: Progress, run_id: str) -> dict:
    """Stream the uncommitted work through Ray Data, committing as run `run_id` (the holder of
    OUTPUT's lease) and counting in `progress`; returns the actors' timings and the runtime."""
    import ray

    started_ray = init_ray(config.address)
    try:
        wait_for_gpus(config, progress.report)
        runtime = ray_runtime(started_ray, cluster_address(config.address)[0])
        progress.report(describe_runtime(runtime))
        resources = actor_resources(config)
        progress.report(f"starting {describe_actors(resources)}, each loading {config.model}")
        dataset = build_dataset(config, manifest, plan, committed, model, resources, run_id)
        edit_seconds, edit_times = 0.0, []
        try:
            with ray_data_errors_held():
                for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                    progress.add(sum(batch["written"].to_pylist()),
                                 sum(batch["failed"].to_pylist()))
                    edit_seconds += sum(batch["edit_seconds"].to_pylist())
                    edit_times += [t for name in ("edit_started_at", "edit_finished_at")
                                   for t in batch[name].to_pylist() if t is not None]
        except Exception as error:
            if failed := model_load_failure(error):
                from sdedit.loading import ModelLoadError

                raise ModelLoadError(
                    f"the SDEdit actors could not load the model: {failed}. What was committed "
                    f"stays in {config.output}; rerun to resume") from error
            raise
        progress.finish()
        return {"edit_seconds": edit_seconds, "first_edit_at": min(edit_times, default=None),
                "last_edit_at": max(edit_times, default=None), "actors": resources.actors,
                "ray": runtime}
    finally:
        if started_ray:
            ray.shutdown()


def model_load_failure(error: BaseException) -> str | None:
    """The message of the ModelLoadError an SDEdit actor raised while starting (weights that do
    not load on a worker, a model that changed since the driver read it), under Ray's wrappers:
    the error itself, or, as Ray passes an actor's failed start on, a line of its text."""
    from sdedit.loading import ModelLoadError

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ModelLoadError):
            return str(error)
        if found := re.findall(r"\bModelLoadError: (.+)", str(error)):
            return found[-1].strip()
        seen.add(id(error))
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return None


def init_ray(address: str | None) -> bool:
    """Connect to a cluster (`address`, else the cluster of the Ray job this process is the
    entrypoint of) or start a local runtime; True when this call started it. A SIGTERM handler
    the caller installed (the CLI's) stays in force."""
    import ray

    if ray.is_initialized():
        return False
    caller_sigterm = signal.getsignal(signal.SIGTERM)
    address, source = cluster_address(address)
    try:
        if address:
            try:
                check_listening(address)
                ray.init(address=address)
            except (ConnectionError, ray.exceptions.RayError) as error:  # not a storage failure
                raise ClusterUnreachable(
                    f"cannot join the Ray cluster at {address} ({source}): "
                    f"{type(error).__name__}: {error}. Is it running (`ray status --address "
                    f"{address}`)? A cluster with token authentication also needs "
                    "RAY_AUTH_MODE=token and its token here") from error
        else:
            ray.init(address="local", include_dashboard=False)
    except SystemExit as stop:  # SIGTERM while ray.init ran, under Ray's own sys.exit(15)
        if stop.code == signal.SIGTERM and callable(caller_sigterm):
            caller_sigterm(signal.SIGTERM, None)  # the caller's answer (the CLI: unwind, 143)
        raise
    finally:
        if (caller_sigterm not in (signal.SIG_DFL, None)  # ray.init put sys.exit(15) there
                and threading.current_thread() is threading.main_thread()):
            signal.signal(signal.SIGTERM, caller_sigterm)
    return True


def cluster_address(address: str | None) -> tuple[str | None, str]:
    """The cluster to join and what named it: `--address`, else the cluster of the Ray job this
    process is the entrypoint of; (None, "") for a new local runtime."""
    if address:
        return address, "--address"
    if address := job_cluster():
        return address, "RAY_ADDRESS of this Ray job"
    return None, ""


def job_cluster() -> str | None:
    """The cluster's address when this process is a Ray job's entrypoint (`ray job submit`, a
    KubeRay RayJob): Ray's job supervisor gives it RAY_ADDRESS and the job's config. Without
    `--address` such a run joins that cluster, as `ray.init()` would, instead of starting a
    runtime of its own on the head node. Elsewhere RAY_ADDRESS is not followed: it often names
    a dashboard for `ray job submit`, or a cluster long gone."""
    if JOB_ENTRYPOINT_VARIABLE not in os.environ:
        return None
    return os.environ.get("RAY_ADDRESS") or "auto"


def ray_runtime(started: bool, joined: str | None) -> dict:
    """The Ray runtime this driver uses: the address it joined (as given; else Ray's GCS
    address), whether this run started it, and its live nodes, CPUs and GPUs."""
    import ray

    resources = ray.cluster_resources()
    address = joined if joined and joined != "auto" else ray.get_runtime_context().gcs_address
    return {"address": address, "started_by_this_run": started and not joined,
            "nodes": sum(1 for node in ray.nodes() if node.get("Alive")),
            "cpus": resources.get("CPU", 0.0), "gpus": resources.get("GPU", 0.0)}


def describe_runtime(runtime: Mapping) -> str:
    """e.g. `Ray: the cluster at 10.0.0.2:6379 (3 nodes, 48 CPUs, 8 GPUs)`."""
    where = ("a local runtime started for this run" if runtime["started_by_this_run"] else
             f"the cluster at {runtime['address']}")
    counts = ", ".join(f"{runtime[key]:g} {name}{'s' * (runtime[key] != 1)}"
                       for key, name in (("nodes", "node"), ("cpus", "CPU"), ("gpus", "GPU")))
    return f"Ray: {where} ({counts})"


def check_listening(address: str, timeout: float = 10.0) -> None:
    """ConnectionError unless something accepts connections at a `host:port` (or `[v6]:port`)
    address and does not answer as a web server (Ray waits minutes for a cluster that is not
    there, and without end at the dashboard's port, which answers HTTP but is no GCS); "auto"
    and ray:// pass."""
    host, _, port = address.rpartition(":")
    if not (host and port.isdigit()) or "://" in address:
        return
    try:
        connection = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError as error:
        raise ConnectionError(f"nothing accepts connections at {address}: {error}") from error
    with connection:
        answer = _first_answer(connection, b"GET / HTTP/1.0\r\n\r\n")
    if answer.startswith(b"HTTP/"):
        raise ConnectionError(
            f"{address} answers HTTP, as Ray's dashboard does (port 8265 by default), not as "
            "Ray's GCS: --address takes the address `ray start --head` prints (port 6379 by "
            "default); the dashboard's is for `ray job submit`")


def _first_answer(connection: socket.socket, request: bytes, wait: float = 2.0) -> bytes:
    """The first bytes a server sends back to `request` (b"" when none come within `wait`
    seconds). Ray's GCS speaks HTTP/2 and sends its settings frame at once."""
    connection.settimeout(wait)
    try:
        connection.sendall(request)
        return connection.recv(5)
    except OSError:
        return b""


def build_dataset(config: RunConfig, manifest: ManifestFiles, plan: Plan, committed: Committed,
                  model: ModelInfo, resources: ActorResources, run_id: str):
    """The Ray Data plan: read/expand -> fetch -> SDEdit actors -> encode/write."""
    import ray

    from pipeline.actor import SDEditActor
    from pipeline.fetch import fetch_batch
    from pipeline.manifest import read_and_expand
    from pipeline.writers import write_step

    options = dict(config.storage_options)
    low, high = resources.actors
    tasks = cpu_task_concurrency()
    files = ray.data.from_items([{"file": file} for file in manifest.files])
    files.context.raise_original_map_exception = True  # a task's own error, e.g. LeaseLostError
    ray_data_progress(files.context)
    rows = files.map_batches(
        read_and_expand, batch_size=1, batch_format="pyarrow", num_cpus=CPU_READ,
        fn_kwargs=dict(plan=plan, schema=manifest.schema, committed=committed.keys,
                       storage_options=options, block_rows=config.batch_size))
    # Small blocks: otherwise one task fetches, and one actor edits, a whole manifest file.
    rows = rows.repartition(target_num_rows_per_block=config.batch_size)
    fetched = rows.map_batches(
        fetch_batch, batch_size=config.batch_size, batch_format="pyarrow", num_cpus=CPU_STEP,
        compute=ray.data.TaskPoolStrategy(size=tasks),
        fn_kwargs=dict(resolution=model.resolution, storage_options=options,
                       max_pixels=config.max_pixels, fast_decode=config.fast_decode))
    edited = fetched.map_batches(
        SDEditActor, batch_size=config.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high,
                                           **concurrent_calls(resources, config.compile)),
        **actor_remote_args(resources),
        fn_constructor_kwargs=dict(model=config.model, dtype=config.dtype, storage_options=options,
                                   model_batch=config.model_batch, steps=config.steps,
                                   threads=resources.threads, allow_pickle=config.allow_pickle,
                                   compile=config.compile, channels_last=config.channels_last,
                                   expected_digest=model.digest))
    return edited.map_batches(
        write_step, batch_size=config.rows_per_shard, batch_format="pyarrow", num_cpus=CPU_STEP,
        compute=ray.data.TaskPoolStrategy(size=tasks),
        fn_kwargs=dict(output=config.output, data_format=config.format,
                       image_format=config.image_format, storage_options=options, run=run_id))


def actor_remote_args(resources: ActorResources) -> dict:
    """`num_gpus`, `num_cpus` and `runtime_env` for the actors' map step. A GPU actor that
    takes one CPU names none when Ray reserves one CPU for a GPU map step by default
    (ray-project/ray#66202): naming both makes Ray Data warn on every run that the combination
    is experimental."""
    args = {"num_gpus": resources.gpus, "runtime_env": ACTOR_RUNTIME_ENV}
    if not (resources.gpus and resources.cpus == 1 and gpu_maps_reserve_a_cpu()):
        args["num_cpus"] = resources.cpus
    return args


def concurrent_calls(resources: ActorResources, compile: bool) -> dict:
    """ActorPoolStrategy's arguments for CPU actors that have chunk workers
    (`pipeline.actor.chunk_workers`): as many batches at once in each as it has threads, so its
    workers are busy even when a batch makes one model batch (--batch-size equal to
    --model-batch). Ray Data before 2.53 has no `enable_true_multi_threading` and runs one call
    at a time: there only a batch's own model batches run at once, so --batch-size should be at
    least threads x --model-batch (the defaults, 32 and 8, are)."""
    import ray

    from pipeline.actor import edits_batches_at_once

    device = "cuda" if resources.gpus else "cpu"
    if not edits_batches_at_once(resources.threads, device, compile):
        return {}
    parameters = inspect.signature(ray.data.ActorPoolStrategy).parameters
    if "enable_true_multi_threading" not in parameters:
        return {}
    return {"enable_true_multi_threading": True,
            "max_concurrent_calls_per_actor": resources.threads}


def gpu_maps_reserve_a_cpu() -> bool:
    """Whether this Ray gives a GPU map step that names no `num_cpus` one CPU (older versions
    give it none, which would let CPU tasks crowd its node)."""
    try:
        from ray.data._internal.execution.operators.map_operator import (
            _canonicalize_ray_remote_args as canonical,
        )
        return canonical({"num_gpus": 1}).get("num_cpus") == 1
    except (ImportError, AttributeError, TypeError):  # private: moved or changed, ask for one
        return False


def cpu_task_concurrency() -> int:
    """At most one fetch (and one write) task per two CPUs of the cluster. Their fractional CPU
    reservation would otherwise let Ray start four worker processes per free CPU at once, whose
    imports compete with the actors' start-up; on 2 CPUs the cap cut start-up from 10.2 s to
    8.1 s with the same editing rate."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1) // 2))


def describe_actors(resources: ActorResources) -> str:
    """e.g. `2 SDEdit actors (1 GPU, 1 CPU each)` or `1-4 SDEdit actors (0.5 CPU, 2 threads
    each)`."""
    low, high = resources.actors
    count = f"{low}" if low == high else f"{low}-{high}"
    each = (f"{resources.gpus:g} GPU, {resources.cpus:g} CPU" if resources.gpus else
            f"{resources.cpus:g} CPU, {resources.threads} thread{'s' * (resources.threads != 1)}")
    return f"{count} SDEdit actor{'s' * (high > 1)} ({each} each)"


def wait_for_gpus(config: RunConfig, report: Report) -> None:
    """With --gpus-per-actor and --wait-for-gpus on a cluster without a GPU yet: ask Ray's
    autoscaler for one actor's GPUs (GPU workers that scale from zero start only on demand)
    and wait for them to join, reporting it; `actor_resources` then refuses a cluster that
    still has none. The request is withdrawn either way: the actors hold what they use."""
    import ray

    if not (config.gpus_per_actor and config.wait_for_gpus) or \
            ray.cluster_resources().get("GPU", 0):
        return
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": config.gpus_per_actor}])
    report(f"no GPU in the Ray cluster yet: asked its autoscaler for "
           f"{config.gpus_per_actor:g}, waiting up to {config.wait_for_gpus:g} s")
    started = time.monotonic()
    try:
        while time.monotonic() - started < config.wait_for_gpus:
            time.sleep(min(GPU_POLL_SECONDS, config.wait_for_gpus))
            if gpus := ray.cluster_resources().get("GPU", 0):
                report(f"{gpus:g} GPU(s) joined after {time.monotonic() - started:.0f} s")
                return
    finally:
        request_resources(bundles=[])


def actor_resources(config: RunConfig) -> ActorResources:
    """One GPU per actor and one actor per GPU by default when the cluster has GPUs; on CPU
    clusters one actor by default, a fractional CPU reservation and, unless --threads says,
    each node's cores shared among its actors (torch threads)."""
    import ray

    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    gpus = config.gpus_per_actor if config.gpus_per_actor is not None else float(cluster_gpus > 0)
    if gpus > 0 and not cluster_gpus:
        raise ConfigError(f"--gpus-per-actor {gpus} but the Ray cluster has no GPUs" + (
            f" (none joined in --wait-for-gpus {config.wait_for_gpus:g} s)"
            if config.wait_for_gpus else "; if its GPU workers scale from zero or are still "
            "starting, --wait-for-gpus SECONDS waits for them"))
    if gpus > 0:
        every_gpu = max(1, int(cluster_gpus // gpus))
        return ActorResources(gpus, config.cpus_per_actor or 1.0, None,
                              config.actors or (every_gpu, every_gpu))
    actors = config.actors or (1, 1)
    nodes = [cpus for n in ray.nodes()  # a head started with --num-cpus 0 runs no actor
             if n.get("Alive") and (cpus := n["Resources"].get("CPU", 0)) > 0] or [1]
    actors_per_node = -(-actors[1] // len(nodes))
    threads = config.threads or max(1, int(min(nodes)) // actors_per_node)
    return ActorResources(0.0, config.cpus_per_actor or 0.5, threads, actors)


def build_summary(config: RunConfig, model: ModelInfo, rows: int, expected: int, todo: int,
                  final: Committed, uncounted: tuple[Committed, Committed], stats: Mapping,
                  times: tuple[float, float, float]) -> dict:
    """Counts of the manifest's outputs that reconcile (written + errors = expected; what
    OUTPUT holds for keys the manifest no longer makes is `outside_manifest`, error rows of
    keys written since are `superseded_errors`), timings, config and versions."""
    started, pipeline_started, finished = times
    outside, superseded = uncounted
    written = final.written_keys - outside.written_keys
    errors = final.error_rows - outside.error_rows - superseded.error_rows
    data_rows = final.data_rows - outside.data_rows
    stages = Counter(final.errors_by_stage)
    stages.subtract(outside.errors_by_stage)
    stages.subtract(superseded.errors_by_stage)
    seconds = finished - pipeline_started
    run_written = int(stats.get("written", 0))
    return {
        "manifest_rows": rows,
        "expected_outputs": expected,
        "written": written,
        "errors": errors,
        "errors_by_stage": {stage: count for stage, count in sorted(stages.items()) if count},
        "error_rate": errors / expected if expected else 0.0,
        "duplicate_rows": data_rows - written,
        "reconciled": written + errors == expected and data_rows == written,
        "outside_manifest": {"written": outside.written_keys, "errors": outside.error_rows},
        "superseded_errors": superseded.error_rows,
        "this_run": {
            "todo": todo,
            "skipped_already_committed": expected - todo,
            "retried_errors": int(stats.get("retried_errors", 0)),
            "written": run_written,
            "errors": int(stats.get("failed", 0)),
            "pipeline_seconds": round(seconds, 3),
            # None when nothing was to do: 0.0 read as a stalled run
            "images_per_second": round(run_written / seconds, 3) if todo and seconds > 0
            else None,
            "actor_edit_seconds": round(float(stats.get("edit_seconds", 0.0)), 3),
            "actors": list(stats["actors"]) if stats.get("actors") else None,
            "ray": stats.get("ray"),
            **edit_window(stats, pipeline_started, finished),
        },
        "timings": {"started_at": started, "finished_at": finished,
                    "wall_seconds": round(finished - started, 3),
                    "setup_seconds": round(pipeline_started - started, 3)},
        "model": {"name": model.name, "digest": model.digest, "resolution": model.resolution},
        "config": config.public_dict(),
        "versions": package_versions(),
    }


def edit_window(stats: Mapping, pipeline_started: float, finished: float) -> dict:
    """Where this run's time went around the actors: from the pipeline's start to the first
    edit (actor start-up, first fetch) and from the last edit to the end (encode, write)."""
    first, last = stats.get("first_edit_at"), stats.get("last_edit_at")
    if first is None or last is None:
        return {}
    return {"startup_seconds": round(first - pipeline_started, 3),
            "editing_seconds": round(last - first, 3),
            "drain_seconds": round(finished - last, 3)}


def package_versions() -> dict:
    """Installed versions of the packages that decide the outputs."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_summary(config: RunConfig, summary: dict) -> None:
    """Write OUTPUT/summary.json (replaced, whole, on every run)."""
    from pipeline.writers import commit

    commit(config.output, SUMMARY, json.dumps(summary, indent=2, sort_keys=True).encode(),
           config.storage_options)
