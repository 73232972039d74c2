"""`sdedit inspect`: the terminal summary and the contact sheet's grid, pixels and HTML."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from task_fixtures import flat, png_bytes, write_output

from pipeline.writers import DATA_TYPES, WRITERS
from tasks.cli import inspect as inspect_command
from tasks.inspect import (
    HEADER,
    LABEL,
    PAD,
    PLACEHOLDER,
    SHARD,
    cell_origin,
    read_rows,
    render_sheet,
    sheet_rows,
    sheet_size,
    summary_lines,
    write_contact_sheet,
)
from tasks.outputs import OutputFolder

T0S = (0.25, 0.5, 0.75)
CELL = 16


def output_colour(index: int, column: int) -> tuple[int, int, int]:
    return (40 * index + 20, 60 * column + 30, 200)


@pytest.fixture
def run_output(tmp_path):
    """3 ids x 3 t0 x 2 samples of 16x16 flat images; (id1, 0.75) failed; a mask for id0."""
    (tmp_path / "run" / "guides").mkdir(parents=True)
    outputs = []
    for index in range(3):
        flat((index * 50, 0, 0)).save(tmp_path / "run" / "guides" / f"id{index}.png")
        for column, t0 in enumerate(T0S):
            if (index, t0) == (1, 0.75):
                continue
            for sample in (0, 1):
                colour = output_colour(index, column) if sample == 0 else (255, 255, 255)
                outputs.append(
                    {
                        "id": f"id{index}",
                        "t0": t0,
                        "sample": sample,
                        "image": flat(colour),
                        "guide": f"guides/id{index}.png",
                        "l2_to_guide": 0.1 * (column + 1),
                        "mask": "guides/mask.png" if index == 0 else None,
                    }
                )
    Image.new("L", (16, 16), 255).save(tmp_path / "run" / "guides" / "mask.png")
    errors = [
        {"id": "id1", "t0": 0.75, "sample": None, "stage": "edit", "error": "boom"},
        {"id": "idX", "t0": None, "sample": None, "stage": "read", "error": "missing"},
    ]
    summary = {
        "config": {"manifest": str(tmp_path / "run" / "manifest.parquet")},
        "counts": {"expected_outputs": 20},
        "timings": {"images_per_second": 2.5},
    }
    return write_output(tmp_path / "out", outputs, errors, summary, files=3)


def test_sheet_geometry_is_guide_mask_and_one_column_per_t0():
    assert sheet_size(2, 5, 16) == (PAD + 5 * (16 + PAD), HEADER + 2 * (LABEL + 16 + PAD))
    assert sheet_size(2, 5, 16) == (104, 92)
    assert cell_origin(1, 2, 16) == (PAD + 2 * 20, HEADER + 36 + LABEL)


def test_sheet_shows_each_ids_outputs_in_t0_order(run_output):
    rows, t0s = sheet_rows(OutputFolder(str(run_output)), count=2)
    assert [row.id for row in rows] == ["id0", "id1"] and t0s == list(T0S)
    sheet = np.asarray(render_sheet(rows, t0s, cell=CELL))
    assert sheet.shape == (92, 104, 3)
    for index in range(2):
        x, y = cell_origin(index, 0, CELL)
        assert tuple(sheet[y, x]) == (index * 50, 0, 0)  # the guide
        for column in range(3):
            x, y = cell_origin(index, 2 + column, CELL)
            cell = sheet[y : y + CELL, x : x + CELL]
            expected = PLACEHOLDER if (index, column) == (1, 2) else output_colour(index, column)
            assert tuple(cell[0, 0]) == expected
    x, y = cell_origin(0, 1, CELL)
    assert (sheet[y : y + CELL, x : x + CELL] == 255).all()  # id0's all-white mask
    x, y = cell_origin(1, 1, CELL)
    assert tuple(sheet[y, x]) == PLACEHOLDER  # id1 has no mask


def test_missing_cells_say_failed_only_when_an_error_row_exists(run_output, tmp_path):
    rows, t0s = sheet_rows(OutputFolder(str(run_output)), count=3)
    by_id = {row.id: row for row in rows}
    assert by_id["id1"].failed == frozenset({0.75})
    assert by_id["id1"].missing_label(0.75) == "failed"
    assert by_id["id0"].missing_label(0.75) == "not run"  # e.g. a task preset without 0.75


def test_chosen_ids_and_samples(run_output):
    rows, _ = sheet_rows(OutputFolder(str(run_output)), ids=["id2"], sample=1)
    assert [row.id for row in rows] == ["id2"]
    assert all(output is not None for output in rows[0].outputs.values())
    sheet = np.asarray(render_sheet(rows, list(T0S), cell=CELL))
    x, y = cell_origin(0, 3, CELL)
    assert tuple(sheet[y, x]) == (255, 255, 255)


def test_summary_counts_errors_throughput_and_faithfulness(run_output):
    text = "\n".join(summary_lines(OutputFolder(str(run_output))))
    assert "written           16  (3 ids, 3 t0 values, 2 samples)" in text
    assert "expected          20" in text
    assert "errors            2  (edit: 1, read: 1)" in text
    assert "images/s          2.50" in text
    assert "   0.500        6   0.20000   0.20000   0.20000" in text


def test_the_summary_says_how_the_last_run_counted_what_output_holds(run_output):
    """OUTPUT's rows need not add up to `expected`: error rows of keys written since and what
    the manifest no longer makes stay. The summary showed 232 written + 104 errors against 312
    expected where summary.json counted 80 errors, and did not say why."""
    summary = json.loads((run_output / "summary.json").read_text())
    summary.update({"expected_outputs": 17, "written": 15, "errors": 2, "reconciled": True,
                    "outside_manifest": {"written": 1, "errors": 0}, "superseded_errors": 0})
    (run_output / "summary.json").write_text(json.dumps(summary))
    lines = summary_lines(OutputFolder(str(run_output)))
    assert lines[1:5] == [
        "written           16  (3 ids, 3 t0 values, 2 samples)",
        "expected          17  (the last run's manifest: 15 written + 2 failed, reconciled)",
        "errors            2  (edit: 1, read: 1)",
        "not counted       1 outputs and 0 error rows of keys the last run's manifest no "
        "longer makes"]
    summary.update({"outside_manifest": {"written": 0, "errors": 0}, "superseded_errors": 3,
                    "reconciled": False})
    (run_output / "summary.json").write_text(json.dumps(summary))
    lines = summary_lines(OutputFolder(str(run_output)))
    assert lines[2].endswith("(the last run's manifest: 15 written + 2 failed, not reconciled)")
    assert lines[4] == "not counted       3 error rows of keys written since"


def test_html_is_self_contained(run_output, tmp_path):
    png, page, _ = write_contact_sheet(OutputFolder(str(run_output)), str(tmp_path / "sheet"), 3)
    html = Path(page).read_text(encoding="utf-8")
    assert html.count("<td class='id'>") == 3 and "t0 = 0.75" in html
    assert html.count("data:image/png;base64,") == 3 + 1 + 8  # guides, one mask, outputs
    assert "src='http" not in html and 'src="http' not in html
    assert Image.open(png).size == sheet_size(3, 5, 128)


def test_without_guide_columns_the_sheet_shows_outputs_only(tmp_path):
    outputs = [{"id": "a", "t0": 0.5, "image": flat(77)}, {"id": "b", "t0": 0.5, "image": flat(9)}]
    folder = write_output(tmp_path / "out", outputs)
    rows, t0s = sheet_rows(OutputFolder(str(folder)))
    sheet = np.asarray(render_sheet(rows, t0s, cell=CELL))
    assert sheet.shape[:2] == sheet_size(2, 3, CELL)[::-1]
    assert tuple(sheet[cell_origin(0, 0, CELL)[::-1]]) == PLACEHOLDER
    assert tuple(sheet[cell_origin(1, 2, CELL)[::-1]]) == (9, 9, 9)


def test_cli_writes_sheet_under_output_and_prints_summary(run_output):
    result = CliRunner().invoke(inspect_command, [str(run_output), "-n", "2", "--cell", "32"])
    assert result.exit_code == 0, result.output
    assert "errors            2" in result.output
    assert Image.open(run_output / "inspect" / "contact_sheet.png").size == sheet_size(2, 5, 32)
    assert (run_output / "inspect" / "contact_sheet.html").is_file()


def test_cli_on_an_empty_output_says_what_is_missing(tmp_path):
    result = CliRunner().invoke(inspect_command, [str(tmp_path)])
    assert result.exit_code == 1 and "no output shards and no error rows under" in result.output


def test_an_output_whose_every_row_failed_is_summarized_and_drawn(tmp_path):
    errors = [{"id": "a", "t0": 0.5, "sample": 0, "stage": "read", "error": "cannot read a.png"},
              {"id": "b", "t0": 0.8, "sample": 0, "stage": "decode", "error": "corrupt b.png"}]
    output = write_output(tmp_path / "out", [], errors=errors,
                          summary={"expected_outputs": 2, "written": 0, "errors": 2})
    result = CliRunner().invoke(inspect_command, [str(output)])
    assert result.exit_code == 0, result.output
    assert "errors            2  (decode: 1, read: 1)" in result.output
    rows, t0s = sheet_rows(OutputFolder(str(output)))
    assert t0s == [0.5, 0.8] and [row.id for row in rows] == ["a", "b"]
    assert rows[0].missing_label(0.5) == "failed" and rows[0].missing_label(0.8) == "not run"
    assert (output / "inspect" / "contact_sheet.png").exists()


@pytest.mark.parametrize(("option", "message"), [
    (["--sample", "2"], "--sample 2: {out} holds samples 0-1"),
    (["--id", "nosuch", "--id", "id2"],
     "--id nosuch: not in {out} (it holds 3 id(s): id0, id1, id2)"),
])
def test_ids_and_samples_that_do_not_exist_are_refused(run_output, option, message):
    """Both drew rows of "not run" cells and exited 0."""
    result = CliRunner().invoke(inspect_command, [str(run_output), *option])
    assert result.exit_code == 1, result.output
    assert message.format(out=run_output) in " ".join(result.output.split())
    assert not (run_output / "inspect").exists()


def test_a_rerun_with_nothing_to_do_shows_no_rate_of_zero(run_output):
    """The summary holds only the last invocation's rate: 0.0 when it found everything done."""
    summary = {"expected_outputs": 20, "this_run": {"todo": 0, "images_per_second": 0.0}}
    (run_output / "summary.json").write_text(json.dumps(summary))
    text = "\n".join(summary_lines(OutputFolder(str(run_output))))
    assert "images/s          n/a (the last run had nothing to do)" in text
    summary["this_run"] = {"todo": 4, "images_per_second": 1.25}
    (run_output / "summary.json").write_text(json.dumps(summary))
    assert "images/s          1.25" in summary_lines(OutputFolder(str(run_output)))


@pytest.mark.parametrize(("option", "value", "name"), [
    ("-n", "0", "'-n' / '--count'"), ("-n", "-1", "'-n' / '--count'"),
    ("--cell", "0", "'--cell'"), ("--cell", "-5", "'--cell'"),
])
def test_count_and_cell_under_one_are_refused(run_output, option, value, name):
    """-n 0 was an Arrow traceback, -n -1 a Python slice, --cell 0 an empty sheet and --cell -5
    Pillow's error naming no option."""
    result = CliRunner().invoke(inspect_command, [str(run_output), option, value])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == (
        f"Error: Invalid value for {name}: {value} is not in the range x>=1.")
    assert not (run_output / "inspect").exists()


def test_a_manifest_that_does_not_exist_is_refused(run_output, tmp_path):
    """It was taken as any folder: every row showed "no guide"."""
    missing = tmp_path / "nope.parquet"
    result = CliRunner().invoke(inspect_command, [str(run_output), "--manifest", str(missing)])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == (
        f"Error: Invalid value for --manifest: manifest {missing} does not exist")
    assert not (run_output / "inspect").exists()


def test_guides_a_wrong_manifest_cannot_resolve_are_named_not_drawn_as_absent(run_output,
                                                                              tmp_path):
    """A manifest elsewhere (it exists, so it is accepted) resolved every guide to a file that
    is not there, and the sheet said "no guide" with no word of why."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pq.write_table(pa.table({"id": ["id0"], "guide": ["guides/id0.png"]}),
                   elsewhere / "manifest.parquet")
    result = CliRunner().invoke(inspect_command, [str(run_output), "-n", "2", "--manifest",
                                                  str(elsewhere / "manifest.parquet")])
    assert result.exit_code == 0, result.output
    note = next(line for line in result.output.splitlines() if "could not be read" in line)
    assert note.startswith(f"3 guide/mask file(s) on the sheet could not be read, e.g. guide: "
                           f"cannot read {elsewhere}/guides/id0.png: FileNotFoundError")
    assert note.endswith("pass --manifest MANIFEST if that is not where they are)")
    html = (run_output / "inspect" / "contact_sheet.html").read_text(encoding="utf-8")
    assert html.count("guide unreadable") == 2 and html.count("mask unreadable") == 1
    assert "could not be read" in html and "no guide" not in html
    rows, _ = sheet_rows(OutputFolder(str(run_output)), count=2)  # the run's own manifest
    assert [row.unread for row in rows] == [(), ()]
    assert rows[1].empty_label("mask") == "no mask"


def test_an_unreadable_shard_is_named(run_output):
    shard = run_output / "data" / "part-2.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    result = CliRunner().invoke(inspect_command, [str(run_output)])
    assert result.exit_code == 1, result.output
    assert result.output == (
        f"Error: shard {shard} is not a readable Parquet file (cut short or damaged?): "
        "ArrowInvalid: Parquet magic bytes not found in footer. Either the file is corrupted or "
        "this is not a parquet file.\n")


def test_an_output_image_that_cannot_be_decoded_is_named(run_output):
    """The error named a BytesIO object, not the row."""
    shard = run_output / "data" / "part-0.parquet"
    rows = pq.read_table(shard).to_pylist()
    for row in rows:
        if (row["id"], row["t0"], row["sample"]) == ("id0", 0.25, 0):
            row["image"] = b"not an image"
    pq.write_table(pa.Table.from_pylist(rows), shard)
    result = CliRunner().invoke(inspect_command, [str(run_output)])
    assert result.exit_code == 1, result.output
    assert result.output == (
        f"Error: output id 'id0', t0 0.25, sample 0 in {shard}: its image cannot be decoded: "
        "not an image Pillow can identify\n")
    assert not (run_output / "inspect").exists()


@pytest.mark.parametrize("data_format", ["parquet", "webdataset"])
def test_the_sheet_reads_images_only_from_the_shards_of_its_ids(tmp_path, data_format,
                                                               monkeypatch):
    """Ids spread over every shard: Parquet statistics could not rule a shard out, and a tar
    never can, so the sheet read every shard's images. Now the shards that do not hold its
    ids stay unread: damaging them after the rows are read changes nothing. Nor is OUTPUT
    listed again (a round trip per folder and format on an object store)."""
    from fsspec.implementations.local import LocalFileSystem

    order = [5, 0, 9, 3, 11, 1, 7, 2, 10, 4, 8, 6]  # four shards of three, each spanning ids
    rows = [{"id": f"id{i:02d}", "t0": 0.5, "sample": 0, "image": png_bytes(flat((20 * i, 0, 0))),
             "image_format": "png"} for i in order]
    schema = pa.schema([(name, DATA_TYPES[name]) for name in rows[0]])
    for start in range(0, len(rows), 3):
        writer = WRITERS[data_format](str(tmp_path / "data"), {})
        writer.write(pa.Table.from_pylist(rows[start:start + 3], schema))
        writer.close()
    folder = OutputFolder(str(tmp_path))
    read = read_rows(folder)
    chosen = ["id03", "id09"]
    holding = {Path(row[SHARD]) for row in read[0] if row["id"] in chosen}
    others = [path for path in (tmp_path / "data").iterdir() if path not in holding]
    assert (len(holding), len(others)) == (2, 2)
    for path in others:
        path.write_bytes(b"damaged after the rows were read")
    listed = []
    monkeypatch.setattr(LocalFileSystem, "ls", lambda self, path, *a, **k: listed.append(path))
    sheet, t0s = sheet_rows(folder, ids=chosen, read=read)
    assert listed == []
    assert t0s == [0.5] and [row.id for row in sheet] == chosen
    assert [Image.open(io.BytesIO(row.outputs[0.5].data)).getpixel((0, 0)) for row in sheet] == [
        (60, 0, 0), (180, 0, 0)]


def test_newest_shows_the_ids_of_the_latest_shards_first(tmp_path):
    """A nightly job's OUTPUT: the sheet showed night one's first ids every night after."""
    import os

    from task_fixtures import output_record

    night = [{"id": f"a{i}", "t0": 0.5, "image": flat((i, 0, 0))} for i in range(4)]
    errors = [{"id": "aF", "t0": 0.5, "sample": None, "stage": "read", "error": "missing"}]
    root = write_output(tmp_path / "out", night, errors, files=1)
    tonight = [{"id": f"b{i}", "t0": 0.5, "image": flat((0, i, 0))} for i in range(2)]
    pq.write_table(pa.Table.from_pylist([output_record(row) for row in tonight]),
                   root / "data" / "part-1.parquet")
    pq.write_table(pa.Table.from_pylist([{**errors[0], "id": "bF"}]),
                   root / "errors" / "part-1.parquet")
    for shard, when in [("data/part-0", 1_000), ("errors/part-0", 1_000),
                        ("data/part-1", 3_000), ("errors/part-1", 3_000)]:
        os.utime(root / f"{shard}.parquet", (when, when))
    folder = OutputFolder(str(root))
    assert [row.id for row in sheet_rows(folder, count=4, newest=True)[0]] == [
        "b0", "b1", "bF", "a0"]  # tonight's outputs, then its failures, then the night before
    assert [row.id for row in sheet_rows(folder, count=4)[0]] == ["a0", "a1", "a2", "a3"]
    shown = CliRunner().invoke(inspect_command, [str(root), "--newest", "-n", "2"])
    assert shown.exit_code == 0, shown.output
    html = (root / "inspect" / "contact_sheet.html").read_text()
    assert "<td class='id'>b1</td>" in html and "<td class='id'>a0</td>" not in html
    both = CliRunner().invoke(inspect_command, [str(root), "--newest", "--id", "a0"])
    assert both.exit_code == 2 and "give --id or --newest, not both" in both.output
