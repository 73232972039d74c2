"""Reading OUTPUT/data in either format: one table for Parquet and WebDataset shards, so
`sdedit inspect` and `sdedit evaluate` give the same numbers for the same job in both."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from task_fixtures import flat, photo, png_bytes, write_output

from pipeline.manifest import find_files
from pipeline.resume import record_manifest
from pipeline.writers import DATA_TYPES, WRITERS
from tasks.evaluate import evaluate
from tasks.inspect import (
    PLACEHOLDER,
    cell_origin,
    sheet_rows,
    sheet_size,
    summary_lines,
    write_contact_sheet,
)
from tasks.outputs import SHARD_SUFFIXES, OutputFolder, data_shards, manifest_base, read_table

FORMATS = ("parquet", "webdataset")
SORT = [("id", "ascending"), ("t0", "ascending"), ("sample", "ascending")]


def data_table(count: int) -> pa.Table:
    """`count` ids x 2 t0 of output rows in the pipeline's types; pass-through guide, label."""
    rows = [
        {"id": f"id{i}", "t0": t0, "sample": 0, "seed": 1000 + i, "image": png_bytes(flat(i * 40)),
         "image_format": "png", "width": 16, "height": 16, "model": "builtin:tiny",
         "model_digest": "sha256:x", "steps": 2, "repeats": 1,
         "l2_to_guide": None if i == 0 else 0.1 * i + t0, "guide": f"g{i}.png", "label": i}
        for i in range(count) for t0 in (0.3, 0.6)
    ]
    schema = pa.schema([*DATA_TYPES.items(), ("guide", pa.string()), ("label", pa.int64())])
    return pa.Table.from_pylist(rows, schema)


def write_shards(output, table: pa.Table, data_format: str, per_shard: int = 3) -> OutputFolder:
    """`table` committed under OUTPUT/data by the pipeline's writer, `per_shard` rows a shard."""
    for start in range(0, table.num_rows, per_shard):
        writer = WRITERS[data_format](str(output / "data"), {})
        writer.write(table.slice(start, per_shard))
        writer.close()
    return OutputFolder(str(output))


def test_suffixes_match_the_writers():
    assert {name: f".{w.extension}" for name, w in WRITERS.items()} == SHARD_SUFFIXES


def test_webdataset_shards_read_back_as_the_parquet_table(tmp_path):
    table = data_table(4)
    folders = {name: write_shards(tmp_path / name, table, name) for name in FORMATS}
    (tmp_path / "webdataset" / "data" / ".tmp-part-x.tar.123").write_bytes(b"partial")
    (tmp_path / "webdataset" / "data" / ".tmp-part-y.tar").write_bytes(b"partial")
    assert len(data_shards(folders["webdataset"])[1]) == 3  # 8 rows, 3 a shard
    parquet, webdataset = (read_table(folders[name], "data").sort_by(SORT) for name in FORMATS)
    assert webdataset.schema == parquet.schema == table.schema
    assert webdataset.equals(parquet) and webdataset.equals(table.sort_by(SORT))
    assert webdataset["l2_to_guide"].null_count == 2


def test_shards_that_type_the_id_apart_are_read_together(tmp_path):
    """Earlier versions wrote a manifest's large_string ids (pandas) as they were, beside
    other runs' string ids: `sdedit inspect` stopped with Arrow's "Unable to merge"."""
    folder = write_shards(tmp_path / "out", data_table(4), "parquet")
    shard = sorted((tmp_path / "out" / "data").glob("part-*.parquet"))[0]
    table = pq.read_table(shard)
    pq.write_table(table.set_column(0, "id", table["id"].cast(pa.large_string())), shard)
    read = read_table(folder, "data")
    assert read.num_rows == 8 and sorted(set(read["id"].to_pylist())) == [
        f"id{index}" for index in range(4)]


def test_columns_and_ids_select_the_same_rows_in_both_formats(tmp_path):
    table = data_table(4)
    folders = {name: write_shards(tmp_path / name, table, name) for name in FORMATS}
    chosen = [
        read_table(folders[name], "data", ["id", "t0", "image", "absent"], ["id1", "id3"])
        .sort_by([("id", "ascending"), ("t0", "ascending")])
        for name in FORMATS
    ]
    assert chosen[0].column_names == ["id", "t0", "image"]
    assert chosen[0].equals(chosen[1])
    assert chosen[1]["id"].to_pylist() == ["id1", "id1", "id3", "id3"]


def test_format_comes_from_data_or_the_summary_and_empty_data_names_output(tmp_path):
    output = tmp_path / "out"
    (output / "data").mkdir(parents=True)
    (output / "data" / ".tmp-part-a.tar").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match=f"no output shards under {output}/data"):
        data_shards(OutputFolder(str(output)))
    table = data_table(2)
    folder = write_shards(output, table, "webdataset", per_shard=4)
    assert data_shards(folder)[0] == "webdataset"
    write_shards(output, table, "parquet", per_shard=4)
    with pytest.raises(ValueError, match="both Parquet and WebDataset"):
        data_shards(folder)
    (output / "summary.json").write_text(json.dumps({"config": {"format": "parquet"}}))
    data_format, paths = data_shards(folder)
    assert data_format == "parquet" and [p.rsplit(".", 1)[1] for p in paths] == ["parquet"]


# -- the same job run by the pipeline in both formats --------------------------------------------


@pytest.fixture(scope="module")
def both_formats(tmp_path_factory, ray_local):
    """One small job (3 ids with guides, one masked, one with a missing guide; 2 t0 x 2 samples)
    run by `sdedit run` once per format; returns {format: OutputFolder}."""
    from pipeline.config import RunConfig
    from pipeline.job import run

    root = tmp_path_factory.mktemp("formats")
    (root / "inputs").mkdir()
    for name in ("chelsea", "coffee", "rocket"):
        photo(name, (64, 64)).save(root / "inputs" / f"{name}.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(root / "inputs" / "mask.png")
    manifest = root / "inputs" / "manifest.parquet"
    pq.write_table(pa.table({
        "id": ["chelsea", "coffee", "rocket", "lost"],
        "guide": ["chelsea.png", "coffee.png", "rocket.png", "missing.png"],
        "mask": [None, "mask.png", None, None],
    }), manifest)
    folders = {}
    for name in FORMATS:
        run(RunConfig(manifest=str(manifest), output=str(root / name), model="builtin:tiny",
                      steps=2, t0=(0.3, 0.6), samples=2, batch_size=4, model_batch=4,
                      rows_per_shard=3, format=name))
        folders[name] = OutputFolder(str(root / name))
    return folders


@pytest.mark.slow
def test_pipeline_outputs_read_back_identically(both_formats):
    assert [data_shards(both_formats[f])[0] for f in FORMATS] == list(FORMATS)
    parquet, webdataset = (read_table(both_formats[f], "data").sort_by(SORT) for f in FORMATS)
    assert parquet.num_rows == 3 * 2 * 2
    assert webdataset.schema == parquet.schema
    assert webdataset.equals(parquet)


@pytest.mark.slow
def test_inspect_summary_numbers_are_identical_for_both_formats(both_formats):
    parquet, webdataset = (summary_lines(both_formats[f]) for f in FORMATS)
    numbers = [line for line in parquet if not line.startswith(("output", "images/s"))]
    assert numbers == [line for line in webdataset if not line.startswith(("output", "images/s"))]
    assert "written           12  (3 ids, 2 t0 values, 2 samples)" in numbers
    assert ("expected          16  (the last run's manifest: 12 written + 4 failed, "
            "reconciled)") in numbers
    assert any(line.startswith("errors            4  (") for line in numbers)
    heading = "faithfulness (l2_to_guide: mean squared error, [-1,1] units)"
    table = numbers[numbers.index(heading) + 2:]
    assert [line.split()[:2] for line in table] == [["0.300", "6"], ["0.600", "6"]]
    means = [float(line.split()[2]) for line in table]
    assert 0 < means[0] < means[1]  # larger t0 strays further from the guide


@pytest.mark.slow
def test_evaluate_reports_are_identical_for_both_formats(both_formats):
    parquet, webdataset = (evaluate(both_formats[f]) for f in FORMATS)
    assert parquet.pop("output") != webdataset.pop("output")
    assert webdataset == parquet
    assert parquet["outputs_scored"] == 12 and parquet["outputs_without_guide"] == 0
    assert [group["outputs"] for group in parquet["by_t0"]] == [6, 6]
    assert [group["masked_outputs"] for group in parquet["by_t0"]] == [2, 2]
    assert parquet["exact_keep_outside_mask"] is True
    for group in parquet["by_t0"]:
        assert group["l2_to_guide"] == pytest.approx(group["l2_to_guide_reported"], rel=1e-6)


@pytest.mark.slow
def test_contact_sheet_of_a_webdataset_output(both_formats, tmp_path):
    folder, cell = both_formats["webdataset"], 32
    png, page, _ = write_contact_sheet(folder, str(tmp_path / "sheet"), count=3, cell=cell)
    sheet = np.asarray(Image.open(png))
    assert Image.open(png).size == sheet_size(3, 2 + 2, cell)
    for row in range(3):
        for column in (0, 2, 3):  # guide and both outputs are images, not placeholders
            x, y = cell_origin(row, column, cell)
            assert tuple(sheet[y + cell // 2, x + cell // 2]) != PLACEHOLDER
    assert "data:image/png;base64," in Path(page).read_text(encoding="utf-8")


def test_evaluate_cli_on_an_empty_output_names_it(tmp_path):
    from click.testing import CliRunner

    from tasks.cli import evaluate as evaluate_command

    result = CliRunner().invoke(evaluate_command, [str(tmp_path)])
    assert result.exit_code == 1 and f"no output shards under {tmp_path}/data" in result.output


def test_guides_and_masks_are_decoded_as_the_pipeline_decodes_them(tmp_path):
    """`inspect` and `evaluate` opened guides with Pillow alone: a transparent guide came back
    black (the run composites it over white), an EXIF-turned photo on its side, a 16-bit one
    clipped to white, so `evaluate` scored outputs against images the run never edited."""
    from pipeline.fetch import load_guide, load_mask
    from tasks.images import InputError
    from tasks.outputs import load_image

    clear = Image.new("RGBA", (6, 4), (0, 0, 0, 0))
    clear.save(tmp_path / "clear.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to view
    Image.new("RGB", (6, 4), (200, 30, 30)).save(tmp_path / "turned.jpg", exif=exif.tobytes())
    Image.fromarray(np.full((4, 6), 257 * 60, np.uint16)).save(tmp_path / "deep.png")
    for name in ("clear.png", "turned.jpg", "deep.png"):
        uri = str(tmp_path / name)
        guide = load_image(uri, {})
        assert np.array_equal(np.asarray(guide), np.asarray(load_guide(uri, {}, 10**6))), name
        mask = load_image(uri, {}, "L")
        assert np.array_equal(np.asarray(mask),
                              np.asarray(load_mask(uri, uri, mask.size, {}, 10**6))), name
    assert np.asarray(load_image(str(tmp_path / "clear.png"), {})).min() == 255  # white
    assert load_image(str(tmp_path / "turned.jpg"), {}).size == (4, 6)
    with pytest.raises(InputError, match="over the limit of 20"):
        load_image(str(tmp_path / "deep.png"), {}, max_pixels=20)
    with pytest.raises(InputError, match="cannot read"):
        load_image(str(tmp_path / "gone.png"), {})


@pytest.mark.parametrize("layout", ["glob with a wildcard folder", "file not named .parquet",
                                    "folder", "file"])
def test_relative_guides_resolve_against_the_folder_the_run_used(tmp_path, layout):
    """`sdedit run` resolved `gm/*/m.parquet` against gm/ and `pqm/manifest.pq` against pqm/;
    evaluate and inspect took gm/* and the file itself, so they found no guide."""
    from click.testing import CliRunner

    from tasks.cli import evaluate as evaluate_command

    root = tmp_path / "gm"
    (root / "part1").mkdir(parents=True)
    (root / "guides").mkdir()
    flat(100).save(root / "guides" / "a.png")
    manifest_file, manifest = {
        "glob with a wildcard folder": (root / "part1" / "m.parquet", f"{root}/*/m.parquet"),
        "file not named .parquet": (root / "manifest.pq", f"{root}/manifest.pq"),
        "folder": (root / "part1" / "m.parquet", str(root)),
        "file": (root / "m.parquet", str(root / "m.parquet")),
    }[layout]
    guide = "guides/a.png"  # relative to gm/ in each layout, as the run resolves it
    pq.write_table(pa.table({"id": ["a"], "guide": [guide]}), manifest_file)
    run_base = find_files(manifest, {}).base
    output = write_output(tmp_path / "out", [{"id": "a", "t0": 0.5, "image": flat(110),
                                              "guide": guide}],
                          summary={"config": {"manifest": manifest}})
    folder = OutputFolder(str(output))
    assert manifest_base(folder, {"config": {"manifest": manifest}}) == run_base
    assert evaluate(folder)["outputs_scored"] == 1
    (row,), _ = sheet_rows(folder)
    assert row.guide is not None and row.guide.getpixel((0, 0)) == (100, 100, 100)
    (output / "summary.json").unlink()  # a first run still writing, stopped or killed
    record_manifest(str(output), manifest, {})  # as every run does when it starts
    assert evaluate(folder)["outputs_scored"] == 1
    (output / "_run_manifest.json").unlink()  # OUTPUTs of earlier versions: --manifest
    assert evaluate(folder)["outputs_scored"] == 0
    result = CliRunner().invoke(evaluate_command, [str(output), "--manifest", manifest])
    assert result.exit_code == 0, result.output
    assert json.loads((output / "evaluation.json").read_text())["outputs_scored"] == 1


def test_a_manifest_out_of_reach_leaves_absolute_guides_scored(tmp_path, closed_port):
    """evaluate and inspect list the run's manifest to find its folder; a store this machine
    cannot reach (credentials, network) stopped both, though no guide needed the folder."""
    flat(100).save(tmp_path / "guide.png")
    manifest = f"http://127.0.0.1:{closed_port}/run/manifest.parquet"
    output = write_output(tmp_path / "out", [{"id": "a", "t0": 0.5, "image": flat(110),
                                              "guide": str(tmp_path / "guide.png")}],
                          summary={"config": {"manifest": manifest}})
    folder = OutputFolder(str(output))
    assert manifest_base(folder, {"config": {"manifest": manifest}}) == (
        f"http://127.0.0.1:{closed_port}/run")
    assert evaluate(folder)["outputs_scored"] == 1
    (row,), _ = sheet_rows(folder)
    assert row.guide.getpixel((0, 0)) == (100, 100, 100)
