"""How fast the pipeline moves images when the model costs a fixed time: the CPU side's ceiling.

    python benchmarks/bench_overhead.py [--images 2048] [--size 32] [--seconds-per-image 0]
        [--batch-size 512] [--model-batch 256] [--cpus N]

A GPU edits small images faster than a few CPUs can read, decode, encode and write them. This
runs `sdedit run` on generated PNG guides with `sdedit.edit` replaced, in every Ray worker, by a
stand-in that sleeps `--seconds-per-image` per sample of each call (0: an infinitely fast model)
and returns the guide, so the actor's own work (tensors in, 8-bit images and L2 out) and every
CPU stage run as in a real job while the model's time is known. The actor runs one model batch
at a time, as a GPU actor does (`--threads 1`: a CPU actor's chunk workers would run the
stand-in's sleeps side by side). It prints the run's images/s and, with a model time, the ratio
to that model's speed. On a GPU node the CPU stages share its cores with the actor's feeding;
here they share this machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def emulate_model() -> None:
    """Ray worker setup: `sdedit.edit` sleeps instead of running the network."""
    import sdedit

    per_image = float(os.environ["SDEDIT_EMULATED_SECONDS_PER_IMAGE"])

    def edit(model, schedule, guide, **options):
        time.sleep(per_image * guide.shape[0])
        return guide.clone()

    sdedit.edit = edit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seconds-per-image", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--model-batch", type=int, default=256)
    parser.add_argument("--model", default="default", help="what the actor loads (resolution)")
    parser.add_argument("--cpus", type=int, default=None)
    args = parser.parse_args()

    import ray

    from pipeline.bench_cli import write_inputs
    from pipeline.config import RunConfig
    from pipeline.job import run

    os.environ["SDEDIT_EMULATED_SECONDS_PER_IMAGE"] = str(args.seconds_per_image)
    with tempfile.TemporaryDirectory(prefix="sdedit-overhead-") as scratch:
        manifest = write_inputs(Path(scratch) / "inputs", args.images, args.size)
        ray.init(address="local", include_dashboard=False, num_cpus=args.cpus,
                 runtime_env={"worker_process_setup_hook": emulate_model})
        try:
            summary = run(RunConfig(manifest=str(manifest), output=f"{scratch}/output",
                                    model=args.model, t0=(0.5,), steps=20,
                                    batch_size=args.batch_size, model_batch=args.model_batch,
                                    rows_per_shard=args.batch_size, overwrite=True,
                                    threads=1))  # one model batch at a time, as on a GPU
        finally:
            ray.shutdown()
    stats = summary["this_run"]
    result = {"images": args.images, "size": args.size, "cpus": args.cpus or os.cpu_count(),
              "seconds_per_image": args.seconds_per_image, "written": summary["written"],
              "pipeline_images_per_s": stats["images_per_second"],
              "steady_images_per_s": round(stats["written"] / stats["editing_seconds"], 1),
              "actor_busy_images_per_s": round(stats["written"] / stats["actor_edit_seconds"], 1),
              **{name: stats[name] for name in ("startup_seconds", "editing_seconds",
                                                "drain_seconds")}}
    if args.seconds_per_image:
        result["model_images_per_s"] = round(1 / args.seconds_per_image, 1)
        result["steady_ratio"] = round(result["steady_images_per_s"] * args.seconds_per_image, 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
