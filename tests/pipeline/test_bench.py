"""`sdedit bench` arithmetic: the steady-state ratio over the actors' editing window."""

from __future__ import annotations

import pytest

from pipeline.bench_cli import steady_state_ratio


def test_steady_state_ratio_uses_the_editing_window_only():
    run = {"written": 256, "editing_seconds": 47.95, "pipeline_seconds": 58.29}
    assert steady_state_ratio(run, model_only=5.416) == pytest.approx(256 / 47.95 / 5.416, abs=1e-3)
    assert steady_state_ratio(run, model_only=5.416) == 0.986


def test_steady_state_ratio_is_none_without_an_editing_window():
    assert steady_state_ratio({"written": 0, "editing_seconds": None}, model_only=5.0) is None
    assert steady_state_ratio({"written": 0}, model_only=5.0) is None
