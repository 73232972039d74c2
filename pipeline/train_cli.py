"""`sdedit train`: train a small pixel-space DDPM prior on a folder, glob, bucket or manifest.

    sdedit train ./pngs ./my-prior --resolution 32 --steps 10000

The output folder is a diffusers-format prior (EMA weights) that `sdedit.load` and
`--model` accept; it also holds `checkpoint/`, from which the same command resumes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from pathlib import Path, PurePosixPath

import click

from tasks.cli import (
    check_device,
    nearest_existing,
    parse_storage_options,
    reported,
    storage_option,
)
from tasks.images import (
    MAX_PIXELS,
    InputError,
    file_limit,
    open_image,
    options_for,
    read_bytes,
    to_rgb,
)
from tasks.sources import is_remote, local_path

# a manifest's image column, first found first: `source` (the photos of an `sdedit guides` or
# `sdedit manifest` listing, and of the bundled example) before `guide`, which there holds the
# stroke paintings made from them; a prior learns from the photos
MANIFEST_COLUMNS = ("image", "source", "guide")
# files that make a folder a model: a fresh run there would overwrite them
MODEL_FILE_PATTERNS = ("config.json", "model_index.json", "*.safetensors", "*.bin")
# command-line option -> TrainConfig field, for refusing conflicting options on resume
OPTION_FIELDS = {"resolution": "resolution", "batch_size": "batch_size", "lr": "lr",
                 "channels": "channels", "bf16": "bf16", "seed": "seed"}


def image_uris(source: str, storage_options: dict | None = None) -> list[str]:
    """The image URIs a source names: a Parquet manifest (its `image`, else `source`, else
    `guide` column, relative paths resolved against its folder), a glob, or a folder searched
    recursively."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(source, **options_for(source, storage_options or {}))
    protocol = source.split("://")[0] + "://" if "://" in source else ""
    if root.endswith(".parquet"):
        return _manifest_uris(fs, root, source)
    if any(char in root for char in "*?["):
        found = fs.glob(root)
    elif fs.isdir(root):
        found = fs.find(root)
    else:
        raise click.BadParameter(f"{source} is neither a folder, a glob nor a .parquet manifest",
                                 param_hint="IMAGES")
    from tasks.sources import image_suffixes  # as `sdedit manifest` and `guides` list images

    uris = sorted(protocol + path for path in found if path.lower().endswith(image_suffixes()))
    if not uris:
        raise click.BadParameter(f"no images (files with a suffix Pillow decodes, such as .png, "
                                 f".jpg, .webp or .tif) under {source}", param_hint="IMAGES")
    return uris


def _manifest_uris(fs, root: str, source: str) -> list[str]:
    from pipeline.writers import read_parquet

    with fs.open(root, "rb") as stream:
        table = read_parquet(stream)
    column = next((name for name in MANIFEST_COLUMNS if name in table.column_names), None)
    if column is None:
        names = f"{', '.join(MANIFEST_COLUMNS[:-1])} or {MANIFEST_COLUMNS[-1]}"
        raise click.BadParameter(f"manifest {source} has no {names} column (columns: "
                                 f"{table.column_names})", param_hint="IMAGES")
    from pipeline.manifest import resolve_uri  # as `sdedit run` resolves the manifest's paths

    _check_uri_column(table.schema.field(column).type, column, source)
    base = source.rsplit("/", 1)[0] if "/" in source else "."
    uris = [resolve_uri(uri, base) for uri in table.column(column).to_pylist() if uri]
    if not uris:
        raise click.BadParameter(f"manifest {source} names no images: its {column!r} column "
                                 f"has no URI in {table.num_rows} row(s)", param_hint="IMAGES")
    return uris


def _check_uri_column(kind, column: str, source: str) -> None:
    """Refuse a column that holds something else than URIs, such as the encoded images of an
    `sdedit run` output shard (its `image` column), which would otherwise fail mid-way."""
    import pyarrow as pa

    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind):
        return
    shard = (" (an `sdedit run` output shard? Its images are encoded in the file; train on a "
             "folder of images or on the manifest the run read)"
             if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) else "")
    raise click.BadParameter(f"manifest {source}: column {column!r} holds {kind}, expected "
                             f"image URIs (strings){shard}", param_hint="IMAGES")


def decode_image(payload: bytes, resolution: int, uri: str = "<bytes>",
                 max_pixels: int = MAX_PIXELS):
    """Decode to 8-bit RGB exactly as `sdedit run` does (`tasks.images.to_rgb`: 16-bit scaled,
    transparency composited on white), centre-crop to a square and resize to `resolution` with
    Lanczos; returns a uint8 array [H, W, 3]."""
    import numpy as np
    from PIL import Image

    try:
        rgb = to_rgb(open_image(payload, uri, max_pixels), uri)
    except InputError as error:
        raise click.ClickException(str(error)) from error
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((resolution, resolution), Image.Resampling.LANCZOS))


def load_images(uris: list[str], resolution: int, storage_options: dict | None = None,
                max_pixels: int = MAX_PIXELS):
    """All images as one uint8 tensor [N, 3, resolution, resolution]; an image that cannot be
    read (missing, too large) stops training with its URI, as one that cannot be decoded."""
    import numpy as np
    import torch

    arrays = []
    for uri in uris:
        try:
            payload = read_bytes(uri, storage_options or {}, max_bytes=file_limit(max_pixels))
        except InputError as error:
            raise click.ClickException(str(error)) from error
        arrays.append(decode_image(payload, resolution, uri, max_pixels))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def parse_channels(text: str) -> tuple[int, ...]:
    """"32,64,64" -> (32, 64, 64)."""
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}",
                                 param_hint="--channels") from error
    if not widths or min(widths) < 1:
        raise click.BadParameter(f"expected positive widths, got {text!r}",
                                 param_hint="--channels")
    return widths


def _start_state(output: str, config, device, ctx: click.Context):
    """Resume from OUTPUT's checkpoint (refusing conflicting explicit options) or start fresh."""
    from sdedit.training import TrainState, has_checkpoint, load_checkpoint

    if not has_checkpoint(output):
        _refuse_overwriting(output)
        _note_attention(config)
        return TrainState.fresh(config, device)
    try:
        state = load_checkpoint(output, device)
    except ValueError as error:  # a checkpoint it cannot resume from; the message says why
        raise click.ClickException(str(error)) from error
    saved = state.config
    explicit = [name for name in OPTION_FIELDS
                if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    clashes = [f"--{name.replace('_', '-')}" for name in explicit
               if getattr(saved, OPTION_FIELDS[name]) != getattr(config, OPTION_FIELDS[name])]
    if clashes:
        raise click.UsageError(f"{output} holds a checkpoint trained with other settings "
                               f"({', '.join(clashes)}); use a new OUTPUT_MODEL or drop them")
    state.config = replace(saved, steps=config.steps)
    click.echo(f"resuming {output} from step {state.step}")
    return state


def _refuse_overwriting(output: str) -> None:
    """Stop before a fresh run replaces a model that has no checkpoint to resume from (a prior
    shipped without its `checkpoint/`, the bundled default, any diffusers folder): saving
    would overwrite its weights and config without a word."""
    from pathlib import Path

    held = sorted({found.name for pattern in MODEL_FILE_PATTERNS
                   for found in Path(output).glob(pattern)})
    if held:
        raise click.UsageError(f"{output} already holds a model ({', '.join(held)}) but no "
                               "checkpoint/ to resume from, so training would overwrite it; "
                               f"choose a new OUTPUT_MODEL, or delete {output} to train there "
                               "from the start")


def local_folder(output_model: str) -> str:
    """OUTPUT_MODEL as a local path. Training saves (and renames checkpoints) on the local disk,
    so a bucket URI is refused before any work instead of becoming a folder named `s3:`."""
    if is_remote(output_model):
        name = PurePosixPath(output_model.rstrip("/")).name or "my-prior"
        raise click.BadParameter(
            f"{output_model} is not a local folder: sdedit train writes the model to a local "
            f"folder. Train into one (e.g. ./{name}), copy that folder to the bucket, then use "
            f"it with `sdedit run --model {output_model}`", param_hint="OUTPUT_MODEL")
    return local_path(output_model)


def _note_attention(config) -> None:
    """Say so when no level of a new UNet is `attention_resolution` pixels wide: it then has
    no attention at all (e.g. --resolution 64 with the default three widths)."""
    from sdedit.training import unet_config

    if not any(kind.startswith("Attn") for kind in unet_config(config)["down_block_types"]):
        size = config.attention_resolution
        click.echo(f"note: no level of this UNet is {size}x{size} pixels "
                   f"({config.resolution}px with {len(config.channels)} widths), so it has no "
                   "attention; give another width to --channels for one", err=True)


def _log_line(state, window: list[float], started: float, first_step: int) -> str:
    done, total = state.step, state.config.steps
    rate = (done - first_step) / max(time.time() - started, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    return (f"step {done}/{total} ({100 * done / total:.1f}%)  loss {sum(window) / len(window):.4f}"
            f"  {rate:.2f} steps/s  eta {_duration(eta)}")


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _save(state, output: str) -> None:
    from sdedit.training import save_checkpoint, save_model

    save_model(state.ema, output)
    save_checkpoint(state, output)


def finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Refuse NaN and infinity, which click's FloatRange lets through."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}")
    return value


def check_writable(output: str) -> None:
    """Refuse, before training rather than at the first save (`--save-every` steps of work
    later), an OUTPUT_MODEL under a file or in a folder this process cannot write: a file is
    written and removed in OUTPUT_MODEL or the nearest folder above it that exists (nothing is
    created, so a run that fails on its images leaves no folder)."""
    folder = nearest_existing(Path(output))
    probe = folder / f".sdedit-write-check-{os.getpid()}"
    try:
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is a file, not a folder")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise click.BadParameter(f"cannot write the model to {output}: {error}",
                                 param_hint="OUTPUT_MODEL") from error


def run_training(state, images, output: str, save_every: int, log_every: int,
                 time_limit_s: float | None = None) -> bool:
    """Train until `state.config.steps`, logging every `log_every` and saving every
    `save_every` steps and at the end. With `time_limit_s`, stop (and save) after the first
    step that ends past that many seconds. Returns whether all steps were done."""
    from sdedit.schedules import VPSchedule
    from sdedit.training import train_step

    schedule, pending = VPSchedule.linear(), []
    started, first_step = time.time(), state.step
    while state.step < state.config.steps:
        pending.append(train_step(state, images, schedule))
        if state.step % log_every == 0 or state.step == state.config.steps:
            window, pending = _settle(state, pending, output), []
            click.echo(_log_line(state, window, started, first_step))
        if time_limit_s is not None and time.time() - started > time_limit_s:
            break
        if state.step % save_every == 0 and state.step < state.config.steps:
            _settle(state, pending, output)
            pending = []
            _save(state, output)
    _settle(state, pending, output)
    _save(state, output)
    return state.step >= state.config.steps


def _settle(state, pending: list, output: str) -> list[float]:
    """The losses of the steps since the last call, added to `state.losses` (one device sync);
    a NaN or infinite one stops training before it saves weights it has ruined."""
    import torch

    window = torch.stack(pending).float().tolist() if pending else []
    if bad := [loss for loss in window if not math.isfinite(loss)]:
        raise click.ClickException(
            f"training diverged: loss {bad[0]} by step {state.step}, so it stops without saving "
            f"({output} keeps this run's last save, if any). Train with a lower --lr into a new "
            "OUTPUT_MODEL")
    state.losses.extend(window)
    return window


@click.command("train")
@click.argument("images")
@click.argument("output_model")
@click.option("--resolution", type=click.Choice(["32", "64"]), default="32", show_default=True,
              help="Training resolution in pixels.")
@click.option("--steps", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Total optimizer steps (a resumed run continues up to this many).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-4,
              show_default=True, callback=finite,
              help="AdamW learning rate after a linear warmup.")
@click.option("--channels", default="32,64,64", show_default=True,
              help="UNet widths, one level per width, each half the size of the one before; "
                   "attention runs at the level that is 8x8 pixels, so none at --resolution 64 "
                   "with three widths (give four, e.g. 32,64,64,64).")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
              callback=check_device, help="Default: cuda when available, else cpu.")
@click.option("--bf16", is_flag=True, help="bfloat16 autocast for the forward pass.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-every", type=click.IntRange(min=1), default=500, show_default=True,
              help="Write the model and a resumable checkpoint every N steps.")
@click.option("--log-every", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              callback=finite,
              help="Stop after this many minutes, saving a checkpoint that the same command "
                   "resumes from.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch (default: torch's choice).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=MAX_PIXELS, show_default=True,
              help="Largest accepted training image (width x height).")
@storage_option
@click.pass_context
def train(ctx: click.Context, images: str, output_model: str, resolution: str, steps: int,
          batch_size: int, lr: float, channels: str, device: str | None, bf16: bool, seed: int,
          save_every: int, log_every: int, time_limit: float | None,
          threads: int | None, max_pixels: int, storage_options: tuple[str, ...]) -> None:
    """Train a pixel-space DDPM prior on IMAGES and write it to OUTPUT_MODEL.

    IMAGES is a folder, a glob, a bucket URI or a Parquet manifest with an `image`, `source` or
    `guide` column, the first of them it has (so the photos of an `sdedit guides` manifest, not
    its stroke paintings). Images are decoded as `sdedit run` decodes guides (16-bit scaled to
    8 bits, transparency composited on white). OUTPUT_MODEL receives a diffusers-format folder (EMA
    weights, DDPM scheduler config) plus `checkpoint/`; running the same command again resumes
    from it. OUTPUT_MODEL is a local folder: copy it to a bucket to run from there.
    """
    import torch

    from sdedit.training import parameter_count

    output, storage = local_folder(output_model), parse_storage_options(storage_options)
    check_writable(output)
    if threads:
        torch.set_num_threads(threads)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = _make_config(resolution, steps, batch_size, lr, channels, bf16, seed)
    state = _start_state(output, config, torch.device(device), ctx)
    with reported(f"cannot read the training images {images}"):
        uris = image_uris(images, storage)
        tensor = load_images(uris, state.config.resolution, storage, max_pixels)
    tensor = tensor.to(device)  # uint8: small on any card
    click.echo(f"{len(uris)} images at {state.config.resolution}px; "
               f"{parameter_count(state.unet):,} parameters; device {device}")
    limit_s = time_limit * 60 if time_limit else None
    finished = run_training(state, tensor, output, save_every, log_every, limit_s)
    click.echo(f"saved {output} at step {state.step}"
               + ("" if finished else " (time limit reached; rerun the command to continue)"))


def _make_config(resolution, steps, batch_size, lr, channels, bf16, seed):
    from sdedit.training import TrainConfig

    try:
        return TrainConfig(resolution=int(resolution), steps=steps, batch_size=batch_size, lr=lr,
                           channels=parse_channels(channels), bf16=bf16, seed=seed)
    except ValueError as error:
        raise click.UsageError(str(error)) from error
