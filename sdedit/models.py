"""Adapters from other people's networks to the sampler interface `model(x, level) -> tensor`.

The samplers work in float32 on whatever device x lives; an adapter decides the network's
device, dtype (fp32 / bf16 / fp16), memory format and optional torch.compile, and casts in
and out. Nothing else in the library knows about diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from sdedit.schedules import Schedule

DType = Literal["float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """Map "float32" / "bfloat16" / "float16" (or a torch.dtype, or None = float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of {sorted(_DTYPES)}")
        return dtype
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    name = aliases.get(str(dtype), str(dtype))
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


class UNetAdapter(torch.nn.Module):
    """Wraps a diffusers UNet2DModel as `model(x, level)`: epsilon for VP, score for VE.

    diffusers' UNet2DModel returns an output object; for Fourier (NCSN++) time embeddings it
    already divides by sigma, so the VE output is the score. `unit_range`: the network's
    images lie in [0, 1] (VE networks: score_sde's NCSN++ checkpoints, diffusers'
    ScoreSdeVePipeline), while the samplers' x lies in [-1, 1]. With y = (x + 1) / 2 the
    noise scale in x is 2 sigma_y and the score in x is half the score in y, so the adapter
    gives the network (x + 1) / 2 and level / 2 and halves what it returns; the schedule's
    sigmas are in x units (`sdedit.load` doubles those of the scheduler config).
    """

    def __init__(
        self, unet: torch.nn.Module, dtype: torch.dtype = torch.float32,
        channels_last: bool = False, compile: bool = False, unit_range: bool = False,
    ) -> None:
        super().__init__()
        self.unit_range = unit_range
        self.unet = unet.eval().requires_grad_(False)
        if dtype != torch.float32:
            # diffusers' ModelMixin.to warns on every dtype cast ("modules ... should be kept
            # in float32: []") even when no module must stay float32; cast as a plain Module then
            keep = getattr(self.unet, "_keep_in_fp32_modules", None)
            self.unet = (self.unet.to(dtype=dtype) if keep else
                         torch.nn.Module.to(self.unet, dtype=dtype))
        self.dtype = dtype
        self.channels_last = channels_last
        if channels_last:
            self.unet = self.unet.to(memory_format=torch.channels_last)
        self._forward = torch.compile(self.unet) if compile else self.unet

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        inputs = ((x + 1) / 2 if self.unit_range else x).to(self.dtype)
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        if level.is_floating_point():
            level = (level / 2 if self.unit_range else level).to(self.dtype)
        out = self._forward(inputs, level).sample.to(x.dtype)
        return (out / 2 if self.unit_range else out).contiguous()


@dataclass(frozen=True, eq=False)
class Prior:
    """A loaded diffusion prior, ready for `sdedit.edit(prior.model, prior.schedule, ...)`."""

    model: UNetAdapter
    schedule: Schedule
    resolution: int
    channels: int
    name: str
    digest: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __repr__(self) -> str:  # not the dataclass's: the whole network and every beta
        kind = type(self.schedule).__name__
        return (f"Prior(name={self.name!r}, schedule={kind}, resolution={self.resolution}, "
                f"channels={self.channels}, device={str(self.device)!r}, "
                f"digest={self.digest[:19]}...)")

    def edit(self, guide: torch.Tensor, **options) -> torch.Tensor:
        """Shorthand for `sdedit.edit(self.model, self.schedule, guide, **options)`, which
        first checks that `guide` is a batch this prior takes: [B, channels, resolution,
        resolution] on its device."""
        from sdedit.editing import edit

        expected = (self.channels, self.resolution, self.resolution)
        if isinstance(guide, torch.Tensor):  # anything else: `edit` names what it takes
            if guide.dim() != 4 or tuple(guide.shape[1:]) != expected:
                raise ValueError(f"guide must have shape [B, {', '.join(map(str, expected))}] "
                                 f"for prior {self.name}, got {list(guide.shape)} (resize "
                                 "guides to the prior's resolution first)")
            if guide.device.type != self.device.type:
                raise ValueError(f"guide is on {guide.device} but prior {self.name} is on "
                                 f"{self.device}; move it with guide.to(prior.device)")
        return edit(self.model, self.schedule, guide, **options)
