"""Resume: what is already committed under OUTPUT, and whether this run may continue it.

Committed work is whatever the visible shards under `data/` and `errors/` hold; nothing else is
remembered, so a run killed at any moment resumes by an anti-join on (id, t0, sample). The
first start records the output-deciding configuration in `OUTPUT/_run_config.json`; a later
run with a different one is refused unless it asks to overwrite.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline.manifest import Key, is_local
from pipeline.writers import DATA_DIR, ERRORS_DIR, KEY_COLUMNS, TEMP_PREFIX, webdataset_rows

RUN_CONFIG = "_run_config.json"
SUMMARY = "summary.json"


class ConfigMismatchError(RuntimeError):
    """OUTPUT holds a run with a different configuration."""


@dataclass(frozen=True)
class Committed:
    """Keys visible under OUTPUT: written outputs, failed keys and failures by stage."""

    written: frozenset[Key] = frozenset()
    failed: frozenset[Key] = frozenset()
    errors_by_stage: Mapping[str, int] = field(default_factory=dict)
    data_rows: int = 0  # rows in data shards; more than len(written) means duplicates
    error_rows: int = 0  # duplicate manifest ids give several error rows for one key

    @property
    def keys(self) -> frozenset[Key]:
        """Every committed key, written or failed (a new set: keep it, do not re-evaluate)."""
        return self.written | self.failed


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
    written, rows = set(), 0
    for path in _visible(fs, f"{root}/{DATA_DIR}", suffix):
        keys = read_data(fs, path)
        written.update(keys)
        rows += len(keys)
    failed, stages = set(), Counter()
    for path in _visible(fs, f"{root}/{ERRORS_DIR}", ".parquet"):
        for *key, stage in _parquet_keys(fs, path, extra=("stage",)):
            failed.add(tuple(key))
            stages[stage] += 1
    return Committed(frozenset(written), frozenset(failed), dict(stages), rows,
                     sum(stages.values()))


def _parquet_keys(fs, path: str, extra: tuple[str, ...] = ()) -> list[tuple]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as stream:
        table = pq.read_table(stream, columns=[*KEY_COLUMNS, *extra])
    return list(zip(*(table[c].to_pylist() for c in table.column_names), strict=True))


def _tar_keys(fs, path: str) -> list[Key]:
    with fs.open(path, "rb") as stream:
        return [tuple(row[c] for c in KEY_COLUMNS) for row in webdataset_rows(stream, images=False)]


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
