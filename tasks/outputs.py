"""Reading a finished (or running) `sdedit run` OUTPUT folder.

Layout (see the pipeline issue): `OUTPUT/data/*.parquet` one row per (id, t0, sample) with the
encoded `image`; `OUTPUT/errors/*.parquet` one row per failure; `OUTPUT/summary.json`.
Guides and masks are found through the pass-through `guide` / `mask` columns; relative ones
resolve against the manifest's folder, recorded in the summary's configuration.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

from tasks.sources import is_remote, resolve

KEY_COLUMNS = ("id", "t0", "sample")
HIDDEN_PREFIXES = (".", "_")  # temporary / uncommitted files are never read


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

    return fsspec.core.url_to_fs(folder.uri, **folder.storage_options)


def parquet_files(folder: OutputFolder, sub: str) -> list[str]:
    """Committed Parquet files under OUTPUT/sub, sorted (hidden temporary names skipped)."""
    fs, root = _filesystem(folder)
    where = posixpath.join(root, sub)
    if not fs.exists(where):
        return []
    found = [
        path
        for path in fs.find(where)
        if path.endswith(".parquet") and not posixpath.basename(path).startswith(HIDDEN_PREFIXES)
    ]
    return sorted(found)


def read_table(
    folder: OutputFolder, sub: str, columns: list[str] | None = None, ids: list[str] | None = None
):
    """Committed rows under OUTPUT/sub as one pyarrow Table (None when there are none).

    `columns` missing from a file are skipped; `ids` keeps only those ids' rows.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, _ = _filesystem(folder)
    tables = []
    for path in parquet_files(folder, sub):
        with fs.open(path, "rb") as file:
            schema_names = pq.read_schema(file).names
            file.seek(0)
            wanted = [c for c in columns if c in schema_names] if columns else None
            filters = [("id", "in", ids)] if ids is not None else None
            tables.append(pq.read_table(file, columns=wanted, filters=filters))
    return pa.concat_tables(tables, promote_options="default") if tables else None


def iter_rows(folder: OutputFolder, columns: list[str] | None = None) -> Iterator[dict]:
    """Output rows one data file at a time, so large datasets stream through."""
    import pyarrow.parquet as pq

    fs, _ = _filesystem(folder)
    for path in parquet_files(folder, "data"):
        with fs.open(path, "rb") as file:
            yield from pq.read_table(file, columns=columns).to_pylist()


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
    """The folder relative guide/mask paths resolve against: explicit, else the summary's."""
    if folder.manifest_base:
        return folder.manifest_base
    manifest = find_value(summary, ("manifest",))
    if not isinstance(manifest, str):
        return None
    if manifest.endswith(".parquet") or any(char in manifest for char in "*?["):
        return posixpath.dirname(manifest) if is_remote(manifest) else _local_dirname(manifest)
    return manifest


def _local_dirname(path: str) -> str:
    from pathlib import Path

    return str(Path(path.removeprefix("file://")).parent)


def resolve_guide(uri: str | None, base: str | None) -> str | None:
    """A guide or mask URI made readable: absolute as is, relative against `base`."""
    if not uri:
        return None
    if "://" in uri or uri.startswith("/"):
        return uri
    return resolve(uri, base) if base else None


def decode(image_bytes: bytes) -> Image.Image:
    """An output image decoded to RGB."""
    return Image.open(io.BytesIO(image_bytes)).convert("RGB")


@lru_cache(maxsize=64)
def _read_bytes(uri: str, options: tuple) -> bytes:
    import fsspec

    with fsspec.open(uri, "rb", **dict(options)) as file:
        return file.read()


def load_image(uri: str, storage_options: dict, mode: str = "RGB") -> Image.Image:
    """A guide or mask from any URI, decoded to `mode` (cached: many outputs share a guide)."""
    options = tuple(sorted(storage_options.items()))
    image = Image.open(io.BytesIO(_read_bytes(uri, options)))
    return image.convert(mode)


def to_unit(image: Image.Image) -> np.ndarray:
    """RGB pixels as float64 in [-1, 1] (the model's units, as the pipeline's L2 uses)."""
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 127.5 - 1.0
