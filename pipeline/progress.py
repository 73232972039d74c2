"""Progress of a run in its own units: outputs done of those to do, failures, rate and time left.

Ray Data reports blocks per operator; a user watching a long or scheduled job wants to know how
many outputs are committed and when the job will end. The driver learns both from the shards
the write step commits, so a line is due, at most every `interval` seconds, when a shard lands.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

Report = Callable[[str], None]
RAY_PROGRESS_VARIABLE = "RAY_DATA_DISABLE_PROGRESS_BARS"  # Ray Data's own switch; 0 = shown
RAY_PROGRESS_LOGGER = "ray.data._internal.progress"  # warns once that the report is off


def ray_data_progress(context) -> None:
    """Turn Ray Data's own progress report off in `context` (a DataContext) unless its variable
    is 0: it repeats the commands' own progress lines (about 15 lines every 10 s without a
    terminal) and costs the driver CPU that CPU actors share. Ray Data's warning that it is
    off, with advice to turn it on, is left out of the console too."""
    context.enable_progress_bars = os.environ.get(RAY_PROGRESS_VARIABLE) == "0"
    if not context.enable_progress_bars:
        logging.getLogger(RAY_PROGRESS_LOGGER).setLevel(logging.ERROR)


@contextmanager
def ray_data_errors_held() -> Iterator[None]:
    """Hold Ray Data's error records back from the console while a dataset runs: when a task
    fails, Ray Data logs its traceback (about 200 lines, with advice on settings a CLI user
    cannot change) before the exception reaches the job, which reports it in one line. They
    are dropped when the dataset fails (Ray Data's log file keeps them, `logs/ray-data` in the
    Ray session's folder) and shown after it when it still finishes. Other levels pass."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        held.append(record)
        return False

    consoles = [handler for handler in logging.getLogger("ray.data").handlers
                if isinstance(handler, logging.StreamHandler)
                and not isinstance(handler, logging.FileHandler)]
    for handler in consoles:
        handler.addFilter(hold)
    try:
        yield
    finally:
        for handler in consoles:
            handler.removeFilter(hold)
    for record in held:
        for handler in consoles:
            handler.handle(record)


def quiet(line: str) -> None:
    """A Report that drops every line."""


@dataclass
class Progress:
    """Counts this run's outputs as shards commit and reports them every `interval` seconds
    (0: never); the rate is over the whole run so far, start-up included, of the outputs the
    run made (not those `settled` before it started, such as the driver's error rows)."""

    todo: int
    report: Report
    interval: float
    clock: Callable[[], float] = time.monotonic
    written: int = 0
    failed: int = 0
    settled: int = 0
    started: float = field(init=False)
    last_report: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.last_report = self.clock()

    def add(self, written: int, failed: int) -> None:
        """Count one committed shard's outputs; report if a line is due."""
        self.written += written
        self.failed += failed
        now = self.clock()
        due = self.interval > 0 and now - self.last_report >= self.interval
        if due and self.written + self.failed < self.todo:  # the last line is finish()'s
            self.last_report = now
            self.report(self.line(now))

    def settle(self, failed: int) -> None:
        """Count outputs that failed before the run started (no line, no share of the rate)."""
        self.failed += failed
        self.settled += failed

    def finish(self) -> None:
        """Report the run's totals and how long it took."""
        now = self.clock()
        self.report(f"{self.line(now)}; done in {duration(now - self.started)}")

    def line(self, now: float) -> str:
        """e.g. `1,536 of 20,000 outputs (7.7%): 1,530 written, 6 failed; 41.2/s; about 7 min
        28 s left`."""
        done = self.written + self.failed
        made = done - self.settled
        rate = made / (now - self.started) if now > self.started else 0.0
        share = f" ({100 * done / self.todo:.1f}%)" if self.todo else ""
        more = self.todo - done
        left = f"; about {duration(more / rate)} left" if rate > 0 and more > 0 else ""
        return (f"{done:,} of {self.todo:,} outputs{share}: {self.written:,} written, "
                f"{self.failed:,} failed; {rate:.1f}/s{left}")


def duration(seconds: float) -> str:
    """Seconds as `2 h 5 min`, `7 min 28 s` or `12 s`."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
