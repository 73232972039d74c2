"""Small built-in priors with seeded random weights, for tests and smoke runs.

They download nothing and produce noise-like images: use them to exercise the machinery,
never to judge results. `tiny` is a VP (DDPM) model, `tiny-ve` a VE (NCSN++-style) one.
"""

from __future__ import annotations

import torch

from sdedit.schedules import Schedule, VESchedule, VPSchedule

BUILTIN_SEED = 0
_COMMON = dict(
    sample_size=64, in_channels=3, out_channels=3, layers_per_block=1,
    block_out_channels=(16, 32), norm_num_groups=8,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
)
BUILTINS = {
    "tiny": (dict(_COMMON), lambda: VPSchedule.linear()),
    "tiny-ve": (dict(_COMMON, time_embedding_type="fourier"), lambda: VESchedule(0.01, 50.0)),
}


def build_builtin(name: str) -> tuple[torch.nn.Module, Schedule]:
    """The UNet2DModel and schedule of builtin `name`, weights seeded by BUILTIN_SEED."""
    from diffusers import UNet2DModel

    if name not in BUILTINS:
        raise ValueError(f"unknown builtin model {name!r}; choose one of {sorted(BUILTINS)}")
    config, make_schedule = BUILTINS[name]
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(BUILTIN_SEED)
        unet = UNet2DModel(**config)
    finally:
        torch.random.set_rng_state(state)
    return unet, make_schedule()
