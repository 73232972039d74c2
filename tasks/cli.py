"""`sdedit guides | manifest | inspect | evaluate`: the task commands of the `sdedit` CLI."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from tasks.images import MAX_PIXELS, StorageError, storage_step
from tasks.regions import Box
from tasks.strokes import PAINT_SIDE


def parse_storage_options(pairs: tuple[str, ...]) -> dict:
    """Options for fsspec from ("key=value", ...), read as `sdedit run` reads them (dotted keys
    nest, true/false and integers converted; a malformed one is named, its value never shown)."""
    from pipeline.config import ConfigError
    from pipeline.config import parse_storage_options as parse

    try:
        return parse(pairs)
    except ConfigError as error:
        raise click.BadParameter(str(error), param_hint="--storage-option") from error


def nearest_existing(path: Path) -> Path:
    """`path` or the nearest folder above it that exists: where a command that writes under
    `path` finds out early whether it can (a file there is no folder to write in)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def parse_box(text: str | None) -> Box | None:
    """A Box from --box "left,top,right,bottom", or None."""
    if text is None:
        return None
    try:
        return Box.parse(text)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--box") from error


FRACTION = click.FloatRange(0, 1, min_open=True)  # of an image's side, for random boxes
paint_size = click.option(
    "--paint-size", type=click.IntRange(min=1), default=PAINT_SIDE, show_default=True,
    help="Short side (px) photos are painted at, then scaled back: --stroke-size is in its "
         "pixels, so paintings look alike at any photo size. Finer strokes for larger models: "
         "e.g. --paint-size 256 --stroke-size 37.")

storage_option = click.option(
    "--storage-option",
    "storage_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec storage option for every read and write (e.g. endpoint_url=http://...).",
)


def check_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A --device torch knows and this machine has, refused before any work (torch's own errors
    were a traceback after the inputs were read, or inside the first step)."""
    if value is None:
        return None
    import torch

    try:
        device = torch.device(value)
    except RuntimeError as error:
        raise click.BadParameter(f"unknown torch device {value!r}; e.g. cpu, cuda, cuda:1, "
                                 "mps") from error
    count = usable_devices().get(device.type)
    if count is None:
        raise click.BadParameter(f"{value}: torch {torch.__version__} sees no {device.type} "
                                 "device on this machine")
    if (device.index or 0) >= count:
        raise click.BadParameter(f"{value}: this machine has {count} {device.type} device(s), "
                                 "numbered from 0")
    return value


def usable_devices() -> dict[str, int]:
    """Device type -> how many of them torch can compute on here (xpu, hpu or meta devices
    torch knows the names of but cannot use are absent)."""
    import torch

    found = {"cpu": 1}
    if torch.cuda.is_available():
        found["cuda"] = torch.cuda.device_count()
    if torch.backends.mps.is_available():
        found["mps"] = 1
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found["xpu"] = xpu.device_count()
    return found


def ray_options(command: Callable) -> Callable:
    """Options shared by the Ray Data guide builders."""
    options = [  # in the order written as decorators, top to bottom
        click.argument("source"),
        click.argument("output"),
        click.option("--seed", default=0, show_default=True, help="Run seed; per image derived."),
        click.option("--address", default=None,
                     help="Ray cluster address; default: the Ray job's cluster, else local."),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Images per Ray task."),
        click.option("--num-cpus", type=click.FloatRange(min=0, min_open=True), default=0.5,
                     show_default=True, help="CPUs per Ray task (fractional)."),
        click.option("--max-pixels", type=click.IntRange(min=1), default=MAX_PIXELS,
                     show_default=True, help="Largest accepted source image (width x height)."),
        click.option("--overwrite", is_flag=True,
                     help="Replace guides OUTPUT holds from another source or other options "
                          "(refused without it); the guide and mask files of ids this run does "
                          "not build are removed."),
        storage_option,
    ]
    return functools.reduce(lambda wrapped, option: option(wrapped), reversed(options), command)


@contextmanager
def reported(failure: str) -> Iterator[None]:
    """End the command with one clear line on a bad value or a storage failure in the block
    (the latter prefixed with `failure`, see `tasks.images.storage_step`)."""
    try:
        with storage_step(failure):
            yield
    except (ValueError, StorageError) as error:
        raise click.ClickException(str(error)) from error


def fractions(min_fraction: float, max_fraction: float) -> tuple[float, float]:
    """--min-fraction and --max-fraction, refused unless 0 < min <= max <= 1."""
    if min_fraction > max_fraction:
        raise click.BadParameter(
            f"{min_fraction} is over --max-fraction {max_fraction} (a random box's smallest "
            "side fraction cannot exceed its largest)", param_hint="--min-fraction")
    return min_fraction, max_fraction


def run_builder(task: str, source: str, output: str, options, settings: dict) -> None:
    """Read the sources, run the Ray Data guide job, report what was written."""
    from pipeline.job import ClusterUnreachable, init_ray
    from tasks.guides import GuideJob, build_guides, claim_output, recorded_source
    from tasks.sources import source_rows

    storage = parse_storage_options(settings["storage_options"])
    output = output.rstrip("/")
    try:
        with storage_step(f"cannot build {task} guides from {source} into {output}"):
            # not an earlier run's guides, in OUTPUT inside the source or OUTPUT the source
            rows = source_rows(source, storage,
                               exclude=(output, f"{output}/guides", f"{output}/masks"))
            job = GuideJob(task, output, options, storage, settings["batch_size"],
                           settings["num_cpus"], settings["max_pixels"],
                           recorded_source(source), settings["overwrite"])
            claim_output(job)
            init_ray(settings["address"])  # as `sdedit run` chooses its Ray runtime
            report = build_guides(rows, job)
    except (ValueError, StorageError, ClusterUnreachable) as error:
        raise click.ClickException(str(error)) from error
    manifest = f"; manifest: {report.manifest}" if report.written else ""  # none: removed
    click.echo(f"wrote {report.written} {task} guides{manifest}")
    for _, error in report.errors[:10]:
        click.echo(f"failed: {error}", err=True)  # credentials already masked
    if report.errors:
        click.echo(
            f"{len(report.errors)} row(s) failed; all listed in {output}/guide_errors.parquet",
            err=True,
        )
    if report.written:
        click.echo(f"next: sdedit run {report.manifest} OUTPUT --model URI")
    if not report.written:
        raise click.ClickException(f"no guide could be built from {source}")


@click.group()
def guides() -> None:
    """Build guides, masks and a ready-to-run manifest from real images (Ray Data jobs).

    SOURCE is a folder, a glob or a manifest (.parquet) of images on any fsspec URI; OUTPUT
    receives guides/, masks/ and manifest.parquet (guide and mask paths relative to OUTPUT,
    sources absolute).
    """


@guides.command()
@ray_options
@click.option("--stroke-size", type=click.IntRange(min=1), default=9, show_default=True,
              help="Median filter window (px; odd: an even size rounds up).")
@click.option("--palette-size", type=click.IntRange(min=1), default=12, show_default=True,
              help="Colours in the painting.")
@paint_size
def strokes(source, output, stroke_size, palette_size, paint_size, seed, **settings) -> None:
    """Stroke paintings simulated from photos (median filter + colour quantisation)."""
    from tasks.guides import StrokeOptions

    options = StrokeOptions(stroke_size, palette_size, seed, paint_side=paint_size)
    run_builder("synthesis", source, output, options, settings)


@guides.command()
@ray_options
@click.option("--stroke-size", type=click.IntRange(min=1), default=9, show_default=True,
              help="Median filter window (px; odd: an even size rounds up).")
@click.option("--palette-size", type=click.IntRange(min=1), default=6, show_default=True,
              help="Colours in the strokes.")
@click.option("--box", default=None, help="Region 'left,top,right,bottom'; default: random.")
@click.option("--min-fraction", type=FRACTION, default=0.25, show_default=True,
              help="Random box: min side.")
@click.option("--max-fraction", type=FRACTION, default=0.5, show_default=True,
              help="Random box: max side.")
@paint_size
def edits(
    source, output, stroke_size, palette_size, box, min_fraction, max_fraction, paint_size, seed,
    **settings
) -> None:
    """Strokes painted over a region of each photo, with its mask (white = synthesize).

    The region is a row's `mask` (manifest SOURCE), --box, or a random box per image.
    """
    from tasks.guides import EditOptions

    options = EditOptions(
        stroke_size, palette_size, seed, *fractions(min_fraction, max_fraction), parse_box(box),
        paint_side=paint_size,
    )
    run_builder("editing", source, output, options, settings)


@guides.command()
@ray_options
@click.option("--box", default=None, help="Foreground region 'left,top,right,bottom'.")
@click.option("--same-place", is_flag=True, help="Paste --box where it was, not at random.")
@click.option("--min-fraction", type=FRACTION, default=0.25, show_default=True,
              help="Random box: min side.")
@click.option("--max-fraction", type=FRACTION, default=0.5, show_default=True,
              help="Random box: max side.")
def composites(
    source, output, box, same_place, min_fraction, max_fraction, seed, **settings
) -> None:
    """A region of another image pasted onto each image, with its mask.

    Pairs come from a manifest's `foreground` column, or are drawn per image from --seed.
    """
    from tasks.guides import CompositeOptions

    if same_place and box is None:
        raise click.UsageError("--same-place pastes --box where it was; give --box too")
    options = CompositeOptions(
        seed, *fractions(min_fraction, max_fraction), parse_box(box), same_place
    )
    run_builder("compositing", source, output, options, settings)


@click.command()
@click.argument("source")
@click.argument("output", callback=lambda ctx, param, value: parquet_name(value))
@click.option(
    "--task",
    default="augmentation",
    show_default=True,
    type=click.Choice(["synthesis", "editing", "compositing", "augmentation"]),
)
@click.option("--masks", default=None, help="Folder of masks named like the images.")
@click.option(
    "--labels/--no-labels",
    default=True,
    show_default=True,
    help="Label each image with its sub-folder.",
)
@storage_option
def manifest(source, output, task, masks, labels, storage_options) -> None:
    """Write a manifest (OUTPUT, a .parquet file) for the images in a folder or glob."""
    from tasks.manifests import write_manifest

    with reported(f"cannot write a manifest of {source} to {output}"):
        count = write_manifest(
            source, output, task, masks, labels, parse_storage_options(storage_options)
        )
    click.echo(f"wrote {count} rows to {output} (task {task})")


def parquet_name(output: str) -> str:
    """A manifest's file name: Parquet, so `.parquet` (a `.csv` name held Parquet before)."""
    if not output.lower().endswith(".parquet"):
        raise click.BadParameter(f"{output!r}: expected a .parquet file name (manifests are "
                                 "Parquet)", param_hint="OUTPUT")
    return output


def output_folder(output: str, storage_options: tuple[str, ...], manifest_uri: str | None):
    """The OutputFolder for a command's OUTPUT argument and options."""
    from tasks.outputs import OutputFolder

    options = parse_storage_options(storage_options)
    base = given_manifest_base(manifest_uri, options) if manifest_uri else None
    return OutputFolder(output.rstrip("/"), options, base)


def given_manifest_base(manifest_uri: str, storage_options: dict) -> str:
    """The folder a --manifest's relative guide paths resolve against, refused when the
    manifest is not there as `sdedit run` reads it (it silently resolved no guide)."""
    from pipeline.manifest import ManifestError
    from tasks.outputs import manifest_folder

    try:
        return manifest_folder(manifest_uri, storage_options)
    except ManifestError as error:
        raise click.BadParameter(str(error), param_hint="--manifest") from error


manifest_option = click.option(
    "--manifest",
    "manifest_uri",
    default=None,
    help="The run's manifest, to resolve relative guide paths (default: from summary.json).",
)


@click.command()
@click.argument("output")
@click.option("-n", "--count", type=click.IntRange(min=1), default=8, show_default=True,
              help="Ids on the contact sheet.")
@click.option("--id", "ids", multiple=True, help="Show these ids (repeatable).")
@click.option("--newest", is_flag=True,
              help="Show the ids of the most recently written shards first (a scheduled run's "
                   "latest outputs), not the first ids in sort order.")
@click.option("--sample", default=0, show_default=True, help="Which sample per (id, t0).")
@click.option("--cell", type=click.IntRange(min=1), default=128, show_default=True,
              help="Cell size in pixels.")
@click.option("--out", "destination", default=None, help="Where to write (default OUTPUT/inspect).")
@manifest_option
@storage_option
def inspect(output, count, ids, newest, sample, cell, destination, manifest_uri,
            storage_options) -> None:
    """Summarize an OUTPUT folder and write a contact sheet (PNG + self-contained HTML)."""
    from tasks.inspect import write_contact_sheet

    if ids and newest:
        raise click.UsageError("give --id or --newest, not both: --id names the ids to show")
    with reported(f"cannot inspect {output}"):
        folder = output_folder(output, storage_options, manifest_uri)
        png, page, summary = write_contact_sheet(
            folder, destination or folder.path("inspect"), count, list(ids) or None, sample, cell,
            newest,
        )
    click.echo("\n".join(summary))
    click.echo(f"contact sheet: {png}\n               {page}")


@click.command()
@click.argument("output")
@click.option(
    "--json", "json_uri", default=None, help="Report path (default OUTPUT/evaluation.json)."
)
@manifest_option
@storage_option
def evaluate(output, json_uri, manifest_uri, storage_options) -> None:
    """Faithfulness by t0: L2 to the guide and, for masked tasks, the change outside the mask."""
    from tasks.evaluate import evaluate as evaluate_folder
    from tasks.evaluate import format_report, write_report

    with reported(f"cannot evaluate {output}"):
        folder = output_folder(output, storage_options, manifest_uri)
        report = evaluate_folder(folder)
        destination = json_uri or folder.path("evaluation.json")
        write_report(report, destination, folder.storage_options)
    click.echo(format_report(report))
    click.echo(f"report: {destination}")
    if not report["outputs_scored"] and report["outputs_without_guide"]:
        raise click.ClickException(f"none of the {report['outputs_without_guide']} outputs "
                                   "could be scored: no readable guide (see above)")
