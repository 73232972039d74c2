"""Gaussian noise drawn per sample, so a sample's noise never depends on its batch.

Per-sample streams make the *noise* batch-invariant. The network's own arithmetic may still
differ in the last bits between batch shapes (convolution kernels pick algorithms by shape),
which can flip a rare 8-bit pixel: callers that need bit-identical images keep the batch shape
fixed, as the pipeline's actor does (--model-batch).

Generators on the CPU (the default of `generators`) give the same noise whatever device the
model runs on; a CUDA generator seeded alike gives other numbers, hence another image (an H200
with CUDA generators made images 11.9 dB PSNR from the CPU's, with CPU generators 60 dB, and
bit-identical for 58 of 64 with TF32 off: benchmarks/gpu_noise_check.py). The draws cost CPU
time: on that H200 an `edit` call took 1.06x as long for a 256x256 UNet in bfloat16 (batch 64),
1.42x for the bundled 32x32 prior (batch 256). That was with a blocking copy of each step's
noise, which waited for the GPU; the copy is now asynchronous from pinned memory, so the draws
can overlap the model's work (not yet measured on a GPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


def generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One seeded torch.Generator per sample, for batch-invariant `edit` calls (on the CPU
    unless `device` says otherwise: the same noise on every device)."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


class SampleNoise:
    """Draws standard normal noise for selected samples of a batch.

    With one generator per sample, each sample's draws come from its own stream in a fixed
    order, which makes the noise independent of batch size and composition. With a single
    generator (or None: torch's global RNG) draws are shared and depend on the batch.
    """

    def __init__(self, generator: GeneratorArg, batch_size: int) -> None:
        if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator):
            streams = list(generator)
            if len(streams) != batch_size:
                raise ValueError(
                    f"got {len(streams)} generators for a batch of {batch_size}; "
                    "pass one generator per sample, a single generator, or None"
                )
            if not all(isinstance(stream, torch.Generator) for stream in streams):
                raise TypeError("generator list must hold torch.Generator objects")
            self._per_sample: list[torch.Generator] | None = streams
            self._on_cpu = all(stream.device.type == "cpu" for stream in streams)
            self._shared = None
        else:
            if not (generator is None or isinstance(generator, torch.Generator)):
                raise TypeError(f"generator must be a torch.Generator, a list of them (one per "
                                f"sample) or None, got {type(generator).__name__}; for seeds, "
                                "pass sdedit.generators(seeds)")
            self._per_sample = None
            self._on_cpu = False
            self._shared = generator

    def draw(self, indices: Sequence[int], shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """Noise of shape [len(indices), *shape] in the dtype and device of `like`."""
        if self._per_sample is None:
            device = self._shared.device if self._shared is not None else like.device
            noise = torch.randn(
                (len(indices), *shape), generator=self._shared, device=device, dtype=torch.float32
            )
        elif not self._on_cpu:
            noise = torch.stack(
                [
                    torch.randn(
                        shape, generator=self._per_sample[i], device=self._per_sample[i].device
                    )
                    for i in indices
                ]
            )
        else:
            return self._draw_on_cpu(indices, shape, like)
        return noise.to(device=like.device, dtype=like.dtype)

    def _draw_on_cpu(self, indices: Sequence[int], shape: torch.Size,
                     like: torch.Tensor) -> torch.Tensor:
        """CPU streams fill one float32 buffer in place (the same numbers as a stack of single
        draws, without the stack's copy). For a CUDA `like` the buffer is pinned and copied
        without waiting: a pageable copy would wait for the GPU to finish every queued kernel,
        so the draws for the next step could not overlap the model's work on this one."""
        pinned = like.is_cuda
        noise = torch.empty((len(indices), *shape), dtype=torch.float32, pin_memory=pinned)
        for row, index in enumerate(indices):
            torch.randn(shape, generator=self._per_sample[index], out=noise[row])
        return noise.to(like.device, non_blocking=pinned).to(like.dtype)
