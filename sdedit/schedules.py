"""Noise schedules: where a noise level t0 in (0, 1] starts and which levels a pass visits.

All t0 handling lives here (the img2img "strength" of other libraries): a schedule turns a
t0 and an optional step count into a *path*, the descending list of noise levels one SDEdit
pass visits. The last level of every path is the clean level.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

CLEAN = -1
"""The VP timestep index that stands for clean data (alpha-bar = 1)."""


def _check_t0(t0: float) -> None:
    if not (0.0 < t0 <= 1.0) or math.isnan(t0):
        raise ValueError(f"t0 must lie in (0, 1], got {t0}")


def _check_steps(steps: int | None) -> None:
    if steps is None:
        return
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be a positive integer or None, got {steps!r}")


@dataclass(frozen=True, eq=False)
class VPSchedule:
    """Variance-preserving (DDPM) schedule: x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps.

    Follows Ho et al. 2020; ab_t is the cumulative product of (1 - beta) up to index t.
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)
    _on_device: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(
                f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}"
            )
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def linear(
        cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> VPSchedule:
        """The DDPM / SDEdit default: betas linear from 1e-4 to 0.02 over T = 1000 steps."""
        return cls(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.numel())

    def start_index(self, t0: float) -> int:
        """The timestep a pass starts from: round(t0 * T) - 1 (SDEdit's `--t` levels)."""
        _check_t0(t0)
        return max(round(t0 * self.num_timesteps) - 1, 0)

    def path(self, t0: float, steps: int | None = None) -> list[int]:
        """Timesteps visited from t0 down to clean: every index, or `steps` strided ones.

        The returned list ends with CLEAN, so a pass makes len(path) - 1 model calls.
        """
        _check_steps(steps)
        start = self.start_index(t0)
        if steps is None or int(steps) >= start + 1:
            visited = list(range(start, -1, -1))
        else:
            grid = torch.linspace(start, 0, int(steps), dtype=torch.float64).round().long()
            visited = list(dict.fromkeys(grid.tolist()))
        return [*visited, CLEAN]

    def alpha_bar(self, timesteps: torch.Tensor) -> torch.Tensor:
        """ab_t for a LongTensor of timesteps (float64, on the timesteps' device); CLEAN -> 1."""
        table = self._on_device.get(timesteps.device)
        if table is None:  # copy the table once per device, not once per step
            table = self._on_device.setdefault(
                timesteps.device, self.alphas_cumprod.to(timesteps.device)
            )
        gathered = table[timesteps.clamp(min=0)]
        return torch.where(timesteps >= 0, gathered, torch.ones_like(gathered))


@dataclass(frozen=True)
class VESchedule:
    """Variance-exploding (SMLD / NCSN) schedule: sigma(t) = smin * (smax / smin) ** t.

    Follows Song et al. 2021 (score SDE), the VE-SDE used in SDEdit's Algorithm 1.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def __post_init__(self) -> None:
        if not (0.0 < self.sigma_min < self.sigma_max):
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got {self.sigma_min} and {self.sigma_max}"
            )

    def sigma(self, t: float) -> float:
        """sigma(t) = smin * (smax / smin) ** t."""
        return float(self.sigma_min * (self.sigma_max / self.sigma_min) ** t)

    def sigmas(self, times: torch.Tensor) -> torch.Tensor:
        """sigma(t) elementwise for a float tensor of times."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** times.double()

    def path(self, t0: float, steps: int | None = None) -> list[float]:
        """Times t0 * n / N for n = N..0, with N = steps or round(1000 * t0) (at least 1)."""
        _check_t0(t0)
        _check_steps(steps)
        count = int(steps) if steps is not None else max(round(1000 * t0), 1)
        return [t0 * n / count for n in range(count, -1, -1)]


Schedule = VPSchedule | VESchedule
