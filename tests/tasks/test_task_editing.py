"""Editing guides: strokes over a region, the photo kept exactly elsewhere, white = synthesize."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from task_fixtures import photo

from tasks.editing import edit_guide
from tasks.regions import Box, random_box


def arrays(guide: Image.Image, mask: Image.Image, original: Image.Image):
    return np.asarray(guide), np.asarray(mask), np.asarray(original)


def test_mask_is_white_exactly_over_the_given_box():
    image = photo("chelsea", (64, 48))
    guide, mask = edit_guide(image, region=Box(10, 5, 40, 30))
    assert mask.mode == "L" and mask.size == image.size
    values = np.asarray(mask)
    assert set(np.unique(values)) == {0, 255}
    assert (values[5:30, 10:40] == 255).all()
    assert values.sum() == 255 * 30 * 25


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket"])
def test_outside_the_mask_the_guide_is_the_photo_exactly(name):
    image = photo(name, (64, 48))
    guide, mask, original = arrays(*edit_guide(image, seed=7), image)
    keep = mask == 0
    assert keep.any() and (~keep).any()
    assert np.array_equal(guide[keep], original[keep])
    painted = guide[~keep]
    assert not np.array_equal(painted, original[~keep])  # strokes changed the region
    assert len(np.unique(painted.reshape(-1, 3), axis=0)) <= 6  # default edit palette


def test_random_region_is_drawn_from_the_seed_within_the_fractions():
    image = photo("coffee", (80, 60))
    first = edit_guide(image, seed=11)
    again = edit_guide(image, seed=11)
    other = edit_guide(image, seed=12)
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0]))
    assert np.array_equal(np.asarray(first[1]), np.asarray(again[1]))
    assert not np.array_equal(np.asarray(first[1]), np.asarray(other[1]))
    box = random_box(80, 60, np.random.default_rng(0), 0.25, 0.5)
    width, height = box.size
    assert 20 <= width <= 40 and 15 <= height <= 30 and box.fits(80, 60)


def test_a_mask_image_gives_the_region_and_is_binarised():
    image = photo("rocket", (48, 64))
    region = Image.new("L", image.size, 0)
    region.paste(200, (0, 0, 24, 64))  # light grey counts as white
    region.paste(100, (24, 0, 30, 64))  # dark grey counts as black
    guide, mask, original = arrays(*edit_guide(image, region=region), image)
    assert (mask[:, :24] == 255).all() and (mask[:, 24:] == 0).all()
    assert np.array_equal(guide[:, 24:], original[:, 24:])


def test_regions_that_do_not_fit_are_refused_with_sizes():
    image = photo("chelsea", (64, 48))
    with pytest.raises(ValueError, match=r"box \(50, 0, 70, 10\) does not fit a 64x48 image"):
        edit_guide(image, region=Box(50, 0, 70, 10))
    with pytest.raises(ValueError, match="mask is 10x10, image is 64x48"):
        edit_guide(image, region=Image.new("L", (10, 10), 255))
    with pytest.raises(ValueError, match="empty box"):
        Box(5, 5, 5, 9)
