"""Manifests from folders of images, so augmentation (or editing with ready masks) needs no
hand-written Parquet.

The manifest has `id`, `guide` (the image itself), optional `mask`, `task`, `source` and
`label` (the image's sub-folder) when images sit in sub-folders. Local paths under the
manifest's folder (a plain path or a file:// URI) are written relative to it; everything else
as a full URI. A masks folder inside the images' folder is not taken for images.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from pathlib import PurePosixPath

from tasks.presets import get_preset
from tasks.sources import (
    folder_rows,
    is_remote,
    list_images,
    local_path,
    relative_to,
    stderr_note,
)

# what `sdedit manifest` says of .parquet files found where images were expected
NOT_A_MANIFEST = "`sdedit manifest` takes a folder or glob of images, not a manifest"


def match_masks(rows: list[dict], masks: str, storage_options: dict | None = None) -> None:
    """Set each row's `mask` to the image under `masks` with the same relative stem.

    A mask matches by its path relative to `masks` without suffix ("cats/01.png" for
    "cats/01.jpg"), or failing that by file stem alone, but only where that is no guess: the
    mask lies at the top of `masks` (a flat folder of masks, so no sub-folder disagrees with
    the image's) and no other mask and no other image has its stem. Rows without a match keep
    no mask, so a masked task names them instead of borrowing another image's mask.
    """
    found = [(uri, str(PurePosixPath(relative).with_suffix("")))
             for uri, relative in list_images(masks, storage_options)]
    by_path = {key: uri for uri, key in found}
    mask_stems = Counter(PurePosixPath(key).name for _, key in found)
    by_stem = {key: uri for uri, key in found if "/" not in key and mask_stems[key] == 1}
    keys = [str(PurePosixPath(row.pop("_relative")).with_suffix("")) for row in rows]
    image_stems = Counter(PurePosixPath(key).name for key in keys)
    for row, key in zip(rows, keys, strict=True):
        stem = PurePosixPath(key).name
        row["mask"] = by_path.get(key) or (by_stem.get(stem) if image_stems[stem] == 1 else None)


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
    inside = (masks,) if masks else ()  # masks kept under the images' folder are not images
    rows = folder_rows(location, storage_options, inside, NOT_A_MANIFEST)
    if masks:  # the same listing again: its notes are said already
        relatives = dict(list_images(location, storage_options, inside, note=None))
        for row in rows:
            row["_relative"] = relatives[row["source"]]
        match_masks(rows, masks, storage_options)
    missing = [row["source"] for row in rows if preset.requires_mask and not row.get("mask")]
    if missing:
        raise ValueError(
            f"task {task!r} needs a mask per image; none found for {len(missing)} image(s), "
            f"e.g. {missing[0]} (pass --masks FOLDER with files named like the images)"
        )
    unmasked = [row["source"] for row in rows if masks and not row.get("mask")]
    if unmasked:
        stderr_note(f"{len(unmasked)} of {len(rows)} images have no mask under {masks}, e.g. "
                    f"{unmasked[0]}: their rows have none, so SDEdit changes the whole image")
    base = (posixpath.dirname(output) if is_remote(output)
            else str(PurePosixPath(local_path(output)).parent))
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
    """Write the manifest for `location` to the Parquet file `output`, whole (an interrupted
    write leaves an earlier manifest there as it was); returns its row count."""
    from tasks.guides import write_parquet

    records = manifest_records(location, output, task, masks, labels, storage_options)
    write_parquet(records, output, storage_options or {})
    return len(records)
