"""Guide builders at dataset scale: stroke paintings, stroke edits and composites.

Each builder is a pure per-image function `(images, options, seed) -> (guide, mask | None)`.
`build_guides` runs one over every source row as a Ray Data job: workers read the images,
build and write `OUTPUT/guides/<id>.png` (and `OUTPUT/masks/<id>.png`); the driver then
writes `OUTPUT/manifest.parquet` (last, so its presence means the guides are complete) with
`id`, `guide`, `mask`, `task`, `source` and the pass-through columns: guide and mask paths
relative to OUTPUT, sources (and foregrounds) as absolute paths or full URIs.
Rows that fail are listed in `OUTPUT/guide_errors.parquet`, never silently dropped; so is a
row whose id cannot name its files (null, unsafe, too long, or on several rows), which is
never built. Every file appears whole (`pipeline.writers.commit`), and a rerun that builds
no guide removes the earlier run's manifest. The manifest records what made the guides (task,
source, options: `guide_settings`), and `claim_output` refuses a rerun into OUTPUT with other
settings unless it overwrites: runs made from the old guides would no longer match them. A run
that overwrites also removes the guide and mask files of the ids it did not build.
Images are decoded as `sdedit run` decodes guides (`tasks.images`): transparency over white,
16-bit scaled to 8 bits, masks as "L", at most `GuideJob.max_pixels` pixels.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

from PIL import Image

from tasks.compositing import composite_guide
from tasks.editing import edit_guide
from tasks.images import (
    MAX_PIXELS,
    InputError,
    read_image,
)
from tasks.regions import Box
from tasks.sources import MAX_ID_BYTES
from tasks.strokes import PAINT_SIDE, simulate_strokes

GuideTask = Literal["synthesis", "editing", "compositing"]
Images = dict[str, Image.Image]
GuideAndMask = tuple[Image.Image, Image.Image | None]


@dataclass(frozen=True)
class StrokeOptions:
    """Stroke simulation: median window and palette size (SDEdit's stroke paintings)."""

    stroke_size: int = 9
    palette_size: int = 12
    seed: int = 0
    paint_side: int = PAINT_SIDE  # photos are painted at this short side (tasks.strokes)


@dataclass(frozen=True)
class EditOptions:
    """Stroke edits: strokes over `box`, a row's mask, or a seeded random box."""

    stroke_size: int = 9
    palette_size: int = 6
    seed: int = 0
    min_fraction: float = 0.25
    max_fraction: float = 0.5
    box: Box | None = None
    paint_side: int = PAINT_SIDE


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
    painting = simulate_strokes(images["source"], options.stroke_size, options.palette_size, seed,
                                options.paint_side)
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
        paint_side=options.paint_side,
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
# the images each builder reads from a row; a row's other image columns are never opened
INPUTS: dict[GuideTask, tuple[str, ...]] = {
    "synthesis": ("source",),
    "editing": ("source", "mask"),
    "compositing": ("source", "foreground"),
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
    source: str | None = None  # as recorded (`recorded_source`); None records none
    overwrite: bool = False  # replace guides OUTPUT holds from other settings


@dataclass(frozen=True)
class GuideReport:
    """What a run wrote: the manifest URI, how many guides, and one (id, error) per failed row
    in source order (ids may repeat or be None: those rows are among the failures)."""

    manifest: str
    written: int
    errors: list[tuple[str | None, str]]


SETTINGS_KEY = b"sdedit.guides"  # the manifest's schema metadata: `guide_settings` as JSON


def recorded_source(source: str) -> str:
    """`source` as a guides OUTPUT records it: a local path made absolute, a URI without its
    trailing slash, credentials masked."""
    from pathlib import Path

    from sdedit.loading import redact
    from tasks.sources import is_remote, local_path

    source = source.rstrip("/") or "/"
    return redact(source if is_remote(source) else str(Path(local_path(source)).absolute()))


def guide_settings(job: GuideJob) -> dict:
    """What decides the guides a job writes: task, source and every option (seed included),
    as JSON values. Batch size, CPUs and the pixel limit decide none."""
    settings = {"task": job.task, "source": job.source, **asdict(job.options)}
    return json.loads(json.dumps(settings))  # tuples and boxes as lists, as read back


def recorded_settings(output: str, storage_options: dict) -> dict | None:
    """The `guide_settings` OUTPUT's manifest records; None without a manifest, or one that
    records none (an earlier version's, or not a guides manifest)."""
    import pyarrow.parquet as pq

    from pipeline.resume import output_fs

    fs, root = output_fs(output, storage_options)
    try:
        with fs.open(f"{root}/manifest.parquet", "rb") as file:
            metadata = pq.ParquetFile(file).schema_arrow.metadata or {}
    except FileNotFoundError:
        return None
    except ValueError:  # not Parquet (pyarrow's ArrowInvalid): the run's manifest replaces it
        return None
    try:
        return json.loads(metadata[SETTINGS_KEY])
    except (KeyError, ValueError):
        return None


def claim_output(job: GuideJob) -> None:
    """Refuse to build into an OUTPUT whose manifest records other settings, unless the job
    overwrites: an earlier run's guides would be replaced under the runs made from them, whose
    outputs would then no longer match their guides. The same settings go on (a rerun adds the
    source's new images and rebuilds the rest as they were). A setting the record lacks
    matches any value; an OUTPUT without a recording manifest takes any settings."""
    stored = recorded_settings(job.output, job.storage_options)
    if stored is None or job.overwrite:
        return
    settings = guide_settings(job)
    changed = sorted(name for name in settings
                     if name in stored and stored[name] != settings[name])
    if changed:
        details = "; ".join(f"{name}: {stored[name]!r} -> {settings[name]!r}"
                            for name in changed)
        raise ValueError(
            f"{job.output} holds guides made with other settings ({details}); runs made from "
            "them would no longer match their guides. Use the same options, another OUTPUT, "
            "or --overwrite to replace them")


def image_seed(seed: int, row_id: str) -> int:
    """A per-image seed from the run seed and the row id (stable across processes)."""
    from sdedit.seeds import stable_seed

    return stable_seed("guides", seed, row_id) % (2**32)


def id_problem(row_id: str | None, rows: int = 1) -> str | None:
    """Why `row_id` cannot name a row's guide file, or None: the rules `sdedit run` applies to
    ids (not null, safe as a file name, on one row only), plus at most MAX_ID_BYTES bytes."""
    from pipeline.manifest import unsafe_id_reason

    if row_id is None:
        return "the id is missing (null)"
    reason = unsafe_id_reason(row_id)
    if reason is None and len(row_id.encode()) > MAX_ID_BYTES:
        reason = f"it takes {len(row_id.encode())} bytes in UTF-8, over {MAX_ID_BYTES}"
    if reason:
        return f"id {row_id!r} is unsafe as a file name: {reason}"
    if rows > 1:
        return (f"id {row_id!r} appears on {rows} rows; every such row is an error "
                "(give each row its own id)")
    return None


def id_problems(rows: list[dict]) -> list[str | None]:
    """`id_problem` for every row, counting how many rows share each id."""
    counts = Counter(row.get("id") for row in rows)
    return [id_problem(row.get("id"), counts[row.get("id")]) for row in rows]


def read_images(row: dict, job: GuideJob) -> Images:
    """The images the job's builder uses: source and foreground as 8-bit RGB, mask as "L".

    Decoding follows `tasks.images` (alpha over white, 16-bit scaled, size limit), so a
    guide looks as the run will read it; a bad file raises `InputError` naming its URI.
    """
    images = {}
    for key in INPUTS[job.task]:
        if row.get(key):
            images[key] = read_image(row[key], job.storage_options, job.max_pixels,
                                     mask=key == "mask")
    return images


def write_png(image: Image.Image, uri: str, storage_options: dict) -> None:
    """Write `image` as a PNG at `uri`, whole or not at all (`pipeline.writers.commit`)."""
    from pipeline.writers import commit

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    folder, name = posixpath.split(uri)
    commit(folder, name, buffer.getvalue(), storage_options)


def write_parquet(records: list[dict], uri: str, storage_options: dict,
                  metadata: dict[bytes, bytes] | None = None) -> None:
    """Write `records` (with schema `metadata`) as a Parquet file at `uri`, whole or not at
    all: an interrupted write leaves the previous file as it was (`pipeline.writers.commit`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.writers import commit

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records, metadata=metadata), buffer)
    folder, name = posixpath.split(uri)
    commit(folder or ".", name, buffer.getvalue(), storage_options)


def build_one(row: dict, job: GuideJob) -> dict:
    """Build and write one row's guide (and mask); returns relative paths or the error.

    Pure apart from reading the row's images and writing the two PNGs. A row whose id is
    unsafe as a file name is an error, never a file outside OUTPUT.
    """
    problem = id_problem(row["id"]) or _missing_image(row, job.task)
    if problem:
        return _failed(row, problem, job.task)
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
        return _failed(row, f"{type(error).__name__}: {error}", job.task)
    return {
        "index": row["index"],
        "guide": guide_path,
        "mask": mask_path if mask else None,
        "error": None,
    }


def _missing_image(row: dict, task: GuideTask) -> str | None:
    if not row.get("source"):
        return "the row has no image (its 'source' or 'guide' is empty)"
    if task == "compositing" and not row.get("foreground"):
        return "the row has no foreground: no 'foreground' and no other row's image to paste"
    return None


def _failed(row: dict, problem: str, task: GuideTask) -> dict:
    """The result of a failed row: an error line naming the row, its id, the URIs its task
    reads (credentials masked, as in every line `sdedit` writes) and the problem."""
    from sdedit.loading import redact

    parts = [f"id {row['id']!r}", *(f"{key}={row[key]}" for key in INPUTS[task] if row.get(key))]
    error = redact(f"row {row['index']} ({', '.join(parts)}): {problem}")
    return {"index": row["index"], "guide": None, "mask": None, "error": error}


def draw_foregrounds(rows: list[dict], seed: int) -> list[dict]:
    """Give each row without a `foreground` another row's source: the next row with an image
    on a ring ordered by `ring_place` (consistent hashing). A row's partner so depends on its
    own place and its neighbour's, not on where it stands among the rows: adding or removing
    a row changes the partner (and guide) of one other row only, the one before it on the
    ring, so a rerun of `sdedit run`, which keeps what it committed, keeps at most that
    row's outputs of an old guide. A row without an image is its own error, no partner."""
    if len(rows) < 2 and not all(row.get("foreground") for row in rows):
        raise ValueError("compositing needs at least two images, or a 'foreground' column")
    ring = sorted((ring_place(seed, row["id"]), position)
                  for position, row in enumerate(rows) if row.get("source"))
    after = {position: ring[(index + 1) % len(ring)][1]
             for index, (_, position) in enumerate(ring)}
    paired = []
    for position, row in enumerate(rows):
        if not row.get("foreground") and position in after and len(ring) > 1:
            row = {**row, "foreground": rows[after[position]]["source"]}
        paired.append(row)
    return paired


def ring_place(seed: int, row_id: str | None) -> int:
    """A row's place on the ring of compositing partners, from the run seed and its id."""
    from sdedit.seeds import stable_seed

    return stable_seed("foreground", seed, row_id)


def build_guides(rows: list[dict], job: GuideJob) -> GuideReport:
    """Build every row's guide as a Ray Data job and write the ready-to-run manifest.

    1. pair rows with foregrounds (compositing); 2. set aside rows whose id cannot name a
    file (`id_problems`) as errors; 3. map the builder over the other rows on Ray workers
    (fractional CPUs, so reads never starve); 4. write the manifest and error list.
    Callers check OUTPUT first (`claim_output`), before they start Ray.
    """
    if job.task == "compositing":
        rows = draw_foregrounds(rows, job.options.seed)
    _make_folders(job)
    work, results = [], []
    for index, (row, problem) in enumerate(zip(rows, id_problems(rows), strict=True)):
        item = {"index": index, "id": row.get("id"),
                **{key: str(row.get(key) or "") for key in ("source", "mask", "foreground")}}
        if problem:
            results.append(_failed(item, problem, job.task))
        else:
            work.append(item)
    results += _build_on_ray(work, job) if work else []
    results.sort(key=lambda result: result["index"])
    return write_manifest(rows, results, job)


def _build_on_ray(work: list[dict], job: GuideJob) -> list[dict]:
    import ray

    from pipeline.progress import ray_data_errors_held, ray_data_progress

    dataset = ray.data.from_items(work, override_num_blocks=max(1, len(work) // job.batch_size))
    ray_data_progress(dataset.context)  # its report repeats the command's own lines
    dataset.context.raise_original_map_exception = True  # a storage failure, not Ray's wrapper
    built = dataset.map_batches(
        _build_batch,
        fn_kwargs={"job": job},
        batch_format="pyarrow",
        batch_size=job.batch_size,
        num_cpus=job.num_cpus,
    )
    with ray_data_errors_held():  # a failed task is the command's one error line
        return [r for batch in built.iter_batches(batch_format="pyarrow")
                for r in batch.to_pylist()]


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
    from pipeline.resume import output_fs

    fs, root = output_fs(job.output, job.storage_options)
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
        record |= {k: v for k, v in row.items() if k not in ("id", "source", "mask")}
        records.append(record)
    return records


def remove_unlisted(fs, root: str, records: list[dict]) -> None:
    """Delete the guide and mask PNGs under OUTPUT (`root` on `fs`) that the manifest just
    written does not list (an overwritten run's ids that this run did not build), in one
    request per batch on object stores. Run after the manifest is written, so that a failure
    leaves extra files, never a manifest naming missing ones."""
    listed = {record.get(column) for record in records for column in ("guide", "mask")}
    unlisted = [path for folder in ("guides", "masks") if fs.exists(f"{root}/{folder}")
                for path in fs.find(f"{root}/{folder}")
                if path.endswith(".png") and path[len(root):].lstrip("/") not in listed]
    if unlisted:
        fs.rm(unlisted)


def write_manifest(rows: list[dict], results: list[dict], job: GuideJob) -> GuideReport:
    """Write OUTPUT/guide_errors.parquet (row, id, error per failed row) and then
    OUTPUT/manifest.parquet, each whole; remove either left by an earlier run into OUTPUT
    when this run has no errors or no guides (so a manifest always describes this run)."""
    from pipeline.manifest import GUIDE_ERRORS
    from pipeline.resume import output_fs

    records = manifest_records(rows, results, job.task)
    errors = [
        {"row": result["index"], "id": row.get("id"), "error": result["error"]}
        for row, result in zip(rows, results, strict=True) if result["error"]
    ]
    fs, root = output_fs(job.output, job.storage_options)
    settings = {SETTINGS_KEY: json.dumps(guide_settings(job)).encode()}
    for name, content in ((GUIDE_ERRORS, errors), ("manifest.parquet", records)):
        if content:
            write_parquet(content, f"{job.output}/{name}", job.storage_options,
                          settings if name == "manifest.parquet" else None)
        elif fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}")  # stale from an earlier run
    if job.overwrite:
        remove_unlisted(fs, root, records)
    errors_by_row = [(error["id"], error["error"]) for error in errors]
    return GuideReport(f"{job.output}/manifest.parquet", len(records), errors_by_row)
