"""Per-sample noise: the numbers each sample's own generator gives, whatever the batch."""

import pytest
import torch

import sdedit
from sdedit.noise import SampleNoise


def single_draws(seeds, order, shape):
    """What each stream gives drawn alone, one tensor at a time, in `order` of (indices)."""
    streams = sdedit.generators(seeds)
    return [torch.stack([torch.randn(shape, generator=streams[i]) for i in indices])
            for indices in order]


@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 5, 7), (1, 2, 3)])
def test_cpu_streams_give_each_samples_own_numbers_in_order(shape):
    seeds, order = [5, 9, 11], [[0, 2], [1], [0, 1, 2], [2]]
    noise = SampleNoise(sdedit.generators(seeds), len(seeds))
    like = torch.zeros(1, *shape)
    drawn = [noise.draw(indices, torch.Size(shape), like) for indices in order]
    for got, expected, indices in zip(drawn, single_draws(seeds, order, shape), order,
                                      strict=True):
        assert got.shape == (len(indices), *shape) and got.dtype == torch.float32
        assert torch.equal(got, expected)  # bit for bit: in-place fills of one buffer


def test_draws_take_the_dtype_of_like_after_drawing_in_float32():
    shape = torch.Size((3, 8, 8))
    drawn = SampleNoise(sdedit.generators([1, 2]), 2).draw(
        [0, 1], shape, torch.zeros(1, dtype=torch.bfloat16))
    expected = single_draws([1, 2], [[0, 1]], shape)[0]
    assert drawn.dtype == torch.bfloat16
    assert torch.equal(drawn, expected.to(torch.bfloat16))


def test_a_draw_does_not_depend_on_the_other_samples_of_the_batch():
    shape = torch.Size((3, 4, 4))
    alone = SampleNoise(sdedit.generators([7]), 1).draw([0], shape, torch.zeros(1))
    among = SampleNoise(sdedit.generators([3, 7, 8]), 3).draw([0, 1, 2], shape, torch.zeros(1))
    assert torch.equal(among[1:2], alone)
    assert not torch.equal(among[0:1], alone)


def test_one_generator_per_sample_is_required():
    with pytest.raises(ValueError, match="got 2 generators for a batch of 3"):
        SampleNoise(sdedit.generators([1, 2]), 3)
    with pytest.raises(TypeError, match="torch.Generator objects"):
        SampleNoise([torch.Generator(), 4], 2)
