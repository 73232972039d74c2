"""Manifests: find and check the Parquet files, then expand rows into work keys (id, t0, sample).

A manifest row holds `id`, `guide` (URI), optional `mask` (URI, white = synthesize), `t0` (a
list overriding the run's t0 values), `seed` and `task`; every other column passes through to
the outputs. Expansion is a pure function of a row and the plan, so the driver (counting and
resuming) and the workers (doing the work) agree on the keys without talking to each other; the
driver uses `key_table` (through `count_work`, a chunk of rows at a time), the same rules applied
column-wise (keys only, tested against `row_work`).
Rows that cannot be processed become keys carrying an error (stage "validate"), never drops.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections import Counter, defaultdict
from collections.abc import Collection, Iterator, Mapping, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal

import numpy as np
import pyarrow as pa

from sdedit.loading import redact
from tasks.images import options_for
from tasks.sources import (  # ids that `sdedit manifest` makes fit MAX_ID_LENGTH too
    MAX_ID_LENGTH,
    in_store,
    is_absolute,
    last_target,
)

REQUIRED_COLUMNS = ("id", "guide")
PLAN_COLUMNS = ("id", "guide", "mask", "t0", "seed", "task")
KEY_DECIDING_COLUMNS = ("id", "t0", "task")  # all the driver reads to count and match keys
# Output columns the pipeline adds; a manifest column with one of these names would be lost.
RESERVED_COLUMNS = ("sample", "image", "image_format", "width", "height", "model",
                    "model_digest", "steps", "repeats", "l2_to_guide", "stage", "error")
INTERNAL = "_sd_"  # prefix of working columns that never reach the outputs
RUN_CONFIG = "_run_config.json"  # marks an OUTPUT folder (`pipeline.resume`)
OUTPUT_SHARD_FOLDERS = ("data", "errors")  # its shards (`pipeline.writers.DATA_DIR`...)
GUIDE_ERRORS = "guide_errors.parquet"  # `sdedit guides` lists its failed rows there
READ_ROWS = 8192  # manifest rows a read task expands at a time
READ_THREADS = 16  # files the driver opens at once (manifests, shards): a store's latency
T0_DECIMALS = 6
COUNT_CHUNK_ROWS = 500_000  # manifest rows whose keys the driver counts at once
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Key = tuple[str | None, float, int]
KEY_SCHEMA = pa.schema([("id", pa.string()), ("t0", pa.float64()), ("sample", pa.int64())])
NULL_ID = "\x00"  # stands for a null id when keys are matched (ids with control characters fail)


class ManifestError(ValueError):
    """The manifest cannot be used at all; raised before any work starts."""


@dataclass(frozen=True)
class TaskDefaults:
    """What a task preset contributes to a row: defaults and whether a mask is required."""

    t0: tuple[float, ...]
    samples: int
    repeats: int
    requires_mask: bool


NO_TASK = TaskDefaults((0.5,), 1, 1, False)  # what a row without a task takes


@dataclass(frozen=True)
class ManifestFiles:
    """The Parquet files of a manifest and the folder URI that relative paths resolve against."""

    files: tuple[str, ...]
    base: str
    schema: pa.Schema


@dataclass(frozen=True)
class Plan:
    """Run-level settings that decide each row's work keys; shipped to every worker."""

    base: str
    seed: int
    t0: tuple[float, ...] | None = None
    samples: int | None = None
    repeats: int | None = None
    task: str | None = None
    presets: Mapping[str, TaskDefaults] = field(default_factory=dict)
    untasked: bool = True  # some row names no task (so, without --task, takes NO_TASK)
    duplicates: frozenset[str] = frozenset()
    # Work rows ordered by t0 (full-schedule runs, whose model calls differ per t0, so actor
    # batches share them) or as expanded: each row's t0 x samples rows side by side, so a
    # source image is read once per block (`--steps` runs, where every t0 calls as often).
    order_by_t0: bool = True
    member_names: bool = False  # ids name WebDataset tar members (`id_stem`), which must fit
    own_t0: bool = False  # every row gives its own t0 list, which wins over --t0


@dataclass(frozen=True)
class Work:
    """One unit of output: a key, its per-sample seed and repeats, or why it cannot be made."""

    key: Key
    seed: int
    repeats: int
    error: str | None = None


@contextmanager
def decoding(file: str) -> Iterator[None]:
    """Arrow's own errors reading a manifest file (a damaged footer or page, not a store that
    failed) as a ManifestError naming the file. A damaged page raises a plain OSError, which
    was taken for a storage failure: "rerun to resume", night after night, naming only the
    folder. Errors of the store keep their types (fsspec's OSError subclasses, an errno, the
    clients' own) and stay storage failures."""
    try:
        yield
    except (pa.ArrowInvalid, OSError) as error:
        if isinstance(error, OSError) and (type(error) is not OSError or error.errno):
            raise
        reason = " ".join(str(error).split())  # Arrow's message runs over several lines
        raise ManifestError(
            f"manifest file {file} is not a readable Parquet file ({reason}): repair or "
            "replace it, or move it out of the manifest; the run stops before or where it "
            "reaches the file, and what was committed stays") from error


def find_files(uri: str, storage_options: Mapping) -> ManifestFiles:
    """List the manifest's Parquet files (a file, a folder or a glob) and check their columns."""
    import fsspec
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(uri, **options_for(uri, storage_options))
    files, base = list_parquet(fs, path, uri)

    def schema_of(file: str) -> pa.Schema:
        with fs.open(file, "rb") as stream, decoding(fs.unstrip_protocol(file)):
            schema = pq.ParquetFile(stream).schema_arrow  # empty, cut short, or not Parquet
        check_columns(schema, fs.unstrip_protocol(file))
        return schema

    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:  # a store answers in parallel
        schemas = list(pool.map(schema_of, files))  # the first bad file in order is raised
    names = [fs.unstrip_protocol(f) for f in files]
    return ManifestFiles(tuple(names), fs.unstrip_protocol(base),
                         unified([as_conformed(schema) for schema in schemas], names))


# The types `conform` reads these columns in, whatever form a file gives them
CONFORMED_TYPES = {"id": pa.string(), "guide": pa.string(), "mask": pa.string(),
                   "task": pa.string(), "t0": pa.list_(pa.float64())}


def as_conformed(schema: pa.Schema) -> pa.Schema:
    """A manifest file's schema as `conform` reads its rows, so that files may give t0 as a
    number or as a list of them, and ids as numbers or strings, as rows of one file may (a
    nightly file with one t0 a row beside one with t0 lists stopped the job)."""
    for name, kind in CONFORMED_TYPES.items():
        if name in schema.names:
            index = schema.get_field_index(name)
            schema = schema.set(index, schema.field(index).with_type(kind))
    return schema


def unified(schemas: list[pa.Schema], files: list[str]) -> pa.Schema:
    """One schema for every manifest file: types that differ between files must widen without
    loss (float32 to float64, also in t0 lists; an integer to a wider one of its sign; string
    to large_string; a timestamp to a finer unit short of ns, same time zone), so each file's
    rows can be cast to it as they are read; anything else (a seed column int64 in one file
    and float64 in another would change the seeds) stops the job with a message naming the
    column and the files."""
    try:
        return pa.unify_schemas(schemas)
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        pass
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid) as error:
        raise _type_clash(schemas, files) from error
    for file_schema, file in zip(schemas, files, strict=True):
        for column in file_schema:
            if not _widens(column.type, schema.field(column.name).type):
                other, kind = next((f, s.field(column.name).type)
                                   for s, f in zip(schemas, files, strict=True)
                                   if column.name in s.names
                                   and s.field(column.name).type != column.type)
                raise ManifestError(
                    f"manifest column {column.name!r} is {column.type} in {file} but {kind} in "
                    f"{other}; its files must agree on each column's type (or differ only by "
                    "widening without loss, e.g. float32 to float64)")
    return schema


def _type_clash(schemas: list[pa.Schema], files: list[str]) -> ManifestError:
    """The first column whose types no promotion joins, named with the two files that give
    them (the message listed every file of a folder manifest, 51 KB for 1,000 files, and
    named no column's odd one out)."""
    seen: dict[str, tuple[pa.DataType, str]] = {}  # column -> (its type so far, which file)
    for file_schema, file in zip(schemas, files, strict=True):
        for column in file_schema:
            kind, first = seen.setdefault(column.name, (column.type, file))
            try:
                joined = pa.unify_schemas([pa.schema([(column.name, kind)]),
                                           pa.schema([column])], promote_options="permissive")
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                return ManifestError(
                    f"manifest column {column.name!r} is {column.type} in {file} but {kind} in "
                    f"{first}; its files must agree on each column's type (or differ only by "
                    "widening without loss, e.g. float32 to float64)")
            if joined.field(column.name).type != kind:
                seen[column.name] = (joined.field(column.name).type, file)
    return ManifestError(f"manifest files {files[0]} ... ({len(files)} files) do not agree on "
                         "their columns' types")


PANDAS_INDEX = re.compile(r"__index_level_\d+__")  # a pandas index that to_parquet kept


def typed_as_shards(schema: pa.Schema, shards: tuple[pa.Schema, str] | None,
                    own: Collection[str]) -> pa.Schema:
    """The manifest's schema with each pass-through column (one not in `own`) typed as OUTPUT's
    committed shards hold it, so that every shard of a dataset agrees: readers that take one
    shard's schema for all (pyarrow.dataset, polars, DuckDB, Hugging Face datasets) otherwise
    fail on the first shard that differs. `shards` is (a shard's schema, its URI), or None when
    OUTPUT holds none. A column that is only nulls, and that no shard types yet, is written as
    string: Arrow's null type takes no later value. Values that would not cast unchanged to the
    shards' type stop the job before any work. Columns the shards hold and the manifest lacks
    are added (the run writes them as nulls), so that every shard has them."""
    held, shard = shards if shards is not None else (pa.schema([]), "")
    fields = []
    for column in schema:
        kind = column.type
        if column.name not in own:
            before = held.field(column.name).type if column.name in held.names else pa.null()
            if not pa.types.is_null(before):
                if not _casts_unchanged(kind, before):
                    raise ManifestError(
                        f"manifest column {column.name!r} is {kind} but OUTPUT's shards hold it "
                        f"as {before} ({shard}); the shards of one dataset must agree on each "
                        f"column's type: cast the column to {before} in the manifest, or write "
                        "to another OUTPUT (or rerun with --overwrite)")
                kind = _room_for_any_categories(before)
            elif pa.types.is_null(kind):
                kind = pa.string()
        fields.append(column.with_type(kind))
    fields += [field for field in held if field.name not in schema.names
               and _shared_column(field.name, own)]  # written as nulls
    return pa.schema(fields, metadata=schema.metadata)


def new_columns(schema: pa.Schema, shards: tuple[pa.Schema, str] | None,
                own: Collection[str]) -> list[str]:
    """The manifest's pass-through columns that OUTPUT's committed shards lack (none when it
    holds no shard): only this run's shards will have them."""
    if shards is None:
        return []
    return sorted(name for name in schema.names
                  if name not in shards[0].names and _shared_column(name, own))


def _shared_column(name: str, own: Collection[str]) -> bool:
    """Whether every shard of OUTPUT should hold column `name`: a pass-through column (not one
    of `own`, which the pipeline writes itself), not a pandas index."""
    return name not in own and not PANDAS_INDEX.fullmatch(name)


def _room_for_any_categories(kind: pa.DataType) -> pa.DataType:
    """A dictionary type with indices of at least 32 bits: pandas gives a category column of
    few values int8 indices, which new rows with more categories would overflow."""
    if pa.types.is_dictionary(kind) and kind.index_type.bit_width < 32:
        return pa.dictionary(pa.int32(), kind.value_type, kind.ordered)
    return kind


def _casts_unchanged(source: pa.DataType, target: pa.DataType) -> bool:
    """`_widens`, or both strings or both binaries of either offset width; a dictionary type
    (pandas' categoricals) as its values' type."""
    types = pa.types
    if types.is_dictionary(source) or types.is_dictionary(target):
        return _casts_unchanged(*(kind.value_type if types.is_dictionary(kind) else kind
                                  for kind in (source, target)))
    return _widens(source, target) or all(
        types.is_string(kind) or types.is_large_string(kind) for kind in (source, target)) or all(
        types.is_binary(kind) or types.is_large_binary(kind) for kind in (source, target))


UNITS = ("s", "ms", "us", "ns")  # timestamp units, coarsest first


def _widens(source: pa.DataType, target: pa.DataType) -> bool:
    """Whether every value of `source` casts to `target` unchanged."""
    types = pa.types
    if source == target or types.is_null(source):
        return True
    if types.is_floating(source) and types.is_floating(target):
        return source.bit_width <= target.bit_width
    if types.is_integer(source) and types.is_integer(target):
        return (types.is_signed_integer(source) == types.is_signed_integer(target)
                and source.bit_width <= target.bit_width)
    if types.is_timestamp(source) and types.is_timestamp(target):  # ns holds 1677-2262 only
        return source.tz == target.tz and (source.unit == target.unit or target.unit != "ns"
                                           and UNITS.index(source.unit) <= UNITS.index(target.unit))
    if (types.is_list(source) or types.is_large_list(source)) and (
            types.is_list(target) or types.is_large_list(target)):
        return _widens(source.value_type, target.value_type)
    return (types.is_string(source) and types.is_large_string(target)) or (
        types.is_binary(source) and types.is_large_binary(target))


def list_parquet(fs, path: str, uri: str) -> tuple[list[str], str]:
    http = uri.split("://", 1)[0].lower() in ("http", "https")
    # a glob; over http(s) '?' starts the query (a signed URL), as fsspec's http glob takes it
    if magic := re.search(r"[*\[]" if http else r"[*?\[]", path):
        base = path[: magic.start()].rsplit("/", 1)[0]
        files = _without_guide_errors(_outside_outputs(
            fs, [f for f in fs.glob(path) if not _hidden(f, base, path)], base))
    elif fs.isdir(path):
        base = path
        files = _without_guide_errors(_outside_outputs(
            fs, [f for f in fs.find(path) if f.endswith(".parquet") and not _hidden(f, path)],
            base))
    elif fs.exists(path):
        files, base = [path], path.split("?", 1)[0].rsplit("/", 1)[0]
    else:
        raise ManifestError(f"manifest {uri} does not exist")
    if not files:
        raise ManifestError(f"manifest {uri} holds no .parquet files")
    return files, base


def _outside_outputs(fs, files: list[str], root: str) -> list[str]:
    """`files`, sorted, less those under an OUTPUT of `sdedit run` below `root` (a folder
    holding its `_run_config.json`): `sdedit run gout gout/edits` read its own shards as
    manifest files on every rerun. When `root` itself is an OUTPUT (`sdedit run gout gout`),
    its shard folders are left out and the files beside them kept. One existence check per
    folder between."""
    top = root.rstrip("/")
    marked: dict[str, bool] = {}
    if fs.exists(f"{top}/{RUN_CONFIG}"):
        marked.update({f"{top}/{sub}": True for sub in OUTPUT_SHARD_FOLDERS})

    def in_output(file: str) -> bool:
        folder = posixpath.dirname(file)
        while folder.startswith(f"{top}/") and folder != top:
            if folder not in marked:
                marked[folder] = fs.exists(f"{folder}/{RUN_CONFIG}")
            if marked[folder]:
                return True
            folder, child = posixpath.dirname(folder), folder
            if folder == child:  # the file system's root
                break
        return False

    return sorted(file for file in files if not in_output(file))


def _without_guide_errors(files: list[str]) -> list[str]:
    """`files` less the `guide_errors.parquet` that `sdedit guides` writes beside its
    `manifest.parquet`: a guides OUTPUT taken as a folder manifest read its failed rows as a
    manifest file (no `guide` column) and stopped."""
    held = set(files)
    return [file for file in files if not (
        posixpath.basename(file) == GUIDE_ERRORS
        and posixpath.join(posixpath.dirname(file), "manifest.parquet") in held)]


def _hidden(path: str, root: str, pattern: str = "") -> bool:
    """Whether a file under a folder manifest `root` is hidden: its name or a folder between
    (Spark's `_temporary/`, Delta's `_delta_log/`, `.ipynb_checkpoints/`, `_SUCCESS`) starts
    with '.' or '_', as pyarrow and Spark skip them; unless a glob `pattern` names such a part
    itself (`/d/_staging*/m.parquet`)."""
    below = path[len(root.rstrip("/")):].strip("/")
    named = pattern[len(root.rstrip("/")):].strip("/").split("/") if pattern else []
    return any(part.startswith((".", "_")) and not any(
        wanted.startswith(part[0]) and fnmatch.fnmatchcase(part, wanted) for wanted in named)
        for part in below.split("/"))


def clashing_columns(names: Sequence[str]) -> list[str]:
    """The columns of `names` named as the outputs or the pipeline's working columns are,
    which a manifest cannot pass through."""
    return [name for name in names if name in RESERVED_COLUMNS or name.startswith(INTERNAL)]


def _texts(kind: pa.DataType) -> bool:
    """Strings in any of Arrow's layouts (pandas' categoricals are dictionaries)."""
    if pa.types.is_dictionary(kind):
        return _texts(kind.value_type)
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind) or pa.types.is_null(kind))


def _numbers(kind: pa.DataType) -> bool:
    """Integers, floats or decimals (DuckDB writes [0.3, 0.5] as decimals)."""
    return (pa.types.is_integer(kind) or pa.types.is_floating(kind) and not
            pa.types.is_float16(kind) or pa.types.is_decimal(kind) or pa.types.is_null(kind))


def _lists(kind: pa.DataType) -> bool:
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)
            or pa.types.is_fixed_size_list(kind))


# What each column the pipeline reads must be (Arrow types), and how the message says it.
COLUMN_TYPES = {
    "id": (lambda kind: _texts(kind) or pa.types.is_integer(kind), "strings (or integers)"),
    "guide": (_texts, "URI strings"),
    "mask": (_texts, "URI strings"),
    "task": (_texts, "strings"),
    "t0": (lambda kind: _numbers(kind) or _lists(kind) and _numbers(kind.value_type),
           "numbers or lists of numbers"),
    "seed": (lambda kind: _numbers(kind) or _texts(kind), "integers (or any numbers or text)"),
}


def check_columns(schema: pa.Schema, where: str) -> None:
    """Stop with one message listing every missing required, clashing or mistyped column (a
    guide column of binary, as Spark writes strings without their UTF-8 mark, failed deep in
    the run with a traceback)."""
    problems = []
    missing = [name for name in REQUIRED_COLUMNS if name not in schema.names]
    if missing:
        cased = [other for name in missing for other in schema.names
                 if other.lower() == name and other != name]
        problems.append(f"missing required column(s): {', '.join(missing)}" + (
            f" (found {', '.join(map(repr, cased))}: names are case-sensitive)" if cased else ""))
    twice = sorted({name for name in schema.names if schema.names.count(name) > 1})
    if twice:
        problems.append(f"column(s) named more than once: {', '.join(twice)} (rename them)")
    clashing = clashing_columns(schema.names)
    if clashing:
        problems.append(f"column(s) named like output columns: {', '.join(clashing)} "
                        "(rename them)")
    for name, (accepts, expected) in COLUMN_TYPES.items():
        if name in schema.names and name not in twice and not accepts(
                kind := schema.field(name).type):
            problems.append(f"column {name!r} is {kind}; expected {expected} (cast it)")
    if problems:
        raise ManifestError(f"manifest {where}: " + "; ".join(problems) +
                            f". Expected columns: {', '.join(REQUIRED_COLUMNS)} and optionally "
                            "mask, t0, seed, task, plus any pass-through columns")


def resolve_uri(uri: str, base: str) -> str:
    """An absolute URI: relative paths resolve against the manifest's folder, on an object
    store with their `..` and `.` segments resolved too (`tasks.sources.in_store`); of a
    chained URI, its last target (`zip://a.png::../a.zip`: the archive beside the manifest)."""
    if is_absolute(uri):
        return uri
    chain, target = last_target(uri)
    return chain + in_store(base.rstrip("/") + "/" + target)


def read_plan_columns(manifest: ManifestFiles, storage_options: Mapping) -> pa.Table:
    """The columns that decide work keys (id, t0, task), from every manifest file."""
    import fsspec
    import pyarrow.parquet as pq

    def columns_of(file: str) -> pa.Table:
        fs, path = fsspec.core.url_to_fs(file, **options_for(file, storage_options))
        with fs.open(path, "rb") as stream, decoding(file):
            parquet = pq.ParquetFile(stream)
            columns = [c for c in KEY_DECIDING_COLUMNS if c in parquet.schema_arrow.names]
            return conform(parquet.read(columns=columns))

    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:  # in order, several at a time
        return pa.concat_tables(list(pool.map(columns_of, manifest.files)),
                                promote_options="permissive")


def conform(table: pa.Table) -> pa.Table:
    """Manifest columns in the types expansion expects (`check_columns` has checked them):
    ids, guides, masks and tasks as plain strings (not dictionaries or views), t0 as lists of
    float64 (from single numbers, large or fixed-size lists: Polars writes large lists)."""
    for name in ("id", "guide", "mask", "task"):
        if name in table.column_names and table.schema.field(name).type not in (
                pa.string(), pa.large_string()):  # all-null columns (Arrow's null type) too
            table = _replace(table, name, table[name].cast(pa.string()))
    if "t0" in table.column_names:
        kind = table.schema.field("t0").type
        if not _lists(kind):
            values = [None if v is None else [v]
                      for v in table["t0"].cast(pa.float64()).to_pylist()]
            table = _replace(table, "t0", pa.array(values, pa.list_(pa.float64())))
        elif kind != pa.list_(pa.float64()):
            table = _replace(table, "t0", table["t0"].cast(pa.list_(pa.float64())))
    return table


def _replace(table: pa.Table, name: str, column) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, column)


def duplicate_ids(ids: pa.ChunkedArray) -> frozenset[str]:
    """Ids that appear on more than one row."""
    import pyarrow.compute as pc

    counts = ids.value_counts()
    repeated = counts.field(0).filter(pc.greater(counts.field(1), 1))
    return frozenset(repeated.drop_null().to_pylist())


def row_work(row: Mapping, plan: Plan) -> Iterator[Work]:
    """The work keys of one manifest row, each with its seed, or with the reason it fails."""
    from sdedit.seeds import stable_seed  # torch-free: read tasks and the driver need no torch

    t0s, samples, repeats, problem = _row_settings(row, plan)
    row_id = row.get("id")
    problem = (problem or _id_problem(row_id, plan.duplicates, plan.member_names)
               or _guide_problem(row))
    for t0 in t0s:
        key_t0 = _round_t0(t0)
        error = problem or _t0_problem(key_t0, t0, row_id)
        if error and row.get("guide"):
            error = f"{error} (guide {redact(str(row['guide']))})"  # which row, beside the id
        for sample in range(samples):
            seed = stable_seed(plan.seed, row_seed(row.get("seed")), row_id, key_t0, sample)
            yield Work((row_id, key_t0, sample), seed, repeats, error)


def row_seed(value: object) -> object:
    """A row's seed as its value, not its column's type: a float column (pandas stores
    integers with a missing value so) gave other seeds than the same integers, 5.0 not being
    5 (nor Decimal("5")); NaN is a missing seed."""
    if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        return int(value)
    if isinstance(value, float):
        if value != value:
            return None
        if value.is_integer():
            return int(value)
    return value


def key_table(plan_columns: pa.Table, plan: Plan) -> pa.Table:
    """Every work key (id, t0, sample) that `row_work` gives the rows, and the `row` it comes
    from: keys only, no seeds or errors, so millions of rows are counted and matched in
    seconds. Built as flat columns in one pass, whether rows share a few t0 lists or each gives
    its own (one table per distinct list made a million rows of random t0 take minutes)."""
    table = conform(plan_columns)
    shared: dict = {}  # the keys of a layout without a row's own t0 list: the run's or a task's
    t0s, samples, counts = [], [], []
    for row_t0, task in zip(_column(table, "t0"), _column(table, "task"), strict=True):
        layout = (tuple(row_t0) if row_t0 else None, task or plan.task)
        keys = shared.get(layout) or _layout_keys(*_layout(*layout, plan)[:2])
        if layout[0] is None:
            shared[layout] = keys
        t0s += keys[0]
        samples += keys[1]
        counts.append(len(keys[0]))
    row = np.repeat(np.arange(table.num_rows, dtype=np.int64), counts)
    return pa.table({"id": table["id"].take(row).cast(pa.string()),
                     "t0": np.array(t0s, np.float64), "sample": np.array(samples, np.int64),
                     "row": row}, schema=KEY_SCHEMA.append(pa.field("row", pa.int64())))


def _column(table: pa.Table, name: str) -> list:
    return table[name].to_pylist() if name in table.column_names else [None] * table.num_rows


def _layout_keys(t0s: tuple, samples: int) -> tuple[list[float], list[int]]:
    """The (t0, sample) halves of the keys of a row with these t0 values and sample count."""
    return [_round_t0(t0) for t0 in t0s for _ in range(samples)], list(range(samples)) * len(t0s)


def count_work(plan_columns: pa.Table, plan: Plan, committed: pa.Table,
               chunk_rows: int = COUNT_CHUNK_ROWS) -> tuple[int, int]:
    """(work keys, keys not committed yet) of the manifest's rows, counted `chunk_rows` rows at
    a time against the committed keys of those rows' ids, so the driver never holds every key
    (nor a join over all of them) at once."""
    expected = todo = 0
    for start in range(0, plan_columns.num_rows, chunk_rows):
        chunk = plan_columns.slice(start, chunk_rows)
        keys = key_table(chunk, plan)
        expected += keys.num_rows
        keys = keys.filter(pa.array(~shared_keys(keys["id"], plan)))  # the driver's (below)
        done = committed_mask(keys, committed_for(chunk["id"], committed))
        todo += keys.num_rows - int(done.sum())
    return expected, todo


def in_manifest(plan_columns: pa.Table, plan: Plan, committed: pa.Table,
                chunk_rows: int = COUNT_CHUNK_ROWS) -> np.ndarray:
    """True for each committed row whose key (id, t0, sample) is one of the manifest rows'
    work keys; False for rows of ids or t0 values the manifest no longer has. Matched
    `chunk_rows` manifest rows at a time, as `count_work` counts."""
    inside = np.zeros(committed.num_rows, dtype=bool)
    at = committed.select(KEY_SCHEMA.names).append_column(
        "at", pa.array(np.arange(committed.num_rows, dtype=np.int64)))
    for start in range(0, plan_columns.num_rows, chunk_rows):
        chunk = plan_columns.slice(start, chunk_rows)
        candidates = committed_for(chunk["id"], at)
        if candidates.num_rows:
            hit = committed_mask(candidates, key_table(chunk, plan))
            inside[candidates["at"].to_numpy()[hit]] = True
    return inside


def shared_keys(ids: pa.ChunkedArray | pa.Array, plan: Plan) -> np.ndarray:
    """True for rows whose keys other rows share: a repeated id, or none (null). No worker can
    tell such rows apart, so they are never pipeline work: every one is an error row, which the
    driver writes (`shared_key_errors`)."""
    import pyarrow.compute as pc

    missing = pc.is_null(ids)
    if plan.duplicates:
        repeated = pc.is_in(ids, value_set=pa.array(sorted(plan.duplicates), pa.string()))
        missing = pc.or_(missing, pc.fill_null(repeated, False))
    return np.asarray(missing.to_numpy(zero_copy_only=False), dtype=bool)


def shared_key_errors(plan_columns: pa.Table, plan: Plan, committed: pa.Table,
                      guides: Mapping | None = None) -> tuple[pa.Table, str]:
    """The error rows still missing for the rows `shared_keys` picks, and a shard name for them.
    Each names the guides of the rows making its key: `guides` (id -> URIs, from
    `shared_key_guides`), else the plan columns' own guide column, if any.

    Such rows share keys, so they are counted per key: as many error rows as rows make the
    key, less the rows OUTPUT holds for it already (an earlier run's, or the output written
    before an appended row repeated its id). The name covers the keys and those counts, so
    each run's shard is new and a rerun of the same state writes the same one."""
    import hashlib

    import pyarrow.compute as pc

    table = conform(plan_columns)
    rows = table.filter(pa.array(shared_keys(table["id"], plan)))
    keys = key_table(rows, plan)
    wanted = Counter(loose_keys(keys))
    ids = rows["id"]
    held = committed.filter(pc.or_(pc.is_null(committed["id"]),
                                   pc.is_in(committed["id"], value_set=pc.unique(ids))))
    have = Counter(loose_keys(held))
    rows_per_id = Counter(ids.to_pylist())
    if guides is None:
        guides = _guides_by_id(rows)
    missing = sorted(((key, count - have[key]) for key, count in wanted.items()
                      if count > have[key]), key=repr)  # a t0 may be "nan" beside floats
    errors = [(None if key[0] == NULL_ID else key[0], float(key[1]), key[2])
              for key, count in missing for _ in range(count)]
    table = pa.table({
        "id": pa.array([key[0] for key in errors], pa.string()),
        "t0": pa.array([key[1] for key in errors], pa.float64()),
        "sample": pa.array([key[2] for key in errors], pa.int32()),
        "stage": pa.array(["validate"] * len(errors), pa.string()),
        "error": pa.array([_shared_key_problem(key[0], rows_per_id[key[0]],
                                               guides.get(key[0], [])) for key in errors],
                          pa.string()),
    })
    counted = [(key, wanted[key], have[key]) for key, _ in missing]
    return table, f"part-{hashlib.sha256(repr(counted).encode()).hexdigest()[:24]}.parquet"


def superseded_errors(plan_columns: pa.Table, plan: Plan, written: pa.Table,
                      failed: pa.Table) -> np.ndarray:
    """True for each error row that no longer counts: its key has a data row, and the manifest
    makes the key fewer times than that row and the key's error rows before it add up to (the
    error row of an appended row that repeated a written id, left once that row is removed
    from the manifest again). Keys the manifest does not make are `in_manifest`'s, not these."""
    import pyarrow.compute as pc

    superseded = np.zeros(failed.num_rows, dtype=bool)
    if not failed.num_rows or not written.num_rows:
        return superseded
    data = written.filter(pc.is_in(written["id"], value_set=pc.unique(failed["id"])))
    ids = pc.unique(data["id"])  # ids with data rows and error rows: few, usually none
    rows = np.flatnonzero(pc.is_in(failed["id"], value_set=ids).to_numpy(zero_copy_only=False))
    candidates = failed.take(rows)
    with_data = set(loose_keys(data))
    table = conform(plan_columns)
    wanted = Counter(loose_keys(key_table(table.filter(pc.is_in(table["id"], value_set=ids)),
                                           plan)))
    seen: Counter = Counter()
    for index, key in zip(rows, loose_keys(candidates), strict=True):
        if key in with_data and wanted[key]:
            seen[key] += 1
            superseded[index] = 1 + seen[key] > wanted[key]
    return superseded


def stale_shared_key_errors(plan_columns: pa.Table, plan: Plan, written: pa.Table,
                            failed: pa.Table) -> np.ndarray:
    """True for each validate error row of a key that has no data row and more error rows than
    the manifest now has rows making it: fewer rows share its id than when they were written
    (one renamed, as the error row asks, or removed). Once forgotten, such a key is work again
    if its id no longer repeats, and `shared_key_errors` remakes its error rows, one per row,
    if it still does. Keys the manifest does not make are `in_manifest`'s, keys with a data
    row `superseded_errors`'."""
    import pyarrow.compute as pc

    stale = np.zeros(failed.num_rows, dtype=bool)
    if failed.num_rows < 2:
        return stale
    counts = failed.group_by(list(KEY_SCHEMA.names), use_threads=False).aggregate(
        [([], "count_all")])
    ids = pc.unique(counts.filter(pc.greater(counts["count_all"], 1))["id"])
    if not len(ids):
        return stale  # every key has one error row at most: the usual case
    rows = np.flatnonzero(pc.is_in(failed["id"], value_set=ids, skip_nulls=False)
                          .to_numpy(zero_copy_only=False))
    candidates = failed.take(rows)
    keys = loose_keys(candidates)
    errors = Counter(keys)
    with_data = set(loose_keys(written.filter(pc.is_in(written["id"], value_set=ids))))
    table = conform(plan_columns)
    making = table.filter(pc.is_in(table["id"], value_set=ids, skip_nulls=False))
    wanted = Counter(loose_keys(key_table(making, plan)))
    stages = candidates["stage"].to_pylist()
    for index, key, stage in zip(rows, keys, stages, strict=True):
        stale[index] = (stage == "validate" and key not in with_data
                        and 0 < wanted[key] < errors[key])
    return stale


def loose_keys(keys: pa.Table) -> list[tuple]:
    """Keys that compare as `committed_mask` matches them: a null id as NULL_ID, NaN t0 equal."""
    ids = keys["id"].fill_null(NULL_ID).to_pylist()
    t0s = ["nan" if t0 != t0 else t0 for t0 in keys["t0"].to_pylist()]
    return list(zip(ids, t0s, keys["sample"].to_pylist(), strict=True))


SHOWN_GUIDES = 3  # guides an error row of a shared key names


def shared_key_guides(manifest: ManifestFiles, plan: Plan,
                      storage_options: Mapping) -> dict[str | None, list[str]]:
    """The guide URIs (as the manifest has them, credentials masked) of the rows that
    `shared_keys` picks, by id: read from the id and guide columns of every manifest file,
    only when such rows exist (the driver keeps no guide column otherwise)."""
    import fsspec
    import pyarrow.parquet as pq

    guides: dict[str | None, list[str]] = defaultdict(list)
    for file in manifest.files:
        fs, path = fsspec.core.url_to_fs(file, **options_for(file, storage_options))
        with fs.open(path, "rb") as stream:  # a batch at a time: the columns may be large
            for batch in pq.ParquetFile(stream).iter_batches(columns=["id", "guide"]):
                table = conform(pa.Table.from_batches([batch]))
                shared = table.filter(pa.array(shared_keys(table["id"], plan)))
                for row_id, found in _guides_by_id(shared).items():
                    guides[row_id] += found
    return guides


def _guides_by_id(rows: pa.Table) -> dict[str | None, list[str]]:
    guides: dict[str | None, list[str]] = defaultdict(list)
    for row_id, guide in zip(rows["id"].to_pylist(), _column(rows, "guide"), strict=True):
        if guide:
            guides[row_id].append(redact(str(guide)))
    return guides


def _shared_key_problem(row_id: str | None, rows: int, guides: list[str]) -> str:
    named = ", ".join(guides[:SHOWN_GUIDES]) + (", ..." if len(guides) > SHOWN_GUIDES else "")
    named = f", guides {named}" if guides else ""
    if row_id is None:
        return f"id is missing (null) ({rows} row{'s' * (rows > 1)} without one{named})"
    return (f"id {row_id!r} appears on more than one manifest row ({rows} rows{named}); every "
            "such row is an error (give each row its own id)")


def committed_for(ids: pa.ChunkedArray | pa.Array, committed: pa.Table) -> pa.Table:
    """The committed keys whose id is among `ids`: all that keys of those rows can match."""
    import pyarrow.compute as pc

    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    return committed.filter(pc.is_in(committed["id"], value_set=ids))


def keys_table(keys: Sequence[Key]) -> pa.Table:
    """Keys as a table with the key schema."""
    ids, t0s, samples = zip(*keys, strict=True) if keys else ((), (), ())
    return pa.table({"id": list(ids), "t0": list(t0s), "sample": list(samples)},
                    schema=KEY_SCHEMA)


def committed_mask(keys: pa.Table, committed: pa.Table) -> np.ndarray:
    """True where a key (id, t0, sample) is among the committed ones. A null id matches a null
    id and a NaN t0 a NaN t0, so failed rows without an id or a valid t0 are not redone."""
    mask = np.zeros(keys.num_rows, dtype=bool)
    if keys.num_rows == 0 or committed.num_rows == 0:
        return mask
    left = _matchable(keys).append_column("position", pa.array(np.arange(keys.num_rows)))
    found = left.join(_matchable(committed), keys=list(KEY_SCHEMA.names), join_type="left semi")
    mask[found["position"].to_numpy()] = True
    return mask


def _matchable(keys: pa.Table) -> pa.Table:
    keys = keys.select(KEY_SCHEMA.names).cast(KEY_SCHEMA)
    return keys.set_column(0, "id", keys["id"].fill_null(NULL_ID))


def _row_settings(row: Mapping, plan: Plan) -> tuple[tuple[float, ...], int, int, str | None]:
    task = row.get("task") or plan.task
    t0s, samples, repeats, preset = _layout(row.get("t0"), task, plan)
    problem = None
    if task and preset is None:
        problem = f"unknown task {task!r} for id {row.get('id')!r}"
    elif preset and preset.requires_mask and not row.get("mask"):
        problem = f"task {task!r} requires a mask, but id {row.get('id')!r} has none"
    return t0s, samples, repeats, problem


def _layout(row_t0: Sequence | None, task: str | None,
            plan: Plan) -> tuple[tuple, int, int, TaskDefaults | None]:
    """(t0 values, samples, repeats, preset) of a row: its own t0 list, else the run's flags,
    else its task preset's defaults."""
    preset = plan.presets.get(task) if task else None
    defaults = preset or NO_TASK
    t0s = distinct_t0(row_t0 or plan.t0 or defaults.t0)
    samples = plan.samples or defaults.samples
    repeats = plan.repeats or defaults.repeats
    return t0s, samples, repeats, preset


def defaults_in_play(plan: Plan) -> list[TaskDefaults]:
    """Where this plan's rows take t0, samples and repeats from when the run leaves them unset:
    the task presets its rows name, and the built-in values where a row names no task and
    --task gives it none."""
    return [*plan.presets.values(), *([NO_TASK] if plan.untasked and not plan.task else [])]


def undeciding(plan: Plan) -> tuple[str, ...]:
    """Run options that decide none of this plan's outputs: --task when every row names its own
    task, --t0 when every row gives its own t0 list (a row's own wins over either)."""
    return (*(() if plan.untasked else ("task",)), *(("t0",) if plan.own_t0 else ()))


def own_t0(plan_columns: pa.Table) -> bool:
    """Whether every row of the manifest gives its own (non-empty) t0 list."""
    import pyarrow.compute as pc

    if "t0" not in plan_columns.column_names or not plan_columns.num_rows:
        return False
    lengths = pc.list_value_length(plan_columns["t0"])  # conformed: lists
    return bool(pc.all(pc.fill_null(pc.greater(lengths, 0), False)).as_py())


def distinct_t0(t0s: Sequence[float | None]) -> tuple:
    """Each t0 value once as keys see it (rounded to T0_DECIMALS; missing ones are one NaN), in
    the order given: a row whose list names 0.3 twice, or 0.3 and 0.3000000001, has one output
    per sample at 0.3, not two under one key."""
    seen, kept = set(), []
    for t0 in t0s:
        key = _round_t0(t0)
        marker = "nan" if key != key else key
        if marker not in seen:
            seen.add(marker)
            kept.append(t0)
    return tuple(kept)


def _round_t0(t0: float | None) -> float:
    # float32 manifests store 0.3 as 0.30000001192...; keys use the rounded decimal value.
    return float("nan") if t0 is None else round(float(t0), T0_DECIMALS)


def _id_problem(row_id: str | None, duplicates: Set[str], member_names: bool) -> str | None:
    if row_id is None:
        return "id is missing (null)"
    reason = unsafe_id_reason(row_id, member_names)
    if reason:
        return f"id {row_id!r} is unsafe as a file name: {reason}"
    if row_id in duplicates:
        return (f"id {row_id!r} appears on more than one manifest row; every such row is "
                "an error (give each row its own id)")
    return None


# A WebDataset member is named `{quoted id}-t{t0}-s{sample}.{ext}`; a name over 255 bytes
# cannot be extracted on common file systems (GNU tar: "File name too long").
MAX_QUOTED_ID = 255 - len("-t0500000-s0000.json")


def id_stem(row_id: str) -> str:
    """The id as it starts a WebDataset member's name: percent-quoted, without dots
    (WebDataset splits names at the first dot)."""
    from urllib.parse import quote

    return quote(row_id, safe="-_").replace(".", "%2E")


def unsafe_id_reason(row_id: str, member_names: bool = False) -> str | None:
    """Why an id cannot be used in file and shard names (with `member_names`, in WebDataset
    member names too), or None when it is safe."""
    if not row_id.strip():
        return "it is empty"
    if len(row_id) > MAX_ID_LENGTH:
        return f"it is longer than {MAX_ID_LENGTH} characters"
    if member_names and len(stem := id_stem(row_id)) > MAX_QUOTED_ID:
        return (f"a WebDataset member's name starts with it percent-quoted, {len(stem)} bytes, "
                f"over {MAX_QUOTED_ID} (tar cannot extract a name over 255 bytes)")
    if "/" in row_id or "\\" in row_id:
        return "it contains a path separator"
    if _CONTROL.search(row_id):
        return "it contains control characters"
    if row_id.startswith("."):
        return "it starts with '.'"
    return None


def _guide_problem(row: Mapping) -> str | None:
    if not row.get("guide"):
        return f"id {row.get('id')!r} has no guide URI"
    return None


def _t0_problem(key_t0: float, t0: float | None, row_id: str | None) -> str | None:
    """Why a t0 (`key_t0`: as keys round it) makes no output; the message shows it as given."""
    if t0 is None:
        return f"t0 is missing (a null in the t0 list of id {row_id!r})"
    if not 0.0 < key_t0 <= 1.0:  # also catches NaN
        rounded = (f" (it rounds to {key_t0}: t0 values keep {T0_DECIMALS} decimals)"
                   if 0.0 < t0 <= 1.0 else "")
        return f"t0 {t0} for id {row_id!r} is outside (0, 1]{rounded}"
    return None


def read_and_expand(
    items: dict, plan: Plan, schema: pa.Schema, committed: pa.Table, storage_options: Mapping,
    block_rows: int = 64, read_rows: int = READ_ROWS,
) -> Iterator[pa.Table]:
    """Ray Data step: read manifest files `read_rows` rows at a time and yield their work rows
    in blocks of `block_rows`, so downstream stages (and several actors) get work early and a
    task holds a bounded part of a file (pyarrow and pandas write a million rows to a row
    group: read whole, the first block of such a file came after 20 s and 1 GiB)."""
    import fsspec
    import pyarrow.parquet as pq

    for file in items["file"]:
        file = str(file)
        fs, path = fsspec.core.url_to_fs(file, **options_for(file, storage_options))
        with fs.open(path, "rb") as stream, decoding(file):
            for batch in pq.ParquetFile(stream).iter_batches(batch_size=read_rows):
                rows = align(conform(pa.Table.from_batches([batch])), schema)
                expanded = expand_table(rows, plan, committed)
                for start in range(0, expanded.num_rows, block_rows):
                    yield expanded.slice(start, block_rows)


def align(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A table with exactly the manifest's unified columns and types (missing ones as nulls;
    a file's float32 t0 lists, say, as the float64 lists another file has)."""
    for name in schema.names:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
    return table.select(schema.names).cast(schema)


def expand_table(table: pa.Table, plan: Plan, committed: pa.Table) -> pa.Table:
    """One output row per work key not in `committed` (a key table), in `plan.order_by_t0`'s
    order.

    Manifest `t0` and `seed` columns are replaced by the key's t0 and the per-sample seed;
    `guide`/`mask` keep the manifest's text and `_sd_*_uri` hold the resolved URIs.
    """
    table = conform(table)
    table = table.filter(pa.array(~shared_keys(table["id"], plan)))  # the driver's errors
    keys = key_table(table, plan)
    committed = committed_for(table["id"], committed)
    pending = np.unique(keys["row"].to_numpy()[~committed_mask(keys, committed)])
    rows = table.take(pending).select([c for c in PLAN_COLUMNS if c in table.column_names])
    indexed = [(index, work) for index, row in zip(pending, rows.to_pylist(), strict=True)
               for work in row_work(row, plan)]  # seeds only for rows with work left
    done = committed_mask(keys_table([work.key for _, work in indexed]), committed)
    indexed = [pair for pair, skip in zip(indexed, done, strict=True) if not skip]
    works = [work for _, work in indexed]
    out = table.take(pa.array([index for index, _ in indexed], pa.int64()))
    out = out.drop_columns([c for c in ("t0", "seed") if c in out.column_names])
    out = _add_work_columns(out, works, plan.base)
    return out.sort_by([("t0", "ascending")]) if plan.order_by_t0 else out


def _add_work_columns(table: pa.Table, works: list[Work], base: str) -> pa.Table:
    guides = table["guide"].to_pylist()
    masks = table["mask"].to_pylist() if "mask" in table.column_names else [None] * len(works)
    columns = {
        "t0": pa.array([w.key[1] for w in works], pa.float64()),
        "sample": pa.array([w.key[2] for w in works], pa.int32()),
        "seed": pa.array([w.seed for w in works], pa.int64()),
        "repeats": pa.array([w.repeats for w in works], pa.int32()),
        INTERNAL + "guide_uri": pa.array([resolve_uri(g, base) if g else None for g in guides],
                                         pa.string()),
        INTERNAL + "mask_uri": pa.array([resolve_uri(m, base) if m else None for m in masks],
                                        pa.string()),
        INTERNAL + "stage": pa.array(["validate" if w.error else None for w in works],
                                     pa.string()),
        INTERNAL + "error": pa.array([w.error for w in works], pa.string()),
    }
    for name, column in columns.items():
        table = table.append_column(name, column)
    return table
