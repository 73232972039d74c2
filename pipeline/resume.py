"""Resume: what is already committed under OUTPUT, and whether this run may continue it.

Committed work is whatever the visible shards under `data/` and `errors/` hold, so a run killed
at any moment resumes by an anti-join on (id, t0, sample). Reading every shard's keys costs a
few object-store round trips per shard, so each finished run also writes an index of the keys
per shard name (`OUTPUT/_committed_data.parquet`, `_committed_errors.parquet`): a shard's name is
a digest of its keys, so an index entry stays true while the shard exists, and only shards the
index does not list are read. The index is a cache: missing or unreadable, the shards are read.
The first start records the output-deciding configuration in `OUTPUT/_run_config.json`; a later
run with a different one is refused unless it asks to overwrite.
"""

from __future__ import annotations

import io
import json
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa

from pipeline.manifest import (
    KEY_SCHEMA,
    READ_THREADS,
    RUN_CONFIG,
    TaskDefaults,
    keys_table,
    loose_keys,
)
from pipeline.writers import (
    DATA_DIR,
    ERRORS_DIR,
    KEY_COLUMNS,
    TEMP_PREFIX,
    ParquetShardWriter,
    commit,
    is_shard,
    read_parquet,
    webdataset_rows,
)
from sdedit.loading import redact
from tasks.images import options_for

SUMMARY = "summary.json"
# the manifest of the last run started (credentials masked), for `sdedit inspect` and `evaluate`
# to resolve relative guides with before that run's summary names it (or when it never will)
RUN_MANIFEST = "_run_manifest.json"
EVALUATION = "evaluation.json"  # `sdedit evaluate`'s report by default
INSPECT_DIR, INSPECT_FILES = "inspect", ("contact_sheet.png", "contact_sheet.html")  # inspect's
INDEXES = {DATA_DIR: "_committed_data.parquet", ERRORS_DIR: "_committed_errors.parquet"}
SHARD = pa.field("shard", pa.dictionary(pa.int32(), pa.string()))  # file name under data/errors
ERROR_KEY_SCHEMA = KEY_SCHEMA.append(pa.field("stage", pa.string()))  # key columns of errors/
WRITTEN_SCHEMA = KEY_SCHEMA.append(SHARD)
FAILED_SCHEMA = ERROR_KEY_SCHEMA.append(SHARD)


class ConfigMismatchError(RuntimeError):
    """OUTPUT holds a run with a different configuration."""


@dataclass(frozen=True)
class Committed:
    """What OUTPUT holds, as Arrow tables (millions of keys stay compact and reach the workers
    without copies): one row per data row (`WRITTEN_SCHEMA`) and per error row
    (`FAILED_SCHEMA`), each with the shard that holds it."""

    written: pa.Table = field(default_factory=WRITTEN_SCHEMA.empty_table)
    failed: pa.Table = field(default_factory=FAILED_SCHEMA.empty_table)

    @property
    def keys(self) -> pa.Table:
        """Every committed key, written or failed (duplicates possible)."""
        return pa.concat_tables([self.written.select(KEY_SCHEMA.names),
                                 self.failed.select(KEY_SCHEMA.names)])

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

    def without_failures(self, stages: tuple[str, ...]) -> tuple[Committed, int]:
        """These keys as `forget_errors(stages)` would leave them, and how many error rows it
        would remove."""
        import pyarrow.compute as pc

        kept = self.failed.filter(pc.invert(in_stages(self.failed["stage"], stages)))
        return Committed(self.written, kept), self.failed.num_rows - kept.num_rows

    @property
    def errors_by_stage(self) -> dict[str, int]:
        """Error rows per stage."""
        counts = self.failed["stage"].value_counts()
        return {stage.as_py(): count.as_py()
                for stage, count in zip(counts.field(0), counts.field(1), strict=True)}


def output_fs(output: str, storage_options: Mapping):
    """The fsspec file system and root path of OUTPUT."""
    import fsspec

    return fsspec.core.url_to_fs(output, **options_for(output, storage_options))


def visible_shards(fs, folder: str, suffix: str) -> list[str]:
    """The committed shards under `folder` whose names end in `suffix`, sorted: what runs
    resume from, and `sdedit inspect` and `evaluate` read."""
    return sorted(path for name, path in _entries(fs, folder).items()
                  if name.endswith(suffix) and is_shard(name))


def holds_shards(fs, root: str) -> bool:
    """Whether OUTPUT (`root` on `fs`) holds a committed data or error shard."""
    return any(is_shard(name) for folder in (DATA_DIR, ERRORS_DIR)
               for name in _entries(fs, f"{root}/{folder}"))


def _entries(fs, path: str) -> dict[str, str]:
    """The names (-> paths) of what a folder holds; none for a folder that does not exist.
    An object store's folder marker (the empty `data/` object a console's "create folder"
    leaves) is no entry."""
    if not fs.exists(path):
        return {}
    entries = {}
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if entry.rstrip("/") != path.rstrip("/") and name:
            entries[name] = entry
    return entries


def shard_schema(output: str, data_format: str,
                 storage_options: Mapping) -> tuple[pa.Schema, str] | None:
    """The Arrow schema of OUTPUT's first committed Parquet data shard, and its URI; None when
    there is none, or for WebDataset tars (their JSON carries no column types)."""
    import pyarrow.parquet as pq

    if data_format != "parquet":
        return None
    fs, root = output_fs(output, storage_options)
    shards = visible_shards(fs, f"{root}/{DATA_DIR}", ".parquet")
    if not shards:
        return None
    with fs.open(shards[0], "rb") as stream:
        return pq.ParquetFile(stream).schema_arrow, fs.unstrip_protocol(shards[0])


class ForeignFilesError(RuntimeError):
    """OUTPUT's data/ or errors/ holds files no run wrote."""


def refuse_a_file(output: str, storage_options: Mapping) -> None:
    """NotADirectoryError when OUTPUT names a file: an object store, which has no folders, took
    one for a folder and wrote beside it (`s3://b/report.txt/data/...`)."""
    fs, root = output_fs(output, storage_options)
    if fs.isfile(root):
        raise NotADirectoryError(f"{output} is a file, not a folder (OUTPUT is the folder the "
                                 "run writes its shards and records in)")


def refuse_foreign_files(output: str, storage_options: Mapping) -> None:
    """ForeignFilesError when OUTPUT's data/ or errors/ holds anything but shards and hidden
    names (a cut write's temporary files, a desktop's .DS_Store): a folder of the user's own
    files given as OUTPUT. --overwrite would delete them, and readers cannot take them for
    shards. NotADirectoryError when OUTPUT is a file (`refuse_a_file`)."""
    refuse_a_file(output, storage_options)
    fs, root = output_fs(output, storage_options)
    for folder in (DATA_DIR, ERRORS_DIR):
        foreign = sorted(name for name in _entries(fs, f"{root}/{folder}")
                         if not (is_shard(name) or name.startswith((".", "_"))))
        if foreign:
            some = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" * (len(foreign) > 5))
            raise ForeignFilesError(
                f"{output.rstrip('/')}/{folder}/ holds files no sdedit run wrote ({some}); a "
                "run keeps only its shards there (part-*.parquet or .tar). Choose another "
                "OUTPUT (an empty or new folder, or one a run made), or move those files out")


def _remove_run(fs, root: str) -> None:
    """Delete what runs and the report commands wrote in OUTPUT (shards, the temporary files
    of cut writes, records, reports), each folder's in one request; other files stay."""
    from fsspec.implementations.local import LocalFileSystem

    for folder, ours in ((DATA_DIR, _run_file), (ERRORS_DIR, _run_file),
                         (INSPECT_DIR, lambda name: name in INSPECT_FILES)):
        path = f"{root}/{folder}"
        doomed = [entry for name, entry in _entries(fs, path).items() if ours(name)]
        if doomed:
            fs.rm(doomed)  # object stores delete a list in batches
        if isinstance(fs, LocalFileSystem) and fs.exists(path) and not fs.ls(path):
            fs.rmdir(path)  # object stores have no folders to leave behind
    for name in (SUMMARY, RUN_CONFIG, RUN_MANIFEST, EVALUATION, *INDEXES.values()):
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}")


def _run_file(name: str) -> bool:
    return is_shard(name) or name.startswith(TEMP_PREFIX)


def read_committed(output: str, data_format: str, storage_options: Mapping) -> Committed:
    """The keys of every committed shard (data and errors): from the index where it lists the
    shard, else from the shard's key columns, several shards at a time."""
    fs, root = output_fs(output, storage_options)
    fs.invalidate_cache()
    read_data = _tar_keys if data_format == "webdataset" else _parquet_keys
    suffix = ".tar" if data_format == "webdataset" else ".parquet"
    return Committed(_folder_keys(fs, root, DATA_DIR, suffix, read_data, WRITTEN_SCHEMA),
                     _folder_keys(fs, root, ERRORS_DIR, ".parquet",
                                  partial(_parquet_keys, schema=ERROR_KEY_SCHEMA), FAILED_SCHEMA))


def _folder_keys(fs, root: str, folder: str, suffix: str, read, schema: pa.Schema) -> pa.Table:
    import pyarrow.compute as pc

    shards = {path.rsplit("/", 1)[-1]: path
              for path in visible_shards(fs, f"{root}/{folder}", suffix)}
    indexed = _read_index(fs, f"{root}/{INDEXES[folder]}", schema)
    names = pa.array(list(shards), pa.string())
    indexed = indexed.filter(pc.is_in(indexed["shard"].cast(pa.string()), value_set=names))
    known = set(pc.unique(indexed["shard"].cast(pa.string())).to_pylist())
    missing = [path for name, path in shards.items() if name not in known]
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        tables = list(pool.map(lambda path: _with_shard(read(fs, path), path), missing))
    return pa.concat_tables([indexed, *(t.cast(schema) for t in tables)])


def _read_index(fs, path: str, schema: pa.Schema) -> pa.Table:
    """The index at `path`, or an empty table when there is none or it cannot be used."""
    if not fs.exists(path):
        return schema.empty_table()
    try:
        with fs.open(path, "rb") as stream:
            return read_parquet(stream, schema.names).cast(schema)
    except (pa.ArrowInvalid, KeyError, ValueError):  # written by another version, or damaged
        return schema.empty_table()


def _with_shard(keys: pa.Table, path: str) -> pa.Table:
    name = pa.array([path.rsplit("/", 1)[-1]], pa.string())
    indices = pa.array(np.zeros(keys.num_rows, np.int32))
    return keys.append_column(SHARD, pa.DictionaryArray.from_arrays(indices, name))


def _parquet_keys(fs, path: str, schema: pa.Schema = KEY_SCHEMA) -> pa.Table:
    """Only the columns of `schema` from a Parquet shard."""
    with fs.open(path, "rb") as stream:
        return read_parquet(stream, schema.names).cast(schema)


def _tar_keys(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as stream:
        return keys_table([tuple(row[c] for c in KEY_COLUMNS)
                           for row in webdataset_rows(stream, images=False)])


def write_index(output: str, committed: Committed, storage_options: Mapping) -> None:
    """Record which keys each committed shard holds, so the next run reads only new shards."""
    import pyarrow.parquet as pq

    for folder, table in ((DATA_DIR, committed.written), (ERRORS_DIR, committed.failed)):
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        commit(output.rstrip("/"), INDEXES[folder], buffer.getvalue(), storage_options)


def forget_errors(output: str, stages: tuple[str, ...], storage_options: Mapping) -> int:
    """Make committed failures of `stages` work again; returns how many error rows went."""
    if not stages:
        return 0
    return _forget(output, lambda rows: in_stages(rows["stage"], stages), storage_options)


def forget_error_rows(output: str, rows: pa.Table, storage_options: Mapping) -> int:
    """Make these committed failures (rows of `Committed.failed`: keys, stage and shard) work
    again; returns how many error rows went."""
    if not rows.num_rows:
        return 0
    chosen = set(zip(loose_keys(rows), rows["stage"].to_pylist(), strict=True))
    shards = set(rows["shard"].cast(pa.string()).to_pylist())

    def select(table: pa.Table) -> pa.Array:
        pairs = zip(loose_keys(table), table["stage"].to_pylist(), strict=True)
        return pa.array([pair in chosen for pair in pairs], pa.bool_())

    return _forget(output, select, storage_options, shards)


def _forget(output: str, select, storage_options: Mapping,
            shards: Collection[str] | None = None) -> int:
    """Delete the error rows that `select(rows) -> mask` picks in each error shard (in those
    named `shards`, or all). Each error shard holding such rows is deleted, then its other rows
    are committed again as a new shard. Deleting first means a kill in between only turns those
    other rows back into work too (done again on the next run), never into duplicates. The
    errors index goes first: a redone key that fails again can land in a shard of the same
    name with another stage."""
    import pyarrow.compute as pc

    fs, root = output_fs(output, storage_options)
    if fs.exists(f"{root}/{INDEXES[ERRORS_DIR]}"):
        fs.rm(f"{root}/{INDEXES[ERRORS_DIR]}")
    forgotten = 0
    for path in visible_shards(fs, f"{root}/{ERRORS_DIR}", ".parquet"):
        if shards is not None and path.rsplit("/", 1)[-1] not in shards:
            continue
        with fs.open(path, "rb") as stream:
            rows = read_parquet(stream)
        chosen = select(rows)
        count = pc.sum(chosen).as_py() or 0
        if count:
            fs.rm(path)
            kept = ParquetShardWriter(f"{output.rstrip('/')}/{ERRORS_DIR}", storage_options)
            kept.write(rows.filter(pc.invert(chosen)))
            kept.close()
            forgotten += count
    return forgotten


def in_stages(stage: pa.ChunkedArray, stages: tuple[str, ...]) -> pa.ChunkedArray:
    """Which error rows failed at one of `stages` (those --retry-errors redoes)."""
    import pyarrow.compute as pc

    return pc.is_in(stage, value_set=pa.array(stages, pa.string()))


def clean_temporaries(output: str, storage_options: Mapping) -> int:
    """Delete leftovers of interrupted local writes; returns how many were removed. At OUTPUT's
    top only those of files the lease holder writes (the caller): a run waiting for the lease
    may be writing its own lease file there."""
    fs, root = output_fs(output, storage_options)
    holders = tuple(TEMP_PREFIX + name
                    for name in (RUN_CONFIG, RUN_MANIFEST, SUMMARY, *INDEXES.values()))
    removed = 0
    for folder, prefixes in ((DATA_DIR, TEMP_PREFIX), (ERRORS_DIR, TEMP_PREFIX), ("", holders)):
        for name, leftover in _entries(fs, f"{root}/{folder}".rstrip("/")).items():
            if name.startswith(prefixes):
                fs.rm(leftover)
                removed += 1
    return removed


def claim_output(output: str, record: dict, overwrite: bool, storage_options: Mapping,
                 defaults: Sequence[TaskDefaults] = (), ignored: Collection[str] = ()) -> None:
    """Record this run's configuration in OUTPUT, or refuse a different recorded one (see
    `recorded` for `defaults` and `ignored`).

    With `overwrite`, what a previous run left (shards, errors, summary) is deleted first, and
    what `sdedit evaluate` and `inspect` made of the outputs replaced. An OUTPUT whose data/ or
    errors/ holds files no run wrote is refused either way (`refuse_foreign_files`).
    """
    fs, root = output_fs(output, storage_options)
    refuse_foreign_files(output, storage_options)
    if overwrite:
        _remove_run(fs, root)
    elif (stored := recorded(output, record, storage_options, defaults, ignored)) is not None:
        gained = {name: record[name] for name in LATER_FIELDS
                  if name in record and name not in stored}
        if not gained:
            return
        record = {**stored, **gained}  # what an earlier version's record lacks, added
    commit(output, RUN_CONFIG, json.dumps(record, indent=2, sort_keys=True).encode(),
           storage_options)  # whole or not at all: a torn record would refuse every rerun


def record_manifest(output: str, manifest: str, storage_options: Mapping) -> None:
    """Record which manifest this run reads (`RUN_MANIFEST`), replacing the last run's."""
    commit(output, RUN_MANIFEST, json.dumps({"manifest": redact(manifest)}).encode(),
           storage_options)


def recorded_manifest(output: str, storage_options: Mapping) -> str | None:
    """The manifest `record_manifest` recorded in OUTPUT, or None."""
    fs, root = output_fs(output, storage_options)
    try:
        return json.loads(fs.cat_file(f"{root}/{RUN_MANIFEST}"))["manifest"]
    except FileNotFoundError:
        return None


# Fields records gained in later versions: a record without one (an OUTPUT an earlier version
# made) matches any value, and the next run records it.
LATER_FIELDS = ("model_config_digest",)

# Recorded as None when the run leaves them to the rows' task presets (or built-in values).
PRESET_FIELDS = ("t0", "samples", "repeats")


def _same_outputs(value):
    """A recorded value as outputs depend on it: a list of t0 values in any order is one."""
    return sorted(value, key=repr) if isinstance(value, list | tuple) else value


def _differs(name: str, stored, new, defaults: Sequence[TaskDefaults]) -> bool:
    """Whether outputs made with the stored value of field `name` may differ from the new
    value's. Unset (None) t0, samples or repeats mean each row's default; the same value
    written out (`--samples 1`, `samples: 1` added to a config file) makes the same outputs
    when every one of `defaults`, those the manifest's rows take, gives that value."""
    if _same_outputs(stored) == _same_outputs(new):
        return False
    if name not in PRESET_FIELDS or None not in (stored, new) or not defaults:
        return True
    return any(_same_outputs(getattr(d, name) if stored is None else stored)
               != _same_outputs(getattr(d, name) if new is None else new) for d in defaults)


class _Unset:
    """How a mismatch shows a t0, samples or repeats left unset: each row's task default."""

    def __repr__(self) -> str:
        return "unset (each row's task default)"


def _shown(name: str, value, other):
    """A recorded value as a mismatch shows it: a switch recorded only when on is off (False),
    not None, where the other side has it on; an unset t0, samples or repeats is `_Unset`."""
    if value is None and name in PRESET_FIELDS:
        return _Unset()
    return False if value is None and isinstance(other, bool) else value


def _same_model_elsewhere(stored: dict, record: dict) -> bool:
    """Whether two records name one prior under two URIs: the same weights' digest and the same
    digest of what its configs decide (records without the latter, of builtins or of earlier
    versions, are told apart by the URI alone)."""
    return all(stored.get(name) is not None and stored.get(name) == record.get(name)
               for name in ("model_digest", "model_config_digest"))


def recorded(output: str, record: dict, storage_options: Mapping,
             defaults: Sequence[TaskDefaults] = (), ignored: Collection[str] = ()) -> dict | None:
    """The record OUTPUT holds when it is of this configuration (None: it holds none, or one
    of a run that committed nothing, which failed to start or was stopped first: no output
    can mix); a different one raises ConfigMismatchError naming what changed. `defaults` are
    where this run's rows take unset t0, samples and repeats from
    (`manifest.defaults_in_play`); without them, unset and set values always differ. `ignored`
    fields decide none of this manifest's outputs (`manifest.undeciding`)."""
    fs, root = output_fs(output, storage_options)
    path = f"{root}/{RUN_CONFIG}"
    if not fs.exists(path):
        return None
    try:
        stored = json.loads(fs.cat_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        if not holds_shards(fs, root):
            return None
        raise ConfigMismatchError(
            f"{output.rstrip('/')}/{RUN_CONFIG} does not hold a run's configuration ({error}); "
            "delete that file if OUTPUT's data is from this configuration, or --overwrite to "
            "replace it") from error
    ignored = {*ignored, *(name for name in LATER_FIELDS if name not in stored)}
    if _same_model_elsewhere(stored, record):
        ignored.add("model")  # the prior moved (another bucket, a copied folder)
    changed = sorted(k for k in set(stored) | set(record)
                     if k not in ignored and _differs(k, stored.get(k), record.get(k), defaults))
    if changed and not holds_shards(fs, root):
        return None
    if changed:
        details = "; ".join(f"{k}: {_shown(k, stored.get(k), record.get(k))!r} -> "
                            f"{_shown(k, record.get(k), stored.get(k))!r}" for k in changed)
        raise ConfigMismatchError(
            f"{output} holds a run with a different configuration ({details}). Use the "
            "same options to resume, another OUTPUT, or --overwrite to replace it")
    return stored
