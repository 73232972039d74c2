"""Where SDEdit's per-sample noise is drawn, on a GPU: what it costs and what it changes.

    python benchmarks/gpu_noise_check.py --out noise.npz [--church] [--rows 64]

The actor seeds one torch.Generator per sample on the model's device, so a GPU run draws its
noise from CUDA's generator and a CPU run from the CPU's: the same (id, t0, sample, seed) gets
different noise, hence a different image, on each. Drawing on the CPU and copying to the GPU
makes the two agree up to floating point, at the cost of CPU draws. This script:
- edits the same `--rows` smooth random guides with the bundled prior (float32, t0 0.5,
  20 steps) three ways: CUDA generators, CPU generators, CPU generators with TF32 off, and
  saves the uint8 outputs to `--out` (compare them with `--compare` on a CPU machine);
- times one `edit` call with CUDA against CPU generators for the bundled prior (float32,
  batch 256) and, with `--church`, a church-256-shaped UNet (bfloat16, batch 64).

    python benchmarks/gpu_noise_check.py --compare noise.npz   # on the CPU machine
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from gpu_actor_check import timed

import sdedit


def smooth_guides(rows: int, size: int) -> torch.Tensor:
    """Seeded smooth random guides in [-1, 1], [rows, 3, size, size], on the CPU, on the uint8
    grid (so that the saved guides give the CPU the very same input)."""
    coarse = torch.rand(rows, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return from_uint8(to_uint8(torch.nn.functional.interpolate(
        coarse, size=(size, size), mode="bilinear", align_corners=False)))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float() / 127.5 - 1


def outputs(prior, guides: torch.Tensor, device: str) -> np.ndarray:
    """The bundled prior's SDEdit of `guides`, noise from per-sample generators on `device`."""
    generators = sdedit.generators(range(len(guides)), device=device)
    with torch.no_grad():
        edited = prior.edit(guides.to(prior.device), t0=0.5, steps=20, generator=generators)
    return to_uint8(edited)


def time_edit(prior, batch: int, device: str) -> float:
    """Best of three wall times of one `edit` call with generators on `device`."""
    guides = smooth_guides(batch, prior.resolution).to(prior.device)
    prior.edit(guides, t0=0.5, steps=2, generator=sdedit.generators(range(batch), device=device))
    return min(timed(lambda: prior.edit(guides, t0=0.5, steps=20,
                                        generator=sdedit.generators(range(batch), device=device)))
               for _ in range(3))


VARIANTS = {  # saved name -> (generator device, TF32 on)
    "cuda_generators": ("cuda", True),
    "cpu_generators": ("cpu", True),
    "cpu_generators_no_tf32": ("cpu", False),  # what the actor does (prefer_deterministic_cuda)
}


def on_gpu(args: argparse.Namespace) -> None:
    from pipeline.actor import prefer_deterministic_cuda

    prefer_deterministic_cuda()
    prior = sdedit.load("default", device="cuda", dtype="float32")
    guides = smooth_guides(args.rows, prior.resolution)
    saved = {"guides": to_uint8(guides)}
    for name, (device, tf32) in VARIANTS.items():  # TF32 set each time: the actor turns it off
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        saved[name] = outputs(prior, guides, device)
    np.savez_compressed(args.out, **saved)
    timings = [("default", "float32", prior, 256)]
    if args.church:
        from bench_gpu_edit import church_folder

        root = Path(tempfile.mkdtemp())
        timings.append(("church", "bfloat16", sdedit.load(str(church_folder(root)), device="cuda",
                                                          dtype="bfloat16"), 64))
    for name, dtype, model, batch in timings:
        cuda, cpu = (time_edit(model, batch, device) for device in ("cuda", "cpu"))
        print(json.dumps({"model": name, "dtype": dtype, "batch": batch,
                          "cuda_generators_s": round(cuda, 4), "cpu_generators_s": round(cpu, 4),
                          "cpu_over_cuda": round(cpu / cuda, 3)}), flush=True)


def compare(path: str) -> None:
    """The CPU's outputs for the same guides against each GPU variant in `path`."""
    from compare_outputs import compare as compare_images

    saved = np.load(path)
    prior = sdedit.load("default", device="cpu", dtype="float32")
    here = outputs(prior, from_uint8(saved["guides"]), "cpu")
    for name in VARIANTS:
        print(json.dumps({"gpu": name, **compare_images(dict(enumerate(here)),
                                                        dict(enumerate(saved[name])))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="noise.npz")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--church", action="store_true")
    parser.add_argument("--compare", metavar="NPZ", help="compare a GPU's outputs with this CPU")
    args = parser.parse_args()
    compare(args.compare) if args.compare else on_gpu(args)


if __name__ == "__main__":
    main()
