"""CPU time of `sdedit.edit` with the builtin tiny prior: every step vs strided steps.

    python benchmarks/bench_edit.py [--repeat 3] [--threads 2] [--batch 8] [--t0 0.5]
        [--steps 50]

Prints, per variant, the best wall time and process CPU time over --repeat runs, the model
calls and image-forwards per second, and the full/strided ratio. Other processes on the
machine share its cores, so also note `nproc` and the load average printed at the start.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch

import sdedit


@dataclass(frozen=True)
class Timing:
    """Best-of-N wall and CPU seconds for one variant, and the model calls it made."""

    label: str
    wall_s: float
    cpu_s: float
    model_calls: int
    batch: int

    def line(self) -> str:
        rate = self.model_calls * self.batch / self.wall_s
        return (f"{self.label:>12}: wall {self.wall_s:8.2f} s  cpu {self.cpu_s:8.2f} s  "
                f"{self.model_calls:4d} model calls  {rate:7.1f} image-forwards/s")


def time_edit(prior, guide: torch.Tensor, t0: float, steps: int | None, repeat: int,
              label: str) -> Timing:
    """Run `edit` `repeat` times with fixed seeds; keep the fastest run (least disturbed)."""
    schedule = prior.schedule
    calls = len(schedule.path(t0, steps)) - 1
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        generator = sdedit.generators(range(guide.shape[0]))
        wall, cpu = time.perf_counter(), time.process_time()
        sdedit.edit(prior.model, schedule, guide, t0=t0, steps=steps, generator=generator)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return Timing(label, best_wall, best_cpu, calls, guide.shape[0])


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--t0", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=50, help="strided variant's step count")
    parser.add_argument("--model", default="builtin:tiny")
    return parser.parse_args()


def main() -> None:
    """Time full and strided sampling and print both and their ratio."""
    args = parse_arguments()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    prior = sdedit.load(args.model, device="cpu")
    size = prior.resolution
    guide = torch.rand(args.batch, prior.channels, size, size,
                       generator=torch.Generator().manual_seed(0)) * 2 - 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, nproc {os.cpu_count()}, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"model {args.model} ({size}x{size}), batch {args.batch}, t0 {args.t0}")
    sdedit.edit(prior.model, prior.schedule, guide, t0=args.t0, steps=2)  # warm-up
    full = time_edit(prior, guide, args.t0, None, args.repeat, "full steps")
    strided = time_edit(prior, guide, args.t0, args.steps, args.repeat, f"steps={args.steps}")
    print(full.line())
    print(strided.line())
    print(f"ratio full / steps={args.steps}: wall {full.wall_s / strided.wall_s:.1f}x, "
          f"cpu {full.cpu_s / strided.cpu_s:.1f}x")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
