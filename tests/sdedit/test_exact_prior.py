"""SDEdit against priors whose answer is known in closed form.

The data distribution is a per-pixel Gaussian N(mu, s^2) (mu per channel), so the exact
epsilon (VP) and score (VE) are linear in x and every quantity is Gaussian:
- the *continuous* answer: SDEdit's output given a guide g is the exact posterior
  p(x_0 | x_t0) averaged over x_t0 ~ perturbation of g (the reverse SDE reproduces the
  forward process's joint law), and
- the *discrete* answer: the sampler's own linear recursion, propagated for mean and variance
  in float64.
Output moments are estimated from 4 x 96 x 96 iid pixels per channel.
"""

from __future__ import annotations

import math

import pytest
import torch

import sdedit

MU = torch.tensor([0.3, -0.2, 0.05], dtype=torch.float64)
GUIDE = torch.tensor([-0.5, 0.6, 0.9], dtype=torch.float64)
S = 0.25
SHAPE = (4, 3, 96, 96)
PIXELS = SHAPE[0] * SHAPE[2] * SHAPE[3]


def _per_channel(values: torch.Tensor) -> torch.Tensor:
    return values.float().view(1, 3, 1, 1)


def gaussian_eps_model(schedule: sdedit.VPSchedule):
    """Exact E[eps | x_t] for x_0 ~ N(mu, s^2): sqrt(1-ab) (x - sqrt(ab) mu) / (ab s^2 + 1-ab)."""

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        ab = schedule.alpha_bar(t).view(-1, 1, 1, 1)
        mu = MU.view(1, 3, 1, 1)
        eps = (1 - ab).sqrt() * (x.double() - ab.sqrt() * mu) / (ab * S**2 + 1 - ab)
        return eps.float()

    return model


def gaussian_score_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact score of N(mu, s^2 + sigma^2): -(x - mu) / (s^2 + sigma^2)."""
    assert sigma.is_floating_point() and sigma.shape == (x.shape[0],)
    var = S**2 + sigma.double().view(-1, 1, 1, 1) ** 2
    return (-(x.double() - MU.view(1, 3, 1, 1)) / var).float()


def guide_batch() -> torch.Tensor:
    return _per_channel(GUIDE).expand(SHAPE).contiguous()


def moments(out: torch.Tensor, mask: torch.Tensor | None = None):
    """Per-channel mean and variance over batch and pixels (inside the mask, if given)."""
    values = out.double().permute(1, 0, 2, 3).reshape(3, -1)
    if mask is not None:
        keep = mask.expand_as(out).permute(1, 0, 2, 3).reshape(3, -1) > 0.5
        values = values[keep].view(3, -1)
    return values.mean(dim=1), values.var(dim=1)


def vp_posterior(t0_index: int, schedule, guide, mu=MU):
    """Continuous answer for one VP pass: mean and variance of E-posterior given the guide."""
    ab = float(schedule.alphas_cumprod[t0_index])
    post_var = 1 / (1 / S**2 + ab / (1 - ab))
    mean = post_var * (mu / S**2 + ab * guide / (1 - ab))
    var = post_var + post_var**2 * ab / (1 - ab)
    return mean, torch.full_like(mean, var)


def vp_discrete(path: list[int], schedule, guide, mu=MU, mask: float = 1.0):
    """The ancestral sampler's own recursion in float64, for mean and variance.

    x = p e + q + w, with e the pass's first noise draw and w independent noise of variance v;
    each step is x' = m (a x + b + sigma z) + (1 - m)(sqrt(ab_s) g + sqrt(1 - ab_s) e).
    """
    ab = lambda t: 1.0 if t < 0 else float(schedule.alphas_cumprod[t])  # noqa: E731
    p, q, v = math.sqrt(1 - ab(path[0])), math.sqrt(ab(path[0])) * guide, 0.0
    for t, s in zip(path[:-1], path[1:], strict=True):
        alpha, c = ab(t) / ab(s), math.sqrt(1 - ab(t)) / (ab(t) * S**2 + 1 - ab(t))
        beta = 1 - alpha
        a = (1 - beta * c / math.sqrt(1 - ab(t))) / math.sqrt(alpha)
        b = beta * c * math.sqrt(ab(t)) * mu / (math.sqrt(1 - ab(t)) * math.sqrt(alpha))
        noise_var = beta * (1 - ab(s)) / (1 - ab(t)) if s >= 0 else 0.0
        p = mask * a * p + (1 - mask) * math.sqrt(1 - ab(s))
        q = mask * (a * q + b) + (1 - mask) * math.sqrt(ab(s)) * guide
        v = mask**2 * (a * a * v + noise_var)
    return q, torch.full_like(q, p * p + v)


def assert_moments(out, expected_mean, expected_var, mean_sigmas=5.0, var_rel=None, mask=None):
    """Means within `mean_sigmas` standard errors; variances within Monte Carlo error."""
    mean, var = moments(out, mask)
    count = PIXELS if mask is None else int((mask.expand_as(out)[:, 0] > 0.5).sum())
    mean_tol = mean_sigmas * (expected_var / count).sqrt() + 1e-6
    assert torch.all((mean - expected_mean).abs() <= mean_tol), (mean, expected_mean, mean_tol)
    rel = var_rel if var_rel is not None else 5 * math.sqrt(2 / count)
    assert torch.all((var / expected_var - 1).abs() <= rel), (var, expected_var, rel)


@pytest.fixture(scope="module")
def vp():
    return sdedit.VPSchedule.linear()


@pytest.mark.parametrize("t0", [0.3, 0.5, 0.8])
def test_vp_full_steps_match_discrete_and_closed_form(vp, t0):
    out = sdedit.edit(gaussian_eps_model(vp), vp, guide_batch(), t0=t0,
                      generator=torch.Generator().manual_seed(1))
    path = vp.path(t0)
    assert len(path) - 1 == round(t0 * 1000)  # every integer step from round(t0 T) - 1 to 0
    d_mean, d_var = vp_discrete(path, vp, GUIDE)
    assert_moments(out, d_mean, d_var)
    c_mean, c_var = vp_posterior(path[0], vp, GUIDE)
    assert torch.allclose(d_mean, c_mean, atol=1e-6)  # the mean recursion is exact
    # "fixedsmall" is the lower of DDPM's two variance choices (Ho et al. 2020, sec. 3.2):
    # it undershoots the exact reverse variance by a few percent, never more.
    assert torch.all((d_var < c_var) & (d_var > 0.95 * c_var))
    assert_moments(out, c_mean, c_var, var_rel=0.07)


@pytest.mark.parametrize(("t0", "steps"), [(0.5, 20), (0.9, 7)])
def test_vp_strided_steps_keep_the_exact_mean(vp, t0, steps):
    calls = []
    model = gaussian_eps_model(vp)

    def counting(x, t):
        calls.append(int(t[0]))
        return model(x, t)

    out = sdedit.edit(counting, vp, guide_batch(), t0=t0, steps=steps,
                      generator=torch.Generator().manual_seed(2))
    start = round(t0 * 1000) - 1
    assert len(calls) == steps and calls[0] == start and calls[-1] == 0
    assert calls == sorted(calls, reverse=True)
    d_mean, d_var = vp_discrete(vp.path(t0, steps), vp, GUIDE)
    assert_moments(out, d_mean, d_var)
    c_mean, _ = vp_posterior(start, vp, GUIDE)
    assert torch.allclose(d_mean, c_mean, atol=1e-6)


@pytest.mark.parametrize(("steps", "low", "high"), [(50, 0.76, 0.83), (20, 0.58, 0.66),
                                                    (5, 0.19, 0.24)])
def test_vp_strided_steps_lose_variance_as_the_readme_says(vp, steps, low, high):
    """Fewer steps give smoother outputs: "fixedsmall" leaves out the uncertainty about the
    clean image that a long stride carries (exactly 0.79, 0.62 and 0.21 of SDEdit's output
    variance at t0 = 0.5, against 0.97 with every step)."""
    out = sdedit.edit(gaussian_eps_model(vp), vp, guide_batch(), t0=0.5, steps=steps,
                      generator=torch.Generator().manual_seed(8))
    _, c_var = vp_posterior(vp.path(0.5)[0], vp, GUIDE)
    ratio = moments(out)[1] / c_var
    assert torch.all((ratio > low) & (ratio < high)), ratio


def test_vp_t0_one_samples_the_prior(vp):
    out = sdedit.edit(gaussian_eps_model(vp), vp, guide_batch(), t0=1.0,
                      generator=torch.Generator().manual_seed(3))
    # ab(999) ~ 4e-5, so the guide's pull is < 1e-4: the output is N(mu, s^2), up to the
    # few percent of variance that "fixedsmall" leaves out.
    assert_moments(out, MU, torch.full((3,), S**2), var_rel=0.07)
    assert_moments(out, *vp_discrete(vp.path(1.0), vp, GUIDE))


def test_vp_mask_keeps_guide_exactly_and_tracks_noise_level(vp):
    guide = guide_batch()
    mask = torch.zeros(SHAPE[0], 1, *SHAPE[2:])
    mask[:, :, :, : SHAPE[3] // 2] = 1.0  # left half: synthesize; right half: keep
    seeds = [11, 12, 13, 14]
    streams = sdedit.generators(seeds)
    first_draw = torch.stack([torch.randn(SHAPE[1:], generator=g) for g in streams])
    model, seen = gaussian_eps_model(vp), []

    def recording(x, t):
        expected = vp.alpha_bar(t).view(-1, 1, 1, 1).sqrt() * guide.double()
        expected = expected + (1 - vp.alpha_bar(t)).view(-1, 1, 1, 1).sqrt() * first_draw.double()
        seen.append(float((x.double() - expected).abs().mul(1 - mask).max()))
        return model(x, t)

    out = sdedit.edit(recording, vp, guide, t0=0.4, mask=mask, generator=sdedit.generators(seeds))
    assert len(seen) == 400 and max(seen) < 1e-5  # kept region = noised guide, same draw
    keep = (1 - mask).expand_as(out).bool()
    assert torch.equal(out[keep], guide[keep])  # exactly the guide, no residual noise
    d_mean, d_var = vp_discrete(vp.path(0.4), vp, GUIDE)
    assert_moments(out, d_mean, d_var, mask=mask)


def test_vp_repeats_compose_passes(vp):
    t0, repeats = 0.5, 3
    out = sdedit.edit(gaussian_eps_model(vp), vp, guide_batch(), t0=t0, steps=25,
                      repeats=repeats, generator=torch.Generator().manual_seed(4))
    path = vp.path(t0, 25)
    # one pass maps g -> a g + b + noise(v); K passes compose the linear maps.
    zero_mean, pass_var = vp_discrete(path, vp, torch.zeros(3))
    unit_mean, _ = vp_discrete(path, vp, torch.ones(3))
    a, b = unit_mean - zero_mean, zero_mean
    mean, var = GUIDE.clone(), torch.zeros(3, dtype=torch.float64)
    for _ in range(repeats):
        mean, var = a * mean + b, a * a * var + pass_var
    assert_moments(out, mean, var)
    single = sdedit.edit(gaussian_eps_model(vp), vp, guide_batch(), t0=t0, steps=25,
                         generator=torch.Generator().manual_seed(4))
    assert (moments(out)[0] - MU).abs().sum() < (moments(single)[0] - MU).abs().sum()


def test_mixed_t0_batch_matches_each_sample_alone(vp):
    guide = guide_batch()
    t0 = torch.tensor([0.2, 0.6, 0.6, 0.35])
    seeds = [21, 22, 23, 24]
    model = gaussian_eps_model(vp)
    batch = sdedit.edit(model, vp, guide, t0=t0, steps=30, generator=sdedit.generators(seeds))
    for i in range(4):
        alone = sdedit.edit(model, vp, guide[i : i + 1], t0=float(t0[i]), steps=30,
                            generator=sdedit.generators(seeds[i : i + 1]))
        assert torch.allclose(batch[i : i + 1], alone, atol=1e-6)
        d_mean, d_var = vp_discrete(vp.path(float(t0[i]), 30), vp, GUIDE)
        mean, var = moments(batch[i : i + 1])
        assert torch.all((mean - d_mean).abs() < 5 * (d_var / (PIXELS / 4)).sqrt())


def ve_posterior(schedule: sdedit.VESchedule, t0: float, guide):
    sigma0 = schedule.sigma(t0)
    post_var = 1 / (1 / S**2 + 1 / sigma0**2)
    mean = post_var * (MU / S**2 + guide / sigma0**2)
    return mean, torch.full_like(mean, post_var + post_var**2 / sigma0**2)


def ve_discrete(schedule: sdedit.VESchedule, times: list[float], guide):
    mean = guide.clone()
    var = torch.full_like(guide, schedule.sigma(times[0]) ** 2)
    for t, s in zip(times[:-1], times[1:], strict=True):
        step = schedule.sigma(t) ** 2 - schedule.sigma(s) ** 2
        a = 1 - step / (S**2 + schedule.sigma(t) ** 2)
        mean = a * mean + step * MU / (S**2 + schedule.sigma(t) ** 2)
        var = a * a * var + (step if s > 0 else 0.0)  # the step to t = 0 adds no noise
    return mean, var


def test_ve_sigma_is_geometric():
    ve = sdedit.VESchedule(sigma_min=0.01, sigma_max=50.0)
    assert ve.sigma(0.0) == pytest.approx(0.01)
    assert ve.sigma(1.0) == pytest.approx(50.0)
    assert ve.sigma(0.5) == pytest.approx(0.01 * math.sqrt(5000))
    assert len(ve.path(0.5)) - 1 == 500 and len(ve.path(0.5, steps=40)) - 1 == 40


@pytest.mark.parametrize(("t0", "steps"), [(0.3, None), (0.5, None), (0.5, 100)])
def test_ve_euler_maruyama_matches_discrete_and_closed_form(t0, steps):
    ve = sdedit.VESchedule(sigma_min=0.01, sigma_max=50.0)
    out = sdedit.edit(gaussian_score_model, ve, guide_batch(), t0=t0, steps=steps,
                      generator=torch.Generator().manual_seed(5))
    d_mean, d_var = ve_discrete(ve, ve.path(t0, steps), GUIDE)
    assert_moments(out, d_mean, d_var)
    c_mean, c_var = ve_posterior(ve, t0, GUIDE)
    # Euler-Maruyama's error and sigma(0) = 0.01 of residual noise keep this within a few %.
    assert_moments(out, c_mean, c_var, mean_sigmas=8.0, var_rel=0.06)


def test_the_ve_step_to_the_clean_level_adds_no_noise():
    """As the VP step to the clean level; with Algorithm 1's last noise, one step from t0 = 0.5
    left sigma(0.5) = 0.7 of noise on every output (score_sde and diffusers remove it)."""
    ve = sdedit.VESchedule(sigma_min=0.01, sigma_max=50.0)
    out = sdedit.edit(gaussian_score_model, ve, guide_batch(), t0=0.5, steps=1,
                      generator=torch.Generator().manual_seed(6))
    d_mean, d_var = ve_discrete(ve, ve.path(0.5, 1), GUIDE)
    assert torch.all(d_var < 0.02)  # no more than what the guide's noising leaves
    assert_moments(out, d_mean, d_var)


def test_ve_mask_keeps_guide_exactly():
    ve = sdedit.VESchedule(sigma_min=0.01, sigma_max=50.0)
    guide = guide_batch()
    mask = torch.zeros(SHAPE[0], 3, *SHAPE[2:])
    mask[:, :, : SHAPE[2] // 2] = 1.0  # top half synthesized, per-channel mask shape
    out = sdedit.edit(gaussian_score_model, ve, guide, t0=0.4, steps=200, mask=mask,
                      generator=sdedit.generators([1, 2, 3, 4]))
    assert torch.equal(out[mask == 0], guide[mask == 0])
    d_mean, d_var = ve_discrete(ve, ve.path(0.4, 200), GUIDE)
    assert_moments(out, d_mean, d_var, mask=mask[:, :1])


@pytest.mark.parametrize(("steps", "low", "high"), [(20, 1.15, 1.24), (5, 2.1, 2.3)])
def test_ve_strided_steps_gain_variance_as_the_readme_says(steps, low, high):
    """Euler-Maruyama adds each step's whole noise increment, more than the exact reverse
    step over a long stride: 1.20 and 2.20 times SDEdit's output variance at t0 = 0.5."""
    ve = sdedit.VESchedule(sigma_min=0.01, sigma_max=50.0)
    out = sdedit.edit(gaussian_score_model, ve, guide_batch(), t0=0.5, steps=steps,
                      generator=torch.Generator().manual_seed(9))
    ratio = moments(out)[1] / ve_posterior(ve, 0.5, GUIDE)[1]
    assert torch.all((ratio > low) & (ratio < high)), ratio


def test_ve_mask_tracks_the_noise_level_of_each_call():
    """The kept region at every model call is the guide plus sigma(t) times the pass's first
    draw, through strided steps, mixed t0 and two repeats (VP's test checks the same)."""
    ve = sdedit.VESchedule(sigma_min=0.01, sigma_max=50.0)
    shape, steps, repeats, seeds = (3, 3, 8, 8), 9, 2, [5, 6, 7]
    guide = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.zeros(shape[0], 1, *shape[2:])
    mask[..., :4] = 1.0
    draws = []  # each pass draws once for the start, then once per step, per sample
    for stream in sdedit.generators(seeds):
        draws.append([])
        for _ in range(repeats):
            draws[-1].append(torch.randn(shape[1:], generator=stream))
            for _ in range(steps):
                torch.randn(shape[1:], generator=stream)
    seen = []

    def recording(x, sigma):
        first = torch.stack([mine[len(seen) // steps] for mine in draws])
        expected = guide + sigma.view(-1, 1, 1, 1) * first
        seen.append(float(((x - expected).abs() * (1 - mask)).max()))
        return gaussian_score_model(x, sigma)

    out = sdedit.edit(recording, ve, guide, t0=torch.tensor([0.2, 0.5, 0.5]), mask=mask,
                      steps=steps, repeats=repeats, generator=sdedit.generators(seeds))
    assert len(seen) == steps * repeats and max(seen) < 1e-4
    keep = (1 - mask).expand_as(out).bool()
    assert torch.equal(out[keep], guide[keep])


def test_soft_mask_blends_every_step(vp):
    guide = guide_batch()
    mask = torch.full((SHAPE[0], 1, *SHAPE[2:]), 0.25)
    out = sdedit.edit(gaussian_eps_model(vp), vp, guide, t0=0.3, steps=10, mask=mask,
                      generator=torch.Generator().manual_seed(8))
    # each step keeps 3/4 of the guide noised with the pass's own draw: the moments follow
    # the blended recursion, not the unmasked one.
    d_mean, d_var = vp_discrete(vp.path(0.3, 10), vp, GUIDE, mask=0.25)
    assert_moments(out, d_mean, d_var)
    free_mean, _ = vp_discrete(vp.path(0.3, 10), vp, GUIDE)
    assert torch.all((d_mean - free_mean).abs() > 0.05)
