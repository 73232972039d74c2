"""Compositing guides: a foreground region pasted onto a background, with its mask."""

from __future__ import annotations

import numpy as np
import pytest
from task_fixtures import centre_square, photo

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


@pytest.mark.parametrize("size", [(300, 60), (60, 300)])
def test_drawn_boxes_are_pasted_in_the_square_sdedit_run_keeps(size):
    """`sdedit run` centre-crops every guide to a square: a paste outside it was cropped away."""
    background, foreground = photo("coffee", size), photo("chelsea", size)
    kept = centre_square(size)
    inside = outside = 0
    for seed in range(40):
        guide, mask = composite_guide(background, foreground, seed=seed, min_fraction=0.5,
                                      max_fraction=0.5)
        guide, mask = np.asarray(guide), np.asarray(mask)
        inside += (mask[kept] == 255).sum()
        outside += (mask[~kept] == 255).sum()
        assert np.array_equal(guide[~kept], np.asarray(background)[~kept])
    assert (inside, outside) == (40 * 30 * 30, 0)  # 30 = half the square's side
    wider = Box(0, 0, 100, 40) if size[0] > size[1] else Box(0, 0, 40, 100)  # than the square
    assert (np.asarray(composite_guide(background, foreground, box=wider)[1]) == 255).sum() == 4000
