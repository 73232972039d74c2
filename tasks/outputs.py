"""Reading a finished (or running) `sdedit run` OUTPUT folder.

Layout (see the pipeline issue): `OUTPUT/data/*.parquet` one row per (id, t0, sample) with the
encoded `image` (or `OUTPUT/data/*.tar` WebDataset shards, read back into the same table);
`OUTPUT/errors/*.parquet` one row per failure; `OUTPUT/summary.json`.
Guides and masks are found through the pass-through `guide` / `mask` columns; relative ones
resolve against the manifest's folder, recorded in the summary's configuration.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.config import Format
from pipeline.manifest import READ_THREADS
from tasks.images import (
    MAX_PIXELS,
    options_for,
    read_image,
)
from tasks.sources import is_absolute, is_remote, resolve

# data shard name endings by format, as pipeline.writers.WRITERS writes them
SHARD_SUFFIXES: dict[Format, str] = {"parquet": ".parquet", "webdataset": ".tar"}
FORMAT_NAMES: dict[Format, str] = {"parquet": "Parquet", "webdataset": "WebDataset (tar)"}


@dataclass(frozen=True)
class OutputFolder:
    """An OUTPUT URI plus how to reach it and where its manifest's relative paths start."""

    uri: str
    storage_options: dict = field(default_factory=dict)
    manifest_base: str | None = None

    def path(self, *parts: str) -> str:
        """A URI inside the folder."""
        return posixpath.join(self.uri.rstrip("/"), *parts)


def _filesystem(folder: OutputFolder):
    import fsspec

    return fsspec.core.url_to_fs(folder.uri, **options_for(folder.uri, folder.storage_options))


def shard_files(folder: OutputFolder, sub: str, suffix: str = ".parquet") -> list[str]:
    """Committed `suffix` shards under OUTPUT/sub, sorted: the files `sdedit run` takes for
    shards when it resumes, no other file there."""
    from pipeline.resume import visible_shards

    fs, root = _filesystem(folder)
    return visible_shards(fs, posixpath.join(root, sub), suffix)


def data_shards(folder: OutputFolder) -> tuple[Format, list[str]]:
    """The format OUTPUT/data holds and its committed shards (summary.json decides a mix)."""
    found = {name: shard_files(folder, "data", suffix) for name, suffix in SHARD_SUFFIXES.items()}
    held = [name for name, paths in found.items() if paths]
    if len(held) > 1:
        configured = read_summary(folder).get("config", {}).get("format")
        held = [configured] if configured in held else held
    if len(held) == 1:
        return held[0], found[held[0]]
    if held:
        raise ValueError(f"{folder.path('data')} holds both Parquet and WebDataset shards and "
                         "summary.json does not say which format the run wrote")
    raise FileNotFoundError(f"no output shards under {folder.path('data')}: neither Parquet "
                            "(*.parquet) nor WebDataset (*.tar) files")


def shard_times(folder: OutputFolder, sub: str) -> dict[str, float]:
    """When each file under OUTPUT/sub was last written, in POSIX seconds, by its path as
    `shard_files` gives it (the store's own clock: a local file's mtime, an object's
    LastModified); none for a folder that does not exist."""
    fs, root = _filesystem(folder)
    path = posixpath.join(root, sub)
    if not fs.exists(path):
        return {}
    return {entry["name"].rstrip("/"): _written_at(entry, folder.path(sub))
            for entry in fs.ls(path, detail=True) if entry.get("type") != "directory"}


def _written_at(entry: dict, where: str) -> float:
    from datetime import datetime

    for key in ("mtime", "LastModified", "last_modified", "updated", "modified"):
        value = entry.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    raise ValueError(f"the store of {where} gives no modification time for "
                     f"{entry['name']}, so the newest outputs cannot be told")


def read_shard(
    fs, path: str, data_format: Format, columns: list[str] | None = None,
    ids: list[str] | None = None, uri: str | None = None,
):
    """One committed data shard as a pyarrow Table in the Parquet dataset's columns and types.

    `columns` missing from the shard are skipped; `ids` keeps only those ids' rows. A shard
    cut short or in another format is a ValueError naming it (`uri`, else `path`); a storage
    failure stays an OSError.
    """
    import pyarrow as pa

    try:
        with fs.open(path, "rb") as file:
            return SHARD_READERS[data_format](file, columns, ids)
    except OSError:
        raise
    except (ValueError, tarfile.TarError, pa.ArrowException) as error:
        raise ValueError(f"shard {uri or path} is not a readable {FORMAT_NAMES[data_format]} "
                         f"file (cut short or damaged?): {type(error).__name__}: {error}"
                         ) from error


def _read_parquet(file, columns: list[str] | None, ids: list[str] | None):
    from pipeline.writers import read_parquet

    return read_parquet(file, columns, ids)


def _read_webdataset(file, columns: list[str] | None, ids: list[str] | None):
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.writers import read_webdataset_shard

    table = read_webdataset_shard(file, images=columns is None or "image" in columns)
    if ids is not None:
        table = table.filter(pc.is_in(table["id"], value_set=pa.array(ids, pa.string())))
    return table.select([c for c in columns if c in table.column_names]) if columns else table


SHARD_READERS = {"parquet": _read_parquet, "webdataset": _read_webdataset}


def read_table(
    folder: OutputFolder, sub: str, columns: list[str] | None = None, ids: list[str] | None = None
):
    """Committed rows under OUTPUT/sub as one pyarrow Table (None when there are none).

    `data` is read in whichever format the run wrote (see `data_shards`); other folders
    (`errors`) are Parquet. `columns` missing from a file are skipped; `ids` keeps only those
    ids' rows.
    """
    import pyarrow as pa

    try:
        shards = committed_shards(folder, sub)
    except FileNotFoundError:  # no data shard: every output failed, or none committed yet
        return None
    tables = [table for _, table in read_shards(folder, shards, columns, ids, READ_THREADS)]
    # permissive: shards of earlier versions may type a column apart (string and large_string)
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def committed_shards(folder: OutputFolder, sub: str = "data") -> tuple[Format, list[str]]:
    """The format and committed shards of OUTPUT/sub: `data` in the run's format (see
    `data_shards`: FileNotFoundError when none), other folders (`errors`) Parquet."""
    return data_shards(folder) if sub == "data" else ("parquet", shard_files(folder, sub))


def read_shards(
    folder: OutputFolder, shards: tuple[Format, list[str]], columns: list[str] | None = None,
    ids: list[str] | None = None, threads: int = 1,
) -> Iterator[tuple[str, object]]:
    """(URI, pyarrow Table) of each of `shards` in order, so that a row can be told by its
    shard (`columns` and `ids` as in `read_table`). One at a time, so large datasets stream
    through; with `threads`, that many at once, for callers that keep every table anyway (an
    object store answers each read after a round trip: 80 shards took 98 s one by one)."""
    from concurrent.futures import ThreadPoolExecutor

    fs, root = _filesystem(folder)
    data_format, paths = shards

    def read(path: str) -> tuple[str, object]:
        uri = folder.path(posixpath.relpath(path, root))
        return uri, read_shard(fs, path, data_format, columns, ids, uri)

    if threads == 1:
        yield from map(read, paths)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        yield from pool.map(read, paths)


def iter_shards(folder: OutputFolder, columns: list[str] | None = None,
                ids: list[str] | None = None, threads: int = 1) -> Iterator[tuple[str, object]]:
    """(URI, pyarrow Table) of each data shard in turn (either format; FileNotFoundError when
    there is none; `threads` as in `read_shards`)."""
    return read_shards(folder, committed_shards(folder), columns, ids, threads)


def read_summary(folder: OutputFolder) -> dict:
    """OUTPUT/summary.json, or {} when the run has not written one yet."""
    fs, root = _filesystem(folder)
    path = posixpath.join(root, "summary.json")
    if not fs.exists(path):
        return {}
    with fs.open(path, "r") as file:
        return json.load(file)


def find_value(tree: object, names: tuple[str, ...]) -> object | None:
    """The first value under any of `names`, searching nested dicts depth-first."""
    if isinstance(tree, dict):
        for name in names:
            if name in tree and not isinstance(tree[name], dict):
                return tree[name]
        for value in tree.values():
            found = find_value(value, names)
            if found is not None:
                return found
    return None


def manifest_base(folder: OutputFolder, summary: dict) -> str | None:
    """The folder relative guide/mask paths resolve against: explicit, else that of the
    manifest the last run started recorded (`pipeline.resume.RUN_MANIFEST`: also while a first
    run writes, or after one was stopped or killed, before any summary), else that of the
    manifest the summary records (OUTPUTs of earlier versions). None when none names one."""
    if folder.manifest_base:
        return folder.manifest_base
    manifest = _recorded_manifest(folder) or find_value(summary, ("manifest",))
    if not isinstance(manifest, str):
        return None
    return run_manifest_base(manifest, folder.storage_options)


def _recorded_manifest(folder: OutputFolder) -> str | None:
    from pipeline.resume import recorded_manifest

    try:
        return recorded_manifest(folder.uri, folder.storage_options)
    except Exception:  # noqa: BLE001 (unreadable or malformed: guides are then not resolved)
        return None


def run_manifest_base(manifest: str, storage_options: dict) -> str:
    """The folder `sdedit run` resolved `manifest`'s relative paths against, decided by the
    run's own rule (`pipeline.manifest.list_parquet`: a glob's folder before its first
    wildcard, a folder itself, a file's folder, whatever the file's name). A manifest this
    command cannot list (gone since the run, or in a store out of its reach: outputs with
    absolute guide URIs need no base) is placed by its name: a `.parquet` file's or a glob's
    folder, else itself."""
    try:
        return manifest_folder(manifest, storage_options)
    except Exception:  # noqa: BLE001 (any store's failure: the name still says where)
        if not (manifest.endswith(".parquet") or any(char in manifest for char in "*?[")):
            return manifest
        if is_remote(manifest):
            return posixpath.dirname(manifest)
        return os.path.dirname(os.path.abspath(manifest.removeprefix("file://")))


def manifest_folder(manifest: str, storage_options: dict) -> str:
    """The folder `sdedit run` resolves `manifest`'s relative paths against (see
    `run_manifest_base`), read as the run reads it: `pipeline.manifest.ManifestError` when it
    does not exist or holds no .parquet file."""
    import fsspec

    from pipeline.manifest import list_parquet

    fs, path = fsspec.core.url_to_fs(manifest, **options_for(manifest, storage_options))
    return fs.unstrip_protocol(list_parquet(fs, path, manifest)[1])


def resolve_guide(uri: str | None, base: str | None) -> str | None:
    """A guide or mask URI made readable: absolute as is, relative against `base`."""
    if not uri:
        return None
    if is_absolute(uri):
        return uri
    return resolve(uri, base) if base else None


def decode(image_bytes: bytes) -> Image.Image:
    """An output image decoded to RGB."""
    return Image.open(io.BytesIO(image_bytes)).convert("RGB")


def row_label(row: dict, shard: str) -> str:
    """Which output a data row holds, for messages: id, t0, sample and shard."""
    return f"output id {row['id']!r}, t0 {row['t0']:g}, sample {row['sample']} in {shard}"


def decode_output(image_bytes: bytes, label: str) -> Image.Image:
    """An output image decoded to RGB; a ValueError starting `label` (see `row_label`) when its
    bytes are no image Pillow can decode."""
    try:
        return decode(image_bytes)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        reason = ("not an image Pillow can identify" if isinstance(error, UnidentifiedImageError)
                  else f"{type(error).__name__}: {error}")
        raise ValueError(f"{label}: its image cannot be decoded: {reason}") from error


@lru_cache(maxsize=64)
def _decoded(uri: str, options: str, mask: bool, max_pixels: int) -> Image.Image:
    return read_image(uri, json.loads(options), max_pixels, mask=mask)


def load_image(uri: str, storage_options: dict, mode: str = "RGB",
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A guide (mode "RGB") or mask (mode "L") from any URI, decoded as `sdedit run` decodes it
    (`tasks.images.read_image`: EXIF orientation, 16-bit, transparency over white...), so what
    is compared with an output is what the run edited; InputError when it cannot be (cached:
    many outputs share a guide)."""
    options = json.dumps(storage_options, sort_keys=True)  # hashable, nested options too
    return _decoded(uri, options, mode == "L", max_pixels).copy()


def pixel_limit(summary: dict) -> int:
    """The --max-pixels the run that wrote OUTPUT decoded guides with (else the default)."""
    value = summary.get("config", {}).get("max_pixels")
    return value if isinstance(value, int) else MAX_PIXELS


def to_unit(image: Image.Image) -> np.ndarray:
    """RGB pixels as float64 in [-1, 1] (the model's units, as the pipeline's L2 uses)."""
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 127.5 - 1.0
