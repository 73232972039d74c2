"""Training a DDPM prior: loss falls, saved folders load and edit, resume is exact."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import sdedit
from sdedit.schedules import VPSchedule
from sdedit.training import (
    SCHEDULER_CONFIG,
    TrainConfig,
    TrainState,
    ddpm_loss,
    ema_decay,
    has_checkpoint,
    learning_rate,
    load_checkpoint,
    save_checkpoint,
    save_model,
    train_step,
    unet_config,
    update_ema,
)

TINY = TrainConfig(resolution=16, channels=(8, 16), norm_groups=4, attention_resolution=8,
                   batch_size=4, steps=6, lr=2e-3, warmup=1, ema_decay=0.9)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(count: int = 8, size: int = 16) -> torch.Tensor:
    """uint8 images [N, 3, size, size]: flat colours with a dark square, a learnable set."""
    colours = torch.tensor([[230, 40, 40], [40, 200, 60], [50, 70, 220], [240, 210, 40]])
    images = colours[torch.arange(count) % 4].view(count, 3, 1, 1).expand(count, 3, size, size)
    images = images.clone().to(torch.uint8)
    images[:, :, size // 4: size // 2, size // 4: size // 2] = 20
    return images


def _fixed_loss(unet: torch.nn.Module, images: torch.Tensor) -> float:
    x0 = images.float() / 127.5 - 1
    with torch.no_grad():
        return float(ddpm_loss(unet, VPSchedule.linear(), x0, torch.Generator().manual_seed(7)))


def test_unet_config_puts_attention_at_the_8x8_level():
    config = unet_config(TrainConfig(resolution=32, channels=(32, 64, 64)))
    assert config["down_block_types"] == ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
    assert config["up_block_types"] == ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    assert config["sample_size"] == 32 and config["block_out_channels"] == (32, 64, 64)


@pytest.mark.parametrize("changes, message", [
    (dict(resolution=18, channels=(8, 16, 16)), "divisible by 2"),
    (dict(channels=(10, 16)), "norm_groups"),
    (dict(batch_size=0), "batch_size"),
])
def test_config_rejects_impossible_shapes(changes, message):
    with pytest.raises(ValueError, match=message):
        replace(TINY, **changes)


def test_warmup_and_ema_decay_follow_their_formulas():
    config = replace(TINY, lr=1e-3, warmup=10, ema_decay=0.999)
    assert learning_rate(config, 0) == pytest.approx(1e-4)
    assert learning_rate(config, 9) == pytest.approx(1e-3)
    assert learning_rate(config, 500) == pytest.approx(1e-3)
    assert ema_decay(config, 0) == pytest.approx(0.1)
    assert ema_decay(config, 10_000) == pytest.approx(0.999)


def test_update_ema_interpolates_parameters():
    ema, model = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        ema.weight.fill_(1.0)
        model.weight.fill_(3.0)
    update_ema(ema, model, decay=0.75)
    assert torch.allclose(ema.weight, torch.full_like(ema.weight, 1.5))


def test_loss_goes_down_on_tiny_data():
    images = _images()
    state = TrainState.fresh(replace(TINY, steps=80, batch_size=8))
    before = _fixed_loss(state.unet, images)
    for _ in range(80):
        train_step(state, images, VPSchedule.linear())
    after = _fixed_loss(state.unet, images)
    assert state.step == 80
    assert after < 0.6 * before, (before, after)


def test_saved_model_round_trips_through_sdedit_load(tmp_path):
    state = TrainState.fresh(TINY)
    train_step(state, _images(), VPSchedule.linear())
    save_model(state.ema, tmp_path / "prior")
    prior = sdedit.load(tmp_path / "prior", device="cpu")
    assert (prior.resolution, prior.channels) == (16, 3)
    assert torch.allclose(prior.schedule.betas, VPSchedule.linear().betas, rtol=1e-6)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
    with torch.no_grad():
        expected = state.ema.eval()(x, t).sample
    assert torch.allclose(prior.model(x, t), expected, atol=1e-6)
    scheduler = json.loads((tmp_path / "prior" / "scheduler_config.json").read_text())
    assert scheduler == SCHEDULER_CONFIG


def test_saved_model_runs_sdedit(tmp_path):
    save_model(TrainState.fresh(TINY).ema, tmp_path / "prior")
    prior = sdedit.load(str(tmp_path / "prior"), device="cpu")
    guide = _images(2).float() / 127.5 - 1
    out = sdedit.edit(prior.model, prior.schedule, guide, t0=0.05, steps=3,
                      generator=sdedit.generators([1, 2]))
    assert out.shape == guide.shape and bool(torch.isfinite(out).all())
    assert float((out - guide).pow(2).mean()) < 0.05  # t0 = 0.05 barely perturbs the guide


def test_resume_matches_an_uninterrupted_run(tmp_path):
    images, schedule = _images(), VPSchedule.linear()
    straight = TrainState.fresh(TINY)
    for _ in range(6):
        train_step(straight, images, schedule)
    first = TrainState.fresh(TINY)
    for _ in range(3):
        first.losses.append(train_step(first, images, schedule))
    save_checkpoint(first, tmp_path)
    resumed = load_checkpoint(tmp_path)
    assert resumed.step == 3 and resumed.config == TINY and len(resumed.losses) == 3
    for _ in range(3):
        train_step(resumed, images, schedule)
    for name, tensor in straight.unet.state_dict().items():
        assert torch.equal(tensor, resumed.unet.state_dict()[name]), name
    for name, tensor in straight.ema.state_dict().items():
        assert torch.equal(tensor, resumed.ema.state_dict()[name]), name


def test_checkpoint_holds_no_pickle(tmp_path):
    state = TrainState.fresh(TINY)
    train_step(state, _images(), VPSchedule.linear())
    folder = save_checkpoint(state, tmp_path)
    assert sorted(path.name for path in folder.iterdir()) == ["state.json", "state.safetensors"]
    meta = json.loads((folder / "state.json").read_text())
    assert meta["step"] == 1 and meta["config"]["channels"] == [8, 16]
    assert meta["optimizer"]["param_groups"][0]["lr"] == pytest.approx(TINY.lr)


def test_fresh_state_is_seeded_and_leaves_global_rng_alone():
    before = torch.random.get_rng_state()
    first, second = TrainState.fresh(TINY), TrainState.fresh(TINY)
    assert torch.equal(torch.random.get_rng_state(), before)
    for name, tensor in first.unet.state_dict().items():
        assert torch.equal(tensor, second.unet.state_dict()[name]), name
    other = TrainState.fresh(replace(TINY, seed=1))
    assert not torch.equal(other.unet.conv_in.weight, first.unet.conv_in.weight)


def test_bf16_autocast_step_gives_a_finite_loss():
    state = TrainState.fresh(replace(TINY, bf16=True))
    loss = train_step(state, _images(), VPSchedule.linear())
    assert state.step == 1 and 0.0 < loss < 10.0
    assert state.unet.conv_in.weight.dtype == torch.float32  # autocast keeps fp32 master weights


class Killed(BaseException):
    """A SIGKILL at a chosen point of `save_checkpoint`."""


def _kill_after_writing(monkeypatch, name: str) -> None:
    """Make the rename that puts `name` in place the last thing the process does."""
    import os

    rename = os.replace

    def dying(source, destination):
        rename(source, destination)
        if str(destination).endswith(name):
            raise Killed

    monkeypatch.setattr(os, "replace", dying)


def _same_state(first: TrainState, second: TrainState) -> bool:
    modules = ((first.unet, second.unet), (first.ema, second.ema))
    tensors = all(torch.equal(a, b) for x, y in modules
                  for a, b in zip(x.state_dict().values(), y.state_dict().values(), strict=True))
    adam = [int(slots["step"]) for slots in second.optimizer.state_dict()["state"].values()]
    return tensors and first.step == second.step and set(adam) == {first.step}


def test_a_save_killed_after_the_tensors_resumes_the_step_they_belong_to(tmp_path, monkeypatch):
    """Earlier, state.json was renamed into place after state.safetensors: a kill between them
    resumed step-2 metadata with step-5 tensors (Adam's counter at 5, the run's at 2)."""
    images, schedule = _images(), VPSchedule.linear()
    state = TrainState.fresh(TINY)
    for _ in range(2):
        train_step(state, images, schedule)
    save_checkpoint(state, tmp_path)
    for _ in range(3):
        train_step(state, images, schedule)
    with monkeypatch.context() as patched:
        _kill_after_writing(patched, "state.safetensors")
        with pytest.raises(Killed):
            save_checkpoint(state, tmp_path)
    assert has_checkpoint(tmp_path)
    resumed = load_checkpoint(tmp_path)
    assert resumed.step == 5 and _same_state(state, resumed)
    save_checkpoint(resumed, tmp_path)  # the next save makes the readable copy current again
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 5


def test_a_torn_checkpoint_of_an_earlier_release_is_refused(tmp_path):
    """Checkpoints written before the step travelled with the tensors hold it in state.json
    only: read when it agrees with the tensors' optimizer state, refused when it does not."""
    from safetensors.torch import load_file, save_file

    images, schedule = _images(), VPSchedule.linear()
    state = TrainState.fresh(TINY)
    for _ in range(2):
        train_step(state, images, schedule)
    folder = save_checkpoint(state, tmp_path)
    tensors_file, json_file = folder / "state.safetensors", folder / "state.json"
    save_file(load_file(str(tensors_file)), str(tensors_file))  # without the metadata
    assert _same_state(state, load_checkpoint(tmp_path))
    old_meta = json_file.read_text()
    train_step(state, images, schedule)
    save_checkpoint(state, tmp_path)
    save_file(load_file(str(tensors_file)), str(tensors_file))
    json_file.write_text(old_meta)  # step 3 tensors, step 2 metadata
    with pytest.raises(ValueError, match="is torn: state.json says step 2, its tensors are "
                                         "from step 3"):
        load_checkpoint(tmp_path)
