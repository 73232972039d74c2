"""Shard writers: digest names, atomic commits, the WebDataset layout."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.writers import (
    DATA_TYPES,
    WRITERS,
    commit,
    error_rows,
    keys_digest,
    read_parquet,
    read_webdataset_shard,
    webdataset_key,
    webdataset_rows,
)


def rows(ids: list[str]) -> pa.Table:
    return pa.table({"id": ids, "t0": [0.5] * len(ids), "sample": [0] * len(ids),
                     "image": [b"png-bytes"] * len(ids), "image_format": ["png"] * len(ids)})


def test_digest_depends_on_keys_not_order():
    assert keys_digest(rows(["a", "b"])) == keys_digest(rows(["b", "a"]))
    assert keys_digest(rows(["a", "b"])) != keys_digest(rows(["a", "c"]))


def test_parquet_shard_is_named_by_its_keys_and_rewrites_itself(tmp_path):
    first = WRITERS["parquet"](str(tmp_path / "data"), {})
    first.write(rows(["a", "b"]))
    uri = first.close()
    again = WRITERS["parquet"](str(tmp_path / "data"), {})
    again.write(rows(["b", "a"]))
    assert again.close() == uri
    assert [p.name for p in (tmp_path / "data").iterdir()] == [uri.rsplit("/", 1)[-1]]
    assert pq.read_table(tmp_path / "data").num_rows == 2


def test_empty_writer_commits_nothing(tmp_path):
    writer = WRITERS["parquet"](str(tmp_path / "data"), {})
    assert writer.close() is None
    assert not (tmp_path / "data").exists()


def test_commit_leaves_no_temporary_file(tmp_path):
    commit(str(tmp_path), "part-x.parquet", b"abc", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-x.parquet"]


def test_a_failed_local_write_names_its_file_under_ray_datas_retry_advice(tmp_path):
    """A full disk or a read-only OUTPUT in a write task read "PermissionError: [Errno 1]
    Operation not permitted: 'Failed to apply UDF transform after 1/1 attempts ...'": Ray Data
    appends its advice to an error's arguments, and an OSError's third is its file's name."""
    from ray.data._internal.util import _annotate_exception_with_retry_context

    from tasks.images import without_ray_retry_note

    (tmp_path / "part-x.parquet").mkdir()  # what the rename must replace: a folder
    (tmp_path / "part-x.parquet" / "inside").write_bytes(b"")
    with pytest.raises(OSError) as failed:
        commit(str(tmp_path), "part-x.parquet", b"abc", {})
    annotated = _annotate_exception_with_retry_context(
        failed.value, description="apply UDF transform", attempts=1, max_attempts=1,
        total_backoff_s=0.0, exception_str=str(failed.value))
    message = without_ray_retry_note(str(annotated))
    assert message.startswith(f"cannot write {tmp_path}/part-x.parquet: [Errno 21] Is a "
                              f"directory: '{tmp_path}/.tmp-part-x.parquet.")
    assert "Failed to" not in message and "DataContext" not in message


def test_webdataset_shard_holds_image_and_json_per_sample(tmp_path):
    writer = WRITERS["webdataset"](str(tmp_path), {})
    writer.write(rows(["img.01", "b"]))
    path = writer.close().removeprefix("file://")
    with tarfile.open(path) as tar:
        names = tar.getnames()
        record = json.load(tar.extractfile(names[1]))
    assert names == ["img%2E01-t0500000-s0000.png", "img%2E01-t0500000-s0000.json",
                     "b-t0500000-s0000.png", "b-t0500000-s0000.json"]
    assert record == {"id": "img.01", "t0": 0.5, "sample": 0, "image_format": "png"}
    assert "." not in webdataset_key("a.b.c", 0.25, 3)


def test_webdataset_member_names_longer_than_ustar_allows_are_kept_whole(tmp_path):
    # ids up to MAX_ID_LENGTH are valid; quoted, one of 180 'é' is 1,080 characters
    long_ids = ["x" * 200, "é" * 180]
    writer = WRITERS["webdataset"](str(tmp_path), {})
    writer.write(rows(long_ids))
    path = writer.close().removeprefix("file://")
    with open(path, "rb") as stream:
        records = list(webdataset_rows(stream))
    assert [record["id"] for record in records] == long_ids
    assert all(record["image"] for record in records)
    with tarfile.open(path) as tar:
        assert max(len(name) for name in tar.getnames()) > 1000


def test_a_webdataset_shard_read_for_its_keys_leaves_the_images_unread(tmp_path):
    writer = WRITERS["webdataset"](str(tmp_path), {})
    writer.write(rows(["a", "b"]))
    path = writer.close().removeprefix("file://")
    with open(path, "rb") as stream:
        keys = read_webdataset_shard(stream, images=False)
    with open(path, "rb") as stream:
        whole = read_webdataset_shard(stream)
    assert keys["id"].to_pylist() == whole["id"].to_pylist() == ["a", "b"]
    assert keys["image"].to_pylist() == [None, None]
    assert whole["image"].to_pylist() == [b"png-bytes", b"png-bytes"]


class CountingStream(io.BytesIO):
    """A file that tallies the bytes read from it."""

    read_bytes = 0

    def read(self, size=-1):
        data = super().read(size)
        self.read_bytes += len(data)
        return data

    def readinto(self, buffer):
        count = super().readinto(buffer)
        self.read_bytes += count
        return count


@pytest.mark.parametrize("statistics", [True, False])
def test_reading_some_ids_reads_only_the_row_groups_that_may_hold_them(statistics):
    """`sdedit inspect` reads a few ids' images out of every shard: the row groups whose id
    statistics rule those ids out must stay unread (without statistics, all are read)."""
    ids = [f"id{i:02d}" for i in range(100)]  # 10 row groups of 10 rows, 200 KB each
    table = rows(ids).set_column(3, "image", pa.array([bytes(20_000) + i.encode() for i in ids]))
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=10, compression="none",
                   write_statistics=statistics)
    stream = CountingStream(buffer.getvalue())
    chosen = read_parquet(stream, ["id", "image", "absent"], ["id12", "id17", "zz"])
    assert chosen.column_names == ["id", "image"]
    assert chosen["id"].to_pylist() == ["id12", "id17"]
    assert chosen["image"].to_pylist() == [bytes(20_000) + b"id12", bytes(20_000) + b"id17"]
    size = len(buffer.getvalue())
    assert (stream.read_bytes < 0.2 * size) if statistics else (stream.read_bytes > 0.9 * size)
    stream.seek(0)
    assert read_parquet(stream, ["id"]).column_names == ["id"]


READ_THEN_EXIT = """
import sys
from tasks.outputs import OutputFolder, iter_shards
print(sum(table.num_rows for _, table in iter_shards(OutputFolder(sys.argv[1]))))
"""


def test_a_script_that_reads_shards_and_exits_exits_cleanly(tmp_path):
    """`pq.read_table` on a Python stream could free it on an Arrow thread during the
    interpreter's exit: such a script aborted ("terminate called without an active
    exception", exit 134) about half the time."""
    for start in range(0, 12, 3):
        writer = WRITERS["parquet"](str(tmp_path / "data"), {})
        writer.write(rows([f"id{i}" for i in range(start, start + 3)]))
        writer.close()
    for _ in range(8):
        done = subprocess.run([sys.executable, "-c", READ_THEN_EXIT, str(tmp_path)],
                              capture_output=True, text=True, timeout=120)
        assert (done.returncode, done.stdout, done.stderr) == (0, "12\n", "")


def test_error_rows_mask_the_credentials_of_the_uris_they_name():
    failed = pa.table({
        "id": pa.array(["a", "b", "c"], pa.large_string()), "t0": [0.5] * 3, "sample": [0] * 3,
        "_sd_stage": ["read", "read", "decode"],
        "_sd_error": ["cannot read https://h/a.png?X-Amz-Credential=AKIA1&X-Amz-Signature=S1G: "
                      "HTTP 403 Forbidden",
                      "cannot read http://alice:HUNTER2@h/b.png: HTTP 404 Not Found",
                      "s3://bucket/c.png is not an image"]})
    assert error_rows(failed)["error"].to_pylist() == [
        "cannot read https://h/a.png?X-Amz-Credential=***&X-Amz-Signature=***: HTTP 403 Forbidden",
        "cannot read http://alice:***@h/b.png: HTTP 404 Not Found",
        "s3://bucket/c.png is not an image"]
    assert error_rows(failed).schema.field("id").type == pa.string()  # as every run writes it


def test_webdataset_json_is_strict_json_and_keeps_binary_and_time_values(tmp_path):
    """Pass-through values JSON lacks were written as Python's text: NaN (which JSON readers
    other than Python's refuse), bytes as their repr b'\\x00\\xff' (the bytes lost)."""
    import base64
    import datetime

    table = rows(["a"])
    for name, values, kind in (
            ("blob", [b"\x00\xff"], None), ("score", [float("nan")], None),
            ("when", [datetime.datetime(2024, 1, 2, 3, 4, 5)], pa.timestamp("us")),
            ("scores", [[1.5, float("inf")]], None), ("day", [datetime.date(2024, 1, 2)], None)):
        table = table.append_column(name, pa.array(values, kind))
    writer = WRITERS["webdataset"](str(tmp_path), {})
    writer.write(table)
    with tarfile.open(writer.close().removeprefix("file://")) as tar:
        text = tar.extractfile("a-t0500000-s0000.json").read().decode()
    record = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text}"))
    assert base64.b64decode(record["blob"]) == b"\x00\xff"
    assert (record["score"], record["scores"]) == (None, [1.5, None])
    assert (record["when"], record["day"]) == ("2024-01-02T03:04:05", "2024-01-02")


def test_guide_and_mask_uris_reach_the_outputs_without_their_credentials():
    """A guide's password or signed URL's signature was written verbatim into OUTPUT/data,
    though every message and record masked it."""
    from pipeline.writers import DATA_COLUMNS, data_rows

    table = pa.table({name: pa.array([None, None], DATA_TYPES[name]) for name in DATA_COLUMNS})
    table = table.append_column("guide", pa.array([
        "http://alice:TopSecretPw999@h/ok.png?token=TokSecret777", "guides/a.png"]))
    table = table.append_column("mask", pa.array(
        ["https://h/m.png?X-Amz-Credential=AKIA1&X-Amz-Signature=SigSecret555", None]))
    table = table.append_column("caption", pa.array(["token=kept", "as is"]))
    written = data_rows(table.append_column("_sd_stage", pa.array([None, None], pa.string())))
    assert written["guide"].to_pylist() == ["http://alice:***@h/ok.png?token=***", "guides/a.png"]
    assert written["mask"].to_pylist() == [
        "https://h/m.png?X-Amz-Credential=***&X-Amz-Signature=***", None]
    assert written["caption"].to_pylist() == ["token=kept", "as is"]  # not a URI column
    assert written.column_names == [*DATA_COLUMNS, "guide", "mask", "caption"]


def test_webdataset_values_arrow_cannot_type_alike_read_back_as_their_json_text(tmp_path):
    """A uint64 pass-through column holding 2**64 - 1 made `sdedit inspect` stop with
    OverflowError: Python int too large to convert to C long."""
    table = rows(["a", "b"]).append_column("big", pa.array([2**64 - 1, 1], pa.uint64()))
    writer = WRITERS["webdataset"](str(tmp_path), {})
    writer.write(table.append_column("label", pa.array(["cat", "dog"])))
    with open(writer.close().removeprefix("file://"), "rb") as stream:
        read = read_webdataset_shard(stream)
    assert read["big"].to_pylist() == [str(2**64 - 1), "1"]
    assert read["label"].to_pylist() == ["cat", "dog"]  # others typed as before
