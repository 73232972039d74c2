"""Shard writers: one narrow interface (`write(rows)`, `close()`), one registry of formats.

A shard is named by a digest of the (id, t0, sample) keys it holds, so a retried write
produces the same name and replaces itself instead of adding a twin. Local shards are written
to a hidden temporary name and renamed; object-store shards are uploaded in one request (an
object appears whole or not at all). Names starting with "." are never read back.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import uuid
from collections.abc import Iterator, Mapping
from typing import IO, Protocol

import pyarrow as pa

from pipeline.manifest import KEY_SCHEMA, id_stem
from tasks.images import with_backoff

DATA_DIR, ERRORS_DIR = "data", "errors"
KEY_COLUMNS = tuple(KEY_SCHEMA.names)  # ("id", "t0", "sample")
# the data columns, in order, with their types as the pipeline builds them (manifest.py, actor.py,
# encode.py); a WebDataset shard's JSON is read back into these types
DATA_TYPES = {"id": pa.string(), "t0": pa.float64(), "sample": pa.int32(), "seed": pa.int64(),
              "image": pa.binary(), "image_format": pa.string(), "width": pa.int32(),
              "height": pa.int32(), "model": pa.string(), "model_digest": pa.string(),
              "steps": pa.int32(), "repeats": pa.int32(), "l2_to_guide": pa.float64()}
DATA_COLUMNS = tuple(DATA_TYPES)
ERROR_COLUMNS = ("id", "t0", "sample", "stage", "error")
URI_COLUMNS = ("guide", "mask")  # manifest columns of URIs, which may carry credentials
TEMP_PREFIX = ".tmp-"
UPLOAD_ATTEMPTS = 4  # backoff 0.5 + 1 + 2 s between them, botocore's own retries within each
SHARD_NAME = re.compile(r"part-[0-9a-f]+\.(?:parquet|tar)")  # every shard writer's file names


def is_shard(name: str) -> bool:
    """Whether a file name under data/ or errors/ is one a shard writer gives (readers take no
    other file there for a shard: a user's own Parquet file is not one)."""
    return SHARD_NAME.fullmatch(name) is not None


class ShardWriter(Protocol):
    """Collects rows for one shard; `close()` commits it atomically and returns its URI."""

    def write(self, rows: pa.Table) -> None: ...

    def close(self) -> str | None: ...


def keys_digest(rows: pa.Table) -> str:
    """A stable name for a set of keys, independent of row order."""
    keys = sorted(zip(*(rows[c].to_pylist() for c in KEY_COLUMNS), strict=True),
                  key=lambda key: repr(key))
    return hashlib.sha256(repr(keys).encode()).hexdigest()[:24]


def commit(folder: str, name: str, payload: bytes, storage_options: Mapping) -> str:
    """Make `folder/name` appear whole: temp file + rename locally, one PUT on object stores."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    from tasks.images import options_for

    fs, root = fsspec.core.url_to_fs(folder, **options_for(folder, storage_options))
    path = f"{root.rstrip('/')}/{name}"
    if isinstance(fs, LocalFileSystem):
        try:
            os.makedirs(root, exist_ok=True)
            temporary = f"{root.rstrip('/')}/{TEMP_PREFIX}{name}.{uuid.uuid4().hex}"
            with open(temporary, "wb") as stream:
                stream.write(payload)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except OSError as error:  # one text argument: Ray Data appends its retry advice to the
            # first, and took the file name's place in (errno, strerror, filename)
            raise type(error)(f"cannot write {path}: {error}") from error
    else:
        _upload(fs, path, payload)
    return fs.unstrip_protocol(path)


def _upload(fs, path: str, payload: bytes, attempts: int = UPLOAD_ATTEMPTS) -> None:
    """One PUT per attempt (the object appears whole or not at all), with backoff through an
    outage of the store of about half a minute (botocore retries each attempt a few times
    too, 5-8 s against an endpoint that does not answer); no bucket, no rights or refused
    credentials fail at once."""
    with_backoff(lambda: fs.pipe_file(path, payload), attempts, delay=0.5)


class _BufferedWriter:
    def __init__(self, folder: str, storage_options: Mapping) -> None:
        self.folder, self.storage_options = folder, storage_options
        self.tables: list[pa.Table] = []

    def write(self, rows: pa.Table) -> None:
        if rows.num_rows:
            self.tables.append(rows)

    def close(self) -> str | None:
        if not self.tables:
            return None
        rows = pa.concat_tables(self.tables)
        name = f"part-{keys_digest(rows)}.{self.extension}"
        return commit(self.folder, name, self.serialise(rows), self.storage_options)


class ParquetShardWriter(_BufferedWriter):
    """One Parquet file per shard."""

    extension = "parquet"

    def serialise(self, rows: pa.Table) -> bytes:
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(rows, buffer, compression="zstd")
        return buffer.getvalue()


class WebDatasetShardWriter(_BufferedWriter):
    """One tar per shard: `KEY.<image_format>` and `KEY.json` (every other field) per sample."""

    extension = "tar"

    def serialise(self, rows: pa.Table) -> bytes:
        buffer = io.BytesIO()
        # POSIX.1-2001: ustar headers, plus a pax record for a member name over ustar's 100
        # characters (long or non-ASCII ids, percent-quoted); short names give ustar bytes.
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for row in rows.to_pylist():
                image = row.pop("image")
                key = webdataset_key(row["id"], row["t0"], row["sample"])
                _add(tar, f"{key}.{row['image_format']}", image)
                _add(tar, f"{key}.json", json.dumps(json_value(row), sort_keys=True,
                                                    allow_nan=False, default=str).encode())
        return buffer.getvalue()


def json_value(value):
    """A pass-through value as strict JSON holds it (what any JSON reader parses, unlike
    Python's NaN): NaN and infinities become null, binary becomes base64 text, dates and
    times ISO 8601 text; other types JSON lacks (decimals, durations) their text."""
    import base64
    import datetime
    import math

    if isinstance(value, dict):
        return {key: json_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return value


def webdataset_key(row_id: str, t0: float, sample: int) -> str:
    """A tar member stem without dots (WebDataset splits names at the first dot)."""
    return f"{id_stem(row_id)}-t{round(t0 * 1e6):07d}-s{sample:04d}"


def webdataset_rows(stream: IO[bytes], images: bool = True) -> Iterator[dict]:
    """The rows of one WebDataset shard: each sample's JSON fields plus its `image` bytes.

    The inverse of `WebDatasetShardWriter`; with `images=False` the image members are skipped
    unread and `image` is None (enough for keys).
    """
    pending: dict[str, bytes] = {}
    with tarfile.open(fileobj=stream, mode="r:") as tar:
        for member in tar:
            key, _, extension = member.name.partition(".")
            if extension == "json":
                record = json.load(tar.extractfile(member))
                yield record | {"image": pending.pop(key, None)}
            elif images:
                pending[key] = tar.extractfile(member).read()


def read_webdataset_shard(stream: IO[bytes], images: bool = True) -> pa.Table:
    """One WebDataset shard as the Parquet writer would hold it: data columns, then pass-through.

    Data columns get their pipeline types; pass-through types are inferred from the JSON values
    (their order is alphabetical: the JSON does not keep the manifest's). With `images=False`
    the image members are skipped unread and `image` is null.
    """
    rows = list(webdataset_rows(stream, images))
    passthrough = sorted({name for row in rows for name in row} - set(DATA_TYPES))
    return pa.table({**{name: pa.array([row.get(name) for row in rows], DATA_TYPES[name])
                        for name in DATA_COLUMNS},
                     **{name: _inferred([row.get(name) for row in rows]) for name in passthrough}})


def read_parquet(stream: IO[bytes], columns: list[str] | None = None,
                 ids: list[str] | None = None) -> pa.Table:
    """A Parquet file from an open stream: `columns` (those it lacks are skipped), and with
    `ids` only those ids' rows, reading only the row groups whose `id` statistics may hold one.

    Through `ParquetFile`, never `pq.read_table`: the latter's dataset scan can drop its last
    reference to the Python stream on an Arrow thread after returning, and when that falls in
    the interpreter's exit the process aborts ("terminate called without an active exception",
    exit 134; 15 of 30 short scripts that read shards and exit).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(stream)
    if ids is None:
        return parquet.read(columns=columns)
    metadata = parquet.metadata
    groups = [g for g in range(metadata.num_row_groups) if _may_hold(metadata.row_group(g), ids)]
    table = parquet.read_row_groups(groups, columns=columns)
    return table.filter(pc.is_in(table["id"], value_set=pa.array(ids, pa.string())))


def _may_hold(group, ids: list[str]) -> bool:
    """Whether a row group's `id` statistics leave room for any of `ids` (yes without them)."""
    column = next((group.column(i) for i in range(group.num_columns)
                   if group.column(i).path_in_schema == "id"), None)
    stats = column.statistics if column is not None else None
    if stats is None or not stats.has_min_max or not isinstance(stats.min, str):
        return True
    return any(stats.min <= row_id <= stats.max for row_id in ids)


def _inferred(values: list) -> pa.Array:
    """A pass-through column from its JSON values; values Arrow cannot type alike (an integer
    beyond int64, as a uint64 column can hold; numbers mixed with text) as their JSON text."""
    try:
        return pa.array(values)
    except (OverflowError, pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if value is None else json.dumps(value) for value in values])


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    tar.addfile(info, io.BytesIO(payload))


WRITERS: dict[str, type[_BufferedWriter]] = {
    "parquet": ParquetShardWriter,
    "webdataset": WebDatasetShardWriter,
}


def data_rows(table: pa.Table) -> pa.Table:
    """Output columns first, then pass-through columns; working columns dropped. The guide and
    mask URIs keep no credentials (a password, a signed URL's signature): they are masked as
    in every message, so that the dataset can be shared. `sdedit inspect` and `evaluate` then
    cannot read those guides (a signed URL expires anyway)."""
    from sdedit.loading import redact

    passthrough = [c for c in table.column_names
                   if c not in DATA_COLUMNS and not c.startswith("_sd_")]
    table = table.select([*DATA_COLUMNS, *passthrough])
    for index, (name, kind) in enumerate(DATA_TYPES.items()):  # every run's shards alike: a
        if table.schema.field(name).type != kind:  # large_string id (pandas) was kept as is
            table = table.set_column(index, name, table[name].cast(kind))
    for name in URI_COLUMNS:
        if name in table.column_names:
            uris = table[name]
            masked = pa.array([None if uri is None else redact(uri) for uri in uris.to_pylist()],
                              uris.type)
            table = table.set_column(table.column_names.index(name), name, masked)
    return table


def error_rows(table: pa.Table) -> pa.Table:
    """The error dataset's columns from failed work rows; credentials the URIs in the messages
    carry (a signed URL's signature, a password) are masked."""
    from sdedit.loading import redact

    messages = [None if m is None else redact(m) for m in table["_sd_error"].to_pylist()]
    return pa.table({
        "id": table["id"].cast(pa.string()), "t0": table["t0"], "sample": table["sample"],
        "stage": table["_sd_stage"], "error": pa.array(messages, pa.string()),
    })


def write_step(table: pa.Table, output: str, data_format: str, image_format: str,
               storage_options: Mapping, run: str) -> pa.Table:
    """Ray Data step: encode, then commit one data shard and one error shard while run `run`
    still holds OUTPUT's lease (LeaseLostError otherwise); returns counts."""
    import pyarrow.compute as pc

    from pipeline.encode import encode_batch
    from pipeline.lease import confirm_held

    table = encode_batch(table, image_format)
    failed = pc.is_valid(table["_sd_stage"])
    good, bad = table.filter(pc.invert(failed)), table.filter(failed)
    data = WRITERS[data_format](f"{output.rstrip('/')}/{DATA_DIR}", storage_options)
    data.write(data_rows(good))
    confirm_held(output, run, storage_options)
    data.close()
    errors = ParquetShardWriter(f"{output.rstrip('/')}/{ERRORS_DIR}", storage_options)
    errors.write(error_rows(bad))
    if bad.num_rows:  # checked again: the data shard's upload took time
        confirm_held(output, run, storage_options)
    errors.close()
    return pa.table({
        "written": [good.num_rows],
        "failed": [bad.num_rows],
        "edit_seconds": [float(pc.sum(table["_sd_edit_seconds"]).as_py() or 0.0)],
        "edit_started_at": [pc.min(table["_sd_edit_started_at"]).as_py()],
        "edit_finished_at": [pc.max(table["_sd_edit_finished_at"]).as_py()],
    })
