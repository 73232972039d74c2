"""The task commands through click: `sdedit guides ...` and `sdedit manifest`."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
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
