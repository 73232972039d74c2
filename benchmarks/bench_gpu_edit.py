"""GPU throughput of `sdedit.edit` through `sdedit.load`, for the design's performance anchors.

    python benchmarks/bench_gpu_edit.py [--out results.json] [--models church,default]

`church` is a UNet2DModel with google/ddpm-church-256's configuration (113.7M parameters,
seeded random weights, saved as a diffusers folder and loaded back through `sdedit.load`), so
the figures compare with ../shared/design.md (NVIDIA H200: fp32 eager batch 8 = 50
image-forwards/s, bf16 eager batch 64 = 310). `default` is the bundled 32x32 prior. Each
variant runs SDEdit at t0 = 0.5 with 20 strided steps (10 model calls) after one warm-up and
reports the best of three runs; an output check confirms the images are finite.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import sdedit

CHURCH_256 = dict(
    sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
)
SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 1e-4,
             "beta_end": 0.02, "beta_schedule": "linear", "variance_type": "fixed_small"}
VARIANTS = {  # model -> [(dtype, batch)]
    "church": [("float32", 8), ("bfloat16", 64), ("bfloat16", 128)],
    "default": [("float32", 256), ("bfloat16", 1024)],
}


def church_folder(root: Path) -> Path:
    """A diffusers folder holding a seeded random church-256-shaped UNet."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(**CHURCH_256).save_pretrained(root / "church", safe_serialization=True)
    (root / "church" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return root / "church"


def time_variant(uri: str, dtype: str, batch: int, t0: float, steps: int) -> dict:
    """Best-of-3 wall time of one `edit` call on the GPU, as image-forwards and images per s."""
    prior = sdedit.load(uri, device="cuda", dtype=dtype)
    size = prior.resolution
    guide = torch.rand(batch, 3, size, size, device="cuda",
                       generator=torch.Generator("cuda").manual_seed(0)) * 2 - 1
    calls = len(prior.schedule.path(t0, steps)) - 1
    prior.edit(guide, t0=t0, steps=2)  # warm-up: cuDNN autotuning, allocator
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = prior.edit(guide, t0=t0, steps=steps)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return {"dtype": dtype, "batch": batch, "resolution": size, "model_calls": calls,
            "wall_s": round(best, 4), "image_forwards_per_s": round(calls * batch / best, 1),
            "images_per_s": round(batch / best, 1), "finite": bool(torch.isfinite(out).all()),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main() -> None:
    """Time every variant of the chosen models and write the results as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--models", default="church,default")
    parser.add_argument("--prior", default="default", help="what `default` loads")
    parser.add_argument("--t0", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    with tempfile.TemporaryDirectory() as root:
        uris = {"church": lambda: str(church_folder(Path(root))), "default": lambda: args.prior}
        for model in args.models.split(","):
            uri = uris[model]()
            for dtype, batch in VARIANTS[model]:
                run = {"model": model, **time_variant(uri, dtype, batch, args.t0, args.steps)}
                print(json.dumps(run), flush=True)
                results["runs"].append(run)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
