"""Train a pixel-space DDPM prior: a diffusers UNet2DModel, epsilon loss, EMA weights.

Follows Ho et al. 2020 (Algorithm 1): draw t ~ U{0..T-1} and eps ~ N(0, I), form
x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, and regress eps with a mean squared error. Linear
betas 1e-4..0.02, T = 1000, as the SDEdit reference priors. The saved model holds the EMA
weights in a diffusers-format folder that `sdedit.load` reads.

Checkpoints hold no pickle: tensors (weights, EMA, Adam moments, RNG state) go to a
safetensors file and everything else (step, configuration, optimizer hyper-parameters) to
JSON, so a resumed run continues bit for bit where the saved one stopped. That JSON travels in
the safetensors file's own metadata, so one rename commits tensors and step together (a run
killed while saving resumes from the previous checkpoint or the new one, never a mix);
`state.json` beside it is a readable copy.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sdedit.schedules import VPSchedule

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_META = "sdedit.checkpoint"  # safetensors metadata key of the checkpoint's JSON
SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
    "clip_sample": False,
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run; stored in its checkpoint."""

    resolution: int = 32
    channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_resolution: int = 8
    norm_groups: int = 8
    steps: int = 10_000
    batch_size: int = 32
    lr: float = 2e-4
    warmup: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    flip: bool = True
    bf16: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resolution % 2 ** (len(self.channels) - 1):
            raise ValueError(f"resolution {self.resolution} must be divisible by "
                             f"2^(levels - 1) = {2 ** (len(self.channels) - 1)}")
        if any(width % self.norm_groups for width in self.channels):
            raise ValueError(f"every channel width in {self.channels} must be divisible by "
                             f"{self.norm_groups}, the UNet's group-norm groups (norm_groups)")
        for name in ("steps", "batch_size", "layers_per_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @classmethod
    def from_json(cls, values: dict) -> TrainConfig:
        """Inverse of `asdict`: lists back to tuples."""
        return cls(**{**values, "channels": tuple(values["channels"])})


def unet_config(config: TrainConfig) -> dict:
    """UNet2DModel keyword arguments: one level per width, attention where the feature map is
    `attention_resolution` pixels wide (the DDPM paper uses 16x16 at 32x32)."""
    sizes = [config.resolution // 2**level for level in range(len(config.channels))]
    attention = [size == config.attention_resolution for size in sizes]
    return dict(
        sample_size=config.resolution, in_channels=3, out_channels=3,
        layers_per_block=config.layers_per_block, block_out_channels=tuple(config.channels),
        norm_num_groups=config.norm_groups,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
    )


def build_unet(config: TrainConfig) -> torch.nn.Module:
    """A freshly initialised diffusers UNet2DModel for `config`."""
    from diffusers import UNet2DModel

    return UNet2DModel(**unet_config(config))


def ddpm_loss(
    unet: torch.nn.Module, schedule: VPSchedule, x0: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The simple DDPM loss E ||eps - eps_theta(x_t, t)||^2 (Ho et al. 2020, eq. 14)."""
    batch, device = x0.shape[0], generator.device
    t = torch.randint(0, schedule.num_timesteps, (batch,), generator=generator, device=device)
    eps = torch.randn(x0.shape, generator=generator, device=device).to(x0.device)
    alpha_bar = schedule.alpha_bar(t).float().view(batch, 1, 1, 1)  # table cached per device
    alpha_bar, t = alpha_bar.to(x0.device), t.to(x0.device)
    xt = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    prediction = unet(xt, t).sample
    return torch.nn.functional.mse_loss(prediction.float(), eps)


def sample_batch(images: torch.Tensor, config: TrainConfig, generator: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """A random batch (with replacement) from uint8 images [N, 3, H, W], in [-1, 1], with
    random horizontal flips when `config.flip`. Indices and flips come from `generator` on its
    own device, so a run on one device is reproducible whatever holds `images`."""
    size, rng_device = config.batch_size, generator.device
    index = torch.randint(0, images.shape[0], (size,), generator=generator, device=rng_device)
    batch = images[index.to(images.device)].to(device).float().div(127.5).sub(1.0)
    if config.flip:
        flips = (torch.rand(size, generator=generator, device=rng_device) < 0.5).to(device)
        batch = torch.where(flips.view(-1, 1, 1, 1), batch.flip(-1), batch)
    return batch


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup over `warmup` steps, then constant."""
    return config.lr * min(1.0, (step + 1) / max(config.warmup, 1))


@dataclass
class TrainState:
    """The mutable state of a run: network, EMA copy, optimizer, data/noise RNG and step."""

    config: TrainConfig
    unet: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0
    losses: list[float] = field(default_factory=list)

    @classmethod
    def fresh(cls, config: TrainConfig, device: torch.device | str = "cpu") -> TrainState:
        """A new run: weights seeded by `config.seed` (torch's global RNG is left as it was);
        the data and noise generator lives on `device`, so batches never cross the bus."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            unet = build_unet(config).to(device)
        ema = copy.deepcopy(unet).requires_grad_(False)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
        generator = torch.Generator(device=device).manual_seed(config.seed)
        return cls(config, unet, ema, optimizer, generator)


def train_step(state: TrainState, images: torch.Tensor, schedule: VPSchedule) -> torch.Tensor:
    """One optimizer step on a fresh batch; updates EMA weights; returns the batch loss as a
    0-d tensor (reading it with `float` waits for the device, so callers batch the reads)."""
    config, device = state.config, next(state.unet.parameters()).device
    state.unet.train()
    x0 = sample_batch(images, config, state.generator, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
        loss = ddpm_loss(state.unet, schedule, x0, state.generator)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(state.unet.parameters(), config.grad_clip)
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate(config, state.step)
    state.optimizer.step()
    update_ema(state.ema, state.unet, ema_decay(config, state.step))
    state.step += 1
    return loss.detach()


def ema_decay(config: TrainConfig, step: int) -> float:
    """EMA decay with the usual warm start min(decay, (1 + step) / (10 + step))."""
    return min(config.ema_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers copied)."""
    targets, sources = list(ema.parameters()), [p.detach() for p in model.parameters()]
    if len(targets) != len(sources):
        raise ValueError(f"EMA holds {len(targets)} parameters, the model {len(sources)}")
    torch._foreach_lerp_(targets, sources, 1.0 - decay)  # one fused launch, not one per tensor
    for target, source in zip(ema.buffers(), model.buffers(), strict=True):
        target.copy_(source)


def save_model(unet: torch.nn.Module, folder: str | os.PathLike) -> Path:
    """Write a diffusers-format prior folder: config.json, safetensors weights and a DDPM
    scheduler_config.json (linear betas, epsilon prediction)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder, safe_serialization=True)
    _write_json(folder / "scheduler_config.json", SCHEDULER_CONFIG)
    return folder


def save_checkpoint(state: TrainState, folder: str | os.PathLike) -> Path:
    """Write the resumable state into `folder/checkpoint/` (safetensors + JSON, no pickle).
    The step and everything else `load_checkpoint` needs besides tensors go into the
    safetensors file's metadata, committed with the tensors by one rename; `state.json`,
    written after it, is a copy for people and tools."""
    from safetensors.torch import save_file

    target = Path(folder) / CHECKPOINT_DIR
    target.mkdir(parents=True, exist_ok=True)
    tensors, optimizer_meta = _optimizer_tensors(state.optimizer)
    tensors |= {f"model.{k}": v for k, v in state.unet.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in state.ema.state_dict().items()}
    tensors["rng"] = state.generator.get_state()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"step": state.step, "config": asdict(state.config), "optimizer": optimizer_meta,
            "losses": [float(loss) for loss in state.losses[-1000:]]}
    partial = target / "state.safetensors.partial"
    save_file(tensors, str(partial), metadata={CHECKPOINT_META: json.dumps(meta)})
    os.replace(partial, target / "state.safetensors")
    _write_json(target / "state.json", meta)
    return target


def has_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a checkpoint written by `save_checkpoint`."""
    return (Path(folder) / CHECKPOINT_DIR / "state.safetensors").exists()


def load_checkpoint(folder: str | os.PathLike, device: torch.device | str = "cpu") -> TrainState:
    """Rebuild the TrainState saved in `folder/checkpoint/`."""
    from safetensors.torch import load_file

    target = Path(folder) / CHECKPOINT_DIR
    tensors = load_file(str(target / "state.safetensors"))
    meta = _checkpoint_meta(target, tensors)
    state = TrainState.fresh(TrainConfig.from_json(meta["config"]), device)
    state.unet.load_state_dict(_prefixed(tensors, "model."))
    state.ema.load_state_dict(_prefixed(tensors, "ema."))
    state.optimizer.load_state_dict(_optimizer_state(tensors, meta["optimizer"], device))
    state.generator.set_state(tensors["rng"])
    state.step, state.losses = int(meta["step"]), list(meta["losses"])
    return state


def _checkpoint_meta(target: Path, tensors: dict) -> dict:
    """The JSON saved with the checkpoint's tensors, from the safetensors metadata.
    Checkpoints of earlier releases kept it only in `state.json`, renamed into place after the
    tensors, so a run killed between the two renames left tensors of one step beside the
    metadata of an earlier one: such a pair (Adam's step counters, one per optimizer step, name
    another step than `state.json`) is refused instead of resumed."""
    from safetensors import safe_open

    with safe_open(str(target / "state.safetensors"), framework="pt") as saved:
        embedded = (saved.metadata() or {}).get(CHECKPOINT_META)
    if embedded is not None:
        return json.loads(embedded)
    json_file = target / "state.json"
    if not json_file.exists():
        raise ValueError(f"checkpoint {target} has tensors without their step ({json_file.name} "
                         "is missing); remove the folder to train from the start")
    meta = json.loads(json_file.read_text())
    adam_steps = {int(value) for key, value in tensors.items()
                  if key.startswith("optim.") and key.endswith(".step")}
    if adam_steps and adam_steps != {int(meta["step"])}:
        raise ValueError(f"checkpoint {target} is torn: {json_file.name} says step "
                         f"{meta['step']}, its tensors are from step {max(adam_steps)} (a run "
                         "killed while saving); remove the folder to train from the start")
    return meta


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    saved = optimizer.state_dict()
    tensors = {
        f"optim.{index}.{name}": torch.as_tensor(value)
        for index, slots in saved["state"].items() for name, value in slots.items()
    }
    return tensors, {"param_groups": saved["param_groups"]}


def _optimizer_state(tensors: dict, meta: dict, device: torch.device | str) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            # Adam keeps its step counter on the CPU unless capturable.
            state.setdefault(int(index), {})[name] = value if name == "step" else value.to(device)
    return {"state": state, "param_groups": meta["param_groups"]}


def _prefixed(tensors: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def _write_json(path: Path, values: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)


def parameter_count(module: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters())

