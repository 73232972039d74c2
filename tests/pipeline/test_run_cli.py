"""`sdedit run` argument handling that stops before any work (no Ray needed)."""

from __future__ import annotations

import json

import ray
from click.testing import CliRunner
from run_helpers import write_images, write_manifest

from pipeline.cli import main


def test_run_is_registered_and_documents_its_options():
    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0
    for option in ("--t0", "--samples", "--storage-option", "--actors", "--config",
                   "--max-error-rate", "--overwrite", "--format", "--image-format",
                   "--compile", "--channels-last", "--dry-run", "--progress-interval",
                   "--wait-for-output", "--wait-for-gpus"):
        assert option in result.output


def test_bad_option_values_are_usage_errors(tmp_path):
    result = CliRunner().invoke(main, ["run", "m.parquet", str(tmp_path), "--t0", "1.5"])
    assert result.exit_code == 2 and "t0 values must lie in (0, 1]" in result.output
    result = CliRunner().invoke(main, ["run", "m.parquet", str(tmp_path), "--actors", "x"])
    assert result.exit_code == 2 and "actors must be N or MIN-MAX" in result.output


def test_storage_option_values_are_never_echoed(tmp_path):
    for malformed in ("=SECRETVAL", "secret:SECRETVAL"):  # no key, or no '='
        result = CliRunner().invoke(main, ["run", "m.parquet", str(tmp_path),
                                           "--storage-option", malformed])
        assert result.exit_code == 2 and "KEY=VALUE" in result.output
        assert "SECRETVAL" not in result.output, result.output


def test_manifest_and_output_may_come_from_a_config_file(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'manifest = "{tmp_path}/missing.parquet"\noutput = "{tmp_path}/out"\n'
                      'model = "builtin:tiny"\n')
    result = CliRunner().invoke(main, ["run", "--config", str(config)])
    assert result.exit_code == 1
    assert "missing.parquet does not exist" in result.output


def test_missing_manifest_and_output_are_named(tmp_path):
    result = CliRunner().invoke(main, ["run"])
    assert result.exit_code == 2 and "missing required option(s): manifest, output" in result.output


def test_dry_run_prints_the_plan_without_ray_or_output(tmp_path):
    names = write_images(tmp_path / "inputs", 3)
    manifest = write_manifest(tmp_path / "inputs" / "m.parquet",
                              {"id": ["a", "b", "c"], "guide": names})
    result = CliRunner().invoke(main, ["run", str(manifest), str(tmp_path / "out"), "--model",
                                       "builtin:tiny", "--t0", "0.3", "--t0", "0.6",
                                       "--samples", "2", "--dry-run"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert (plan["manifest_rows"], plan["expected_outputs"], plan["todo"]) == (3, 12, 12)
    assert (plan["already_committed"], plan["errors_to_retry"]) == (0, 0)
    assert plan["model"]["resolution"] == 64 and plan["model"]["digest"].startswith("sha256:")
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


def test_an_error_line_masks_the_credentials_of_a_uri(tmp_path, closed_port):
    manifest = f"http://bob:MANPASS@127.0.0.1:{closed_port}/jobs/m.parquet?token=MTOKEN"
    result = CliRunner().invoke(main, ["run", manifest, str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 1
    assert f"http://bob:***@127.0.0.1:{closed_port}/jobs/m.parquet" in result.output
    assert "MANPASS" not in result.output and "MTOKEN" not in result.output


def test_the_task_commands_read_storage_options_as_run_does():
    from tasks.cli import parse_storage_options

    assert parse_storage_options(("anon=false", "client_kwargs.region_name=eu")) == {
        "anon": False, "client_kwargs": {"region_name": "eu"}}
    result = CliRunner().invoke(main, ["inspect", "s3://b/out", "--storage-option",
                                       "=SECRETVALUE"])
    assert result.exit_code == 2 and "SECRETVALUE" not in result.output
    assert "storage option must look like KEY=VALUE" in result.output


def test_rows_naming_their_own_task_keep_it_and_the_plan_says_so(tmp_path):
    """`sdedit manifest` names a task in every row, so `--task synthesis` on its output changed
    nothing and said nothing: 2 augmentation rows gave 2 x 3 t0 x 4 samples, not 2 x 3 x 1."""
    names = write_images(tmp_path / "inputs", 3)
    manifest = write_manifest(tmp_path / "inputs" / "m.parquet",
                              {"id": ["a", "b", "c"], "guide": names,
                               "task": ["augmentation", "augmentation", None]})
    args = ["run", str(manifest), str(tmp_path / "out"), "--model", "builtin:tiny", "--dry-run"]
    result = CliRunner().invoke(main, [*args, "--task", "synthesis"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["task_note"] == ("--task synthesis applies to 1 of 3 rows; the others keep the "
                                 "task their manifest row names (augmentation: 2)")
    assert plan["expected_outputs"] == 2 * 3 * 4 + 3  # synthesis: t0 0.4, 0.5, 0.6; 1 sample
    assert json.loads(CliRunner().invoke(main, args).stdout)["task_note"] is None
    result = CliRunner().invoke(main, [*args, "--task", "synthesys"])
    assert result.exit_code == 1
    assert result.output.endswith("unknown task 'synthesys'; known tasks: synthesis, editing, "
                                  "compositing, augmentation\n")
