"""`sdedit run` end to end on a local Ray runtime: outputs, resume, append, refusal, formats."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset
import pyarrow.parquet as pq
import pytest
from PIL import Image
from run_helpers import read_dataset, read_errors, write_images, write_manifest

from pipeline.config import RunConfig
from pipeline.job import ActorResources, concurrent_calls, preview, run
from pipeline.manifest import ManifestError
from pipeline.resume import ConfigMismatchError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


def config(manifest, output, **overrides) -> RunConfig:
    values = dict(manifest=str(manifest), output=str(output), model="builtin:tiny", steps=2,
                  t0=(0.5,), batch_size=4, model_batch=4, rows_per_shard=4)
    return RunConfig(**{**values, **overrides})


def shard_state(output) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in sorted((output / "data").iterdir())}


def test_run_writes_one_row_per_key_with_metadata_and_a_reconciled_summary(small_manifest,
                                                                            tmp_path):
    output = tmp_path / "out"
    summary = run(config(small_manifest, output, t0=(0.3, 0.6), samples=2))
    table = read_dataset(output)
    assert table.num_rows == 4 * 2 * 2
    assert table.column_names[:13] == ["id", "t0", "sample", "seed", "image", "image_format",
                                       "width", "height", "model", "model_digest", "steps",
                                       "repeats", "l2_to_guide"]
    assert set(table.column_names[13:]) == {"guide", "label"}
    assert table["label"].to_pylist()[:4] == ["a", "a", "a", "a"]
    assert set(zip(table["t0"].to_pylist(), table["sample"].to_pylist(), strict=True)) == {
        (0.3, 0), (0.3, 1), (0.6, 0), (0.6, 1)}
    image = Image.open(io.BytesIO(table["image"][0].as_py()))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))
    assert set(table["model"].to_pylist()) == {"builtin:tiny"}
    assert all(0.0 < v < 4.0 for v in table["l2_to_guide"].to_pylist())
    assert read_errors(output) is None
    stored = json.loads((output / "summary.json").read_text())
    assert stored == summary
    assert (summary["expected_outputs"], summary["written"], summary["errors"]) == (16, 16, 0)
    assert summary["reconciled"] and summary["duplicate_rows"] == 0
    assert summary["config"]["t0"] == [0.3, 0.6] and summary["versions"]["torch"]
    timing = summary["this_run"]
    parts = [timing[name] for name in ("startup_seconds", "editing_seconds", "drain_seconds")]
    assert min(parts) >= 0 and sum(parts) == pytest.approx(timing["pipeline_seconds"], abs=0.01)
    assert timing["editing_seconds"] >= timing["actor_edit_seconds"] - 0.01  # one actor


def test_rerun_does_nothing_and_append_does_only_new_rows(tmp_path):
    inputs = tmp_path / "inputs"
    names = write_images(inputs, 6)
    manifest = inputs / "manifest.parquet"
    write_manifest(manifest, {"id": ["a", "b", "c", "d"], "guide": names[:4]})
    output = tmp_path / "out"
    assert preview(config(manifest, output))["todo"] == 4 and not output.exists()
    first = run(config(manifest, output))
    before = shard_state(output)
    again = run(config(manifest, output, batch_size=2))  # execution knobs may change
    assert again["this_run"]["todo"] == 0 and shard_state(output) == before
    assert again["this_run"]["images_per_second"] is None  # not 0.0, which reads as stalled
    write_manifest(manifest, {"id": ["a", "b", "c", "d", "e", "f"], "guide": names})
    planned = preview(config(manifest, output))  # a dry run: counts, nothing changes
    assert (planned["expected_outputs"], planned["todo"], planned["already_committed"]) == (6, 2, 4)
    assert shard_state(output) == before
    appended = run(config(manifest, output))
    after = shard_state(output)
    assert (first["written"], appended["this_run"]["todo"], appended["written"]) == (4, 2, 6)
    assert {k: after[k] for k in before} == before  # finished shards untouched
    assert read_dataset(output)["id"].to_pylist() == ["a", "b", "c", "d", "e", "f"]


def test_appended_rows_take_the_column_types_output_holds_so_readers_see_one_schema(tmp_path):
    """pandas writes a column of only None as Arrow's null type. Rows appended later with
    values made shards typed string beside the first run's null-typed one, and readers that take
    one shard's schema for all (pyarrow.dataset, polars, DuckDB, Hugging Face datasets) failed
    when that shard came first. The same for ids written as large_string, which the job kept."""
    names = write_images(tmp_path / "inputs", 5)
    folder = tmp_path / "inputs" / "manifest"
    guides = [f"../{name}" for name in names]
    write_manifest(folder / "a.parquet", {"id": ["a", "b"], "guide": guides[:2],
                                          "caption": pa.nulls(2),
                                          "score": pa.array([1, 2], pa.int32())})
    output = tmp_path / "out"
    run(config(folder, output))
    write_manifest(folder / "b.parquet", {"id": pa.array(["c", "d"], pa.large_string()),
                                          "guide": guides[2:4],
                                          "caption": ["x", None],
                                          "score": pa.array([3, None], pa.int16())})
    assert run(config(folder, output))["this_run"]["todo"] == 2
    shards = sorted((output / "data").glob("part-*.parquet"))
    assert len(shards) == 2
    assert {pq.read_schema(s).field("caption").type for s in shards} == {pa.string()}
    assert {pq.read_schema(s).field("id").type for s in shards} == {pa.string()}  # pandas'
    # large_string ids made shards `sdedit inspect` could not read together
    assert {pq.read_schema(s).field("score").type for s in shards} == {pa.int32()}
    table = pyarrow.dataset.dataset(output / "data", format="parquet").to_table()
    assert sorted(zip(*(table[c].to_pylist() for c in ("id", "caption", "score")),
                      strict=True)) == [("a", None, 1), ("b", None, 2), ("c", "x", 3),
                                        ("d", None, None)]
    before = shard_state(output)
    write_manifest(folder / "c.parquet", {"id": ["e"], "guide": guides[4:],
                                          "score": pa.array([2**40], pa.int64())})
    refusal = r"'score' is int64 but OUTPUT's shards hold it as int32 .*cast the column"
    with pytest.raises(ManifestError, match=refusal):
        preview(config(folder, output))
    with pytest.raises(ManifestError, match=refusal):
        run(config(folder, output))
    assert shard_state(output) == before


def test_a_dropped_column_is_written_as_nulls_and_a_new_one_is_noted(tmp_path):
    """Shards of a rerun whose manifest dropped a column lacked it, so readers taking such a
    shard's schema for all lost it everywhere; a column new in a rerun was only in its shards,
    without a word."""
    names = write_images(tmp_path / "inputs", 3)
    manifest = tmp_path / "inputs" / "m.parquet"
    write_manifest(manifest, {"id": ["a"], "guide": names[:1],
                              "label": pa.array([7], pa.int32())})
    output = tmp_path / "out"
    run(config(manifest, output))
    write_manifest(manifest, {"id": ["a", "b", "c"], "guide": names, "caption": ["x", "y", "z"]})
    lines = []
    assert run(config(manifest, output), report=lines.append)["this_run"]["todo"] == 2
    assert (f"note: column(s) caption are new to {output}: only this run's shards will have "
            "them") in "\n".join(lines)
    shards = sorted((output / "data").glob("part-*.parquet"), key=lambda s: s.stat().st_mtime)
    assert pq.read_schema(shards[-1]).field("label").type == pa.int32()
    unified = pa.unify_schemas([pq.read_schema(shard) for shard in shards])
    table = pyarrow.dataset.dataset(output / "data", schema=unified, format="parquet").to_table()
    assert sorted(zip(*(table[c].to_pylist() for c in ("id", "label", "caption")),
                      strict=True)) == [("a", 7, None), ("b", None, "y"), ("c", None, "z")]


def test_a_changed_configuration_is_refused_unless_overwrite(small_manifest, tmp_path):
    output = tmp_path / "out"
    run(config(small_manifest, output))
    with pytest.raises(ConfigMismatchError, match=r"steps: 2 -> 3.*--overwrite"):
        run(config(small_manifest, output, steps=3))
    with pytest.raises(ConfigMismatchError, match=r"steps: 2 -> 3.*--overwrite"):
        preview(config(small_manifest, output, steps=3))
    replacing = preview(config(small_manifest, output, steps=3, overwrite=True))
    assert (replacing["todo"], replacing["already_committed"]) == (4, 0)
    assert len(read_dataset(output)) == 4  # a dry run removes nothing
    (output / "evaluation.json").write_text("{}")  # sdedit evaluate's and inspect's reports
    (output / "inspect").mkdir()
    (output / "inspect" / "contact_sheet.png").write_bytes(b"png")
    summary = run(config(small_manifest, output, steps=3, overwrite=True))
    # replaced with the outputs they describe (they stayed, describing outputs now gone)
    assert not (output / "evaluation.json").exists() and not (output / "inspect").exists()
    assert summary["written"] == 4
    eager = read_dataset(output)
    assert set(eager["steps"].to_pylist()) == {3}
    with pytest.raises(ConfigMismatchError, match=r"compile: False -> True"):
        run(config(small_manifest, output, steps=3, compile=True))
    compiled = run(config(small_manifest, output, steps=3, compile=True, channels_last=True,
                          overwrite=True))
    assert compiled["written"] == 4 and compiled["config"]["compile"]
    for before, after in zip(eager["image"].to_pylist(), read_dataset(output)["image"].to_pylist(),
                             strict=True):
        difference = np.abs(np.asarray(Image.open(io.BytesIO(before)), int)
                            - np.asarray(Image.open(io.BytesIO(after)), int))
        assert difference.max() <= 1  # torch.compile may move a rare pixel by one level


def test_outputs_are_identical_across_batch_sizes_and_actor_counts(tmp_path):
    names = write_images(tmp_path / "inputs", 6)
    manifest = write_manifest(tmp_path / "inputs" / "m.parquet", {
        "id": [f"r{i}" for i in range(6)], "guide": names, "t0": [[0.3, 0.7]] * 3 + [None] * 3})
    one = tmp_path / "one"
    two = tmp_path / "two"
    # default threads: the cores shared among the actors, 2 for one actor here (two chunk
    # workers, calls at once), 1 for two; each chunk runs on one torch thread either way
    run(config(manifest, one, batch_size=2, samples=2, rows_per_shard=3))
    run(config(manifest, two, batch_size=5, samples=2, actors=(2, 2), rows_per_shard=7))
    a, b = read_dataset(one), read_dataset(two)
    assert a.num_rows == b.num_rows == 3 * 2 * 2 + 3 * 2
    assert a["image"].to_pylist() == b["image"].to_pylist()
    assert a["seed"].to_pylist() == b["seed"].to_pylist()


def test_cpu_actors_with_threads_take_as_many_calls_at_once():
    cpu = ActorResources(gpus=0.0, cpus=0.5, threads=2, actors=(1, 1))
    assert concurrent_calls(cpu, compile=False) == {
        "enable_true_multi_threading": True, "max_concurrent_calls_per_actor": 2}
    assert concurrent_calls(cpu._replace(threads=1), compile=False) == {}
    assert concurrent_calls(cpu, compile=True) == {}  # a compiled model keeps torch's threads
    assert concurrent_calls(ActorResources(1.0, 1.0, None, (1, 1)), compile=False) == {}


def test_fast_decode_reaches_the_workers_and_is_recorded(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(3)
    for index in range(3):  # photos 8x the model resolution: decoded at 1/8 scale
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        photo = Image.fromarray(coarse).resize((683, 512), Image.Resampling.BICUBIC)
        photo.save(inputs / f"p{index}.jpg", quality=92)
    manifest = write_manifest(inputs / "m.parquet", {
        "id": ["p0", "p1", "p2"], "guide": [f"p{i}.jpg" for i in range(3)]})
    run(config(manifest, tmp_path / "full", t0=(0.3,)))
    run(config(manifest, tmp_path / "fast", t0=(0.3,), fast_decode=True))
    full, fast = read_dataset(tmp_path / "full"), read_dataset(tmp_path / "fast")
    assert full["id"].to_pylist() == fast["id"].to_pylist() == ["p0", "p1", "p2"]
    pixels = [[np.asarray(Image.open(io.BytesIO(b)), dtype=int) for b in t["image"].to_pylist()]
              for t in (full, fast)]
    differences = [np.abs(a - b).mean() for a, b in zip(*pixels, strict=True)]
    assert all(0 < d < 2 for d in differences), differences  # the guides differ by ~1 level
    record = json.loads((tmp_path / "fast" / "_run_config.json").read_text())
    assert record["fast_decode"] is True
    assert "fast_decode" not in json.loads((tmp_path / "full" / "_run_config.json").read_text())


def test_mask_keeps_the_guide_exactly_where_black(tmp_path):
    inputs = tmp_path / "inputs"
    names = write_images(inputs, 1, size=(64, 64))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(inputs / "mask.png")
    manifest = write_manifest(inputs / "m.parquet",
                              {"id": ["x"], "guide": names, "mask": ["mask.png"]})
    run(config(manifest, tmp_path / "out", t0=(0.8,)))
    row = read_dataset(tmp_path / "out").to_pylist()[0]
    out = np.asarray(Image.open(io.BytesIO(row["image"])))
    guide = np.asarray(Image.open(inputs / names[0]).convert("RGB"))
    assert np.array_equal(out[:, :32], guide[:, :32])
    assert np.abs(out[:, 32:].astype(int) - guide[:, 32:]).mean() > 5
    assert row["mask"] == "mask.png"


def test_webdataset_shards_hold_images_and_metadata(small_manifest, tmp_path):
    output = tmp_path / "out"
    summary = run(config(small_manifest, output, format="webdataset", image_format="webp"))
    tars = sorted((output / "data").glob("part-*.tar"))
    names = []
    for path in tars:
        with tarfile.open(path) as tar:
            names += tar.getnames()
    assert sorted(n.rsplit(".", 1)[1] for n in names) == ["json"] * 4 + ["webp"] * 4
    assert summary["written"] == 4 and summary["reconciled"]
    assert run(config(small_manifest, output, format="webdataset",
                      image_format="webp"))["this_run"]["todo"] == 0


def test_bundled_example_runs_with_task_presets(tmp_path):
    from pathlib import Path

    import pipeline

    manifest = Path(pipeline.__file__).parent / "examples" / "manifest.parquet"
    lines = []  # every row names its task: --task decides none of them, and the run says so
    summary = run(config(manifest, tmp_path / "out", t0=None, task="augmentation"), lines.append)
    assert ("--task augmentation applies to 0 of 9 rows; the others keep the task their "
            "manifest row names (editing: 1, synthesis: 8)") in lines
    table = read_dataset(tmp_path / "out")
    per_id = {i: table["id"].to_pylist().count(i) for i in set(table["id"].to_pylist())}
    emoji = {f"emoji-{code}": 3 for code in ("1f60d", "1f98a", "1f345", "1f338")}
    photos = {"astronaut": 3, "chelsea": 3, "coffee": 3, "rocket": 3, "chelsea-edit": 2}
    assert per_id == {**photos, **emoji}
    assert summary["reconciled"] and summary["errors"] == 0
    edit = table.filter(pc.equal(table["id"], "chelsea-edit")).to_pylist()[0]
    out = np.asarray(Image.open(io.BytesIO(edit["image"])))
    guide = np.asarray(Image.open(manifest.parent / "guides" / "chelsea-edit.png"))
    assert np.array_equal(out[:16], guide[:16])  # outside the mask: the guide, exactly
    assert edit["source"] == "photos/chelsea.png"


def test_pickle_only_models_need_allow_pickle(small_manifest, tmp_path):
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    folder = tmp_path / "pickled-prior"
    UNet2DModel(sample_size=32, block_out_channels=(8, 16), norm_num_groups=4,
                layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(
        folder, safe_serialization=False)
    DDPMScheduler().save_pretrained(folder)
    output = tmp_path / "out"
    with pytest.raises(RuntimeError, match="allow-pickle") as refused:
        run(config(small_manifest, output, model=str(folder)))
    assert str(folder) in str(refused.value) and not (output / "data").exists()
    summary = run(config(small_manifest, output, model=str(folder), allow_pickle=True))
    assert (summary["written"], summary["errors"]) == (4, 0) and summary["reconciled"]
    assert set(read_dataset(output)["model"].to_pylist()) == {str(folder)}


def test_retry_errors_redoes_only_the_named_stages(tmp_path):
    inputs = tmp_path / "inputs"
    names = write_images(inputs, 2)
    manifest = write_manifest(inputs / "m.parquet", {
        "id": ["there", "late", "bad"], "guide": [names[0], "later.png", names[1]],
        "t0": [None, None, [0.5, 1.5]]})
    output = tmp_path / "out"
    first = run(config(manifest, output))
    assert first["errors_by_stage"] == {"read": 1, "validate": 1} and first["written"] == 2
    (inputs / "later.png").write_bytes((inputs / names[1]).read_bytes())  # the outage is over
    unchanged = run(config(manifest, output))
    assert unchanged["this_run"]["todo"] == 0 and unchanged["errors"] == 2
    errors_before = sorted(p.name for p in (output / "errors").iterdir())
    planned = preview(config(manifest, output, retry_errors=("read",)))
    assert (planned["errors_to_retry"], planned["todo"]) == (1, 1)
    assert sorted(p.name for p in (output / "errors").iterdir()) == errors_before
    retried = run(config(manifest, output, retry_errors=("read",)))
    assert retried["this_run"]["retried_errors"] == 1 and retried["this_run"]["todo"] == 1
    assert retried["written"] == 3 and retried["errors_by_stage"] == {"validate": 1}
    assert retried["reconciled"] and retried["expected_outputs"] == 4
    table = read_dataset(output)
    assert sorted(table["id"].to_pylist()) == ["bad", "late", "there"]
    assert read_errors(output)["error"][0].as_py().startswith("t0 1.5 for id 'bad'")


def test_actors_that_cannot_load_the_model_stop_the_run_with_one_clear_error(small_manifest,
                                                                             tmp_path,
                                                                             monkeypatch):
    """The model changed between the driver's read and the actors' load (here: the driver is
    told other weights): each actor refuses to start, and the run said so only at the end of
    a Ray traceback of several hundred lines."""
    import pipeline.job
    from pipeline.job import ModelInfo
    from sdedit.loading import ModelLoadError

    other = "sha256:" + "0" * 64
    monkeypatch.setattr(pipeline.job, "probe_model",
                        lambda config: ModelInfo(config.model, other, 64))
    config = RunConfig(manifest=str(small_manifest), output=str(tmp_path / "out"),
                       model="builtin:tiny", steps=2)
    with pytest.raises(ModelLoadError) as error:
        run(config)
    message = str(error.value)
    assert message.startswith("the SDEdit actors could not load the model: model builtin:tiny "
                              f"changed since this run started: the driver read weights {other}, "
                              "this actor loaded sha256:")
    assert message.endswith(f"What was committed stays in {tmp_path / 'out'}; rerun to resume")
    assert "Traceback" not in message


def test_the_error_rate_limit_judges_the_outputs_this_run_made(tmp_path):
    """--max-error-rate was judged over all OUTPUT held: a night whose every output failed
    passed (earlier nights' outputs diluted it), and after it every night with nothing to do
    exited 3."""
    from pipeline.job import ErrorRateExceeded

    names = write_images(tmp_path / "inputs", 8)
    manifest = tmp_path / "inputs" / "m.parquet"
    ids = [f"good{index}" for index in range(8)]
    write_manifest(manifest, {"id": ids, "guide": names})
    output = tmp_path / "out"
    assert run(config(manifest, output, max_error_rate=0.05))["written"] == 8
    write_manifest(manifest, {"id": [*ids, "bad"], "guide": [*names, "gone.png"]})
    with pytest.raises(ErrorRateExceeded) as refused:  # 1 of 9 in OUTPUT, 1 of 1 tonight
        run(config(manifest, output, max_error_rate=0.2))
    assert str(refused.value).startswith(
        "1 of the 1 outputs this run made failed (rate 1.000 > --max-error-rate 0.2; OUTPUT "
        "holds 1 failed of 9); see ")
    quiet = run(config(manifest, output, max_error_rate=0.05))  # nothing to do: it passes
    assert quiet["this_run"]["todo"] == 0 and round(quiet["error_rate"], 3) == 0.111


def test_outputs_of_keys_the_manifest_no_longer_makes_are_not_counted_as_its(tmp_path):
    """A row removed and a t0 value a row no longer lists: their output and error stay in
    OUTPUT, but summary.json counted them as the manifest's (reconciled false) and
    --max-error-rate exited 3 over an error of a row no longer in the manifest."""
    names = write_images(tmp_path / "inputs", 2)
    manifest = tmp_path / "inputs" / "m.parquet"
    write_manifest(manifest, {"id": ["a", "b", "bad"], "guide": [*names, "gone.png"],
                              "t0": [[0.3, 0.5], None, None]})
    output = tmp_path / "out"
    first = run(config(manifest, output))
    assert (first["expected_outputs"], first["written"], first["errors"]) == (4, 3, 1)
    write_manifest(manifest, {"id": ["a", "b"], "guide": names, "t0": [[0.5, 0.7], None]})
    second = run(config(manifest, output))
    assert second["this_run"]["todo"] == 1  # a at 0.7
    assert (second["expected_outputs"], second["written"], second["errors"]) == (3, 3, 0)
    assert second["errors_by_stage"] == {} and second["reconciled"]
    assert second["outside_manifest"] == {"written": 1, "errors": 1}  # a at 0.3, bad
    third = run(config(manifest, output, max_error_rate=0.2))  # was ErrorRateExceeded
    assert third["this_run"]["todo"] == 0 and third["error_rate"] == 0.0
    assert len(read_dataset(output)) == 4 and read_errors(output).num_rows == 1  # kept
