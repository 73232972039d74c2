"""Progress lines: outputs done of those to do, failures, rate and time left, every interval."""

from __future__ import annotations

import logging

import pytest

from pipeline.progress import Progress, duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def progress(todo: int, interval: float) -> tuple[Progress, Clock, list[str]]:
    clock, lines = Clock(), []
    return Progress(todo, lines.append, interval, clock=clock), clock, lines


def test_a_line_is_due_every_interval_with_rate_and_time_left():
    run, clock, lines = progress(todo=100, interval=30)
    clock.now += 10
    run.add(written=20, failed=0)
    assert lines == []  # 10 s < 30 s
    clock.now += 30  # 40 s in: 35 outputs, 0.875/s, 65 to go
    run.add(written=14, failed=1)
    assert lines == ["35 of 100 outputs (35.0%): 34 written, 1 failed; 0.9/s; "
                     "about 1 min 14 s left"]
    clock.now += 29
    run.add(written=5, failed=0)
    assert len(lines) == 1  # the next one is due 30 s after the last
    assert (run.written, run.failed) == (39, 1)


def test_the_last_shard_leaves_the_last_line_to_finish():
    run, clock, lines = progress(todo=10, interval=1)
    clock.now += 5
    run.add(written=8, failed=2)
    assert lines == []
    clock.now += 0.5
    run.finish()
    assert lines == ["10 of 10 outputs (100.0%): 8 written, 2 failed; 1.8/s; done in 6 s"]


def test_outputs_settled_before_the_start_count_as_done_but_not_in_the_rate():
    """The driver's error rows (rows repeating an id) are committed before any work: counted
    in the rate, 900 of them made the first line say 30.3/s and 3 s left for 4 min of work."""
    run, clock, lines = progress(todo=1000, interval=30)
    run.settle(failed=900)
    clock.now += 30
    run.add(written=10, failed=0)
    assert lines == ["910 of 1,000 outputs (91.0%): 10 written, 900 failed; 0.3/s; "
                     "about 4 min 30 s left"]


def test_interval_zero_reports_only_the_end():
    run, clock, lines = progress(todo=1000, interval=0)
    for _ in range(100):
        clock.now += 100
        run.add(written=10, failed=0)
    assert lines == []
    run.finish()
    assert lines == ["1,000 of 1,000 outputs (100.0%): 1,000 written, 0 failed; 0.1/s; "
                     "done in 2 h 46 min"]


@pytest.mark.parametrize("seconds, text", [(0, "0 s"), (12.4, "12 s"), (448, "7 min 28 s"),
                                            (7500, "2 h 5 min"), (-3, "0 s")])
def test_duration_reads_in_hours_minutes_or_seconds(seconds, text):
    assert duration(seconds) == text


def test_ray_datas_own_progress_report_is_off_unless_its_variable_says_0(monkeypatch):
    """`sdedit run` turned it off but `sdedit guides` did not: both use this switch now."""
    from types import SimpleNamespace

    from pipeline.progress import RAY_PROGRESS_VARIABLE, ray_data_progress

    context = SimpleNamespace(enable_progress_bars=True)
    monkeypatch.delenv(RAY_PROGRESS_VARIABLE, raising=False)
    ray_data_progress(context)
    assert context.enable_progress_bars is False
    monkeypatch.setenv(RAY_PROGRESS_VARIABLE, "0")
    ray_data_progress(context)
    assert context.enable_progress_bars is True


def test_ray_datas_warning_that_its_report_is_off_stays_off_the_console(monkeypatch):
    """Every run printed Ray Data's "Progress bars disabled. To enable, set ..." warning,
    advice against what the command chose."""
    from ray.data import DataContext
    from ray.data._internal.progress import get_progress_manager
    from ray.util.debug import reset_log_once

    from pipeline.progress import RAY_PROGRESS_LOGGER, RAY_PROGRESS_VARIABLE, ray_data_progress

    monkeypatch.delenv(RAY_PROGRESS_VARIABLE, raising=False)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(RAY_PROGRESS_LOGGER)
    logger.addHandler(handler)
    try:
        for ours in (False, True):
            context = DataContext()
            logger.setLevel(logging.NOTSET)  # as in a new driver
            if ours:
                ray_data_progress(context)
            else:  # turned off by hand, Ray Data warns
                context.enable_progress_bars = False
            reset_log_once("ray_data_progress_manager_disabled")
            get_progress_manager(context, "dataset", {}, False)
            warned = [r.getMessage() for r in records if r.levelno == logging.WARNING]
            assert bool(warned) is not ours, warned
            records.clear()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def test_ray_datas_error_records_are_held_from_the_console_while_a_dataset_runs():
    """A failed task's traceback (about 200 lines from Ray Data) came before the run's one
    error line: it is dropped from the console when the dataset fails, shown after it when it
    still finishes; other levels pass at once."""
    import io
    import logging

    import ray.data  # noqa: F401  (configures Ray Data's console handler, as a run does)

    from pipeline.progress import ray_data_errors_held

    console, = [handler for handler in logging.getLogger("ray.data").handlers
                if type(handler).__name__ == "PlainRayHandler"]
    shown = io.StringIO()
    before = console.setStream(shown)  # the stream it took when Ray Data was imported
    try:
        logger = logging.getLogger("ray.data._internal.execution.example")
        with pytest.raises(RuntimeError, match="task failed"), ray_data_errors_held():
            logger.warning("held-back check: a warning passes")
            logger.error("held-back check: the failed task's traceback")
            raise RuntimeError("task failed")
        assert "a warning passes" in shown.getvalue()
        assert "the failed task's traceback" not in shown.getvalue()
        with ray_data_errors_held():
            logger.error("held-back check: an error of a dataset that finished")
            assert "that finished" not in shown.getvalue()
        assert "an error of a dataset that finished" in shown.getvalue()
        logger.error("held-back check: outside a run")
        assert "outside a run" in shown.getvalue()
    finally:
        console.setStream(before)
