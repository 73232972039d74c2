"""SDEdit: perturb a guide to noise level t0, then solve the reverse SDE back to clean data.

Meng et al. 2021, "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential
Equations" (arXiv 2108.01073), Algorithms 1-3, with the masked variant of the reference code
(ermongroup/SDEdit, runners/image_editing.py) made exact: mask = 1 marks the region to
synthesize, and the kept region equals the guide noised to the current level with the pass's
noise draw, ending at the guide itself.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdedit.noise import GeneratorArg, SampleNoise
from sdedit.samplers import perturb_ve, perturb_vp, ve_euler_maruyama_step, vp_ancestral_step
from sdedit.schedules import Schedule, VESchedule, VPSchedule

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Sampler:
    perturb: Callable
    step: Callable
    level_dtype: torch.dtype


_SAMPLERS = {
    VPSchedule: _Sampler(perturb_vp, vp_ancestral_step, torch.long),
    VESchedule: _Sampler(perturb_ve, ve_euler_maruyama_step, torch.float64),
}


@torch.no_grad()
def edit(
    model: Model,
    schedule: Schedule,
    guide: torch.Tensor,
    t0: float | torch.Tensor = 0.5,
    mask: torch.Tensor | None = None,
    steps: int | None = None,
    repeats: int = 1,
    generator: GeneratorArg = None,
) -> torch.Tensor:
    """Run SDEdit on a batch of guides in [-1, 1]; returns outputs shaped like the guide.

    VP schedules take an epsilon model `model(x, t: LongTensor[B])`; VE schedules take a score
    model `model(x, sigma: Tensor[B])`. `t0` is a float or a tensor [B] in (0, 1]; `mask`
    [B, 1|C, H, W] in [0, 1] with 1 = synthesize, 0 = keep; `repeats` chains K passes
    (SDEdit's K); `generator` is None, one torch.Generator, or one per sample (then each
    sample's noise is independent of the rest of the batch; see sdedit.noise).
    """
    sampler = _sampler_for(schedule)
    _check_guide(guide)
    dtype = guide.dtype
    if dtype in (torch.float16, torch.bfloat16):
        # the samplers work in float32 (models.py): a step moves x by ~1e-3 of itself, below
        # bf16's precision, and a VE prior's variances overflow fp16; the output gets `dtype`
        guide = guide.float()
    t0s = _check_t0(t0, guide.shape[0])
    mask = _check_mask(mask, guide)
    if isinstance(repeats, bool) or not isinstance(repeats, numbers.Integral) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    repeats = int(repeats)
    paths = [schedule.path(value, steps) for value in t0s]
    noise = SampleNoise(generator, guide.shape[0])
    x = guide
    for _ in range(repeats):
        x = _one_pass(model, schedule, sampler, x, mask, paths, noise)
    return x.to(dtype)


def model_calls(schedule: Schedule, t0: float, steps: int | None = None) -> int:
    """Model calls one SDEdit pass makes from t0 (`schedule.path` minus its start). Samples with
    equal counts take part in every call of a shared batch, whatever their t0 values."""
    return len(schedule.path(t0, steps)) - 1


def _one_pass(
    model: Model, schedule: Schedule, sampler: _Sampler, guide: torch.Tensor,
    mask: torch.Tensor | None, paths: list[list], noise: SampleNoise,
) -> torch.Tensor:
    """One SDEdit pass. Paths are aligned at their end, so samples with fewer steps join late
    and every sample reaches the clean level on the last iteration."""
    everyone = list(range(guide.shape[0]))
    first = noise.draw(everyone, guide.shape[1:], guide)
    levels = _levels_table(paths, sampler.level_dtype, guide.device)  # [B, L+1]
    x = sampler.perturb(schedule, guide, first, levels[:, 0])
    lengths = torch.tensor([len(path) for path in paths])
    longest = int(lengths.max())
    for k in range(longest - 1):
        active = (lengths >= longest - k).nonzero().flatten().tolist()
        x = _step_active(model, schedule, sampler, x, guide, mask, first, levels, k, active, noise)
    return x


def _step_active(
    model: Model, schedule: Schedule, sampler: _Sampler, x: torch.Tensor, guide: torch.Tensor,
    mask: torch.Tensor | None, first: torch.Tensor, levels: torch.Tensor, k: int,
    active: list[int], noise: SampleNoise,
) -> torch.Tensor:
    """Advance the active samples from level k to k + 1; the others wait untouched."""
    everyone = len(active) == x.shape[0]
    idx = None if everyone else torch.tensor(active, device=x.device)
    pick = (lambda t: t) if everyone else (lambda t: t[idx])  # noqa: E731
    now, nxt = pick(levels[:, k]), pick(levels[:, k + 1])
    z = noise.draw(active, x.shape[1:], x)
    stepped = sampler.step(model, schedule, pick(x), now, nxt, z)
    if mask is not None:
        kept = sampler.perturb(schedule, pick(guide), pick(first), nxt)
        stepped = pick(mask) * stepped + (1 - pick(mask)) * kept
    return stepped if everyone else x.index_copy(0, idx, stepped)


def _levels_table(paths: list[list], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Right-align ragged paths in a [B, L] table (left padding repeats the first level)."""
    longest = max(len(path) for path in paths)
    rows = [[path[0]] * (longest - len(path)) + list(path) for path in paths]
    return torch.tensor(rows, dtype=dtype, device=device)


def _sampler_for(schedule: Schedule) -> _Sampler:
    for kind, sampler in _SAMPLERS.items():
        if isinstance(schedule, kind):
            return sampler
    raise TypeError(f"schedule must be a VPSchedule or VESchedule, got {type(schedule).__name__}")


def _check_guide(guide: torch.Tensor) -> None:
    if not isinstance(guide, torch.Tensor) or not guide.is_floating_point():
        raise TypeError(f"guide must be a floating-point tensor, got {_describe(guide)}")
    if guide.ndim != 4 or guide.shape[0] == 0:
        raise ValueError(
            f"guide must have shape [B, C, H, W] with B >= 1, got {tuple(guide.shape)}"
        )
    low, high = float(guide.min()), float(guide.max())
    if not (math.isfinite(low) and math.isfinite(high)) or low < -1.0001 or high > 1.0001:
        raise ValueError(f"guide values must lie in [-1, 1], got min {low:.4g} and max {high:.4g}")


def _check_t0(t0: float | torch.Tensor, batch: int) -> list[float]:
    if isinstance(t0, torch.Tensor):
        if t0.ndim == 0:
            values = [float(t0)] * batch
        elif t0.shape != (batch,):
            raise ValueError(f"t0 tensor must have shape [{batch}] (one per sample), got "
                             f"{tuple(t0.shape)}")
        else:
            values = [float(v) for v in t0.double().tolist()]
    elif isinstance(t0, numbers.Real) and not isinstance(t0, bool):
        values = [float(t0)] * batch
    else:
        raise TypeError(f"t0 must be a float or a tensor [B], got {_describe(t0)}")
    bad = [v for v in values if not (0.0 < v <= 1.0)]
    if bad:
        raise ValueError(f"t0 must lie in (0, 1], got {bad[0]}")
    return values


def _check_mask(mask: torch.Tensor | None, guide: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor or None, got {_describe(mask)}")
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise TypeError(f"mask must be floating point or bool, got dtype {mask.dtype}")
    batch, channels, height, width = guide.shape
    if mask.ndim != 4 or mask.shape[0] != batch or mask.shape[1] not in (1, channels) or \
            mask.shape[2:] != guide.shape[2:]:
        raise ValueError(f"mask must have shape [{batch}, 1 or {channels}, {height}, {width}] "
                         f"to match the guide, got {tuple(mask.shape)}")
    if mask.device != guide.device:
        raise ValueError(f"mask is on {mask.device} but guide is on {guide.device}")
    mask = mask.to(guide.dtype)
    low, high = float(mask.min()), float(mask.max())
    if low < 0 or high > 1 or math.isnan(low) or math.isnan(high):
        raise ValueError(f"mask values must lie in [0, 1] (1 = synthesize), got min {low:.4g} "
                         f"and max {high:.4g}")
    return mask


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return type(value).__name__
