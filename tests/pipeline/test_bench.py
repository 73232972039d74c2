"""`sdedit bench` arithmetic (the steady-state ratio over the actors' editing window, the
best case left by the actor's start-up) and the actor start-up measurement."""

from __future__ import annotations

import json

import click
import pytest

from pipeline.bench_cli import (
    actor_start_seconds,
    best_case_ratio,
    compare,
    dealt,
    median,
    model_throughput,
    steady_state_ratio,
    write_inputs,
)


def test_steady_state_ratio_uses_the_editing_window_only():
    run = {"written": 256, "editing_seconds": 47.95, "pipeline_seconds": 58.29}
    assert steady_state_ratio(run, model_only=5.416) == pytest.approx(256 / 47.95 / 5.416, abs=1e-3)
    assert steady_state_ratio(run, model_only=5.416) == 0.986


def test_steady_state_ratio_is_none_without_an_editing_window():
    assert steady_state_ratio({"written": 0, "editing_seconds": None}, model_only=5.0) is None
    assert steady_state_ratio({"written": 0}, model_only=5.0) is None


def test_best_case_ratio_charges_only_the_actor_start():
    # 256 images at 5 images/s are 51.2 s of model time; 5.12 s of start-up on top
    assert best_case_ratio(256, model_only=5.0, actor_start=5.12) == pytest.approx(51.2 / 56.32,
                                                                                   abs=1e-3)
    assert best_case_ratio(256, model_only=5.0, actor_start=0.0) == 1.0
    assert best_case_ratio(512, 5.0, 5.12) > best_case_ratio(256, 5.0, 5.12)


def test_actor_start_builds_the_actor_in_a_fresh_process():
    seconds = actor_start_seconds("builtin:tiny", steps=20, model_batch=8, actors=1)
    assert 0.1 < seconds < 120  # it imports torch and diffusers: never instant
    with pytest.raises(click.ClickException, match="builtin:nope.*unknown builtin model 'nope'"):
        actor_start_seconds("builtin:nope", steps=20, model_batch=8, actors=1)


def test_model_only_deals_the_chunks_out_to_one_process_per_actor():
    assert dealt(5, model_batch=2, processes=2) == [[[0, 1], [4]], [[2, 3]]]
    assert dealt(3, model_batch=4, processes=1) == [[[0, 1, 2]]]
    assert dealt(2, model_batch=1, processes=3) == [[[0]], [[1]], []]  # one waits idle


def test_model_only_runs_as_many_processes_as_actors(tmp_path):
    write_inputs(tmp_path, count=3, size=16)
    for actors in (1, 2):
        rate = model_throughput(tmp_path, "builtin:tiny", count=3, t0=0.5, steps=2,
                                model_batch=1, actors=actors)
        assert 0 < rate < 10_000
    with pytest.raises(click.ClickException, match="model-only could not run builtin:nope.*"
                                                   "unknown builtin model 'nope'"):
        model_throughput(tmp_path, "builtin:nope", count=3, t0=0.5, steps=2, model_batch=1,
                         actors=2)


def test_each_run_is_compared_with_model_only_around_it():
    run = {"pipeline_images_per_s": 4.5, "written": 256, "editing_seconds": 45.0}
    compared = compare(run, before=5.2, after=4.8)
    assert compared["model_only_images_per_s"] == 5.0
    assert compared["model_only_before_after"] == [5.2, 4.8]
    assert compared["ratio"] == 0.9
    assert compared["steady_state_ratio"] == round(256 / 45.0 / 5.0, 3)
    assert compared["pipeline_images_per_s"] == 4.5  # the run's own figures are kept


def test_median_of_odd_and_even_counts():
    assert median([0.91, 0.85, 0.88]) == 0.88
    assert median([0.91, 0.85, 0.88, 0.86]) == 0.87
    assert median(iter([0.9])) == 0.9
    assert median([]) is None


def test_bench_runs_end_to_end_in_the_chosen_dtype(tmp_path):
    from click.testing import CliRunner

    from pipeline.bench_cli import bench

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench, ["--images", "2", "--size", "16", "--steps", "2",
                                        "--batch-size", "2", "--model-batch", "2",
                                        "--dtype", "bfloat16", "--workdir", str(tmp_path / "w"),
                                        "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["dtype"] == "bfloat16"
    assert [run["written"] for run in saved["runs"]] == [2]
    assert saved["runs"][0]["model_only_images_per_s"] > 0 and saved["ratio"] > 0
    run_config = json.loads((tmp_path / "w" / "output" / "summary.json").read_text())["config"]
    assert run_config["dtype"] == "bfloat16"  # the pipeline ran in it too, not float32


@pytest.fixture
def bench_never_runs(monkeypatch):
    """Fail the test if `sdedit bench` starts benchmarking (writing its input images)."""
    import pipeline.bench_cli

    def refuse(*args):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(pipeline.bench_cli, "write_inputs", refuse)


@pytest.mark.parametrize(("option", "value", "shown"), [
    ("--images", "0", "0 is not in the range x>=1."),
    ("--size", "0", "0 is not in the range x>=1."),
    ("--t0", "2", "2.0 is not in the range 0<x<=1."),
    ("--t0", "0", "0.0 is not in the range 0<x<=1."),
    ("--t0", "nan", "nan is not in the range 0<x<=1."),
    ("--steps", "0", "0 is not in the range x>=1."),
    ("--batch-size", "0", "0 is not in the range x>=1."),
    ("--model-batch", "0", "0 is not in the range x>=1."),
    ("--actors", "0", "0 is not in the range x>=1."),
])
def test_bench_refuses_out_of_range_options_before_it_runs(bench_never_runs, option, value,
                                                           shown):
    """Each was a traceback (ZeroDivisionError, the library's ValueError, a ConfigError)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, ["bench", option, value])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == f"Error: Invalid value for '{option}': {shown}"


def test_bench_refuses_an_out_under_a_file_before_it_runs(bench_never_runs, tmp_path):
    """It wrote the result only after the whole benchmark, and failed there."""
    from click.testing import CliRunner

    from pipeline.cli import main

    (tmp_path / "z").write_text("a file")
    out = tmp_path / "z" / "file" / "x.json"
    result = CliRunner().invoke(main, ["bench", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == (
        f"Error: Invalid value for '--out': {out}: {tmp_path / 'z'} is a file, not a folder")


def test_bench_makes_a_missing_out_folder_before_it_runs(bench_never_runs, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    out = tmp_path / "new" / "deeper" / "x.json"
    result = CliRunner().invoke(main, ["bench", "--out", str(out)])
    assert isinstance(result.exception, AssertionError)  # past the checks: it would run
    assert out.parent.is_dir() and not out.exists()
