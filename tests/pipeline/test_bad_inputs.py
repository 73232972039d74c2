"""Bad input never stops the job and is never dropped: error rows or documented conversions."""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from run_helpers import read_dataset, read_errors, write_images, write_manifest

from pipeline.config import RunConfig
from pipeline.job import run
from pipeline.manifest import ManifestError
from pipeline.run_cli import EXIT_ERROR_RATE
from pipeline.run_cli import run as run_command

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


def bad_inputs(folder) -> dict[str, tuple[str, str | None, str | None]]:
    """id -> (guide file, mask file, expected error stage or None when converted and written)."""
    names = write_images(folder, 2, size=(48, 48))
    Image.new("L", (48, 48), 90).save(folder / "gray.png")
    Image.new("RGBA", (48, 48), (255, 0, 0, 128)).save(folder / "rgba.png")
    Image.new("RGB", (48, 48), (0, 90, 200)).convert(
        "P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(np.full((48, 48), 40000, np.uint16)).save(folder / "deep.png")
    Image.new("CMYK", (48, 48), (10, 20, 30, 0)).save(folder / "cmyk.jpg")
    Image.new("RGB", (400, 400)).save(folder / "bomb.png")
    Image.new("L", (20, 20), 255).save(folder / "small_mask.png")
    Image.new("L", (48, 48), 0).save(folder / "black_mask.png")  # keeps all: nothing to edit
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    whole = (folder / names[1]).read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return {
        "good": (names[0], None, None), "gray": ("gray.png", None, None),
        "rgba": ("rgba.png", None, None), "palette": ("palette.png", None, None),
        "deep": ("deep.png", None, None), "cmyk": ("cmyk.jpg", None, None),
        "missing": ("nowhere.png", None, "read"), "corrupt": ("corrupt.png", None, "decode"),
        "truncated": ("truncated.png", None, "decode"), "bomb": ("bomb.png", None, "decode"),
        "badmask": (names[0], "small_mask.png", "validate"),
        "blackmask": (names[0], "black_mask.png", "validate"),
        "../escape": (names[0], None, "validate"), "noguide": (None, None, "validate"),
    }


def test_bad_inputs_become_error_rows_and_counts_reconcile(tmp_path):
    inputs = tmp_path / "inputs"
    cases = bad_inputs(inputs)
    ids = [*cases, "twin", "twin", "late", "blank"]
    guides = [c[0] for c in cases.values()] + ["img0.png", "img1.png", "img0.png", "img1.png"]
    masks = [c[1] for c in cases.values()] + [None, None, None, None]
    t0 = [None] * len(cases) + [None, None, [0.5, 1.5], [0.5, None]]
    manifest = write_manifest(inputs / "m.parquet",
                              {"id": ids, "guide": guides, "mask": masks, "t0": t0})
    output = tmp_path / "out"
    lines = []
    summary = run(RunConfig(manifest=str(manifest), output=str(output), model="builtin:tiny",
                            steps=2, t0=(0.5,), batch_size=4, model_batch=4,
                            max_pixels=100_000), report=lines.append)
    data, errors = read_dataset(output), read_errors(output)
    total = len(ids) + 2  # the twins' error rows are the driver's: counted in progress too
    assert lines[-1].startswith(f"{total} of {total} outputs (100.0%): {data.num_rows} written, "
                                f"{errors.num_rows} failed;")
    written = set(data["id"].to_pylist())
    failed = {(r["id"], r["t0"]): r for r in errors.to_pylist()}
    assert written == {k for k, c in cases.items() if c[2] is None} | {"late", "blank"}
    for row_id, (_, _, stage) in cases.items():
        if stage:
            assert failed[(row_id, 0.5)]["stage"] == stage, row_id
    assert failed[("twin", 0.5)]["stage"] == "validate"
    # each names the rows it is about by their guides (the twins' rows were indistinguishable)
    assert failed[("twin", 0.5)]["error"] == (
        "id 'twin' appears on more than one manifest row (2 rows, guides img0.png, img1.png); "
        "every such row is an error (give each row its own id)")
    assert failed[("late", 1.5)]["error"] == (
        "t0 1.5 for id 'late' is outside (0, 1] (guide img0.png)")
    assert failed[("../escape", 0.5)]["error"] == ("id '../escape' is unsafe as a file name: it "
                                                   "contains a path separator (guide img0.png)")
    blank = [r for r in errors.to_pylist() if r["id"] == "blank"]
    assert len(blank) == 1 and math.isnan(blank[0]["t0"]) and blank[0]["error"].startswith(
        "t0 is missing (a null in the t0 list of id 'blank')")
    assert "nowhere.png" in failed[("missing", 0.5)]["error"]
    assert "over the limit of 100000" in failed[("bomb", 0.5)]["error"]
    assert "is 20x20 but guide" in failed[("badmask", 0.5)]["error"]
    assert "black_mask.png leaves nothing to edit in guide" in failed[("blackmask", 0.5)]["error"]
    assert errors.num_rows == 12  # 8 bad rows, 2 twins, 2 bad t0 (1.5 and a null)
    assert summary["expected_outputs"] == len(ids) + 2 == data.num_rows + errors.num_rows
    assert summary["reconciled"]
    assert summary["errors_by_stage"] == {"decode": 3, "read": 1, "validate": 8}
    gray = data.filter(pc.equal(data["id"], "gray"))
    assert gray["width"][0].as_py() == 64  # converted and resized to the model resolution
    again = run(RunConfig(manifest=str(manifest), output=str(output), model="builtin:tiny",
                          steps=2, t0=(0.5,), max_pixels=100_000))
    assert again["this_run"]["todo"] == 0  # committed errors (a NaN t0 too) are not retried
    assert read_errors(output).num_rows == 12 and again["reconciled"]


def test_rows_sharing_keys_get_one_error_row_each_across_runs(tmp_path):
    names = write_images(tmp_path / "inputs", 2)
    manifest = tmp_path / "inputs" / "m.parquet"
    write_manifest(manifest, {"id": ["a", "b"], "guide": names})
    output = tmp_path / "out"
    config = RunConfig(manifest=str(manifest), output=str(output), model="builtin:tiny",
                       steps=2, t0=(0.5,), batch_size=1, model_batch=1, rows_per_shard=1)
    assert run(config)["written"] == 2
    # the manifest grows: 'a' again (its output is written), two 'twin' rows, a row without id
    write_manifest(manifest, {"id": ["a", "b", "a", "twin", None, "twin"],
                              "guide": [*names, names[1], names[0], names[0], names[1]]})
    second = run(config)
    errors = read_errors(output)
    assert sorted(map(str, errors["id"].to_pylist())) == ["None", "a", "twin", "twin"]
    assert (second["expected_outputs"], second["written"], second["errors"]) == (6, 2, 4)
    assert second["reconciled"] and second["this_run"]["todo"] == 4
    assert second["this_run"]["ray"] is None  # no work for the pipeline
    third = run(config)
    assert third["this_run"]["todo"] == 0 and read_errors(output).num_rows == 4
    assert third["reconciled"]
    # the appended rows leave the manifest: the repeated 'a''s error row (its key written) no
    # longer counts; it did (2 written + 1 error of 2 outputs, not reconciled, and a nightly
    # --max-error-rate 0.2 exited 3 every night)
    write_manifest(manifest, {"id": ["a", "b"], "guide": names})
    fourth = run(config)
    assert (fourth["expected_outputs"], fourth["written"], fourth["errors"]) == (2, 2, 0)
    assert fourth["reconciled"] and fourth["superseded_errors"] == 1
    assert fourth["outside_manifest"] == {"written": 0, "errors": 3}  # twin, twin, None
    write_manifest(manifest, {"id": ["a", "b", "a"], "guide": [*names, names[1]]})
    fifth = run(config)  # 'a' twice again: its error row counts again, none is added
    assert (fifth["expected_outputs"], fifth["written"], fifth["errors"]) == (3, 2, 1)
    assert fifth["reconciled"] and fifth["superseded_errors"] == 0
    assert read_errors(output).num_rows == 4


def test_rows_whose_id_no_longer_repeats_are_done_on_the_next_run(tmp_path):
    """The fix the error row asks for (give each row its own id) took effect only with
    --retry-errors validate: the rerun counted the id's key as done by its two error rows,
    never edited it and reported 2 written + 2 errors for 3 outputs (`reconciled: false`)."""
    from pipeline.job import preview

    names = write_images(tmp_path / "inputs", 3)
    manifest = tmp_path / "inputs" / "m.parquet"
    write_manifest(manifest, {"id": ["a", "twin", "twin", "trio", "trio", "trio"],
                              "guide": [*names, *names]})
    output = tmp_path / "out"
    config = RunConfig(manifest=str(manifest), output=str(output), model="builtin:tiny",
                       steps=2, t0=(0.5,), batch_size=1, model_batch=1, rows_per_shard=1)
    first = run(config)
    assert (first["written"], first["errors"]) == (1, 5) and first["reconciled"]
    # one twin renamed, one trio row removed: 'twin' is one row's id now, 'trio' two rows'
    write_manifest(manifest, {"id": ["a", "twin", "twin2", "trio", "trio"],
                              "guide": [*names, *names[:2]]})
    shards = sorted(p.name for p in (output / "errors").iterdir())
    planned = preview(config)
    assert (planned["todo"], planned["errors_to_retry"]) == (4, 5)
    assert sorted(p.name for p in (output / "errors").iterdir()) == shards  # nothing changed
    second = run(config)
    assert (second["expected_outputs"], second["written"], second["errors"]) == (5, 3, 2)
    assert second["reconciled"] and second["this_run"]["retried_errors"] == 5
    assert sorted(read_dataset(output)["id"].to_pylist()) == ["a", "twin", "twin2"]
    errors = read_errors(output)
    assert errors["id"].to_pylist() == ["trio", "trio"]
    assert set(errors["error"].to_pylist()) == {
        "id 'trio' appears on more than one manifest row (2 rows, guides img0.png, img1.png); "
        "every such row is an error (give each row its own id)"}
    third = run(config)
    assert third["this_run"]["todo"] == 0 and third["this_run"]["retried_errors"] == 0
    assert third["reconciled"] and read_errors(output).num_rows == 2


def damage_page(path, column: str) -> None:
    """Garble the first page of `column` in a Parquet file whose footer stays readable."""
    data = bytearray(path.read_bytes())
    group = pq.read_metadata(path).row_group(0)
    chunk = next(group.column(i) for i in range(group.num_columns)
                 if group.column(i).path_in_schema == column)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data[start:start + 20] = bytes(byte ^ 0x5A for byte in data[start:start + 20])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("column", ["caption", "guide", "id"])
def test_a_manifest_file_with_a_damaged_page_is_named_not_taken_for_a_storage_failure(
        tmp_path, column):
    """A damaged page (an upload cut or garbled mid-file) raised Arrow's plain OSError: the run
    said a task could not use storage, "rerun to resume", naming only the folder, and every
    rerun failed alike. A pass-through or guide column's page fails in a read task; an id
    column's on the driver, before any work."""
    names = write_images(tmp_path / "inputs", 2)
    folder = tmp_path / "manifests"
    write_manifest(folder / "night1.parquet", {"id": ["a"], "guide": [names[0]],
                                               "caption": ["one"]})
    write_manifest(folder / "night2.parquet", {"id": ["b"], "guide": [names[1]],
                                               "caption": ["two " * 20]})
    damage_page(folder / "night2.parquet", column)
    result = CliRunner().invoke(run_command, [
        str(folder), str(tmp_path / "out"), "--model", "builtin:tiny", "--steps", "2",
        "--t0", "0.5"])
    assert result.exit_code == 1, result.output
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"Error: manifest file file://{folder}/night2.parquet is not a "
                            "readable Parquet file ("), error
    assert error.endswith("): repair or replace it, or move it out of the manifest; the run "
                          "stops before or where it reaches the file, and what was committed "
                          "stays"), error
    assert "storage" not in error


def test_missing_columns_stop_before_any_work(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", {"path": ["a.png"]})
    with pytest.raises(ManifestError, match="missing required column\\(s\\): id, guide"):
        run(RunConfig(manifest=str(manifest), output=str(tmp_path / "out"),
                      model="builtin:tiny"))
    assert not (tmp_path / "out").exists()


def test_cli_exits_non_zero_above_max_error_rate_after_writing(tmp_path):
    inputs = tmp_path / "inputs"
    names = write_images(inputs, 1)
    manifest = write_manifest(inputs / "m.parquet",
                              {"id": ["good", "bad"], "guide": [names[0], "nowhere.png"]})
    output = tmp_path / "out"
    result = CliRunner().invoke(run_command, [
        str(manifest), str(output), "--model", "builtin:tiny", "--steps", "2", "--t0", "0.5",
        "--batch-size", "2", "--model-batch", "2", "--max-error-rate", "0.25"])
    assert result.exit_code == EXIT_ERROR_RATE, result.output
    assert "1 of the 2 outputs this run made failed (rate 0.500 > --max-error-rate 0.25; " \
           "OUTPUT holds 1 failed of 2)" in result.stderr
    # the counts still reach stdout, as after a run within the rate (a scheduler reads them)
    headline = json.loads(result.stdout)
    assert headline.pop("images_per_second") > 0
    assert headline == {"expected_outputs": 2, "written": 1, "errors": 1,
                        "errors_by_stage": {"read": 1}, "reconciled": True, "output": str(output),
                        "this_run": {"todo": 2, "written": 1, "errors": 1}}
    # progress on stderr: the plan, the actors, the totals
    assert "sdedit: 2 manifest rows make 2 outputs: 2 to do, 0 already in " in result.stderr
    # the runtime of the tests' fixture, which the run joins
    assert re.search(r"sdedit: Ray: the cluster at \S+ \(1 node, \d+ CPUs?, 0 GPUs\)",
                     result.stderr), result.stderr
    assert "sdedit: starting 1 SDEdit actor (0.5 CPU, " in result.stderr
    assert "sdedit: 2 of 2 outputs (100.0%): 1 written, 1 failed; " in result.stderr
    summary = json.loads((output / "summary.json").read_text())
    assert (summary["written"], summary["errors"]) == (1, 1)
    runtime = summary["this_run"]["ray"]
    assert not runtime["started_by_this_run"] and (runtime["nodes"], runtime["gpus"]) == (1, 0)
    image = Image.open(io.BytesIO(read_dataset(output)["image"][0].as_py()))
    assert image.size == (64, 64)


def test_cli_refuses_a_changed_configuration_with_a_clear_message(small_manifest, tmp_path):
    common = [str(small_manifest), str(tmp_path / "out"), "--model", "builtin:tiny",
              "--steps", "2", "--batch-size", "4", "--model-batch", "4"]
    quiet = CliRunner().invoke(run_command, [*common, "--progress-interval", "0"])
    assert quiet.exit_code == 0
    assert "sdedit:" not in quiet.stderr and '"written"' in quiet.stdout
    result = CliRunner().invoke(run_command, [*common, "--t0", "0.3"])
    assert result.exit_code == 1
    assert "different configuration (t0: unset (each row's task default) -> [0.3])" in result.output
    assert "--overwrite" in result.output
    spelled = CliRunner().invoke(run_command, [*common, "--t0", "0.5", "--samples", "1",
                                               "--repeats", "1"])  # the defaults, written out
    assert spelled.exit_code == 0, spelled.output
    assert "4 manifest rows make 4 outputs: 0 to do, 4 already in" in spelled.stderr
    table = pq.read_table(small_manifest)  # one row now takes augmentation's 4 samples
    tasked = write_manifest(tmp_path / "tasked.parquet", {
        **table.to_pydict(), "guide": [str(small_manifest.parent / g) for g in table["guide"]
                                       .to_pylist()], "task": [None, None, None, "augmentation"]})
    tasked_common = [str(tasked), *common[1:], "--dry-run"]
    refused = CliRunner().invoke(run_command, [*tasked_common, "--samples", "1"])
    assert refused.exit_code == 1
    assert ("different configuration (samples: unset (each row's task default) -> 1)"
            in refused.output)
    plan = json.loads(CliRunner().invoke(run_command, tasked_common).stdout)
    assert (plan["expected_outputs"], plan["todo"]) == (15, 12)  # 3 + 3 t0 values x 4 samples
