"""The bundled default prior loads offline and runs SDEdit with the exact-keep guarantee."""

from __future__ import annotations

import hashlib

import torch

import sdedit
from sdedit.loading import PRIORS_DIR


def test_default_prior_loads_with_its_file_digest():
    prior = sdedit.load()
    assert prior.name == "default" and prior.resolution == 32 and prior.channels == 3
    weights = PRIORS_DIR / "default" / "diffusion_pytorch_model.safetensors"
    assert prior.digest == "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    assert weights.stat().st_size <= 25 * 2**20
    assert isinstance(prior.schedule, sdedit.VPSchedule)
    assert prior.schedule.num_timesteps == 1000
    assert sdedit.load("default").digest == prior.digest


def test_default_prior_edits_and_keeps_the_unmasked_region():
    prior = sdedit.load("default", device="cpu")
    guide = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24, 8:24] = 1
    out = prior.edit(guide, t0=0.5, steps=5, mask=mask, generator=sdedit.generators([0, 1]))
    assert out.shape == guide.shape and torch.isfinite(out).all()
    keep = (mask == 0).expand_as(guide)
    assert torch.equal(out[keep], guide[keep])
    assert (out[~keep] - guide[~keep]).abs().mean() > 0.01
