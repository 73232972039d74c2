"""One reverse-diffusion step per sampler, each a small pure function.

A step maps the current samples x (at levels `level`) to the next levels `level_next`, given
fresh standard normal noise z. Levels are per sample (tensors [B]) so one batch can mix t0.
`perturb_*` put the guide at a level with a given noise draw; they define the kept region of a
masked edit and the start of a pass.
"""

from __future__ import annotations

import torch

from sdedit.schedules import VESchedule, VPSchedule


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape [B] coefficients to broadcast over [B, C, H, W] in like's dtype."""
    return values.to(dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


def perturb_vp(
    schedule: VPSchedule, guide: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """sqrt(ab_t) guide + sqrt(1 - ab_t) noise; exactly the guide at the CLEAN level."""
    alpha_bar = schedule.alpha_bar(timesteps)
    clean = _per_sample(timesteps < 0, guide)
    noised = _per_sample(alpha_bar.sqrt(), guide) * guide
    noised = noised + _per_sample((1 - alpha_bar).sqrt(), guide) * noise
    return clean * guide + (1 - clean) * noised


def vp_ancestral_step(
    model, schedule: VPSchedule, x: torch.Tensor, timesteps: torch.Tensor,
    timesteps_next: torch.Tensor, z: torch.Tensor,
) -> torch.Tensor:
    """DDPM ancestral step t -> s with "fixedsmall" variance (Ho et al. 2020, eq. 6-7, 11).

    For s = t - 1 this is the reference update x' = (x - beta_t / sqrt(1 - ab_t) eps) /
    sqrt(alpha_t) + sigma_t z; for strided s < t - 1, alpha = ab_t / ab_s and the posterior
    variance beta (1 - ab_s) / (1 - ab_t) are recomputed for the sub-sequence. No noise is
    added on the step to the clean level.
    """
    eps = model(x, timesteps)
    ab_t = schedule.alpha_bar(timesteps)
    ab_s = schedule.alpha_bar(timesteps_next)
    alpha = ab_t / ab_s
    beta = 1 - alpha
    mean = (x - _per_sample(beta / (1 - ab_t).sqrt(), x) * eps) / _per_sample(alpha.sqrt(), x)
    variance = torch.where(timesteps_next >= 0, beta * (1 - ab_s) / (1 - ab_t), 0.0)
    return mean + _per_sample(variance.sqrt(), x) * z


def perturb_ve(
    schedule: VESchedule, guide: torch.Tensor, noise: torch.Tensor, times: torch.Tensor
) -> torch.Tensor:
    """guide + sigma(t) noise; exactly the guide at t = 0."""
    sigma = torch.where(times > 0, schedule.sigmas(times), 0.0)
    return guide + _per_sample(sigma, guide) * noise


def ve_euler_maruyama_step(
    model, schedule: VESchedule, x: torch.Tensor, times: torch.Tensor,
    times_next: torch.Tensor, z: torch.Tensor,
) -> torch.Tensor:
    """Euler-Maruyama step of the reverse VE-SDE (SDEdit Algorithm 1).

    eps^2 = sigma(t)^2 - sigma(t - dt)^2;  x' = x + eps^2 score(x, sigma(t)) + eps z, except
    that the step to t = 0 adds no noise (Algorithm 1 adds it; score_sde's noise removal and
    diffusers' ScoreSdeVePipeline do not, and with few steps it is most of the output's noise,
    e.g. sigma(t0) of it with steps=1), as the VP step to the clean level adds none.
    """
    sigma = schedule.sigmas(times)
    variance = sigma**2 - schedule.sigmas(times_next) ** 2
    score = model(x, sigma.to(x.dtype))
    noise = torch.where(times_next > 0, variance.sqrt(), 0.0)
    return x + _per_sample(variance, x) * score + _per_sample(noise, x) * z
