"""Guide builders at dataset scale: stroke paintings, stroke edits and composites.

Each builder is a pure per-image function `(images, options, seed) -> (guide, mask | None)`.
`build_guides` runs one over every source row as a Ray Data job: workers read the images,
build and write `OUTPUT/guides/<id>.png` (and `OUTPUT/masks/<id>.png`); the driver then
writes `OUTPUT/manifest.parquet` (last, so its presence means the guides are complete) with
`id`, `guide`, `mask`, `task`, `source` and the pass-through columns, paths relative to OUTPUT.
Rows that fail are listed in `OUTPUT/guide_errors.parquet`, never silently dropped.
Images are decoded as `sdedit run` decodes guides (`tasks.images`): transparency over white,
16-bit scaled to 8 bits, masks as "L", at most `GuideJob.max_pixels` pixels.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

from tasks.compositing import composite_guide
from tasks.editing import edit_guide
from tasks.images import (
    MAX_PIXELS,
    InputError,
    options_for,
    read_image,
)
from tasks.regions import Box
from tasks.strokes import simulate_strokes

GuideTask = Literal["synthesis", "editing", "compositing"]
Images = dict[str, Image.Image]
GuideAndMask = tuple[Image.Image, Image.Image | None]


@dataclass(frozen=True)
class StrokeOptions:
    """Stroke simulation: median window and palette size (SDEdit's stroke paintings)."""

    stroke_size: int = 9
    palette_size: int = 12
    seed: int = 0


@dataclass(frozen=True)
class EditOptions:
    """Stroke edits: strokes over `box`, a row's mask, or a seeded random box."""

    stroke_size: int = 9
    palette_size: int = 6
    seed: int = 0
    min_fraction: float = 0.25
    max_fraction: float = 0.5
    box: Box | None = None


@dataclass(frozen=True)
class CompositeOptions:
    """Composites: `box` (or a seeded box) of the foreground pasted at a seeded place."""

    seed: int = 0
    min_fraction: float = 0.25
    max_fraction: float = 0.5
    box: Box | None = None
    same_place: bool = False


GuideOptions = StrokeOptions | EditOptions | CompositeOptions


def strokes_for(images: Images, options: StrokeOptions, seed: int) -> GuideAndMask:
    """Synthesis guide: the source photo's stroke painting; no mask."""
    painting = simulate_strokes(images["source"], options.stroke_size, options.palette_size, seed)
    return painting, None


def edits_for(images: Images, options: EditOptions, seed: int) -> GuideAndMask:
    """Editing guide and mask: strokes over the row's mask, the given box or a random box."""
    region = images.get("mask") or options.box
    return edit_guide(
        images["source"],
        region=region,
        stroke_size=options.stroke_size,
        palette_size=options.palette_size,
        seed=seed,
        min_fraction=options.min_fraction,
        max_fraction=options.max_fraction,
    )


def composites_for(images: Images, options: CompositeOptions, seed: int) -> GuideAndMask:
    """Compositing guide and mask: a region of `foreground` pasted onto `source`."""
    at = (options.box.left, options.box.top) if options.box and options.same_place else None
    return composite_guide(
        images["source"],
        images["foreground"],
        box=options.box,
        at=at,
        seed=seed,
        min_fraction=options.min_fraction,
        max_fraction=options.max_fraction,
    )


BUILDERS: dict[GuideTask, Callable[[Images, GuideOptions, int], GuideAndMask]] = {
    "synthesis": strokes_for,
    "editing": edits_for,
    "compositing": composites_for,
}


@dataclass(frozen=True)
class GuideJob:
    """One guide-building run: which task, with what options, written where."""

    task: GuideTask
    output: str
    options: GuideOptions
    storage_options: dict = field(default_factory=dict)
    batch_size: int = 8
    num_cpus: float = 0.5
    max_pixels: int = MAX_PIXELS


@dataclass(frozen=True)
class GuideReport:
    """What a run wrote: the manifest URI, how many guides, and the failures by id."""

    manifest: str
    written: int
    errors: dict[str, str]


def image_seed(seed: int, row_id: str) -> int:
    """A per-image seed from the run seed and the row id (stable across processes)."""
    from sdedit.seeds import stable_seed

    return stable_seed("guides", seed, row_id) % (2**32)


def read_images(row: dict, job: GuideJob) -> Images:
    """The row's source and foreground as 8-bit RGB and its mask as "L".

    Decoding follows `tasks.images` (alpha over white, 16-bit scaled, size limit), so a
    guide looks as the run will read it; a bad file raises `InputError` naming its URI.
    """
    images = {}
    for key in ("source", "mask", "foreground"):
        if row.get(key):
            images[key] = read_image(row[key], job.storage_options, job.max_pixels,
                                     mask=key == "mask")
    return images


def write_png(image: Image.Image, uri: str, storage_options: dict) -> None:
    """Write `image` as a PNG at `uri` in one request."""
    import fsspec

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    with fsspec.open(uri, "wb", **options_for(uri, storage_options)) as file:
        file.write(buffer.getvalue())


def build_one(row: dict, job: GuideJob) -> dict:
    """Build and write one row's guide (and mask); returns relative paths or the error.

    Pure apart from reading the row's images and writing the two PNGs.
    """
    try:
        images = read_images(row, job)
        guide, mask = BUILDERS[job.task](
            images, job.options, image_seed(job.options.seed, row["id"])
        )
        guide_path, mask_path = f"guides/{row['id']}.png", f"masks/{row['id']}.png"
        write_png(guide, f"{job.output}/{guide_path}", job.storage_options)
        if mask is not None:
            write_png(mask, f"{job.output}/{mask_path}", job.storage_options)
    except (InputError, OSError, ValueError, KeyError) as error:
        return {"index": row["index"], "guide": None, "mask": None, "error": _describe(row, error)}
    return {
        "index": row["index"],
        "guide": guide_path,
        "mask": mask_path if mask else None,
        "error": None,
    }


def _describe(row: dict, error: BaseException) -> str:
    uris = ", ".join(
        f"{key}={row[key]}" for key in ("source", "mask", "foreground") if row.get(key)
    )
    return f"row {row['id']!r} ({uris}): {type(error).__name__}: {error}"


def draw_foregrounds(rows: list[dict], seed: int) -> list[dict]:
    """Give each row without a `foreground` another row's source, drawn per row from `seed`."""
    if len(rows) < 2 and not all(row.get("foreground") for row in rows):
        raise ValueError("compositing needs at least two images, or a 'foreground' column")
    paired = []
    for position, row in enumerate(rows):
        if not row.get("foreground"):
            rng = np.random.default_rng(image_seed(seed, row["id"]))
            other = int(rng.integers(0, len(rows) - 1))
            other += other >= position  # skip the row itself
            row = {**row, "foreground": rows[other]["source"]}
        paired.append(row)
    return paired


def build_guides(rows: list[dict], job: GuideJob) -> GuideReport:
    """Build every row's guide as a Ray Data job and write the ready-to-run manifest.

    1. pair rows with foregrounds (compositing); 2. map the builder over the rows on Ray
    workers (fractional CPUs, so reads never starve); 3. write the manifest and error list.
    """
    import ray

    if job.task == "compositing":
        rows = draw_foregrounds(rows, job.options.seed)
    _make_folders(job)
    work = [
        {
            "index": i,
            **{key: str(row.get(key) or "") for key in ("id", "source", "mask", "foreground")},
        }
        for i, row in enumerate(rows)
    ]
    dataset = ray.data.from_items(work, override_num_blocks=max(1, len(work) // job.batch_size))
    built = dataset.map_batches(
        _build_batch,
        fn_kwargs={"job": job},
        batch_format="pyarrow",
        batch_size=job.batch_size,
        num_cpus=job.num_cpus,
    )
    results = [r for batch in built.iter_batches(batch_format="pyarrow") for r in batch.to_pylist()]
    results.sort(key=lambda result: result["index"])
    return write_manifest(rows, results, job)


def _build_batch(batch, job: GuideJob):
    import pyarrow as pa

    schema = pa.schema(
        [
            ("index", pa.int64()),
            ("guide", pa.string()),
            ("mask", pa.string()),
            ("error", pa.string()),
        ]
    )
    return pa.Table.from_pylist([build_one(row, job) for row in batch.to_pylist()], schema=schema)


def _make_folders(job: GuideJob) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(job.output, **options_for(job.output, job.storage_options))
    for folder in ("guides", "masks") if job.task != "synthesis" else ("guides",):
        fs.makedirs(f"{root}/{folder}", exist_ok=True)


def manifest_records(rows: list[dict], results: list[dict], task: GuideTask) -> list[dict]:
    """Manifest rows (id, guide, mask, task, source, pass-through) for the rows that built."""
    records = []
    for row, result in zip(rows, results, strict=True):
        if result["error"]:
            continue
        record = {"id": row["id"], "guide": result["guide"]}
        if task != "synthesis":
            record["mask"] = result["mask"]
        record |= {"task": task, "source": row["source"]}
        record |= {k: v for k, v in row.items() if k not in ("id", "source", "mask", "index")}
        records.append(record)
    return records


def write_manifest(rows: list[dict], results: list[dict], job: GuideJob) -> GuideReport:
    """Write OUTPUT/manifest.parquet (and guide_errors.parquet when rows failed)."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = manifest_records(rows, results, job.task)
    errors = {row["id"]: r["error"] for row, r in zip(rows, results, strict=True) if r["error"]}
    fs, root = fsspec.core.url_to_fs(job.output, **options_for(job.output, job.storage_options))
    errors_path = f"{root}/guide_errors.parquet"
    if errors:
        table = pa.table({"id": list(errors), "error": list(errors.values())})
        with fs.open(errors_path, "wb") as file:
            pq.write_table(table, file)
    elif fs.exists(errors_path):
        fs.rm(errors_path)  # stale from an earlier run
    manifest = f"{job.output}/manifest.parquet"
    if records:
        with fs.open(f"{root}/manifest.parquet", "wb") as file:
            pq.write_table(pa.Table.from_pylist(records), file)
    return GuideReport(manifest=manifest, written=len(records), errors=errors)
