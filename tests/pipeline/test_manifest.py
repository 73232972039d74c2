"""Manifest checks and expansion into work keys."""

from __future__ import annotations

import functools
import http.server
import io
import re
import threading
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from run_helpers import write_manifest

from pipeline.manifest import (
    ManifestError,
    Plan,
    TaskDefaults,
    check_columns,
    committed_mask,
    conform,
    count_work,
    duplicate_ids,
    expand_table,
    find_files,
    key_table,
    keys_table,
    new_columns,
    read_plan_columns,
    resolve_uri,
    row_work,
    shared_key_errors,
    shared_keys,
    stale_shared_key_errors,
    typed_as_shards,
)
from sdedit import stable_seed

EXAMPLE = Path(__file__).parents[2] / "pipeline" / "examples" / "manifest.parquet"


def test_missing_columns_are_listed_before_any_work(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", {"name": ["a"], "image": ["x.png"]})
    with pytest.raises(ManifestError) as error:
        find_files(str(path), {})
    message = str(error.value)
    assert "missing required column(s): id, guide" in message
    assert "image" in message  # clashes with an output column


def test_a_column_named_twice_or_in_other_case_is_a_manifest_error(tmp_path):
    """Two `id` columns were a KeyError traceback; `ID` and `Guide` were reported missing
    without a word about case."""
    twice = tmp_path / "twice.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["x.png"]), pa.array(["b"])],
                                        names=["id", "guide", "id"]), twice)
    with pytest.raises(ManifestError, match=r"column\(s\) named more than once: id \(rename"):
        find_files(str(twice), {})
    cased = write_manifest(tmp_path / "cased.parquet", {"ID": ["a"], "Guide": ["x.png"]})
    with pytest.raises(ManifestError, match=r"missing required column\(s\): id, guide \(found "
                                            r"'ID', 'Guide': names are case-sensitive\)"):
        find_files(str(cased), {})


def test_an_id_column_of_only_nulls_gives_error_rows(tmp_path):
    """pandas writes an all-None column as Arrow's null type: counting the work raised
    ArrowTypeError (string vs null) before any row was validated."""
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": pa.nulls(2), "guide": ["a.png", "b.png"]}), path)
    manifest = find_files(str(path), {})
    columns = read_plan_columns(manifest, {})
    assert columns.schema.field("id").type == pa.string()
    plan = Plan(base=str(tmp_path), seed=0, t0=(0.5,))
    assert count_work(columns, plan, keys_table([])) == (2, 0)  # the driver writes their errors


def test_webdataset_refuses_ids_whose_member_names_tar_cannot_extract():
    """200 characters of 猫 quote to 1,800 bytes: GNU tar failed on those members ("File name
    too long"). Parquet names nothing after ids, so there they are fine."""
    long_id, short_id = "猫" * 27, "猫" * 26  # quoted: 243 and 234 bytes
    for member_names, refused in ((True, [long_id]), (False, [])):
        plan = Plan(base="/b", seed=0, t0=(0.5,), member_names=member_names)
        errors = {row_id: work.error for row_id in (long_id, short_id)
                  for work in row_work({"id": row_id, "guide": "g.png"}, plan)}
        assert [row_id for row_id, error in errors.items() if error] == refused
    assert errors[short_id] is None
    plan = Plan(base="/b", seed=0, t0=(0.5,), member_names=True)
    error, = (work.error for work in row_work({"id": long_id, "guide": "g.png"}, plan))
    assert error.endswith("is unsafe as a file name: a WebDataset member's name starts with it "
                          "percent-quoted, 243 bytes, over 235 (tar cannot extract a name over "
                          "255 bytes) (guide g.png)")


def test_a_bad_t0_is_named_as_the_manifest_gives_it():
    """1e-9 was reported as "t0 0.0" (the key's rounding) and a null in a t0 list as "t0 nan"."""
    plan = Plan(base="/b", seed=0, t0=(0.5,))
    errors = [work.error for work in row_work(
        {"id": "x", "guide": "g.png", "t0": [1e-9, None, 1.5, 0.3]}, plan)]
    assert errors == [
        "t0 1e-09 for id 'x' is outside (0, 1] (it rounds to 0.0: t0 values keep 6 decimals) "
        "(guide g.png)",
        "t0 is missing (a null in the t0 list of id 'x') (guide g.png)",
        "t0 1.5 for id 'x' is outside (0, 1] (guide g.png)", None]


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        find_files(str(tmp_path / "nope.parquet"), {})


def test_a_manifest_url_with_a_query_string_is_one_file_not_a_glob(tmp_path):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    write_manifest(tmp_path / "jobs" / "m.parquet", {"id": ["a"], "guide": ["a.png"]})
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    root = f"http://127.0.0.1:{httpd.server_address[1]}/jobs"
    try:
        found = find_files(f"{root}/m.parquet?token=T&sig=a/b", {})
        assert found.files == (f"{root}/m.parquet?token=T&sig=a/b",)
        assert found.base == root
        with pytest.raises(ManifestError, match="does not exist"):
            find_files(f"{root}/gone.parquet?token=T", {})
    finally:
        httpd.shutdown()


def test_folder_and_glob_manifests_resolve_relative_paths(tmp_path):
    for part in range(2):
        write_manifest(tmp_path / "m" / f"part{part}.parquet",
                       {"id": [f"r{part}"], "guide": ["a.png"]})
    (tmp_path / "m" / "_SUCCESS.parquet").write_bytes(b"")
    # what Spark, Delta and notebooks leave in sub-folders: read, these were a duplicate 'r0'
    # and a checkpoint "missing required column(s)" that stopped the job
    write_manifest(tmp_path / "m" / "_temporary" / "0" / "part0.parquet",
                   {"id": ["r0"], "guide": ["a.png"]})
    write_manifest(tmp_path / "m" / "_delta_log" / "10.checkpoint.parquet", {"add": ["x"]})
    write_manifest(tmp_path / "m" / ".ipynb_checkpoints" / "part0.parquet", {"id": ["r0"]})
    folder = find_files(str(tmp_path / "m"), {})
    glob = find_files(str(tmp_path / "m" / "part*.parquet"), {})
    assert len(folder.files) == 2 and len(glob.files) == 2
    assert folder.base.endswith("/m") and glob.base.endswith("/m")
    assert resolve_uri("a.png", folder.base).endswith("/m/a.png")
    assert resolve_uri("s3://b/a.png", folder.base) == "s3://b/a.png"


def test_row_expands_to_t0_times_samples_keys_with_stable_seeds():
    plan = Plan(base="/b", seed=7, t0=(0.3, 0.5), samples=2)
    works = list(row_work({"id": "x", "guide": "g.png", "seed": 11}, plan))
    assert [w.key for w in works] == [("x", 0.3, 0), ("x", 0.3, 1), ("x", 0.5, 0), ("x", 0.5, 1)]
    assert works[1].seed == stable_seed(7, 11, "x", 0.3, 1)
    assert len({w.seed for w in works}) == 4
    assert all(w.error is None and w.repeats == 1 for w in works)


def test_row_t0_overrides_run_t0_and_float32_values_are_rounded():
    plan = Plan(base="/b", seed=0, t0=(0.5,))
    works = list(row_work({"id": "x", "guide": "g", "t0": [0.30000001192092896]}, plan))
    assert [w.key for w in works] == [("x", 0.3, 0)]


def test_a_t0_named_twice_in_a_row_is_one_output_per_sample():
    plan = Plan(base="/b", seed=0, t0=(0.5,), samples=2)
    row = {"id": "x", "guide": "g", "t0": [0.3, 0.7, 0.3000000001, 0.3, None, None]}
    keys = [w.key for w in row_work(row, plan)]
    assert keys[:4] == [("x", 0.3, 0), ("x", 0.3, 1), ("x", 0.7, 0), ("x", 0.7, 1)]
    assert [(t0 != t0, sample) for _, t0, sample in keys[4:]] == [(True, 0), (True, 1)]  # NaN
    # the driver counts the same keys the workers make
    table = pa.table({"id": ["x"], "t0": pa.array([row["t0"]], pa.list_(pa.float64()))})
    assert key_table(table, plan).num_rows == 6


@pytest.mark.parametrize(("row", "message"), [
    ({"id": None, "guide": "g"}, "id is missing"),
    ({"id": "a/b", "guide": "g"}, "path separator"),
    ({"id": "..", "guide": "g"}, "starts with '.'"),
    ({"id": "", "guide": "g"}, "empty"),
    ({"id": "a\nb", "guide": "g"}, "control characters"),
    ({"id": "dup", "guide": "g"}, "more than one manifest row"),
    ({"id": "x", "guide": None}, "no guide URI"),
    ({"id": "x", "guide": "g", "t0": [1.5]}, "outside \\(0, 1\\]"),
    ({"id": "x", "guide": "g", "t0": [0.0]}, "outside \\(0, 1\\]"),
    ({"id": "x", "guide": "g", "task": "nope"}, "unknown task"),
    ({"id": "x", "guide": "g", "task": "masked"}, "requires a mask"),
])
def test_bad_rows_become_error_keys(row, message):
    masked = TaskDefaults(t0=(0.5,), samples=1, repeats=1, requires_mask=True)
    plan = Plan(base="/b", seed=0, duplicates=frozenset({"dup"}), presets={"masked": masked})
    works = list(row_work(row, plan))
    assert len(works) == 1
    assert works[0].error is not None
    assert re.search(message, works[0].error)


def test_task_defaults_apply_and_flags_win():
    preset = TaskDefaults(t0=(0.2, 0.3), samples=3, repeats=2, requires_mask=False)
    row = {"id": "x", "guide": "g", "task": "augmentation"}
    from_preset = list(row_work(row, Plan(base="/b", seed=0, presets={"augmentation": preset})))
    assert len(from_preset) == 6 and from_preset[0].repeats == 2
    flags = Plan(base="/b", seed=0, t0=(0.5,), samples=1, repeats=1,
                 presets={"augmentation": preset})
    assert [(w.key, w.repeats) for w in row_work(row, flags)] == [(("x", 0.5, 0), 1)]


def test_expand_table_skips_committed_keys_and_keeps_passthrough_columns():
    table = pa.table({"id": ["a", "b"], "guide": ["a.png", "s3://x/b.png"], "label": [1, 2],
                      "seed": [5, 6]})
    plan = Plan(base="s3://bucket/dir", seed=0, t0=(0.3, 0.6))
    out = expand_table(table, plan, committed=keys_table([("a", 0.3, 0)]))
    keys = list(zip(out["id"].to_pylist(), out["t0"].to_pylist(), strict=True))
    assert keys == [("b", 0.3), ("a", 0.6), ("b", 0.6)]  # ordered by t0
    assert out["label"].to_pylist() == [2, 1, 2]
    assert out["_sd_guide_uri"].to_pylist() == ["s3://x/b.png", "s3://bucket/dir/a.png",
                                                "s3://x/b.png"]
    assert out["seed"].to_pylist()[0] == stable_seed(0, 6, "b", 0.3, 0)


def test_steps_runs_keep_each_rows_work_side_by_side():
    table = pa.table({"id": ["a", "b", "c"], "guide": ["a.png", "b.png", "c.png"]})
    plan = Plan(base="/d", seed=0, t0=(0.6, 0.3), samples=2, order_by_t0=False)
    out = expand_table(table, plan, committed=keys_table([("b", 0.3, 1)]))
    keys = list(zip(*(out[c].to_pylist() for c in ("id", "t0", "sample")), strict=True))
    assert keys == [("a", 0.6, 0), ("a", 0.6, 1), ("a", 0.3, 0), ("a", 0.3, 1),
                    ("b", 0.6, 0), ("b", 0.6, 1), ("b", 0.3, 0),
                    ("c", 0.6, 0), ("c", 0.6, 1), ("c", 0.3, 0), ("c", 0.3, 1)]
    ordered = expand_table(table, Plan(base="/d", seed=0, t0=(0.6, 0.3), samples=2),
                           committed=keys_table([("b", 0.3, 1)]))
    assert ordered["t0"].to_pylist() == [0.3] * 5 + [0.6] * 6  # full-schedule runs
    assert sorted(ordered["seed"].to_pylist()) == sorted(out["seed"].to_pylist())


def test_the_job_orders_by_t0_only_for_full_schedule_runs(tmp_path):
    from pipeline.config import RunConfig
    from pipeline.job import make_plan

    path = write_manifest(tmp_path / "m.parquet", {"id": ["a"], "guide": ["a.png"]})
    files = find_files(str(path), {})
    columns = pa.table({"id": ["a"]})
    for steps, order_by_t0 in ((None, True), (20, False)):
        config = RunConfig(manifest=str(path), output=str(tmp_path / "out"), steps=steps)
        assert make_plan(config, files, columns).order_by_t0 is order_by_t0


def test_integer_ids_are_read_as_strings():
    out = expand_table(pa.table({"id": [1, 2], "guide": ["a", "b"]}), Plan(base="/", seed=0),
                       committed=keys_table([]))
    assert out["id"].to_pylist() == ["1", "2"]


def _key_list(table: pa.Table) -> list[str]:
    """Keys as sorted reprs (NaN t0 values compare equal as text)."""
    return sorted(map(repr, zip(*(table[c].to_pylist() for c in ("id", "t0", "sample")),
                                strict=True)))


def test_key_table_gives_the_keys_row_work_gives():
    presets = {"aug": TaskDefaults((0.2, 0.4), 2, 1, False),
               "edit": TaskDefaults((0.5,), 1, 3, True)}
    plan = Plan(base="/b", seed=3, presets=presets)
    rows = pa.table({"id": ["a", None, "c", "d", "a", "f", "g"],
                     "guide": ["g.png"] * 7,
                     "t0": [[0.3], None, [], [None, 0.30000001192092896], None, [0.7, 0.1], None],
                     "task": [None, "aug", "nope", None, "aug", "edit", "edit"]})
    expected = [w.key for row in rows.to_pylist() for w in row_work(row, plan)]
    keys = key_table(rows, plan)
    assert keys.num_rows == len(expected) == 15
    assert _key_list(keys) == sorted(map(repr, expected))
    assert Counter(keys["row"].to_pylist()) == {  # each key names the row it comes from
        index: len(list(row_work(row, plan))) for index, row in enumerate(rows.to_pylist())}
    flags = Plan(base="/b", seed=0, t0=(0.25, 0.75), samples=3, presets=presets)
    expected = [w.key for row in rows.to_pylist() for w in row_work(row, flags)]
    assert _key_list(key_table(rows, flags)) == sorted(map(repr, expected))
    assert key_table(rows.slice(0, 0), plan).num_rows == 0


def test_committed_mask_matches_null_ids_and_nan_t0():
    keys = keys_table([("a", 0.3, 0), ("a", 0.3, 1), (None, 0.5, 0), ("b", float("nan"), 0),
                       ("a", 0.3, 0), ("c", 0.5, 0)])
    done = keys_table([("a", 0.3, 0), (None, 0.5, 0), ("b", float("nan"), 0), ("z", 0.5, 0)])
    assert committed_mask(keys, done).tolist() == [True, False, True, True, True, False]
    assert committed_mask(keys, keys_table([])).tolist() == [False] * 6


def test_count_work_counts_chunk_by_chunk_what_one_anti_join_counts():
    plan = Plan(base="/b", seed=0, t0=(0.3, 0.6), samples=2)
    rows = pa.table({"id": ["a", None, "b", "c", "a", "d", None],
                     "t0": [None, None, [0.4], [None], None, [0.3, 0.2, 0.1], None],
                     "task": [None] * 7})
    keys = key_table(rows, plan)
    committed = keys_table([("a", 0.3, 0), ("a", 0.6, 1), (None, 0.3, 0), ("b", 0.4, 1),
                            ("c", float("nan"), 0), ("d", 0.2, 1), ("zz", 0.3, 0)])
    work = keys.filter(pa.array(~shared_keys(keys["id"], plan)))  # rows without id: the driver's
    todo = work.num_rows - int(committed_mask(work, committed).sum())
    assert (keys.num_rows, work.num_rows, todo) == (26, 18, 11)  # a is on two rows
    for chunk_rows in (1, 2, 3, 7, 100):
        assert count_work(rows, plan, committed, chunk_rows) == (26, 11)
    assert count_work(rows.slice(0, 0), plan, committed) == (0, 0)


def test_check_columns_accepts_the_documented_schema():
    schema = pa.schema([("id", pa.string()), ("guide", pa.string()), ("mask", pa.string()),
                        ("t0", pa.list_(pa.float32())), ("seed", pa.int64()),
                        ("task", pa.string()), ("caption", pa.string())])
    check_columns(schema, "m.parquet")


def test_duplicate_ids_are_the_ids_on_several_rows():
    ids = pa.chunked_array([["a", "b", None, "a"], [None, "c", "b", "b"]])
    assert duplicate_ids(ids) == frozenset({"a", "b"})
    assert duplicate_ids(pa.chunked_array([["x", "y"]])) == frozenset()


def test_expand_table_leaves_rows_without_an_id_to_the_driver():
    table = pa.table({"id": pa.array([None, "b"], pa.string()), "guide": ["a.png", "b.png"]})
    plan = Plan(base="/", seed=0, t0=(0.5,))
    assert expand_table(table, plan, keys_table([]))["id"].to_pylist() == ["b"]
    done = keys_table([(None, 0.5, 0), ("b", 0.5, 0)])
    assert expand_table(table, plan, done).num_rows == 0


def test_planning_and_expanding_rows_import_no_torch(tmp_path):
    """The driver plans and read tasks expand rows without torch (1.5 s and 180 MiB here, more
    with a CUDA build): only the actors need it."""
    import subprocess
    import sys

    code = f"""
import sys
from pipeline.config import RunConfig
from pipeline.job import plan_job
from pipeline.manifest import expand_table
from pipeline.resume import Committed
config = RunConfig(manifest={str(EXAMPLE)!r}, output={str(tmp_path / "out")!r}, steps=50)
manifest, columns, plan, model = plan_job(config)
import pyarrow.parquet as pq
rows = expand_table(pq.read_table(manifest.files[0]), plan, Committed().keys)
print(rows.num_rows, model.resolution, "torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["26", "32", "False"]


def test_error_rows_of_an_id_fewer_rows_share_now_are_stale():
    """Validate error rows of a key without a data row are stale when they outnumber the rows
    that make the key now; other stages' rows, keys with a data row and keys the manifest no
    longer makes are left alone."""
    plan = Plan(base="/b", seed=0, t0=(0.5,), duplicates=frozenset({"pair"}))
    table = pa.table({"id": ["twin", "late", "a", None, None, "pair", "pair", "solo"],
                      "guide": ["g"] * 8})
    failed = pa.table({
        "id": ["twin", "late", "gone", "twin", "a", None, "pair", "late", None, "pair",
               "gone", None, "solo"],
        "t0": [0.5] * 13, "sample": [0] * 13,
        "stage": ["validate", "read", "validate", "validate", "validate", "validate",
                  "validate", "validate", "validate", "validate", "validate", "validate",
                  "validate"]})
    written = keys_table([("a", 0.5, 0)])
    stale = stale_shared_key_errors(table, plan, written, failed)
    picked = [(row["id"], row["stage"]) for row, s in zip(failed.to_pylist(), stale, strict=True)
              if s]
    # twin: 2 error rows for 1 row; late: its validate row, not its read failure; None: 3 rows
    # for the 2 null-id rows left; not a (written), gone (no row), pair (2 for 2), solo (1)
    assert picked == [("twin", "validate"), ("twin", "validate"), (None, "validate"),
                      ("late", "validate"), (None, "validate"), (None, "validate")]
    assert not stale_shared_key_errors(table, plan, written, failed.slice(0, 1)).any()


def test_rows_that_share_keys_are_the_drivers_error_rows():
    plan = Plan(base="/b", seed=0, t0=(0.3, 0.5), duplicates=frozenset({"twin"}))
    table = pa.table({"id": ["twin", "a", "twin", None, None], "guide": ["g"] * 5})
    assert shared_keys(table["id"], plan).tolist() == [True, False, True, True, True]
    errors, name = shared_key_errors(table, plan, keys_table([]))
    rows = errors.to_pylist()
    assert Counter((r["id"], r["t0"], r["sample"]) for r in rows) == {
        ("twin", 0.3, 0): 2, ("twin", 0.5, 0): 2, (None, 0.3, 0): 2, (None, 0.5, 0): 2}
    assert {r["error"] for r in rows if r["id"] == "twin"} == {
        "id 'twin' appears on more than one manifest row (2 rows, guides g, g); every such row "
        "is an error (give each row its own id)"}
    assert {r["error"] for r in rows if r["id"] is None} == {
        "id is missing (null) (2 rows without one, guides g, g)"}
    assert {r["stage"] for r in rows} == {"validate"}
    # what OUTPUT holds counts: e.g. twin's output at 0.3, written before the id repeated
    fewer, other = shared_key_errors(table, plan, keys_table([("twin", 0.3, 0)]))
    assert fewer.num_rows == 7 and other != name
    assert shared_key_errors(table, plan, keys_table([("twin", 0.3, 0)]))[1] == other
    held = keys_table([(r["id"], r["t0"], r["sample"]) for r in rows])
    assert shared_key_errors(table, plan, held)[0].num_rows == 0
    # a missing t0 in a repeated id's own list is a NaN key beside the others
    with_t0 = table.append_column("t0", pa.array([[0.5, None], None, None, None, None],
                                                 pa.list_(pa.float64())))
    errors = shared_key_errors(with_t0, plan, keys_table([]))[0].to_pylist()
    twin = sorted(str(r["t0"]) for r in errors if r["id"] == "twin")
    assert twin == ["0.3", "0.5", "0.5", "nan"]  # row 1: 0.5 and NaN; row 3: the run's 0.3, 0.5
    # neither the workers' expansion nor the count of pipeline work has those rows
    assert expand_table(table, plan, keys_table([]))["id"].to_pylist() == ["a", "a"]
    assert count_work(table, plan, keys_table([])) == (10, 2)


def test_a_read_task_expands_a_bounded_part_of_a_row_group_at_a_time(tmp_path):
    """pyarrow and pandas write up to a million rows to one row group, which a read task
    expanded whole: its first block came after 20 s and a GiB (1M rows)."""
    from pipeline.manifest import read_and_expand

    write_manifest(tmp_path / "m.parquet", {"id": list("abcde"), "guide": ["a.png"] * 5})
    assert pq.ParquetFile(tmp_path / "m.parquet").num_row_groups == 1
    files = find_files(str(tmp_path / "m.parquet"), {})
    plan = Plan(base=str(tmp_path), seed=0, t0=(0.3, 0.6))
    blocks = list(read_and_expand({"file": list(files.files)}, plan, files.schema,
                                  keys_table([]), {}, read_rows=2))
    assert [sorted(block["id"].to_pylist()) for block in blocks] == [
        ["a", "a", "b", "b"], ["c", "c", "d", "d"], ["e", "e"]]


def test_manifest_files_whose_column_types_differ_are_read_as_one_table(tmp_path):
    """A file appended with float32 t0 lists beside float64 ones (and one without t0): pyarrow
    refused to unify the schemas, a traceback before any work."""
    from pipeline.manifest import read_and_expand

    t0 = {"float": pa.list_(pa.float32()), "double": pa.list_(pa.float64())}
    for name, kind in t0.items():
        pq.write_table(pa.table({"id": [name], "guide": ["a.png"],
                                 "t0": pa.array([[0.25, 0.5]], kind)}),
                       tmp_path / f"{name}.parquet")
    write_manifest(tmp_path / "plain.parquet", {"id": ["plain"], "guide": ["a.png"]})
    # one t0 a row (a number, as one file's rows may give it) and a numeric id: the job stopped
    # with "manifest column 't0' is list<element: float> in ... but double in ..."
    pq.write_table(pa.table({"id": pa.array([7], pa.int64()), "guide": ["a.png"],
                             "t0": pa.array([0.5], pa.float64())}), tmp_path / "single.parquet")
    files = find_files(str(tmp_path), {})
    assert files.schema.field("t0").type == pa.list_(pa.float64())
    plan = Plan(base=str(tmp_path), seed=0, t0=(0.75,))
    for read_rows in (1, 8192):  # a bounded part of a file at a time gives the same rows
        blocks = list(read_and_expand({"file": list(files.files)}, plan, files.schema,
                                      keys_table([]), {}, read_rows=read_rows))
        keys = sorted(zip(*(pa.concat_tables(blocks).column(c).to_pylist()
                            for c in ("id", "t0")), strict=True))
        assert keys == [("7", 0.5), ("double", 0.25), ("double", 0.5), ("float", 0.25),
                        ("float", 0.5), ("plain", 0.75)]
    assert sorted(read_plan_columns(files, {})["id"].to_pylist()) == [
        "7", "double", "float", "plain"]


MANIFEST_WITH_PASSTHROUGH = pa.schema([
    ("id", pa.string()), ("guide", pa.string()), ("t0", pa.list_(pa.float64())),
    ("caption", pa.null()), ("score", pa.int16()), ("note", pa.large_string())])
OWN = ("id", "t0", "seed")  # columns the pipeline writes itself (writers.DATA_COLUMNS)


def held(**kinds) -> pa.Schema:
    """A data shard's schema holding the pass-through columns of MANIFEST_WITH_PASSTHROUGH, of
    these types where given."""
    passed = {"guide": pa.string(), "caption": pa.string(), "score": pa.int64(),
              "note": pa.string(), **kinds}
    return pa.schema([("id", pa.string()), ("t0", pa.float64()), *passed.items()])


def test_pass_through_columns_take_the_types_output_already_holds():
    typed = typed_as_shards(MANIFEST_WITH_PASSTHROUGH, (held(), "s3://b/out/data/part-1.parquet"),
                            OWN)
    assert typed == pa.schema([
        ("id", pa.string()), ("guide", pa.string()),
        ("t0", pa.list_(pa.float64())),  # the pipeline's own: a list in, a float out
        ("caption", pa.string()), ("score", pa.int64()), ("note", pa.string())])
    categorical = pa.dictionary(pa.int8(), pa.string())  # as pandas writes a category column
    shards = held(note=categorical)
    assert typed_as_shards(MANIFEST_WITH_PASSTHROUGH, (shards, "x"), OWN).field("note").type == (
        pa.dictionary(pa.int32(), pa.string()))  # room for more than 128 categories


def test_a_column_of_only_nulls_is_written_as_string_until_a_shard_types_it():
    alone = typed_as_shards(MANIFEST_WITH_PASSTHROUGH, None, OWN)
    assert alone.field("caption").type == pa.string()  # never Arrow's null type
    assert alone.field("score").type == pa.int16() and alone.field("note").type == pa.large_string()
    untyped = held(guide=pa.null(), caption=pa.null(), score=pa.null(),  # an older version's
                   note=pa.null())
    assert typed_as_shards(MANIFEST_WITH_PASSTHROUGH, (untyped, "x"), OWN) == alone


def test_a_pass_through_type_the_shards_cannot_hold_unchanged_is_refused_by_name():
    shards = held(score=pa.int8())
    with pytest.raises(ManifestError) as error:
        typed_as_shards(MANIFEST_WITH_PASSTHROUGH, (shards, "file:///out/data/part-9.parquet"),
                        OWN)
    assert str(error.value) == (
        "manifest column 'score' is int16 but OUTPUT's shards hold it as int8 "
        "(file:///out/data/part-9.parquet); the shards of one dataset must agree on each "
        "column's type: cast the column to int8 in the manifest, or write to another OUTPUT "
        "(or rerun with --overwrite)")
    with pytest.raises(ManifestError, match="'caption' is string but OUTPUT's shards hold it as "
                                            "double"):
        typed_as_shards(pa.schema([("caption", pa.string())]),
                        (pa.schema([("caption", pa.float64())]), "x"), OWN)


def test_columns_the_shards_hold_and_the_manifest_lacks_are_written_as_nulls():
    """A column the manifest dropped was missing from the new shards: readers that took such a
    shard's schema for all dropped it from every row. A pandas index is no column."""
    shards = (held(label=pa.int32()), "x")
    typed = typed_as_shards(MANIFEST_WITH_PASSTHROUGH, shards, OWN)
    assert typed.names == [*MANIFEST_WITH_PASSTHROUGH.names, "label"]
    assert typed.field("label").type == pa.int32()
    assert new_columns(MANIFEST_WITH_PASSTHROUGH, shards, OWN) == []
    index = MANIFEST_WITH_PASSTHROUGH.append(pa.field("__index_level_0__", pa.int64()))
    assert typed_as_shards(index, (held(), "x"), OWN).names == index.names
    assert new_columns(index, (held(), "x"), OWN) == []


def test_columns_new_to_the_shards_are_named_for_the_runs_note():
    added = MANIFEST_WITH_PASSTHROUGH.append(pa.field("label", pa.string()))
    assert new_columns(added, (held(), "x"), OWN) == ["label"]
    assert new_columns(added, None, OWN) == []  # a first run: every shard has them


def test_manifest_files_whose_types_do_not_widen_without_loss_are_refused_by_name(tmp_path):
    """pandas writes an int column with nulls as float64: unified, the int file's seed 7 became
    7.0, whose hash is another seed; a value beyond 2**53 stopped the run mid-way."""
    pq.write_table(pa.table({"id": ["a"], "guide": ["a.png"], "seed": pa.array([7], pa.int64())}),
                   tmp_path / "ints.parquet")
    pq.write_table(pa.table({"id": ["b", "c"], "guide": ["b.png"] * 2,
                             "seed": pa.array([None, 3.0], pa.float64())}),
                   tmp_path / "floats.parquet")
    with pytest.raises(ManifestError) as error:
        find_files(str(tmp_path), {})
    assert str(error.value) == (
        f"manifest column 'seed' is int64 in file://{tmp_path}/ints.parquet but double in "
        f"file://{tmp_path}/floats.parquet; its files must agree on each column's type (or "
        "differ only by widening without loss, e.g. float32 to float64)")
    (tmp_path / "floats.parquet").unlink()
    pq.write_table(pa.table({"id": ["b"], "guide": ["b.png"], "seed": pa.array(["x"])}),
                   tmp_path / "text.parquet")
    with pytest.raises(ManifestError) as error:
        find_files(str(tmp_path), {})
    assert str(error.value).startswith(
        f"manifest column 'seed' is string in file://{tmp_path}/text.parquet but int64 in "
        f"file://{tmp_path}/ints.parquet; its files must agree")


def test_a_type_clash_in_a_folder_of_many_files_names_the_odd_file_only(tmp_path):
    """The message listed every file of the folder (51 KB for 1,000) and named no file."""
    for index in range(40):
        caption = pa.array([7], pa.int64()) if index == 23 else pa.array(["x"])
        pq.write_table(pa.table({"id": [f"r{index}"], "guide": ["a.png"], "caption": caption}),
                       tmp_path / f"m{index:02}.parquet")
    with pytest.raises(ManifestError) as error:
        find_files(str(tmp_path), {})
    assert str(error.value) == (
        f"manifest column 'caption' is int64 in file://{tmp_path}/m23.parquet but string in "
        f"file://{tmp_path}/m00.parquet; its files must agree on each column's type (or differ "
        "only by widening without loss, e.g. float32 to float64)")


def test_timestamp_columns_in_units_that_widen_are_read_as_one_table(tmp_path):
    """A pass-through timestamp written in ms by one tool and us by another: refused before,
    although every ms value is a us value; a time zone on one side only is still refused."""
    from datetime import datetime

    from pipeline.manifest import read_and_expand

    taken = datetime(2026, 5, 1, 12, 30, 15, 250000)
    for unit in ("ms", "us"):
        pq.write_table(pa.table({"id": [unit], "guide": ["a.png"],
                                 "taken": pa.array([taken], pa.timestamp(unit))}),
                       tmp_path / f"{unit}.parquet")
    files = find_files(str(tmp_path), {})
    assert files.schema.field("taken").type == pa.timestamp("us")
    plan = Plan(base=str(tmp_path), seed=0, t0=(0.5,))
    table = pa.concat_tables(read_and_expand({"file": list(files.files)}, plan, files.schema,
                                             keys_table([]), {}))
    assert table["taken"].to_pylist() == [taken, taken]
    pq.write_table(pa.table({"id": ["utc"], "guide": ["a.png"],
                             "taken": pa.array([taken], pa.timestamp("us", tz="UTC"))}),
                   tmp_path / "utc.parquet")
    with pytest.raises(ManifestError, match=re.escape(
            f"'taken' is timestamp[us, tz=UTC] in file://{tmp_path}/utc.parquet but "
            f"timestamp[us] in file://{tmp_path}/us.parquet")):
        find_files(str(tmp_path), {})
    # nanoseconds hold the years 1677-2262 only: a "valid until 9999-12-31" in us cannot widen
    (tmp_path / "utc.parquet").unlink()
    pq.write_table(pa.table({"id": ["ns"], "guide": ["a.png"],
                             "taken": pa.array([taken], pa.timestamp("ns"))}),
                   tmp_path / "ns.parquet")
    with pytest.raises(ManifestError, match="'taken' is timestamp\\[ms\\] in .* but timestamp"):
        find_files(str(tmp_path), {})


def test_relative_uris_resolve_their_dot_segments_on_object_stores_only():
    """s3://b/m/../g.png is a key of its own on an object store (every such guide failed
    there); on a disk the path stays as written, for the disk to resolve through links."""
    assert resolve_uri("../guides/./g.png", "s3://b/runs/m") == "s3://b/runs/guides/g.png"
    assert resolve_uri("../g.png", "https://h:8080/m") == "https://h:8080/g.png"
    assert resolve_uri("../g.png", "file:///data/m") == "file:///data/m/../g.png"
    assert resolve_uri("../g.png", "/data/m") == "/data/m/../g.png"
    assert resolve_uri("g.png", "s3://b/m/") == "s3://b/m/g.png"


def test_a_chained_uris_relative_archive_resolves_against_the_manifest_like_any_path(
        tmp_path):
    """`zip://a.png::../arch.zip` in a manifest on S3 was read from the driver's working
    directory; every resolver (run, inspect and evaluate, guides, train) takes the archive
    beside the manifest now, and leaves the member's path inside it alone."""
    import zipfile

    from pipeline.fetch import load_guide
    from tasks.outputs import resolve_guide
    from tasks.sources import resolve

    for resolver in (resolve_uri, resolve, resolve_guide):
        assert resolver("zip://x/a.png::../arch.zip", "s3://b/runs/m") == (
            "zip://x/a.png::s3://b/runs/arch.zip")
        assert resolver("zip://a.png::s3://c/a.zip", "s3://b/m") == "zip://a.png::s3://c/a.zip"
        assert resolver("tar://a.png::/d/a.tar", "s3://b/m") == "tar://a.png::/d/a.tar"
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 80, 200)).save(buffer, format="PNG")
    with zipfile.ZipFile(tmp_path / "arch.zip", "w") as archive:
        archive.writestr("x/a.png", buffer.getvalue())
    uri = resolve_uri("zip://x/a.png::arch.zip", str(tmp_path))
    assert uri == f"zip://x/a.png::{tmp_path}/arch.zip"
    assert load_guide(uri, {}, 10_000).getpixel((0, 0)) == (9, 80, 200)


def test_a_folder_manifest_leaves_out_the_run_outputs_inside_it(tmp_path):
    """`sdedit run gout gout/edits`: the first run worked, then every rerun read its own shards
    under gout/edits/data/ as manifest files and stopped on their output columns."""
    from pipeline.resume import claim_output
    from pipeline.writers import WRITERS

    write_manifest(tmp_path / "gout" / "manifest.parquet", {"id": ["a"], "guide": ["a.png"]})
    edits = tmp_path / "gout" / "edits"
    claim_output(str(edits), {"steps": 2}, False, {})
    writer = WRITERS["parquet"](str(edits / "data"), {})
    writer.write(pa.table({"id": ["a"], "t0": [0.5], "sample": [0], "image": [b"png"]}))
    writer.close()
    manifest = find_files(str(tmp_path / "gout"), {})
    assert manifest.files == (f"file://{tmp_path}/gout/manifest.parquet",)
    glob = find_files(str(tmp_path / "gout" / "**" / "*.parquet"), {})  # a glob alike
    assert glob.files == (f"file://{tmp_path}/gout/manifest.parquet",)
    write_manifest(tmp_path / "gout" / "more" / "m.parquet", {"id": ["b"], "guide": ["b.png"]})
    assert len(find_files(str(tmp_path / "gout"), {}).files) == 2  # a folder that is no OUTPUT


def test_a_folder_manifest_that_is_its_own_output_leaves_out_the_shards_only(tmp_path):
    """`sdedit run s3://b/m4 s3://b/m4`: the first run worked, then every rerun (a killed run's
    resume too) read OUTPUT's own shards as manifest files and stopped on their columns."""
    from pipeline.resume import claim_output
    from pipeline.writers import WRITERS

    folder = tmp_path / "m4"
    write_manifest(folder / "manifest.parquet", {"id": ["a"], "guide": ["a.png"]})
    write_manifest(folder / "more" / "m.parquet", {"id": ["b"], "guide": ["b.png"]})
    first = find_files(str(folder), {}).files
    claim_output(str(folder), {"steps": 2}, False, {})
    for sub in ("data", "errors"):
        writer = WRITERS["parquet"](str(folder / sub), {})
        writer.write(pa.table({"id": ["a"], "t0": [0.5], "sample": [0], "image": [b"png"]}))
        writer.close()
    assert len(list(folder.glob("*/part-*.parquet"))) == 2
    assert find_files(str(folder), {}).files == first == (
        f"file://{folder}/manifest.parquet", f"file://{folder}/more/m.parquet")
    assert find_files(str(folder / "**" / "*.parquet"), {}).files == first


def test_a_guides_output_as_a_folder_manifest_leaves_out_its_error_list(tmp_path):
    """`sdedit guides strokes photos g` with a bad photo, then `sdedit run g out`: the run
    stopped on g/guide_errors.parquet ("missing required column(s): guide")."""
    folder = tmp_path / "g"
    write_manifest(folder / "manifest.parquet", {"id": ["a"], "guide": ["guides/a.png"]})
    pq.write_table(pa.table({"row": [1], "id": ["bad"], "error": ["not an image"]}),
                   folder / "guide_errors.parquet")
    expected = (f"file://{folder}/manifest.parquet",)
    assert find_files(str(folder), {}).files == expected
    assert find_files(str(folder / "*.parquet"), {}).files == expected
    (folder / "manifest.parquet").rename(folder / "rows.parquet")  # no guides OUTPUT: read
    with pytest.raises(ManifestError, match="guide_errors.parquet: missing required column"):
        find_files(str(folder), {})


def test_columns_of_the_wrong_type_stop_the_run_before_any_work_naming_each():
    """A binary guide (Spark's strings without their UTF-8 mark) crashed the run mid-way
    with a traceback; a string t0 or a binary id stopped it with a line naming nothing."""
    schema = pa.schema([("id", pa.binary()), ("guide", pa.binary()), ("mask", pa.int64()),
                        ("t0", pa.list_(pa.string())), ("seed", pa.bool_()),
                        ("task", pa.dictionary(pa.int32(), pa.string()))])
    with pytest.raises(ManifestError) as error:
        check_columns(schema, "s3://b/m.parquet")
    assert str(error.value).startswith(
        "manifest s3://b/m.parquet: column 'id' is binary; expected strings (or integers) (cast "
        "it); column 'guide' is binary; expected URI strings (cast it); column 'mask' is int64; "
        "expected URI strings (cast it); column 't0' is list<item: string>; expected numbers or "
        "lists of numbers (cast it); column 'seed' is bool; expected integers (or any numbers "
        "or text) (cast it). Expected columns:")
    check_columns(pa.schema([("id", pa.int64()), ("guide", pa.large_string()),
                             ("t0", pa.float32()), ("seed", pa.float64()),
                             ("mask", pa.null())]), "m")  # all usable as they are
    check_columns(pa.schema([("id", pa.string_view()),  # pandas categoricals, DuckDB decimals
                             ("guide", pa.dictionary(pa.int8(), pa.string())),
                             ("t0", pa.list_(pa.decimal128(2, 1))), ("seed", pa.string())]), "m")


def test_dictionary_strings_and_decimal_t0_values_expand_as_plain_ones():
    """Accepted before the column checks came in, and refused by their first version."""
    from decimal import Decimal

    plan = Plan(base="/d", seed=0, t0=(0.5,))
    plain = pa.table({"id": ["a"], "guide": ["a.png"], "t0": [[0.3, 0.5]], "seed": [5]})
    other = pa.table({
        "id": pa.array(["a"]).dictionary_encode(), "guide": pa.array(["a.png"], pa.string_view()),
        "t0": pa.array([[Decimal("0.3"), Decimal("0.5")]], pa.list_(pa.decimal128(2, 1))),
        "seed": pa.array([Decimal("5")], pa.decimal128(3, 0))})
    expanded = [expand_table(t, plan, committed=keys_table([])) for t in (plain, other)]
    columns = ["id", "t0", "sample", "seed", "_sd_guide_uri"]
    assert expanded[0].select(columns).to_pylist() == expanded[1].select(columns).to_pylist()
    single = pa.table({"id": ["a"], "guide": ["a.png"], "t0": pa.array([Decimal("0.4")])})
    assert expand_table(single, plan, committed=keys_table([]))["t0"].to_pylist() == [0.4]


@pytest.mark.parametrize("kind", [pa.large_list(pa.float32()), pa.list_(pa.float64(), 2),
                                  pa.list_(pa.int64())])
def test_t0_lists_of_any_list_type_expand_alike(kind):
    """Polars writes large lists; `Could not convert [0.3, 0.5] with type list` stopped it."""
    plan = Plan(base="/d", seed=0, t0=(0.5,))
    values = [[1, 1]] if pa.types.is_integer(kind.value_type) else [[0.3, 0.5]]
    table = pa.table({"id": ["a"], "guide": ["a.png"], "t0": pa.array(values, kind)})
    out = expand_table(table, plan, committed=keys_table([]))
    assert out["t0"].to_pylist() == ([1.0] if values == [[1, 1]] else [0.3, 0.5])


def test_a_float_seed_column_gives_the_seeds_of_the_same_integers():
    """pandas stores integer seeds with a missing value as floats: 5.0 seeded otherwise than 5
    (the outputs then changed with how the manifest was written), NaN otherwise than null."""
    plan = Plan(base="/d", seed=3, t0=(0.5,))
    integers = pa.table({"id": ["a", "b"], "guide": ["a.png", "b.png"],
                         "seed": pa.array([5, None], pa.int64())})
    floats = integers.set_column(2, "seed", pa.array([5.0, float("nan")]))
    seeds = [expand_table(t, plan, committed=keys_table([]))["seed"].to_pylist()
             for t in (integers, floats)]
    assert seeds[0] == seeds[1] == [stable_seed(3, 5, "a", 0.5, 0),
                                    stable_seed(3, None, "b", 0.5, 0)]


def test_a_glob_skips_hidden_files_and_an_unreadable_manifest_file_is_named(tmp_path):
    write_manifest(tmp_path / "m" / "part-0.parquet", {"id": ["a"], "guide": ["a.png"]})
    (tmp_path / "m" / "_SUCCESS").write_bytes(b"")  # Spark's marker, empty
    assert len(find_files(str(tmp_path / "m" / "*"), {}).files) == 1  # was "size is 0 bytes"
    write_manifest(tmp_path / "_staging1" / "m.parquet", {"id": ["b"], "guide": ["b.png"]})
    named = find_files(str(tmp_path / "_staging*" / "m.parquet"), {})  # asked for by name
    assert named.files == (f"file://{tmp_path}/_staging1/m.parquet",)
    (tmp_path / "m" / "part-1.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError) as error:
        find_files(str(tmp_path / "m" / "*"), {})
    assert str(error.value).startswith(f"manifest file file://{tmp_path}/m/part-1.parquet is not "
                                       "a readable Parquet file (Parquet magic bytes not found")


def test_the_builtin_defaults_are_in_play_only_where_a_row_names_no_task():
    """Every row with a synthesis task (t0 0.4, 0.5, 0.6) and `--t0 0.4 --t0 0.5 --t0 0.6`
    written out was refused as another configuration than t0 unset: the built-in 0.5 counted
    as in play though no row takes it."""
    from pipeline.config import RunConfig
    from pipeline.job import make_plan
    from pipeline.manifest import NO_TASK, ManifestFiles, defaults_in_play

    manifest = ManifestFiles(("m.parquet",), "/base", pa.schema([]))

    def in_play(tasks: list | None, task: str | None = None) -> list:
        columns = {"id": [f"r{i}" for i in range(len(tasks or [0]))]}
        if tasks is not None:
            columns["task"] = pa.array(tasks, pa.string())
        config = RunConfig(manifest="m.parquet", output="o", task=task)
        return defaults_in_play(make_plan(config, manifest, pa.table(columns)))

    synthesis = in_play(["synthesis"])
    assert len(synthesis) == 1 and synthesis[0] != NO_TASK
    assert synthesis[0].t0 == (0.4, 0.5, 0.6)
    assert in_play(["synthesis", "synthesis"]) == synthesis
    assert in_play(["synthesis", None]) == [*synthesis, NO_TASK]
    assert in_play(["synthesis", ""]) == [*synthesis, NO_TASK]
    assert in_play(None) == [NO_TASK]
    assert in_play([None], task="synthesis") == synthesis


def test_the_task_option_decides_no_output_when_every_row_names_its_task():
    from pipeline.config import RunConfig
    from pipeline.job import make_plan
    from pipeline.manifest import ManifestFiles, undeciding

    manifest = ManifestFiles(("m.parquet",), "/base", pa.schema([]))
    config = RunConfig(manifest="m.parquet", output="o", task="augmentation")
    tasked = pa.table({"id": ["a", "b"], "task": ["synthesis", "editing"]})
    assert undeciding(make_plan(config, manifest, tasked)) == ("task",)
    mixed = pa.table({"id": ["a", "b"], "task": ["synthesis", None]})
    assert undeciding(make_plan(config, manifest, mixed)) == ()
    assert undeciding(make_plan(config, manifest, pa.table({"id": ["a"]}))) == ()


def test_the_t0_option_decides_no_output_when_every_row_gives_its_t0_list():
    """`--t0 0.7` added to a job whose rows all carry their own t0 lists (which win) was
    refused as a different configuration, while `--task` in the same case was not."""
    from pipeline.config import RunConfig
    from pipeline.job import make_plan
    from pipeline.manifest import ManifestFiles, undeciding

    manifest = ManifestFiles(("m.parquet",), "/base", pa.schema([]))
    config = RunConfig(manifest="m.parquet", output="o", t0=(0.7,))

    def plan(t0s):
        return make_plan(config, manifest, conform(pa.table({"id": ["a", "b"], "t0": t0s})))

    assert undeciding(plan([[0.3], [0.5, 0.6]])) == ("t0",)
    assert undeciding(plan([0.3, 0.4])) == ("t0",)  # single numbers are lists of one
    assert undeciding(plan([[0.3], None])) == ()  # b takes --t0
    assert undeciding(plan([[0.3], []])) == ()
