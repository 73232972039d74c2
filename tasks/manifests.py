"""Manifests from folders of images, so augmentation (or editing with ready masks) needs no
hand-written Parquet.

The manifest has `id`, `guide` (the image itself), optional `mask`, `task`, `source` and
`label` (the image's sub-folder) when images sit in sub-folders. Local paths under the
manifest's folder are written relative to it; everything else as a full URI.
"""

from __future__ import annotations

import posixpath
from pathlib import PurePosixPath

from tasks.images import options_for
from tasks.presets import get_preset
from tasks.sources import folder_rows, is_remote, list_images, relative_to


def match_masks(rows: list[dict], masks: str, storage_options: dict | None = None) -> None:
    """Set each row's `mask` to the image under `masks` with the same relative stem.

    A mask matches by its path relative to `masks` without suffix ("cats/01.png" for
    "cats/01.jpg"), or failing that by file stem alone. Rows without a match keep no mask.
    """
    by_path, by_stem = {}, {}
    for uri, relative in list_images(masks, storage_options):
        by_path[str(PurePosixPath(relative).with_suffix(""))] = uri
        by_stem.setdefault(PurePosixPath(relative).stem, uri)
    for row in rows:
        relative = str(PurePosixPath(row.pop("_relative")).with_suffix(""))
        match = by_path.get(relative) or by_stem.get(PurePosixPath(relative).name)
        row["mask"] = match  # None: no mask for this image


def manifest_records(
    location: str,
    output: str,
    task: str = "augmentation",
    masks: str | None = None,
    labels: bool = True,
    storage_options: dict | None = None,
) -> list[dict]:
    """Manifest rows for every image under a folder or glob, paths relative to `output`'s folder.

    Raises ValueError naming the images without a mask when the task requires masks.
    """
    preset = get_preset(task)
    rows = folder_rows(location, storage_options)
    if masks:
        relatives = dict(list_images(location, storage_options))
        for row in rows:
            row["_relative"] = relatives[row["source"]]
        match_masks(rows, masks, storage_options)
    missing = [row["source"] for row in rows if preset.requires_mask and not row.get("mask")]
    if missing:
        raise ValueError(
            f"task {task!r} needs a mask per image; none found for {len(missing)} image(s), "
            f"e.g. {missing[0]} (pass --masks FOLDER with files named like the images)"
        )
    base = posixpath.dirname(output) if is_remote(output) else str(PurePosixPath(output).parent)
    return [_record(row, base, task, labels) for row in rows]


def _record(row: dict, base: str, task: str, labels: bool) -> dict:
    source = relative_to(row["source"], base)
    record = {"id": row["id"], "guide": source}
    if "mask" in row:
        record["mask"] = relative_to(row["mask"], base) if row["mask"] else None
    record |= {"task": task, "source": source}
    if labels and "label" in row:
        record["label"] = row["label"]
    return record


def write_manifest(
    location: str,
    output: str,
    task: str = "augmentation",
    masks: str | None = None,
    labels: bool = True,
    storage_options: dict | None = None,
) -> int:
    """Write the manifest for `location` to the Parquet file `output`; returns its row count."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = manifest_records(location, output, task, masks, labels, storage_options)
    fs, path = fsspec.core.url_to_fs(output, **options_for(output, storage_options or {}))
    fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    with fs.open(path, "wb") as file:
        pq.write_table(pa.Table.from_pylist(records), file)
    return len(records)
