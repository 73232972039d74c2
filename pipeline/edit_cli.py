"""`sdedit edit`: SDEdit one guide image with a prior, for quick tries.

The recipe: decode the guide (and mask) with `tasks.images`, so `sdedit edit` accepts and
converts exactly the inputs `sdedit run` does, resize them to the model's resolution, run
`sdedit.edit` with one seeded generator, resize the output back to the guide's size and encode
it. Masks are read as grayscale with white = synthesize, black = keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import click

from tasks.cli import check_device, nearest_existing
from tasks.images import MAX_PIXELS, InputError, open_image, to_mask, to_rgb

MaskMode = Literal["binary", "soft"]
_MODES_FOR_CHANNELS = {1: "L", 3: "RGB"}


@dataclass(frozen=True)
class EditOptions:
    """The SDEdit settings of one `sdedit edit` call, validated by click."""

    t0: float
    steps: int | None
    repeats: int
    seed: int
    mask_mode: MaskMode


def _check_t0(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise click.BadParameter(f"t0 must lie in (0, 1] (the noise level to start from), "
                                 f"got {value}")
    return value


def _check_out(ctx: click.Context, param: click.Parameter, value: Path) -> Path:
    """Refuse, before any editing, an output whose extension names no format Pillow writes
    (unknown, read-only such as .psd, or without its writer installed such as .h5)."""
    from PIL import Image

    format_name = Image.registered_extensions().get(value.suffix.lower())
    if format_name is None:
        raise click.BadParameter(f"cannot tell the image format of {value} from its extension; "
                                 "use e.g. .png")
    if format_name not in Image.SAVE:
        raise click.BadParameter(f"Pillow reads {format_name} images ({value.suffix}) but "
                                 "cannot write them; use e.g. .png")
    if not _writable(format_name):
        raise click.BadParameter(f"Pillow cannot write RGB or grayscale {format_name} images "
                                 f"({value.suffix}) here; use e.g. .png")
    folder = nearest_existing(value.parent)
    if not folder.is_dir():
        raise click.BadParameter(f"cannot write {value}: {folder} is a file, not a folder")
    return value


def _writable(format_name: str) -> bool:
    """Whether Pillow encodes a tiny image in `format_name` in a mode `sdedit edit` writes."""
    import io

    from PIL import Image

    for mode in _MODES_FOR_CHANNELS.values():
        try:
            Image.new(mode, (8, 8)).save(io.BytesIO(), format=format_name)
            return True
        except Exception:  # noqa: BLE001 (plugins raise OSError, ValueError, KeyError...)
            continue
    return False


@click.command()
@click.option("--model", "model_uri", default="default", show_default=True,
              help="Prior: 'default', 'builtin:tiny', a diffusers folder, file:// or s3:// URI, "
                   "or a hub id.")
@click.option("--guide", "guide_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Guide image (any format Pillow reads).")
@click.option("--mask", "mask_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Mask image the guide's size: white = synthesize, black = keep.")
@click.option("--mask-mode", type=click.Choice(["binary", "soft"]), default="binary",
              show_default=True, help="binary: threshold the mask at 50%; soft: keep grey levels "
                                      "as blend weights in [0, 1].")
@click.option("--t0", type=float, default=0.5, show_default=True, callback=_check_t0,
              help="Noise level in (0, 1]: small = faithful to the guide, large = free.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Strided sampling steps (default: every step of the schedule).")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="SDEdit passes K; each re-noises the previous output.")
@click.option("--seed", type=click.IntRange(-2**63, 2**64 - 1), default=0, show_default=True,
              help="Noise seed (what torch.Generator.manual_seed takes).")
@click.option("--device", default=None, callback=check_device,
              help="torch device (default: cuda if available, else cpu).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Network dtype; sampling stays float32.")
@click.option("--allow-pickle", is_flag=True,
              help="Allow pickle (.bin) weights; they can run code, so only for trusted models.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=MAX_PIXELS, show_default=True,
              help="Largest accepted guide or mask (width x height).")
@click.option("--out", "out_path", required=True, callback=_check_out,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Output image; the format follows the extension (e.g. .png).")
def edit(
    model_uri: str, guide_path: Path, mask_path: Path | None, mask_mode: MaskMode, t0: float,
    steps: int | None, repeats: int, seed: int, device: str | None, dtype: str,
    allow_pickle: bool, max_pixels: int, out_path: Path,
) -> None:
    """SDEdit one guide image and write the result to --out."""
    options = EditOptions(t0, steps, repeats, seed, mask_mode)
    guide = read_image(guide_path, max_pixels)
    mask = read_mask(mask_path, guide.size, max_pixels) if mask_path is not None else None
    if mask is not None and _lossy(out_path):
        _note(f"{out_path.suffix} is lossy: outside the mask the written image is near the guide, "
              "not exactly it (.png and .webp keep it exactly)")
    prior = _load_prior(model_uri, device, dtype, allow_pickle)
    if mask is not None and not mask_to_tensor(mask, prior.resolution, mask_mode).any():
        _note(f"mask {mask_path} marks nothing to synthesize at the model's "
              f"{prior.resolution}x{prior.resolution} (white marks it; --mask-mode {mask_mode}"
              f"{' counts a pixel from 50% grey' if mask_mode == 'binary' else ''}): the "
              "output is the guide unchanged")
    result = edit_image(prior, guide, mask, options)
    _save(result, out_path)
    click.echo(f"wrote {out_path}")


def edit_image(prior, guide, mask, options: EditOptions):
    """SDEdit a PIL guide (and optional L mask) with `prior`; returns a PIL image of its size.

    Images not at the model's resolution are resized to it, and the output back to the guide's
    size; the kept region (mask = 0) is then pasted from the original guide so it stays exact.
    """
    import sdedit

    resolution = prior.resolution
    guide = _to_channels(guide, prior.channels)
    resized = guide.size != (resolution, resolution)
    if resized:
        stretch = " (stretched: not square)" if guide.width != guide.height else ""
        _note(f"resizing guide from {_size(guide.size)} to the model's resolution "
              f"{_size((resolution, resolution))}{stretch}; the output is resized back to "
              f"{_size(guide.size)}")
    guide_batch = image_to_tensor(guide, resolution).to(prior.device)
    mask_batch = None
    if mask is not None:
        mask_batch = mask_to_tensor(mask, resolution, options.mask_mode).to(prior.device)
    out = sdedit.edit(prior.model, prior.schedule, guide_batch, t0=options.t0, mask=mask_batch,
                      steps=options.steps, repeats=options.repeats,
                      generator=sdedit.generators([options.seed]))
    if not bool(out.isfinite().all()):  # NaN becomes 0 in the uint8 cast: a black image
        half = (" (float16's range is small: try --dtype bfloat16 or float32)"
                if str(prior.model.dtype) == "torch.float16" else "")
        raise click.ClickException(f"SDEdit gave NaN or infinite values with model "
                                   f"{prior.name}; nothing was written{half}")
    result = tensor_to_image(out[0], guide.size)
    if resized and mask is not None:
        result = _paste_kept(result, guide, mask, options.mask_mode, resolution)
    return result


def read_image(path: Path, max_pixels: int = MAX_PIXELS):
    """Decode a guide to 8-bit RGB exactly as `sdedit run` does (`tasks.images.to_rgb`)."""
    return _decode(path, to_rgb, max_pixels, param_hint="'--guide'")


def read_mask(path: Path, size: tuple[int, int], max_pixels: int = MAX_PIXELS):
    """Decode a mask to 8-bit grayscale as `sdedit run` does (white = synthesize); it must
    have the guide's size."""
    mask = _decode(path, to_mask, max_pixels, param_hint="'--mask'")
    if mask.size != size:
        raise click.BadParameter(f"mask {path} is {_size(mask.size)} but the guide is "
                                 f"{_size(size)}; a mask must have the guide's size",
                                 param_hint="'--mask'")
    return mask


def _decode(path: Path, convert, max_pixels: int, param_hint: str):
    """Read `path` and decode it with `tasks.images`; its InputError becomes a usage error."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise click.BadParameter(f"cannot read {path}: {error}", param_hint=param_hint) from error
    try:
        return convert(open_image(data, str(path), max_pixels), str(path))
    except InputError as error:
        raise click.BadParameter(str(error), param_hint=param_hint) from error


def image_to_tensor(image, resolution: int):
    """A PIL image as a float tensor [1, C, R, R] in [-1, 1] (x / 127.5 - 1)."""
    import numpy as np
    import torch
    from PIL import Image

    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def mask_to_tensor(mask, resolution: int, mode: MaskMode):
    """An L mask as a float tensor [1, 1, R, R] in [0, 1]; binary mode thresholds at 50%."""
    import numpy as np
    import torch
    from PIL import Image

    if mask.size != (resolution, resolution):
        mask = mask.resize((resolution, resolution), Image.Resampling.BILINEAR)
    weights = np.asarray(mask, dtype=np.float32) / 255.0
    if mode == "binary":
        weights = (weights >= 0.5).astype(np.float32)
    return torch.from_numpy(weights)[None, None].contiguous()


def tensor_to_image(sample, size: tuple[int, int]):
    """A [C, H, W] tensor in [-1, 1] as an 8-bit PIL image resized to `size` (width, height)."""
    import torch
    from PIL import Image

    pixels = ((sample.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _paste_kept(result, guide, mask, mode: MaskMode, resolution: int):
    """Give the full-size output back what resizing took from the kept region. Binary masks:
    the guide's own pixels where the mask is below 50%. Soft masks: `sdedit.edit` already
    blended m * edit + (1 - m) * guide at the model's resolution, so only the guide's detail
    lost to that resolution comes back, in proportion to the keep weight 1 - m (the guide
    exactly where m is 0), continuous in m and without weighing the edit twice."""
    import numpy as np
    from PIL import Image

    if mode == "binary":
        return Image.composite(result, guide, mask.point(lambda v: 255 if v >= 128 else 0))
    lanczos = Image.Resampling.LANCZOS
    blurred = guide.resize((resolution, resolution), lanczos).resize(guide.size, lanczos)
    shape = (guide.height, guide.width, -1)
    exact = np.asarray(guide, np.float32).reshape(shape)
    detail = exact - np.asarray(blurred, np.float32).reshape(shape)
    keep = 1.0 - np.asarray(mask, np.float32).reshape(guide.height, guide.width, 1) / 255.0
    pixels = np.asarray(result, np.float32).reshape(shape) + keep * detail
    pixels = np.where(keep == 1.0, exact, np.clip(np.round(pixels), 0, 255)).astype(np.uint8)
    return Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)


def _to_channels(image, channels: int):
    if channels not in _MODES_FOR_CHANNELS:
        raise click.ClickException(f"the model takes {channels}-channel images; sdedit edit "
                                   "handles 1 (grayscale) or 3 (RGB)")
    return image.convert(_MODES_FOR_CHANNELS[channels])


def _load_prior(model_uri: str, device: str | None, dtype: str, allow_pickle: bool):
    import sdedit
    from sdedit.loading import ModelLoadError

    try:
        return sdedit.load(model_uri, device=device, dtype=dtype, allow_pickle=allow_pickle)
    except (ModelLoadError, ValueError) as error:
        raise click.ClickException(f"cannot load model {model_uri}: {error}") from error


def _save(image, path: Path) -> None:
    """Write `image` in the format `path`'s suffix names, with the settings `sdedit run`
    encodes that format with (Pillow's own WebP is lossy: the kept region changed by up to
    73 grey levels); other formats with Pillow's defaults."""
    from PIL import Image

    from pipeline.encode import ENCODERS

    kind = Image.registered_extensions().get(path.suffix.lower(), "").lower()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **ENCODERS.get(kind, {}))
    except (OSError, ValueError) as error:  # a format that cannot hold this mode says either
        raise click.ClickException(f"cannot write {path}: {error}") from error


def _lossy(path: Path) -> bool:
    """Whether `sdedit edit` writes `path`'s format lossily (JPEG; WebP it writes lossless)."""
    from PIL import Image

    return Image.registered_extensions().get(path.suffix.lower()) == "JPEG"


def _note(message: str) -> None:
    click.echo(f"note: {message}", err=True)


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"
