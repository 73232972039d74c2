"""The task commands through click: `sdedit guides ...` and `sdedit manifest`."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main


def invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_the_sdedit_group_exposes_the_task_commands():
    output = invoke("--help").output
    for name in ("guides", "manifest", "inspect", "evaluate"):
        assert name in output
    assert {"strokes", "edits", "composites"} <= set(invoke("guides", "--help").output.split())


def test_guides_strokes_from_a_manifest_keeps_labels(ray_local, photo_folder, tmp_path):
    manifest = tmp_path / "photos.parquet"
    invoke("manifest", str(photo_folder), str(manifest))
    out = tmp_path / "strokes"
    result = invoke("guides", "strokes", str(manifest), str(out), "--palette-size", "4")
    assert "wrote 4 synthesis guides" in result.output
    assert "next: sdedit run" in result.output
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert {row["label"] for row in rows} == {"animals", "objects", None}
    assert all(row["source"].startswith(str(photo_folder)) for row in rows)
    assert all(
        len(np.unique(np.asarray(Image.open(out / r["guide"])).reshape(-1, 3), axis=0)) <= 4
        for r in rows
    )


def test_guides_edits_with_a_fixed_box(ray_local, photo_folder, tmp_path):
    out = tmp_path / "edits"
    invoke("guides", "edits", str(photo_folder), str(out), "--box", "0,0,16,16")
    for row in pq.read_table(out / "manifest.parquet").to_pylist():
        mask = np.asarray(Image.open(out / row["mask"]))
        assert (mask[:16, :16] == 255).all() and mask.sum() == 255 * 256


def test_guides_composites_writes_masks(ray_local, photo_folder, tmp_path):
    out = tmp_path / "composites"
    invoke("guides", "composites", str(photo_folder), str(out), "--seed", "3")
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(rows) == 4 and all(row["task"] == "compositing" for row in rows)
    assert all((out / row["mask"]).is_file() for row in rows)


def test_bad_options_are_refused_with_the_reason(tmp_path, photo_folder):
    runner = CliRunner()
    result = runner.invoke(
        main, ["guides", "edits", str(photo_folder), str(tmp_path), "--box", "1,2"]
    )
    assert result.exit_code == 2 and "left,top,right,bottom" in result.output
    result = runner.invoke(
        main,
        ["manifest", str(photo_folder), str(tmp_path / "m.parquet"), "--storage-option", "novalue"],
    )
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
    result = runner.invoke(
        main, ["manifest", str(photo_folder), str(tmp_path / "m.parquet"), "--task", "editing"]
    )
    assert result.exit_code == 1 and "needs a mask per image" in result.output


def test_guides_max_pixels_turns_large_sources_into_error_rows(ray_local, photo_folder, tmp_path):
    out = tmp_path / "small-only"
    result = CliRunner().invoke(main, ["guides", "edits", str(photo_folder), str(out),
                                       "--box", "0,0,16,16", "--max-pixels", "100"])
    assert result.exit_code == 1
    assert "over the limit of 100" in result.output and "raise --max-pixels" in result.output
    assert "4 row(s) failed" in result.output and "no guide could be built" in result.output


@pytest.fixture
def ray_never_starts(monkeypatch):
    """Fail the test if a command starts Ray."""
    import pipeline.job

    def refuse(address):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(pipeline.job, "init_ray", refuse)


def out_of_range(option: str, value: str, bounds: str) -> str:
    return f"Invalid value for '{option}': {value} is not in the range {bounds}."


@pytest.mark.parametrize(("args", "message"), [
    (["strokes", "--batch-size", "0"], out_of_range("--batch-size", "0", "x>=1")),
    (["strokes", "--num-cpus", "0"], out_of_range("--num-cpus", "0.0", "x>0")),
    (["strokes", "--stroke-size", "0"], out_of_range("--stroke-size", "0", "x>=1")),
    (["strokes", "--palette-size", "0"], out_of_range("--palette-size", "0", "x>=1")),
    (["edits", "--palette-size", "0"], out_of_range("--palette-size", "0", "x>=1")),
    (["edits", "--min-fraction", "0"], out_of_range("--min-fraction", "0.0", "0<x<=1")),
    (["edits", "--min-fraction", "0.9", "--max-fraction", "0.1"],
     "Invalid value for --min-fraction: 0.9 is over --max-fraction 0.1 (a random box's "
     "smallest side fraction cannot exceed its largest)"),
    (["composites", "--max-fraction", "1.5"], out_of_range("--max-fraction", "1.5", "0<x<=1")),
    (["composites", "--same-place"], "--same-place pastes --box where it was; give --box too"),
    (["strokes", "--paint-size", "0"], out_of_range("--paint-size", "0", "x>=1")),
])
def test_guide_options_are_checked_before_ray_starts(ray_never_starts, photo_folder, tmp_path,
                                                     args, message):
    command, *options = args
    result = CliRunner().invoke(main, ["guides", command, str(photo_folder), str(tmp_path / "out"),
                                       *options])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == f"Error: {message}"
    assert not (tmp_path / "out").exists()


def test_builder_value_errors_end_with_one_error_line(ray_never_starts, tmp_path):
    (tmp_path / "clash").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "clash" / "a b.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "clash" / "a_b.png")
    result = CliRunner().invoke(main, ["guides", "strokes", str(tmp_path / "clash"),
                                       str(tmp_path / "out")])
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit
    assert result.output == (
        f"Error: images {tmp_path}/clash/a b.png and {tmp_path}/clash/a_b.png under "
        f"{tmp_path}/clash both map to id 'a_b'; rename one (ids come from the path without "
        "its suffix)\n")
    pq.write_table(pa.table({"name": ["x"]}), tmp_path / "m.parquet")
    result = CliRunner().invoke(main, ["guides", "edits", str(tmp_path / "m.parquet"),
                                       str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output == (
        f"Error: manifest {tmp_path}/m.parquet needs columns 'id' and 'source' or 'guide'\n")


def test_a_single_image_cannot_be_composited(monkeypatch, tmp_path):
    import pipeline.job

    monkeypatch.setattr(pipeline.job, "init_ray", lambda address: None)
    (tmp_path / "one").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "x.png")
    result = CliRunner().invoke(main, ["guides", "composites", str(tmp_path / "one"),
                                       str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output == (
        "Error: compositing needs at least two images, or a 'foreground' column\n")


def test_guides_in_an_output_inside_the_source_are_not_sources(monkeypatch, photo_folder,
                                                               tmp_path):
    import shutil

    import pipeline.job
    from tasks import guides

    itself = shutil.copytree(photo_folder, tmp_path / "itself")

    monkeypatch.setattr(pipeline.job, "init_ray", lambda address: None)
    monkeypatch.setattr(guides, "_build_on_ray",
                        lambda work, job: [guides.build_one(row, job) for row in work])
    output = photo_folder / "strokes"
    for _ in range(2):
        result = invoke("guides", "strokes", str(photo_folder), str(output) + "/")
        assert "wrote 4 synthesis guides" in result.output
    rows = pq.read_table(output / "manifest.parquet").to_pylist()
    assert [row["id"] for row in rows] == [
        "animals__chelsea", "astronaut", "objects__coffee", "objects__rocket"]
    assert len(list((output / "guides").iterdir())) == 4
    for _ in range(2):  # into the source itself: its guides/ and masks/ are no photos either
        result = invoke("guides", "edits", str(itself), str(itself))
        assert "wrote 4 editing guides" in result.output, result.output
    rows = pq.read_table(itself / "manifest.parquet").to_pylist()
    assert [row["id"] for row in rows] == [
        "animals__chelsea", "astronaut", "objects__coffee", "objects__rocket"]


def test_guides_refuse_source_columns_that_sdedit_run_reserves(ray_never_starts, tmp_path):
    """They passed through to the guides' manifest, which `sdedit run` then refused."""
    pq.write_table(pa.table({"id": ["a"], "guide": ["a.png"], "width": [64], "mask": ["m.png"],
                             "_sd_note": ["x"], "label": ["cat"], "error": [None]}),
                   tmp_path / "m.parquet")
    result = CliRunner().invoke(main, ["guides", "edits", str(tmp_path / "m.parquet"),
                                       str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output == (
        f"Error: manifest {tmp_path}/m.parquet: column(s) width, _sd_note, error would pass "
        "through to the guides' manifest, and `sdedit run` refuses them there: it names its own "
        "output columns so (sample, image, image_format, width, height, model, model_digest, "
        "steps, repeats, l2_to_guide, stage, error, _sd_*); rename them\n")
    assert not (tmp_path / "out").exists()


def test_manifest_refuses_an_output_name_that_is_not_parquet(tmp_path):
    """`sdedit manifest FOLDER out.csv` wrote Parquet under a CSV name."""
    result = CliRunner().invoke(main, ["manifest", str(tmp_path), str(tmp_path / "out.csv")])
    assert result.exit_code == 2
    assert (f"Invalid value for OUTPUT: '{tmp_path / 'out.csv'}': expected a .parquet file name "
            "(manifests are Parquet)") in result.output
    assert not (tmp_path / "out.csv").exists()


def test_manifest_refuses_a_missing_source_and_a_manifest_for_one(tmp_path):
    missing, output = tmp_path / "nonexist.png", tmp_path / "out.parquet"
    result = CliRunner().invoke(main, ["manifest", str(missing), str(output)])
    assert result.exit_code == 1 and result.output == (
        f"Error: cannot write a manifest of {missing} to {output}: FileNotFoundError: no such "
        f"file or folder: {missing}\n")
    pq.write_table(pa.table({"id": ["a"], "guide": ["a.png"]}), tmp_path / "m.parquet")
    result = CliRunner().invoke(main, ["manifest", str(tmp_path / "m.parquet"), str(output)])
    assert result.exit_code == 1 and result.output == (
        f"note: left out 1 file(s) at {tmp_path}/m.parquet with a suffix of no image format "
        f"Pillow decodes: .parquet\nError: cannot write a manifest of {tmp_path}/m.parquet to "
        f"{output}: FileNotFoundError: no images (files with a suffix Pillow decodes, such as "
        f".png, .jpg, .webp or .tif) found at {tmp_path}/m.parquet; it is a .parquet file: "
        "`sdedit manifest` takes a folder or glob of images, not a manifest\n")
    assert not output.exists()


def test_guides_refuse_an_output_made_with_other_settings(monkeypatch, photo_folder, tmp_path):
    """A rerun with other options replaced the guides under the runs made from them, with no
    word (their outputs then no longer matched their guides)."""
    import shutil

    import pipeline.job
    from tasks import guides

    started = []
    monkeypatch.setattr(pipeline.job, "init_ray", started.append)
    monkeypatch.setattr(guides, "_build_on_ray",
                        lambda work, job: [guides.build_one(row, job) for row in work])
    output = tmp_path / "out"
    for _ in range(2):  # the same settings: a rerun goes on (new photos would be added)
        invoke("guides", "strokes", str(photo_folder), str(output), "--seed", "1")
    assert len(started) == 2
    before = {path.name: path.read_bytes() for path in (output / "guides").iterdir()}
    manifest = (output / "manifest.parquet").read_bytes()
    copy = shutil.copytree(photo_folder, tmp_path / "copy")
    refusals = [
        (["strokes", str(photo_folder), str(output), "--seed", "1", "--stroke-size", "5"],
         "stroke_size: 9 -> 5"),
        (["strokes", str(photo_folder), str(output)], "seed: 1 -> 0"),
        (["edits", str(photo_folder), str(output), "--seed", "1"],
         "palette_size: 12 -> 6; task: 'synthesis' -> 'editing'"),
        (["strokes", str(copy) + "/", str(output), "--seed", "1"],
         f"source: {str(photo_folder)!r} -> {str(copy)!r}"),
    ]
    for args, change in refusals:
        result = CliRunner().invoke(main, ["guides", *args])
        assert result.exit_code == 1, result.output
        assert result.output == (
            f"Error: {output} holds guides made with other settings ({change}); runs made "
            "from them would no longer match their guides. Use the same options, another "
            "OUTPUT, or --overwrite to replace them\n")
    assert len(started) == 2  # refused before Ray started
    assert {path.name: path.read_bytes() for path in (output / "guides").iterdir()} == before
    assert (output / "manifest.parquet").read_bytes() == manifest
    # a relative source naming the same folder is the same source
    monkeypatch.chdir(photo_folder.parent)
    invoke("guides", "strokes", photo_folder.name, str(output), "--seed", "1")
    invoke("guides", "strokes", str(photo_folder), str(output), "--stroke-size", "5",
           "--overwrite")
    after = {path.name: path.read_bytes() for path in (output / "guides").iterdir()}
    assert after.keys() == before.keys() and all(after[n] != before[n] for n in before)
    invoke("guides", "strokes", str(photo_folder), str(output), "--stroke-size", "5")
    # an OUTPUT whose manifest records no settings (an earlier version's) takes any
    pq.write_table(pq.read_table(output / "manifest.parquet").replace_schema_metadata(None),
                   output / "manifest.parquet")
    invoke("guides", "strokes", str(photo_folder), str(output), "--seed", "4")
    result = CliRunner().invoke(main, ["guides", "strokes", str(photo_folder), str(output)])
    assert result.exit_code == 1 and "seed: 4 -> 0" in result.output
    (output / "manifest.parquet").write_bytes(b"not parquet")  # replaced, as a torn file was
    invoke("guides", "strokes", str(photo_folder), str(output))
    assert pq.read_table(output / "manifest.parquet").num_rows == 4


def test_guides_overwrite_removes_the_files_of_ids_it_does_not_build(monkeypatch, photo_folder,
                                                                     tmp_path):
    """--overwrite from a smaller source left the guides and masks of the ids it no longer
    built beside the new ones (the manifest listed only the new)."""
    import pipeline.job
    from tasks import guides

    monkeypatch.setattr(pipeline.job, "init_ray", lambda address: None)
    monkeypatch.setattr(guides, "_build_on_ray",
                        lambda work, job: [guides.build_one(row, job) for row in work])
    output = tmp_path / "out"
    invoke("guides", "edits", str(photo_folder), str(output))
    made = sorted(path.name for path in (output / "guides").iterdir())
    assert len(made) == 4 and sorted(p.name for p in (output / "masks").iterdir()) == made
    (output / "guides" / "notes.txt").write_text("not a guide")  # stays
    invoke("guides", "strokes", str(photo_folder / "objects"), str(output), "--overwrite")
    manifest = pq.read_table(output / "manifest.parquet")
    assert sorted(manifest["guide"].to_pylist()) == ["guides/coffee.png", "guides/rocket.png"]
    assert sorted(path.name for path in (output / "guides").iterdir()) == [
        "coffee.png", "notes.txt", "rocket.png"]
    assert list((output / "masks").iterdir()) == []  # stroke paintings have none
