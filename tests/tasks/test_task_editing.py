"""Editing guides: strokes over a region, the photo kept exactly elsewhere, white = synthesize."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from task_fixtures import centre_square, photo

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
    width, height = box.size  # fractions of the centred 60x60 square's side
    assert 15 <= width <= 30 and 15 <= height <= 30 and box.fits(80, 60) and box.left >= 10


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



@pytest.mark.parametrize("size", [(300, 60), (60, 300)])
def test_random_regions_lie_in_the_square_sdedit_run_keeps(size):
    """`sdedit run` centre-crops every guide to a square; a box drawn over the whole of a
    300x60 photo fell wholly outside it for 15% of seeds, a row whose edit the run never saw."""
    image = photo("chelsea", size)
    kept = centre_square(size)
    assert kept.sum() == 60 * 60
    inside = outside = 0
    for seed in range(40):
        guide, mask, original = arrays(*edit_guide(image, seed=seed, min_fraction=0.5,
                                                   max_fraction=0.5), image)
        inside += (mask[kept] == 255).sum()
        outside += (mask[~kept] == 255).sum()
        assert np.array_equal(guide[~kept], original[~kept])
    assert (inside, outside) == (40 * 30 * 30, 0)  # 30 = half the square's side


def test_a_mask_image_with_nothing_to_synthesize_is_refused():
    image = photo("chelsea", (64, 48))
    with pytest.raises(ValueError) as error:
        edit_guide(image, region=Image.new("L", image.size, 127))
    assert str(error.value) == ("the mask has no pixel above 127 (white = synthesize; 0-127 "
                                "keep), so the edit would change nothing")


def test_a_box_or_mask_off_the_centre_square_is_refused():
    """`sdedit run` keeps the centre square (8..56 of 64 columns): a region wholly beside it
    made guides whose every row became an error there (before: a guide copied as its edit)."""
    image = photo("chelsea", (64, 48))
    with pytest.raises(ValueError) as error:
        edit_guide(image, region=Box(0, 0, 8, 30))
    assert str(error.value) == ("box (0, 0, 8, 30) lies outside the centre square (8, 0, 56, 48) "
                                "of the 64x48 image that `sdedit run` keeps, so the edit would "
                                "change nothing")
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (56, 10, 64, 20))
    with pytest.raises(ValueError, match="the mask's white region lies outside the centre"):
        edit_guide(image, region=mask)
    _, kept = edit_guide(image, region=Box(0, 0, 9, 30))  # one column in the square: kept
    assert np.asarray(kept)[:, 8].max() == 255
