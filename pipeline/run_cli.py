"""`sdedit run MANIFEST OUTPUT`: the batch job on a local Ray runtime or a cluster."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

from pipeline.config import ConfigError, build_config, load_config_file, parse_storage_options
from sdedit.loading import redact
from tasks.images import without_ray_retry_note

EXIT_ERROR_RATE = 3


@click.command()
@click.argument("manifest", required=False)
@click.argument("output", required=False)
@click.option("--model", help="Prior URI: default, builtin:tiny, a folder, s3://..., hub id.")
@click.option("--t0", "t0", type=float, multiple=True,
              help="Noise level in (0, 1]; repeat for several. Default: the task's, else 0.5.")
@click.option("--samples", type=int, help="Outputs per (id, t0). Default: the task's, else 1.")
@click.option("--steps", type=int,
              help="Sampler steps from t0 to 0, at most every step the schedule has from t0 "
                   "(100 from t0 0.1 of 1,000 timesteps); each output's `steps` column says "
                   "how many its passes took. Default: every step.")
@click.option("--repeats", type=int, help="SDEdit passes K. Default: the task's, else 1.")
@click.option("--seed", type=int, help="Run seed (per-sample seeds derive from it). Default 0.")
@click.option("--task", help="Task preset (synthesis, editing, compositing, augmentation) "
              "for the defaults of rows without a `task` of their own; a row's task wins.")
@click.option("--batch-size", type=int, help="Rows per actor call. Default 32.")
@click.option("--model-batch", type=int, help="Samples per model call (fixed). Default 8.")
@click.option("--rows-per-shard", type=int, help="Rows per output shard. Default 256.")
@click.option("--format", "format", type=click.Choice(["parquet", "webdataset"]))
@click.option("--image-format", type=click.Choice(["png", "jpeg", "webp"]))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--compile/--no-compile", default=None,
              help="torch.compile the network in each actor; it compiles on the first batch. "
                   "Meant for GPUs (no gain measured on CPU); may move rare pixels by one "
                   "grey level.")
@click.option("--channels-last/--no-channels-last", default=None,
              help="Channels-last memory format for the network (often faster on GPUs).")
@click.option("--fast-decode/--no-fast-decode", default=None,
              help="Decode JPEG guides at a reduced scale (1/2 to 1/8, never below the model "
                   "resolution): 3-12x less fetch CPU for photos of 0.25-16 megapixels; "
                   "guides differ from a full decode by about one grey level. Masks decode "
                   "fully.")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="fsspec storage option for every read and write, e.g. endpoint_url=...")
@click.option("--address", help="Ray cluster address; default: the cluster of the Ray job this "
                                 "runs in (`ray job submit`), else a new local runtime.")
@click.option("--actors", help="Actor count N or MIN-MAX. Default: one per GPU of the cluster "
                               "(GPUs / --gpus-per-actor), or 1 without GPUs.")
@click.option("--gpus-per-actor", type=float, help="Default 1 when the cluster has GPUs, else 0.")
@click.option("--cpus-per-actor", type=float, help="Default 1 with GPUs, else 0.5.")
@click.option("--wait-for-gpus", type=float, metavar="SECONDS",
              help="With --gpus-per-actor on a cluster that has no GPU yet (GPU workers that "
                   "scale from zero, or still starting): ask Ray's autoscaler for one actor's "
                   "GPUs and wait up to SECONDS for them to join, instead of stopping at once. "
                   "Default 0.")
@click.option("--threads", type=int,
              help="Threads of each CPU actor: it edits that many model batches at once (fewer "
                   "if their memory would not fit), each on one torch thread (with --compile, "
                   "one batch on that many). Default: each "
                   "node's cores shared among its actors. Outputs do not depend on it, except "
                   "with --compile.")
@click.option("--max-pixels", type=int, help="Largest accepted input (width x height).")
@click.option("--max-error-rate", type=float,
              help="Fail (exit 3) when more than this fraction of the outputs this run made "
                   "failed.")
@click.option("--progress-interval", type=float, metavar="SECONDS",
              help="Seconds between progress lines on stderr (outputs done, rate, time left); "
                   "0 silences every `sdedit:` line but errors. Default 30.")
@click.option("--wait-for-output", type=float, metavar="SECONDS",
              help="If another run holds OUTPUT, wait up to SECONDS for it to end or its lease "
                   "to expire (120 s after a killed run's last renewal) instead of stopping at "
                   "once; for retried cluster jobs. Default 0.")
@click.option("--overwrite/--no-overwrite", default=None,
              help="Delete what earlier runs wrote in OUTPUT (outputs, errors, summary, "
                   "evaluation and inspect reports; nothing else) and redo every output, e.g. "
                   "to replace a run made with another configuration.")
@click.option("--allow-pickle/--no-allow-pickle", default=None,
              help="Allow pickle (.bin) weights; they can run code, so only for trusted models.")
@click.option("--retry-errors", metavar="STAGES",
              help="Redo committed failures of these stages (comma list, or all), e.g. read "
                   "after an object-store outage. Other failures stay committed.")
@click.option("--dry-run", is_flag=True,
              help="Plan only: print the counts (outputs to do, already committed, errors to "
                   "retry) and the model, and check that OUTPUT accepts this configuration, "
                   "without starting Ray or writing anything.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML or TOML file with these options; flags override it (--no-overwrite "
                   "and the other --no- switches turn off one it turns on).")
def run(config_file: str | None, storage_options: tuple[str, ...], t0: tuple[float, ...],
        dry_run: bool, **flags) -> None:
    """Edit every row of MANIFEST with SDEdit and write sharded outputs to OUTPUT."""
    from pipeline.job import ErrorRateExceeded, preview
    from pipeline.job import run as run_job

    try:
        config = build_config(
            load_config_file(config_file) if config_file else {},
            {**flags, "t0": t0 or None,
             "storage_options": parse_storage_options(storage_options) or None},
            source=config_file)
    except ConfigError as error:
        raise click.UsageError(str(error)) from error
    try:
        if dry_run:
            click.echo(json.dumps(preview(config), indent=2))
            return
        with stopping_on_signals():
            summary = run_job(config, report=_reporter(config.progress_interval))
    except Terminated as stopped:
        click.echo(f"sdedit: stopped by {stopped.name}; what was committed stays in "
                   f"{redact(config.output)}, "
                   "rerun to resume", err=True)
        sys.exit(128 + stopped.signum)  # as a shell reports a process the signal ended
    except ErrorRateExceeded as error:  # the counts on stdout as after any run, for schedulers
        click.echo(json.dumps(_headline(error.summary, config.output), indent=2))
        click.echo(f"error: {redact(str(error))}", err=True)
        sys.exit(EXIT_ERROR_RATE)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        raise click.ClickException(without_ray_retry_note(str(error))) from error
    click.echo(json.dumps(_headline(summary, config.output), indent=2))


class Terminated(BaseException):
    """A signal to stop arrived: Ctrl-C, SIGTERM (`ray job stop`, a stopped pod whose main
    process this is) or SIGHUP (the terminal closed). The run unwinds. (A Ray job's driver
    whose head pod stops is not sent SIGTERM: Ray's job supervisor kills it, and its lease
    expires.)"""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name + (" (Ctrl-C)" if signum == signal.SIGINT else "")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def stopping_on_signals() -> Iterator[None]:
    """Turn the first of `STOP_SIGNALS` into `Terminated` for the block, so a stopped run
    unwinds: Ray is shut down and OUTPUT's lease released (the next run need not wait for it to
    expire), while committed shards stay for the rerun. Later ones are ignored while it does:
    a second Ctrl-C cut Ray's shutdown short (a traceback, Ray processes left running, once
    the lease left behind). Without it Python dies on SIGTERM or SIGHUP without any of that."""
    stopping: list[int] = []

    def stop(signum, frame):
        if not stopping:  # once: the unwinding itself is not interrupted
            stopping.append(signum)
            raise Terminated(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _reporter(interval: float):
    from pipeline.progress import quiet

    if not interval:
        return quiet
    return lambda line: click.echo(f"sdedit: {redact(line)}", err=True)


def _headline(summary: dict, output: str) -> dict:
    keys = ("expected_outputs", "written", "errors", "errors_by_stage", "reconciled")
    headline = {key: summary[key] for key in keys}
    run = summary["this_run"]
    headline["this_run"] = {key: run[key] for key in ("todo", "written", "errors")}
    headline["images_per_second"] = run["images_per_second"]
    headline["output"] = redact(output)
    return headline
