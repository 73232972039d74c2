"""Resume: what is already committed under OUTPUT, and whether this run may continue it.

Committed work is whatever the visible shards under `data/` and `errors/` hold; nothing else is
remembered, so a run killed at any moment resumes by an anti-join on (id, t0, sample). The
first start records the output-deciding configuration in `OUTPUT/_run_config.json`; a later
run with a different one is refused unless it asks to overwrite.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.manifest import KEY_SCHEMA, keys_table
from pipeline.writers import (
    DATA_DIR,
    ERRORS_DIR,
    KEY_COLUMNS,
    TEMP_PREFIX,
    ParquetShardWriter,
    webdataset_rows,
)
from tasks.images import is_local

RUN_CONFIG = "_run_config.json"
SUMMARY = "summary.json"


class ConfigMismatchError(RuntimeError):
    """OUTPUT holds a run with a different configuration."""


@dataclass(frozen=True)
class Committed:
    """What OUTPUT holds, as key tables (`KEY_SCHEMA`; Arrow, so millions of keys stay compact
    and reach the workers without copies): one row per data row and per error row."""

    written: pa.Table = field(default_factory=KEY_SCHEMA.empty_table)
    failed: pa.Table = field(default_factory=lambda: _with_stage(KEY_SCHEMA.empty_table()))

    @property
    def keys(self) -> pa.Table:
        """Every committed key, written or failed (duplicates possible)."""
        return pa.concat_tables([self.written, self.failed.select(KEY_SCHEMA.names)])

    @property
    def written_keys(self) -> int:
        """Distinct keys with a data row."""
        return self.written.group_by(list(KEY_SCHEMA.names)).aggregate([]).num_rows

    @property
    def data_rows(self) -> int:
        """Rows in data shards; more than `written_keys` means duplicates."""
        return self.written.num_rows

    @property
    def error_rows(self) -> int:
        """Rows in error shards (duplicate manifest ids give several for one key)."""
        return self.failed.num_rows

    @property
    def errors_by_stage(self) -> dict[str, int]:
        """Error rows per stage."""
        counts = self.failed["stage"].value_counts()
        return {stage.as_py(): count.as_py()
                for stage, count in zip(counts.field(0), counts.field(1), strict=True)}


def _with_stage(keys: pa.Table) -> pa.Table:
    return keys.append_column("stage", pa.array([None] * keys.num_rows, pa.string()))


def output_fs(output: str, storage_options: Mapping):
    """The fsspec file system and root path of OUTPUT."""
    import fsspec

    options = {} if is_local(output) else dict(storage_options)
    return fsspec.core.url_to_fs(output, **options)


def _visible(fs, folder: str, suffix: str) -> list[str]:
    if not fs.exists(folder):
        return []
    return sorted(p for p in fs.ls(folder, detail=False)
                  if p.endswith(suffix) and not p.rsplit("/", 1)[-1].startswith((".", "_")))


def read_committed(output: str, data_format: str, storage_options: Mapping) -> Committed:
    """Read only the key columns of every committed shard (data and errors)."""
    fs, root = output_fs(output, storage_options)
    fs.invalidate_cache()
    read_data = _tar_keys if data_format == "webdataset" else _parquet_keys
    suffix = ".tar" if data_format == "webdataset" else ".parquet"
    empty = Committed()
    written = [read_data(fs, path) for path in _visible(fs, f"{root}/{DATA_DIR}", suffix)]
    failed = [_parquet_keys(fs, path, stage=True)
              for path in _visible(fs, f"{root}/{ERRORS_DIR}", ".parquet")]
    return Committed(pa.concat_tables([empty.written, *written]),
                     pa.concat_tables([empty.failed, *failed]))


def _parquet_keys(fs, path: str, stage: bool = False) -> pa.Table:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as stream:
        table = pq.read_table(stream, columns=[*KEY_COLUMNS, *(["stage"] if stage else [])])
    keys = table.select(KEY_COLUMNS).cast(KEY_SCHEMA)
    return keys.append_column("stage", table["stage"].cast(pa.string())) if stage else keys


def _tar_keys(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as stream:
        return keys_table([tuple(row[c] for c in KEY_COLUMNS)
                           for row in webdataset_rows(stream, images=False)])


def forget_errors(output: str, stages: tuple[str, ...], storage_options: Mapping) -> int:
    """Make committed failures of `stages` work again; returns how many error rows went.

    Each error shard holding such rows is deleted, then its other rows are committed again as a
    new shard. Deleting first means a kill in between only turns those other rows back into
    work too (done again on the next run), never into duplicates."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not stages:
        return 0
    fs, root = output_fs(output, storage_options)
    forgotten = 0
    for path in _visible(fs, f"{root}/{ERRORS_DIR}", ".parquet"):
        with fs.open(path, "rb") as stream:
            rows = pq.read_table(stream)
        retry = pc.is_in(rows["stage"], value_set=pa.array(stages, pa.string()))
        count = pc.sum(retry).as_py() or 0
        if count:
            fs.rm(path)
            kept = ParquetShardWriter(f"{output.rstrip('/')}/{ERRORS_DIR}", storage_options)
            kept.write(rows.filter(pc.invert(retry)))
            kept.close()
            forgotten += count
    return forgotten


def clean_temporaries(output: str, storage_options: Mapping) -> int:
    """Delete leftovers of interrupted local writes; returns how many were removed."""
    fs, root = output_fs(output, storage_options)
    removed = 0
    for folder in (DATA_DIR, ERRORS_DIR):
        path = f"{root}/{folder}"
        if fs.exists(path):
            for leftover in fs.ls(path, detail=False):
                if leftover.rsplit("/", 1)[-1].startswith(TEMP_PREFIX):
                    fs.rm(leftover)
                    removed += 1
    return removed


def claim_output(output: str, record: dict, overwrite: bool, storage_options: Mapping) -> None:
    """Record this run's configuration in OUTPUT, or refuse a different recorded one.

    With `overwrite`, everything a previous run left (shards, errors, summary) is deleted first.
    """
    fs, root = output_fs(output, storage_options)
    path = f"{root}/{RUN_CONFIG}"
    if overwrite:
        for name in (DATA_DIR, ERRORS_DIR, SUMMARY, RUN_CONFIG):
            if fs.exists(f"{root}/{name}"):
                fs.rm(f"{root}/{name}", recursive=True)
    elif fs.exists(path):
        stored = json.loads(fs.cat_file(path))
        changed = sorted(k for k in set(stored) | set(record) if stored.get(k) != record.get(k))
        if changed:
            details = "; ".join(f"{k}: {stored.get(k)!r} -> {record.get(k)!r}" for k in changed)
            raise ConfigMismatchError(
                f"{output} holds a run with a different configuration ({details}). Use the "
                "same options to resume, another OUTPUT, or --overwrite to replace it")
        return
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(path, json.dumps(record, indent=2, sort_keys=True).encode())
