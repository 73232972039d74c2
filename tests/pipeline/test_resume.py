"""What OUTPUT holds: committed keys, and failures turned back into work (no Ray)."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest

from pipeline.manifest import TaskDefaults
from pipeline.resume import (
    ConfigMismatchError,
    ForeignFilesError,
    claim_output,
    clean_temporaries,
    forget_errors,
    read_committed,
    write_index,
)
from pipeline.writers import DATA_DIR, ERRORS_DIR, ParquetShardWriter


def commit_errors(output, rows: list[tuple], storage_options: dict | None = None) -> None:
    """One committed error shard holding (id, t0, sample, stage) rows."""
    ids, t0s, samples, stages = zip(*rows, strict=True)
    writer = ParquetShardWriter(f"{output}/{ERRORS_DIR}", storage_options or {})
    messages = [f"{stage} failed for {row_id}" for row_id, stage in zip(ids, stages, strict=True)]
    writer.write(pa.table({"id": list(ids), "t0": list(t0s), "sample": list(samples),
                           "stage": list(stages), "error": messages}))
    writer.close()


def test_read_committed_counts_error_rows_by_stage(tmp_path):
    commit_errors(tmp_path, [("a", 0.5, 0, "read"), (None, 0.5, 0, "validate")])
    commit_errors(tmp_path, [("b", float("nan"), 0, "validate")])
    committed = read_committed(str(tmp_path), "parquet", {})
    assert committed.error_rows == 3 and committed.data_rows == 0
    assert committed.errors_by_stage == {"read": 1, "validate": 2}
    keys = committed.keys.to_pylist()
    assert {"id": "a", "t0": 0.5, "sample": 0} in keys
    assert any(k["id"] == "b" and math.isnan(k["t0"]) for k in keys)


def test_forget_errors_removes_only_the_chosen_stages(tmp_path):
    commit_errors(tmp_path, [("a", 0.5, 0, "read"), ("b", 0.5, 0, "read")])
    commit_errors(tmp_path, [("c", 0.5, 0, "read"), ("d", 0.5, 0, "decode"),
                             ("e", 1.5, 0, "validate")])
    untouched = sorted(p.name for p in (tmp_path / ERRORS_DIR).iterdir())
    assert forget_errors(str(tmp_path), (), {}) == 0
    assert sorted(p.name for p in (tmp_path / ERRORS_DIR).iterdir()) == untouched
    assert forget_errors(str(tmp_path), ("read",), {}) == 3
    committed = read_committed(str(tmp_path), "parquet", {})
    assert committed.errors_by_stage == {"decode": 1, "validate": 1}
    assert sorted(committed.failed["id"].to_pylist()) == ["d", "e"]
    assert len(list((tmp_path / ERRORS_DIR).iterdir())) == 1  # the mixed shard, rewritten
    assert forget_errors(str(tmp_path), ("read", "decode", "validate"), {}) == 2
    assert read_committed(str(tmp_path), "parquet", {}).error_rows == 0
    assert list((tmp_path / ERRORS_DIR).iterdir()) == []


def commit_data(output, ids: list[str]) -> str:
    """One committed data shard (key columns and an image column); returns its file name."""
    writer = ParquetShardWriter(f"{output}/{DATA_DIR}", {})
    writer.write(pa.table({"id": ids, "t0": [0.5] * len(ids), "sample": [0] * len(ids),
                           "image": [b"png"] * len(ids)}))
    return writer.close().rsplit("/", 1)[-1]


def written_ids(output) -> list[str]:
    return sorted(read_committed(str(output), "parquet", {}).written["id"].to_pylist())


def test_the_index_stands_in_for_listed_shards_only(tmp_path):
    first = commit_data(tmp_path, ["a", "b"])
    commit_data(tmp_path, ["c"])
    commit_errors(tmp_path, [("d", 0.5, 0, "read")])
    write_index(str(tmp_path), read_committed(str(tmp_path), "parquet", {}), {})
    assert sorted(p.name for p in tmp_path.glob("_committed_*")) == [
        "_committed_data.parquet", "_committed_errors.parquet"]
    (tmp_path / DATA_DIR / first).write_bytes(b"not parquet")  # the index answers for it
    assert written_ids(tmp_path) == ["a", "b", "c"]
    assert read_committed(str(tmp_path), "parquet", {}).errors_by_stage == {"read": 1}
    commit_data(tmp_path, ["e"])  # committed after the index: read from the shard
    (tmp_path / DATA_DIR / first).unlink()  # gone: its keys are no longer committed
    assert written_ids(tmp_path) == ["c", "e"]


def test_a_damaged_index_is_ignored(tmp_path):
    commit_data(tmp_path, ["a", "b"])
    (tmp_path / "_committed_data.parquet").write_bytes(b"garbage")
    assert written_ids(tmp_path) == ["a", "b"]
    write_index(str(tmp_path), read_committed(str(tmp_path), "parquet", {}), {})
    commit_data(tmp_path, ["c"])
    assert written_ids(tmp_path) == ["a", "b", "c"]


def test_a_retried_key_that_fails_again_shows_its_new_stage(tmp_path):
    commit_errors(tmp_path, [("k", 0.5, 0, "read")])
    write_index(str(tmp_path), read_committed(str(tmp_path), "parquet", {}), {})
    assert forget_errors(str(tmp_path), ("read",), {}) == 1
    commit_errors(tmp_path, [("k", 0.5, 0, "decode")])  # same key, so the same shard name
    assert read_committed(str(tmp_path), "parquet", {}).errors_by_stage == {"decode": 1}


def test_a_torn_run_record_is_named_and_leftovers_of_the_holders_files_are_removed(tmp_path):
    record = {"model": "builtin:tiny", "steps": 2}
    claim_output(str(tmp_path), record, False, {})
    assert json.loads((tmp_path / "_run_config.json").read_text()) == record
    assert [p.name for p in tmp_path.iterdir()] == ["_run_config.json"]  # nothing left beside
    commit_errors(tmp_path, [("x", 0.5, 0, "read")])  # OUTPUT holds a run's outputs
    (tmp_path / "_run_config.json").write_bytes(b'{"model": "buil')  # written in place, killed
    with pytest.raises(ConfigMismatchError) as error:  # was "Expecting ',' delimiter..."
        claim_output(str(tmp_path), record, False, {})
    assert str(error.value).startswith(f"{tmp_path}/_run_config.json does not hold a run's "
                                       "configuration (Unterminated string")
    claim_output(str(tmp_path), record, True, {})  # --overwrite replaces it
    assert json.loads((tmp_path / "_run_config.json").read_text()) == record
    for name in (".tmp-_run_config.json.1a", ".tmp-summary.json.2b", ".tmp-_run_lease.json.3c",
                 "data/.tmp-part-0.parquet.4d"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"half")
    assert clean_temporaries(str(tmp_path), {}) == 3
    assert sorted(p.name for p in tmp_path.glob(".tmp-*")) == [".tmp-_run_lease.json.3c"]


def test_a_record_whose_run_committed_nothing_gives_way_to_another_configuration(tmp_path):
    """A run that failed before any work (a wrong --address, no GPUs) or was stopped before
    its first commit left its record, and the corrected command was refused as a different
    configuration: no output could mix. Once a shard is committed, a change is refused."""
    record = {"model": "builtin:tiny", "steps": 2, "t0": [0.3]}
    claim_output(str(tmp_path), record, False, {})
    corrected = {**record, "steps": 3, "t0": [0.5]}
    claim_output(str(tmp_path), corrected, False, {})
    assert json.loads((tmp_path / "_run_config.json").read_text()) == corrected
    (tmp_path / "_run_config.json").write_bytes(b'{"model": "buil')  # torn, and nothing written
    claim_output(str(tmp_path), record, False, {})
    assert json.loads((tmp_path / "_run_config.json").read_text()) == record
    commit_errors(tmp_path, [("x", 0.5, 0, "read")])
    with pytest.raises(ConfigMismatchError, match=r"\(steps: 2 -> 3; t0: \[0.3\] -> \[0.5\]\)"):
        claim_output(str(tmp_path), corrected, False, {})


def test_an_unset_t0_samples_or_repeats_is_the_value_every_row_takes_by_default(tmp_path):
    """A nightly config that gains `samples: 1` (or `--t0 0.5`) makes the same outputs as the
    run that left them unset, unless a task preset in play gives its rows another value: it
    was refused as a different configuration, and only --overwrite (deleting the outputs)
    went on."""
    from pipeline.manifest import NO_TASK
    from tasks.presets import get_preset

    augmentation, editing = (TaskDefaults(p.t0, p.samples, p.repeats, p.requires_mask) for p
                             in map(get_preset, ("augmentation", "editing")))
    unset = {"model": "builtin:tiny", "t0": None, "samples": None, "repeats": None}
    claim_output(str(tmp_path), unset, False, {}, [NO_TASK])
    commit_errors(tmp_path, [("x", 0.5, 0, "read")])  # OUTPUT holds a run's outputs
    spelled = {**unset, "t0": [0.5], "samples": 1, "repeats": 1}
    claim_output(str(tmp_path), spelled, False, {}, [NO_TASK])
    assert json.loads((tmp_path / "_run_config.json").read_text()) == unset  # kept as it was
    claim_output(str(tmp_path), {**unset, "t0": [0.5, 0.4]}, False, {}, [editing])
    unset_ = r"unset \(each row's task default\)"
    with pytest.raises(ConfigMismatchError, match=rf"\(samples: {unset_} -> 1\)"):
        claim_output(str(tmp_path), {**unset, "samples": 1}, False, {}, [NO_TASK, augmentation])
    with pytest.raises(ConfigMismatchError, match=rf"\(t0: {unset_} -> \[0.5, 0.4\]\)"):
        claim_output(str(tmp_path), {**unset, "t0": [0.5, 0.4]}, False, {}, [NO_TASK, editing])
    with pytest.raises(ConfigMismatchError, match=rf"\(samples: {unset_} -> 2\)"):
        claim_output(str(tmp_path), {**unset, "samples": 2}, False, {}, [NO_TASK])
    with pytest.raises(ConfigMismatchError, match=rf"\(repeats: {unset_} -> 1\)"):  # none known
        claim_output(str(tmp_path), {**unset, "repeats": 1}, False, {})


def test_a_task_option_that_no_row_takes_is_not_a_different_configuration(tmp_path):
    """`--task synthesis` added to a nightly job whose rows all name their own task (which wins)
    was refused as a different configuration (task: None -> 'synthesis')."""
    unset = {"model": "builtin:tiny", "task": None, "steps": 2}
    claim_output(str(tmp_path), unset, False, {})
    commit_errors(tmp_path, [("x", 0.5, 0, "read")])  # OUTPUT holds a run's outputs
    claim_output(str(tmp_path), {**unset, "task": "synthesis"}, False, {}, ignored=("task",))
    assert json.loads((tmp_path / "_run_config.json").read_text()) == unset  # kept as it was
    with pytest.raises(ConfigMismatchError, match=r"\(task: None -> 'synthesis'\)"):
        claim_output(str(tmp_path), {**unset, "task": "synthesis"}, False, {})
    with pytest.raises(ConfigMismatchError, match=r"\(steps: 2 -> 3\)"):  # only the task
        claim_output(str(tmp_path), {**unset, "steps": 3}, False, {}, ignored=("task",))


def test_the_t0_values_of_a_run_in_another_order_are_its_configuration(tmp_path):
    """`--t0 0.8 --t0 0.4` into an OUTPUT made with `--t0 0.4 --t0 0.8` makes the same outputs
    (keys and seeds are per t0 value): it was refused as a different configuration."""
    record = {"model": "builtin:tiny", "t0": [0.4, 0.8], "steps": 2, "samples": None}
    claim_output(str(tmp_path), record, overwrite=False, storage_options={})
    commit_errors(tmp_path, [("x", 0.5, 0, "read")])  # OUTPUT holds a run's outputs
    claim_output(str(tmp_path), {**record, "t0": [0.8, 0.4]}, overwrite=False, storage_options={})
    with pytest.raises(ConfigMismatchError, match=r"t0: \[0.4, 0.8\] -> \[0.4, 0.7\]"):
        claim_output(str(tmp_path), {**record, "t0": [0.4, 0.7]}, overwrite=False,
                     storage_options={})


def test_a_prior_whose_configs_changed_under_the_same_weights_is_another_configuration(
        tmp_path):
    """The record named the weights' digest only: a scheduler config edited in place (other
    betas, DDIM for DDPM) made other images into the same OUTPUT. A record an earlier version
    wrote, without the configs' digest, takes the first run's and refuses a change after it."""
    earlier = {"model": "/models/church", "model_digest": "sha256:w", "steps": 2}
    (tmp_path / "_run_config.json").write_text(json.dumps(earlier))
    now = {**earlier, "model_config_digest": "sha256:c1"}
    claim_output(str(tmp_path), now, False, {})
    commit_errors(tmp_path, [("x", 0.5, 0, "read")])  # OUTPUT holds a run's outputs
    assert json.loads((tmp_path / "_run_config.json").read_text()) == now
    claim_output(str(tmp_path), now, False, {})
    with pytest.raises(ConfigMismatchError,
                       match=r"\(model_config_digest: 'sha256:c1' -> 'sha256:c2'\)"):
        claim_output(str(tmp_path), {**now, "model_config_digest": "sha256:c2"}, False, {})


def test_the_same_prior_under_another_uri_is_the_same_configuration(tmp_path):
    """A prior copied to another bucket or folder (same weights, same configs) was refused as
    another configuration, so a scheduled job could only go on with --overwrite, which redid
    every output. Other weights, other configs, or a record without the configs' digest (it
    cannot tell the configs apart) still need the same URI."""
    record = {"model": "s3://old/church", "model_digest": "sha256:w",
              "model_config_digest": "sha256:c", "steps": 2}
    claim_output(str(tmp_path), record, False, {})
    commit_errors(tmp_path, [("x", 0.5, 0, "read")])  # OUTPUT holds a run's outputs
    claim_output(str(tmp_path), {**record, "model": "/copies/church"}, False, {})
    assert json.loads((tmp_path / "_run_config.json").read_text()) == record
    for changed, shown in (({"model_digest": "sha256:v"}, "model_digest"),
                           ({"model_config_digest": "sha256:d"}, "model_config_digest")):
        with pytest.raises(ConfigMismatchError,
                           match=rf"\(model: 's3://old/church' -> '/copies/church'; {shown}: "):
            claim_output(str(tmp_path), {**record, "model": "/copies/church", **changed},
                         False, {})
    (tmp_path / "_run_config.json").unlink()
    earlier = {"model": "s3://old/church", "model_digest": "sha256:w", "steps": 2}
    claim_output(str(tmp_path), earlier, False, {})
    with pytest.raises(ConfigMismatchError, match=r"\(model: 's3://old/church' -> '/copies/"):
        claim_output(str(tmp_path), {**record, "model": "/copies/church"}, False, {})


def test_an_output_folder_of_the_users_own_files_is_refused_and_overwrite_deletes_none(tmp_path):
    """`sdedit run proj/data/manifest.parquet proj --overwrite` deleted proj/data (the manifest,
    its guides, a README) recursively, then failed on the manifest it had deleted; without
    --overwrite, every run failed with Arrow's "No match for FieldRef.Name(t0)"."""
    (tmp_path / DATA_DIR).mkdir()
    for name in ("manifest.parquet", "guide.png", "README.txt"):
        (tmp_path / DATA_DIR / name).write_bytes(b"the user's")
    record = {"model": "builtin:tiny", "steps": 2}
    for overwrite in (True, False):
        with pytest.raises(ForeignFilesError) as error:
            claim_output(str(tmp_path), record, overwrite, {})
        assert str(error.value) == (
            f"{tmp_path}/data/ holds files no sdedit run wrote (README.txt, guide.png, "
            "manifest.parquet); a run keeps only its shards there (part-*.parquet or .tar). "
            "Choose another OUTPUT (an empty or new folder, or one a run made), or move those "
            "files out")
    assert sorted(p.name for p in (tmp_path / DATA_DIR).iterdir()) == [
        "README.txt", "guide.png", "manifest.parquet"]
    assert not (tmp_path / "_run_config.json").exists()
    assert read_committed(str(tmp_path), "parquet", {}).data_rows == 0  # not read as shards


def test_overwrite_deletes_only_what_runs_and_reports_wrote(tmp_path):
    commit_errors(tmp_path, [("a", 0.5, 0, "read")])
    claim_output(str(tmp_path), {"steps": 2}, False, {})
    (tmp_path / "inspect").mkdir()
    for name in ("inspect/contact_sheet.png", "inspect/notes.txt", "evaluation.json",
                 "errors/.tmp-part-1.parquet.ab", "labels.csv", "errors/.DS_Store"):
        (tmp_path / name).write_bytes(b"x")
    claim_output(str(tmp_path), {"steps": 3}, True, {})  # hidden names are nobody's data
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "_run_config.json", "errors", "errors/.DS_Store", "inspect", "inspect/notes.txt",
        "labels.csv"]


@pytest.mark.slow
def test_an_object_stores_folder_marker_is_no_foreign_file(s3_server):
    """The empty `data/` object a console's "create folder" leaves: s3fs lists it as an entry
    named "", and the run's own OUTPUT was refused for holding files "()"."""
    import s3fs

    output = f"{s3_server.new_bucket()}/out"
    store = s3fs.S3FileSystem(endpoint_url=s3_server.endpoint_url)
    store.pipe_file(f"{output}/data/", b"")
    commit_errors(output, [("a", 0.5, 0, "read")], s3_server.storage_options)  # as a run does
    store.invalidate_cache()
    claim_output(output, {"steps": 2}, False, s3_server.storage_options)
    claim_output(output, {"steps": 3}, True, s3_server.storage_options)
    store.invalidate_cache()
    root = output.removeprefix("s3://")
    assert store.find(root) == [f"{root}/_run_config.json", f"{root}/data/"]  # the marker stays
