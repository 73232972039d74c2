"""Which CUDA settings make the actor's float32 outputs batch-invariant, and what they cost.

    python benchmarks/gpu_determinism_check.py [--rows 256] [--model-batch 128] [--out r.json]

For the bundled prior in float32 (rows as gpu_actor_check.py feeds them), under each setting:
is the same table's output identical when run twice, and when its rows are shuffled and cut
into other tables; and rows/s. Settings: cuDNN's deterministic mode on or off, TF32 on or off,
noise from CUDA or CPU generators. Then the church-256-shaped UNet in bfloat16 (batch 64, t0
0.5, 20 steps): one `edit` call's time with cuDNN's deterministic mode on and off.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from gpu_actor_check import by_id, fetched_table, run_in_pieces, timed

import sdedit
from pipeline.actor import SDEditActor

SETTINGS = {  # name -> (cudnn deterministic, tf32, generator device)
    "deterministic": (True, True, None),
    "default": (False, True, None),
    "no_tf32": (False, False, None),
    "deterministic_no_tf32": (True, False, None),
    "cpu_generators": (False, True, "cpu"),
}


def apply(deterministic: bool, tf32: bool) -> None:
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--model-batch", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    actor = SDEditActor("default", "float32", {}, args.model_batch, 20)
    table = fetched_table(args.rows, actor.prior.resolution)
    actor(table.slice(0, args.model_batch))
    cuda_generators, results = sdedit.generators, []
    for name, (deterministic, tf32, generator_device) in SETTINGS.items():
        apply(deterministic, tf32)
        sdedit.generators = (cuda_generators if generator_device is None else
                             lambda seeds, device=None, on=generator_device: cuda_generators(
                                 seeds, device=on))
        first, second = {}, {}
        seconds = timed(lambda: first.update(by_id(actor(table))))  # noqa: B023
        second.update(by_id(actor(table)))
        pieces = run_in_pieces(actor, table, [37, 5, 64, 101], seed=1)
        row = {"setting": name, "identical_when_rerun": first == second,
               "identical_across_batching": pieces == first,
               "rows_differing_across_batching": sum(pieces[k] != first[k] for k in first),
               "rows_per_s": round(args.rows / seconds, 1)}
        print(json.dumps(row), flush=True)
        results.append(row)
    sdedit.generators = cuda_generators
    from bench_gpu_edit import church_folder

    church = sdedit.load(str(church_folder(Path(tempfile.mkdtemp()))), device="cuda",
                         dtype="bfloat16")
    guide = torch.rand(64, 3, 256, 256, device="cuda") * 2 - 1
    for deterministic in (True, False, True, False):
        apply(deterministic, True)
        church.edit(guide, t0=0.5, steps=2)
        seconds = timed(lambda: church.edit(guide, t0=0.5, steps=20))
        row = {"church_bfloat16_batch_64": True, "cudnn_deterministic": deterministic,
               "seconds": round(seconds, 3), "image_forwards_per_s": round(640 / seconds, 1)}
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
