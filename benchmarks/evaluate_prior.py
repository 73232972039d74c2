"""Split the emoji data, then sample and measure a trained prior for its model card.

    python benchmarks/evaluate_prior.py split EMOJI_64_DIR SPLIT_DIR
    python benchmarks/evaluate_prior.py evaluate --train SPLIT_DIR/train \
        --holdout SPLIT_DIR/holdout --model default --out sdedit/priors/default

`evaluate` writes `samples.png` (generation from t0 = 1), `sdedit_by_t0.png` (held-out image |
stroke guide | outputs by t0) and `evaluation.json`, and prints a Markdown table: by t0, the
mean distance from outputs to their nearest training image (falls as outputs become realistic)
and the mean squared error to the guide (rises as outputs move away from it).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image, ImageFilter

HOLDOUT_BUCKETS = 20  # 1 in 20 emoji groups held out
T0S = (0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
STROKE_SIZE, PALETTE_SIZE = 15, 4  # at 64 px: flat blobs without eyes or text, as a crude painting
UPSCALE = 2  # contact sheets show 32 px tiles at 64 px


def is_holdout(name: str) -> bool:
    """Deterministic hold-out of 1 in 20 emoji groups by the SHA-256 of the group key (the
    first code point of the file name), so that skin-tone and gender variants of a held-out
    emoji are held out too."""
    group = name.split(".")[0].split("-")[0]
    digest = hashlib.sha256(group.encode()).digest()
    return int.from_bytes(digest[:8], "big") % HOLDOUT_BUCKETS == 0


def to_rgb(path: Path) -> Image.Image:
    """An image composited on white, as `sdedit train` sees it."""
    rgba = Image.open(path).convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")


def to_tensor(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """RGB images -> float [N, 3, r, r] in [-1, 1], resized with antialiasing."""
    arrays = [np.asarray(im.resize((resolution, resolution), Image.Resampling.LANCZOS))
              for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def stroke_guide(image: Image.Image, seed: int) -> Image.Image:
    """SDEdit's stroke simulation (median filter + colour quantisation) of a 64 px image."""
    try:
        from tasks.strokes import simulate_strokes
    except ImportError:  # checkouts without the tasks package: the same recipe inline
        smooth = image.filter(ImageFilter.MedianFilter(STROKE_SIZE))
        return smooth.quantize(PALETTE_SIZE, method=Image.Quantize.MEDIANCUT).convert("RGB")
    return simulate_strokes(image, stroke_size=STROKE_SIZE, palette_size=PALETTE_SIZE, seed=seed)


def nearest_distance(outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per output, the RMS pixel distance ([-1, 1] units) to its nearest reference image."""
    flat_out, flat_ref = outputs.flatten(1).double(), reference.flatten(1).double()
    squared = torch.cdist(flat_out, flat_ref).pow(2) / flat_out.shape[1]
    return squared.min(dim=1).values.sqrt()


def guide_mse(outputs: torch.Tensor, guides: torch.Tensor) -> torch.Tensor:
    """Per output, the mean squared error to its guide ([-1, 1] units)."""
    return (outputs - guides).pow(2).flatten(1).mean(dim=1)


def contact_sheet(rows: list[torch.Tensor]) -> Image.Image:
    """Rows of [N, 3, r, r] tensors in [-1, 1] -> one upscaled grid image."""
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels, "RGB")
    return image.resize((image.width * UPSCALE, image.height * UPSCALE), Image.Resampling.NEAREST)


def generate(prior, count: int, steps: int, seed: int) -> torch.Tensor:
    """`count` samples from pure noise (SDEdit with t0 = 1 from a blank guide), clamped."""
    import sdedit

    blank = torch.zeros(count, 3, prior.resolution, prior.resolution, device=prior.device)
    seeds = [sdedit.stable_seed("sample", seed, i) for i in range(count)]
    edited = prior.edit(blank, t0=1.0, steps=steps, generator=sdedit.generators(seeds))
    return edited.clamp(-1, 1).cpu()


def edit_by_t0(
    prior, guides: torch.Tensor, t0s, steps: int, seed: int
) -> dict[float, torch.Tensor]:
    """SDEdit outputs for every guide at every t0, one seeded generator per (guide, t0),
    clamped to [-1, 1]."""
    import sdedit

    outputs = {}
    for t0 in t0s:
        seeds = [sdedit.stable_seed("edit", seed, t0, i) for i in range(len(guides))]
        edited = prior.edit(guides.to(prior.device), t0=t0, steps=steps,
                            generator=sdedit.generators(seeds))
        outputs[t0] = edited.clamp(-1, 1).cpu()  # as saved images are
    return outputs


def load_folder(folder: Path, resolution: int, limit: int | None = None):
    """(names, RGB images at 64 px, [-1, 1] tensor at `resolution`) for a folder of PNGs;
    with `limit`, that many spread evenly over the sorted names."""
    paths = sorted(folder.glob("*.png"))
    if limit is not None:  # spread the pick over the sorted names (code points)
        paths = paths[:: max(len(paths) // limit, 1)][:limit]
    images = [to_rgb(path) for path in paths]
    return [p.name for p in paths], images, to_tensor(images, resolution)


@click.group()
def main() -> None:
    """Evaluate a trained prior."""


@main.command("split")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("target", type=click.Path(file_okay=False, path_type=Path))
def split(source: Path, target: Path) -> None:
    """Link SOURCE/*.png into TARGET/train and TARGET/holdout (1 in 20 emoji groups)."""
    counts = {"train": 0, "holdout": 0}
    for image in sorted(source.glob("*.png")):
        part = "holdout" if is_holdout(image.name) else "train"
        link = target / part / image.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(image.resolve())
        counts[part] += 1
    click.echo(f"train {counts['train']}, holdout {counts['holdout']}")


@main.command("evaluate")
@click.option("--train", "train_dir", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--holdout", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--model", default="default", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--samples", default=64, show_default=True, help="Samples from t0 = 1.")
@click.option("--sample-steps", default=100, show_default=True)
@click.option("--guides", default=24, show_default=True, help="Held-out images to edit.")
@click.option("--edit-steps", default=100, show_default=True, help="Strided steps per edit.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=1, show_default=True)
@click.option("--device", default="cpu", show_default=True)
def evaluate(train_dir: Path, holdout: Path, model: str, out: Path, samples: int,
             sample_steps: int, guides: int, edit_steps: int, seed: int, threads: int,
             device: str) -> None:
    """Sample from MODEL and measure SDEdit on stroke guides of held-out images."""
    import sdedit

    torch.set_num_threads(threads)
    started = time.time()
    prior = sdedit.load(model, device=device)
    _, _, train = load_folder(train_dir, prior.resolution)
    reference = torch.cat([train, train.flip(-1)])  # training used horizontal flips
    _, originals, held = load_folder(holdout, prior.resolution, guides)
    strokes = to_tensor([stroke_guide(im, seed) for im in originals], prior.resolution)
    generated = generate(prior, samples, sample_steps, seed)
    outputs = edit_by_t0(prior, strokes, T0S, edit_steps, seed)
    rows = _table(reference, held, strokes, generated, outputs)
    out.mkdir(parents=True, exist_ok=True)
    side = int(np.ceil(np.sqrt(samples)))
    contact_sheet([generated[i: i + side] for i in range(0, samples, side)]).save(
        out / "samples.png")
    shown = min(len(strokes), 12)
    columns = [held[:shown], strokes[:shown], *(outputs[t0][:shown] for t0 in T0S)]
    contact_sheet([torch.stack(row) for row in zip(*columns, strict=True)]).save(
        out / "sdedit_by_t0.png")
    summary = {"model": model, "rows": rows, "samples": samples, "sample_steps": sample_steps,
               "guides": len(strokes), "edit_steps": edit_steps, "seed": seed,
               "stroke_size": STROKE_SIZE, "palette_size": PALETTE_SIZE,
               "threads": threads, "device": device, "wall_s": round(time.time() - started, 1)}
    (out / "evaluation.json").write_text(json.dumps(summary, indent=2) + "\n")
    click.echo(_markdown(rows))
    click.echo(f"wall time {summary['wall_s']} s")


def _table(reference, held, strokes, generated, outputs) -> list[dict]:
    rows = [
        _row("held-out image (reference)", held, strokes, reference),
        _row("stroke guide (t0 = 0)", strokes, strokes, reference),
    ]
    rows += [_row(f"t0 = {t0}", images, strokes, reference) for t0, images in outputs.items()]
    rows.append(_row("samples from noise", generated, None, reference))
    return rows


def _row(name: str, images, strokes, reference) -> dict:
    distances = nearest_distance(images, reference)
    row = {"what": name, "nn_rms": round(float(distances.mean()), 4),
           "nn_rms_se": round(float(distances.std() / len(distances) ** 0.5), 4)}
    if strokes is not None:
        row["guide_mse"] = round(float(guide_mse(images, strokes).mean()), 4)
    return row


def _markdown(rows: list[dict]) -> str:
    lines = ["| outputs | NN distance to training set (RMS, [-1,1]) ± s.e. | MSE to guide |",
             "|---|---|---|"]
    for row in rows:
        mse = f"{row['guide_mse']:.4f}" if "guide_mse" in row else "-"
        lines.append(f"| {row['what']} | {row['nn_rms']:.4f} ± {row['nn_rms_se']:.4f} | {mse} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
