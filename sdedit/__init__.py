"""SDEdit as a library: schedules, samplers and model loading, in pure torch.

    import sdedit
    prior = sdedit.load("builtin:tiny")
    out = sdedit.edit(prior.model, prior.schedule, guide, t0=0.5, mask=mask)
"""

from sdedit.edit import edit, model_calls
from sdedit.noise import generators, stable_seed
from sdedit.schedules import VESchedule, VPSchedule

__all__ = ["VESchedule", "VPSchedule", "edit", "generators", "load", "model_calls", "stable_seed",
           "Prior"]


def __getattr__(name: str):
    # Model loading pulls in diffusers; import it only when asked for.
    if name == "load":
        from sdedit.loading import load

        return load
    if name == "Prior":
        from sdedit.models import Prior

        return Prior
    raise AttributeError(f"module 'sdedit' has no attribute {name!r}")
