"""SDEdit as a library: schedules, samplers and model loading, in pure torch.

    import sdedit
    prior = sdedit.load("builtin:tiny")
    out = sdedit.edit(prior.model, prior.schedule, guide, t0=0.5, mask=mask)

Names are imported on first use: torch with the first of them that needs it, diffusers with
`load`. `import sdedit` alone, `sdedit.stable_seed` and `sdedit.loading.describe` of a model
folder import neither, so a pipeline's driver and read tasks stay light.
"""

from importlib import import_module

_HOMES = {"edit": "sdedit.editing", "model_calls": "sdedit.editing",
          "generators": "sdedit.noise", "stable_seed": "sdedit.seeds",
          "VESchedule": "sdedit.schedules", "VPSchedule": "sdedit.schedules",
          "load": "sdedit.loading", "Prior": "sdedit.models"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'sdedit' has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
