"""sdedit.edit: input validation with messages that name the problem, batch invariance with
per-sample generators, and how many model calls `steps` buys."""

from __future__ import annotations

import math

import pytest
import torch

import sdedit

VP = sdedit.VPSchedule.linear()
VE = sdedit.VESchedule(0.01, 50.0)


def shrink(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """A deterministic, elementwise toy model: exactly batch-invariant."""
    return 0.1 * x


def gaussian_score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact score of N(0, I) data noised to sigma (a toy VE model)."""
    return -x / (1 + sigma.view(-1, 1, 1, 1) ** 2)


def guides(batch: int = 2, size: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


def run(**overrides) -> torch.Tensor:
    """edit() with the toy VP model and valid defaults, overridden per test."""
    arguments = dict(model=shrink, schedule=VP, guide=guides(), t0=0.5, steps=3)
    arguments.update(overrides)
    return sdedit.edit(**arguments)


# --- t0 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("t0", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_t0_outside_the_unit_interval(t0):
    with pytest.raises(ValueError, match=r"t0 must lie in \(0, 1\]") as caught:
        run(t0=t0)
    assert str(t0) in str(caught.value)


@pytest.mark.parametrize("t0", [torch.tensor([0.5, 0.0]), torch.tensor([0.5, math.nan])])
def test_t0_tensor_with_one_bad_value(t0):
    with pytest.raises(ValueError, match=r"t0 must lie in \(0, 1\]"):
        run(t0=t0)


@pytest.mark.parametrize("shape", [(3,), (1,), (2, 1)])
def test_t0_tensor_of_the_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"t0 tensor must have shape \[2\]") as caught:
        run(t0=torch.full(shape, 0.5))
    assert str(shape) in str(caught.value)


@pytest.mark.parametrize("t0", ["0.5", None, True])
def test_t0_of_the_wrong_type(t0):
    with pytest.raises(TypeError, match="t0 must be a float or a tensor"):
        run(t0=t0)


def test_t0_edges_that_are_valid():
    assert run(t0=1.0).shape == guides().shape
    assert run(t0=1e-4).shape == guides().shape  # rounds to the first timestep
    assert run(t0=torch.tensor(0.3)).shape == guides().shape  # 0-d tensor: one for all


# --- guide ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 1, 3, 8, 8), (0, 3, 8, 8)])
def test_guide_not_a_batch_of_images(shape):
    with pytest.raises(ValueError, match=r"guide must have shape \[B, C, H, W\]") as caught:
        run(guide=torch.zeros(shape))
    assert str(shape) in str(caught.value)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_guide_of_integer_dtype(dtype):
    with pytest.raises(TypeError, match="guide must be a floating-point tensor") as caught:
        run(guide=torch.zeros(2, 3, 8, 8, dtype=dtype))
    assert str(dtype) in str(caught.value)


def test_guide_not_a_tensor():
    with pytest.raises(TypeError, match="guide must be a floating-point tensor, got list"):
        run(guide=[[0.0]])


@pytest.mark.parametrize(("low", "high"), [(0.0, 255.0), (-1.5, 0.0), (0.0, 1.01)])
def test_guide_values_outside_minus_one_one(low, high):
    guide = torch.zeros(2, 3, 8, 8)
    guide[0, 0, 0, 0], guide[1, 2, 7, 7] = low, high
    with pytest.raises(ValueError, match=r"guide values must lie in \[-1, 1\]") as caught:
        run(guide=guide)
    assert f"{high:.4g}" in str(caught.value) and f"{low:.4g}" in str(caught.value)


def test_guide_with_nan():
    guide = guides()
    guide[1, 0, 3, 3] = math.nan
    with pytest.raises(ValueError, match=r"guide values must lie in \[-1, 1\]"):
        run(guide=guide)


# --- mask ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 1, 8, 7), (2, 2, 8, 8), (1, 1, 8, 8), (2, 8, 8),
                                   (3, 1, 8, 8)])
def test_mask_of_the_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"mask must have shape \[2, 1 or 3, 8, 8\]") as caught:
        run(mask=torch.ones(shape))
    assert str(shape) in str(caught.value)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32])
def test_mask_of_integer_dtype(dtype):
    with pytest.raises(TypeError, match="mask must be floating point or bool") as caught:
        run(mask=torch.ones(2, 1, 8, 8, dtype=dtype))
    assert str(dtype) in str(caught.value)


@pytest.mark.parametrize("bad", [255.0, 1.5, -0.5, math.nan])
def test_mask_values_outside_zero_one(bad):
    mask = torch.zeros(2, 1, 8, 8)
    mask[1, 0, 2, 2] = bad
    with pytest.raises(ValueError, match=r"mask values must lie in \[0, 1\]"):
        run(mask=mask)


def test_mask_not_a_tensor():
    with pytest.raises(TypeError, match="mask must be a tensor or None"):
        run(mask=[[1.0]])


def test_mask_on_another_device():
    # The meta device stands in for a GPU on a CPU-only machine: the device check comes before
    # any value is read.
    with pytest.raises(ValueError, match="mask is on meta but guide is on cpu"):
        run(mask=torch.ones(2, 1, 8, 8, device="meta"))


def test_bool_and_per_channel_masks_are_accepted():
    generator = sdedit.generators([1, 2])
    as_bool = run(mask=torch.ones(2, 1, 8, 8, dtype=torch.bool), generator=generator)
    generator = sdedit.generators([1, 2])
    as_float = run(mask=torch.ones(2, 3, 8, 8), generator=generator)
    assert torch.equal(as_bool, as_float)


# --- repeats, steps, generators, schedule --------------------------------------------------


@pytest.mark.parametrize("repeats", [0, -1, 1.5, True, "2"])
def test_repeats_must_be_a_positive_integer(repeats):
    with pytest.raises(ValueError, match="repeats must be a positive integer") as caught:
        run(repeats=repeats)
    assert repr(repeats) in str(caught.value)


@pytest.mark.parametrize("schedule", [VP, VE])
@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_steps_must_be_a_positive_integer(schedule, steps):
    with pytest.raises(ValueError, match="steps must be a positive integer or None") as caught:
        run(schedule=schedule, steps=steps)
    assert repr(steps) in str(caught.value)


@pytest.mark.parametrize("count", [1, 3])
def test_generator_list_of_the_wrong_length(count):
    with pytest.raises(ValueError, match=f"got {count} generators for a batch of 2"):
        run(generator=sdedit.generators(range(count)))


def test_generator_list_of_the_wrong_type():
    with pytest.raises(TypeError, match="torch.Generator"):
        run(generator=[1, 2])


def test_schedule_of_the_wrong_type():
    with pytest.raises(TypeError, match="schedule must be a VPSchedule or VESchedule"):
        run(schedule=torch.linspace(1e-4, 0.02, 1000))


# --- batch invariance ----------------------------------------------------------------------


def alone_and_in_batch(model, schedule, steps, mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample 0 (seed 7, t0 0.4) alone, then first in a batch of 3 with other t0 and seeds."""
    batch = guides(3, seed=4)
    masks = torch.zeros(3, 1, 8, 8)
    masks[:, :, 2:6, 1:5] = 1
    options = dict(steps=steps, repeats=2)
    alone = sdedit.edit(model, schedule, batch[:1], t0=0.4, mask=masks[:1] if mask else None,
                        generator=sdedit.generators([7]), **options)
    # float64, so t0 is exactly the Python float 0.4 (a float32 0.4 is 0.4000000059604645,
    # which moves the VE levels in their last bits)
    t0 = torch.tensor([0.4, 0.9, 0.15], dtype=torch.float64)
    together = sdedit.edit(model, schedule, batch, t0=t0,
                           mask=masks if mask else None, generator=sdedit.generators([7, 8, 9]),
                           **options)
    return alone[0], together[0]


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize(("schedule", "model", "steps"), [
    (VP, shrink, None), (VP, shrink, 5), (VE, gaussian_score, None), (VE, gaussian_score, 4),
])
def test_same_sample_same_seed_same_output_whatever_the_batch(schedule, model, steps, mask):
    alone, together = alone_and_in_batch(model, schedule, steps, mask)
    assert torch.equal(alone, together)


def test_batch_invariance_with_the_builtin_unet(one_torch_thread):
    prior = sdedit.load("builtin:tiny", device="cpu")
    batch = torch.nn.functional.interpolate(guides(3, seed=5), size=64)
    alone = prior.edit(batch[1:2], t0=0.5, steps=3, generator=sdedit.generators([21]))
    together = prior.edit(batch, t0=torch.tensor([0.8, 0.5, 0.2]), steps=3,
                          generator=sdedit.generators([20, 21, 22]))
    # Convolutions may pick batch-size-dependent kernels, so allow float rounding only.
    torch.testing.assert_close(together[1], alone[0], rtol=0, atol=1e-5)
    assert float((together[0] - alone[0]).abs().max()) > 0.1  # the batch is not all the same


def test_a_different_seed_gives_a_different_output():
    first = run(generator=sdedit.generators([1, 2]))
    second = run(generator=sdedit.generators([1, 3]))
    assert torch.equal(first[0], second[0])
    assert not torch.allclose(first[1], second[1])


# --- steps and paths -----------------------------------------------------------------------


class CountingModel:
    """The toy model, counting calls and the batch rows it sees."""

    def __init__(self, score: bool = False) -> None:
        self.calls, self.rows, self.score = 0, 0, score

    def __call__(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        return gaussian_score(x, level) if self.score else shrink(x, level)


def test_vp_full_path_visits_every_timestep():
    path = VP.path(0.5)
    assert path == [*range(499, -1, -1), -1]
    assert VP.path(0.5, steps=500) == path and VP.path(0.5, steps=10_000) == path


@pytest.mark.parametrize("steps", [1, 2, 50, 499])
def test_vp_strided_path(steps):
    path = VP.path(0.5, steps)
    assert len(path) == steps + 1
    assert path[0] == 499 and path[-2:] == ([0, -1] if steps > 1 else [499, -1])
    assert all(a > b for a, b in zip(path, path[1:], strict=False))


def test_ve_paths():
    assert VE.path(0.5) == pytest.approx([0.5 * n / 500 for n in range(500, -1, -1)])
    assert VE.path(0.5, steps=4) == pytest.approx([0.5, 0.375, 0.25, 0.125, 0.0])
    assert VE.path(1e-4) == pytest.approx([1e-4, 0.0])  # at least one step


@pytest.mark.parametrize(("schedule", "steps", "calls"), [
    (VP, None, 500), (VP, 50, 50), (VP, 1, 1), (VE, None, 500), (VE, 7, 7),
])
def test_model_calls_per_pass(schedule, steps, calls):
    model = CountingModel(score=schedule is VE)
    sdedit.edit(model, schedule, guides(1), t0=0.5, steps=steps, repeats=2)
    assert model.calls == 2 * calls


def test_mixed_t0_samples_join_late_and_finish_together():
    model = CountingModel()
    sdedit.edit(model, VP, guides(2), t0=torch.tensor([0.5, 0.1]))
    assert model.calls == 500  # the longer path sets the number of calls
    assert model.rows == 500 + 100  # the t0 = 0.1 sample is only stepped over its own path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_guides_are_edited_in_float32(dtype):
    from sdedit.schedules import VESchedule, VPSchedule

    guide = (torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dtype)
    mask = torch.zeros(2, 1, 8, 8, dtype=dtype)
    mask[..., :4] = 1
    vp = VPSchedule.linear()
    out = sdedit.edit(lambda x, t: 0.3 * x, vp, guide, t0=0.3, mask=mask,
                      generator=sdedit.generators([0, 1]))
    in_float32 = sdedit.edit(lambda x, t: 0.3 * x, vp, guide.float(), t0=0.3, mask=mask.float(),
                             generator=sdedit.generators([0, 1]))
    assert out.dtype == dtype and torch.equal(out, in_float32.to(dtype))
    assert torch.equal(out[..., 4:], guide[..., 4:])  # kept exactly
    ve = VESchedule(0.01, 1348.0)  # early variances overflow fp16 (65504)
    out = sdedit.edit(lambda x, s: -x / (s.view(-1, 1, 1, 1) ** 2 + 1), ve, guide, t0=1.0,
                      steps=20, generator=sdedit.generators([0, 1]))
    assert out.dtype == dtype and bool(out.isfinite().all())
