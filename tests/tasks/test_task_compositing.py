"""Compositing guides: a foreground region pasted onto a background, with its mask."""

from __future__ import annotations

import numpy as np
import pytest
from task_fixtures import photo

from tasks.compositing import composite_guide
from tasks.regions import Box


def test_pasted_region_is_the_foreground_and_the_rest_is_the_background_exactly():
    background, foreground = photo("coffee"), photo("chelsea")
    guide, mask = composite_guide(background, foreground, box=Box(8, 4, 40, 28), at=(20, 10))
    guide, mask = np.asarray(guide), np.asarray(mask)
    assert set(np.unique(mask)) == {0, 255}
    assert (mask[10:34, 20:52] == 255).all() and mask.sum() == 255 * 32 * 24
    assert np.array_equal(guide[mask == 0], np.asarray(background)[mask == 0])
    assert np.array_equal(guide[10:34, 20:52], np.asarray(foreground)[4:28, 8:40])


def test_foreground_is_resized_to_the_background_frame():
    background, foreground = photo("astronaut", (64, 64)), photo("rocket", (32, 48))
    guide, mask = composite_guide(background, foreground, seed=5)
    assert guide.size == mask.size == (64, 64)
    keep = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(guide)[keep], np.asarray(background)[keep])
    assert 0.0625 <= (~keep).mean() <= 0.25  # box sides are 25%..50% of the image sides


def test_seeded_composites_repeat_exactly():
    background, foreground = photo("coffee"), photo("rocket")
    first = composite_guide(background, foreground, seed=3)
    second = composite_guide(background, foreground, seed=3)
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, second, strict=True)
    )


def test_paste_outside_the_image_is_refused():
    with pytest.raises(ValueError, match="leaves the 64x48 image"):
        composite_guide(photo("coffee"), photo("chelsea"), box=Box(0, 0, 30, 30), at=(50, 0))
