"""Task presets: the registry and the defaults each task promises."""

from __future__ import annotations

import dataclasses

import pytest

from tasks.presets import Preset, get_preset, task_names


def test_every_task_has_a_preset_under_its_name():
    assert task_names() == ("synthesis", "editing", "compositing", "augmentation")
    for name in task_names():
        preset = get_preset(name)
        assert isinstance(preset, Preset)
        assert preset.name == name
        assert all(0.0 < t0 <= 1.0 for t0 in preset.t0)
        assert "l2_to_guide" in preset.metrics


def test_synthesis_uses_the_papers_t0_range_without_a_mask():
    preset = get_preset("synthesis")
    assert min(preset.t0) >= 0.4 and max(preset.t0) <= 0.6
    assert not preset.requires_mask
    assert preset.required_columns == ("id", "guide")


@pytest.mark.parametrize("name", ["editing", "compositing"])
def test_masked_tasks_require_a_mask_and_judge_the_kept_region(name):
    preset = get_preset(name)
    assert preset.requires_mask
    assert preset.required_columns == ("id", "guide", "mask")
    assert "change_outside_mask" in preset.metrics


def test_augmentation_is_small_t0_with_several_samples():
    preset = get_preset("augmentation")
    assert max(preset.t0) <= 0.35 and min(preset.t0) >= 0.15
    assert preset.samples > 1
    assert not preset.requires_mask


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown task 'inpainting'.*synthesis, editing"):
        get_preset("inpainting")


def test_presets_are_frozen_and_validated():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_preset("editing").t0 = (0.9,)
    with pytest.raises(ValueError, match=r"t0 values must lie in \(0, 1\]"):
        Preset("bad", t0=(0.0,), repeats=1, samples=1, requires_mask=False)
    with pytest.raises(ValueError, match="repeats and samples"):
        Preset("bad", t0=(0.5,), repeats=0, samples=1, requires_mask=False)
