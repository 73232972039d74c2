"""The pipeline's SDEdit actor on a GPU, without Ray: determinism and throughput.

    python benchmarks/gpu_actor_check.py [--rows 512] [--model default] [--out result.json]
        [--variants float32,bfloat16,bfloat16+compile]

Feeds the actor the same pyarrow tables the fetch step produces (random guides at the model
resolution, every other row masked, mixed t0) and checks, on the device the actor picks:
- determinism: the same rows cut into differently sized and shuffled tables give bit-identical
  pixels to one whole table (the pipeline's promise across --batch-size and restarts);
- the kept region: where a mask is 0 the output equals the guide exactly;
- throughput: rows per second through the actor for each variant (a dtype, `+compile` for
  torch.compile, `+channels_last`), against `sdedit.edit` alone on the same guides with the
  same network (model-only). A compiled variant compiles during the warm-up call.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pyarrow as pa

from pipeline.actor import SDEditActor, to_tensor
from pipeline.manifest import INTERNAL

T0S = (0.3, 0.5, 0.7)


def fetched_table(rows: int, size: int, seed: int = 0) -> pa.Table:
    """Rows as the fetch step leaves them: guide/mask pixels, t0, repeats, seed, stage, error."""
    rng = np.random.default_rng(seed)
    guides = [rng.integers(0, 256, size * size * 3, dtype=np.uint8).tobytes() for _ in range(rows)]
    square = np.zeros((size, size), np.uint8)
    square[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    masks = [square.tobytes() if i % 2 else None for i in range(rows)]
    return pa.table({
        "id": [f"row{i:05d}" for i in range(rows)],
        "t0": [T0S[i % len(T0S)] for i in range(rows)],
        "repeats": [1] * rows,
        "seed": [int(rng.integers(0, 2**31)) for _ in range(rows)],
        INTERNAL + "guide_pixels": pa.array(guides, pa.binary()),
        INTERNAL + "mask_pixels": pa.array(masks, pa.binary()),
        INTERNAL + "stage": pa.array([None] * rows, pa.string()),
        INTERNAL + "error": pa.array([None] * rows, pa.string()),
    })


def by_id(table: pa.Table) -> dict[str, bytes]:
    return dict(zip(table["id"].to_pylist(), table[INTERNAL + "pixels"].to_pylist(), strict=True))


def run_in_pieces(actor: SDEditActor, table: pa.Table, sizes: list[int], seed: int) -> dict:
    """Shuffle the rows, cut them into tables of the given sizes (cycling), run each."""
    order = np.random.default_rng(seed).permutation(table.num_rows)
    shuffled, outputs, first, index = table.take(order), {}, 0, 0
    while first < table.num_rows:
        piece = shuffled.slice(first, sizes[index % len(sizes)])
        outputs |= by_id(actor(piece))
        first, index = first + piece.num_rows, index + 1
    return outputs


def kept_region_exact(table: pa.Table, outputs: dict, size: int) -> bool:
    """Where a row's mask is 0, its output pixels equal its guide pixels."""
    for row_id, guide, mask in zip(table["id"].to_pylist(),
                                   table[INTERNAL + "guide_pixels"].to_pylist(),
                                   table[INTERNAL + "mask_pixels"].to_pylist(), strict=True):
        if mask is None:
            continue
        keep = np.frombuffer(mask, np.uint8).reshape(size, size) == 0
        out = np.frombuffer(outputs[row_id], np.uint8).reshape(size, size, 3)
        source = np.frombuffer(guide, np.uint8).reshape(size, size, 3)
        if not np.array_equal(out[keep], source[keep]):
            return False
    return True


def timed(fn) -> float:
    import torch

    torch.cuda.synchronize() if torch.cuda.is_available() else None
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return time.perf_counter() - started


def model_only_seconds(actor: SDEditActor, table: pa.Table) -> float:
    """`sdedit.edit` alone on the same guides and t0 groups (without the masks), in chunks of
    model_batch; timed on a second pass, after a compiled network has seen every shape."""
    import sdedit

    prior, size, batch = actor.prior, actor.prior.resolution, actor.model_batch
    guide = to_tensor(table[INTERNAL + "guide_pixels"].to_pylist(), size, 3).to(prior.device)
    t0 = np.array(table["t0"].to_pylist())

    def run() -> None:
        for value in T0S:
            rows = np.flatnonzero(t0 == value)
            for first in range(0, len(rows), batch):
                chunk = rows[first:first + batch]
                sdedit.edit(prior.model, prior.schedule, guide[chunk], t0=value, steps=actor.steps,
                            generator=sdedit.generators(chunk.tolist(), device=prior.device))
    run()
    return timed(run)


def main() -> None:
    """Run the checks and print (and optionally write) the results as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--model", default="default")
    parser.add_argument("--model-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None)
    parser.add_argument("--variants", default="float32,bfloat16,bfloat16+compile")
    args = parser.parse_args()
    results = {"rows": args.rows, "model": args.model, "model_batch": args.model_batch,
               "steps": args.steps, "t0": list(T0S), "runs": []}
    for variant in args.variants.split(","):
        dtype, *switches = variant.split("+")
        actor = SDEditActor(args.model, dtype, {}, args.model_batch, args.steps,
                            compile="compile" in switches,
                            channels_last="channels_last" in switches)
        size = actor.prior.resolution
        table = fetched_table(args.rows, size)
        warm_up = timed(lambda: actor(table.slice(0, args.model_batch)))  # noqa: B023
        whole = {}
        seconds = timed(lambda: whole.update(by_id(actor(table))))  # noqa: B023
        pieces = run_in_pieces(actor, table, [37, 5, 64, 101], seed=1)
        model_only = model_only_seconds(actor, table)
        run = {"variant": variant, "device": str(actor.prior.device),
               "warm_up_seconds": round(warm_up, 1),
               "identical_across_batching": pieces == whole,
               "kept_region_exact": kept_region_exact(table, whole, size),
               "actor_rows_per_s": round(args.rows / seconds, 1),
               "model_only_rows_per_s": round(args.rows / model_only, 1),
               "actor_over_model_only": round(model_only / seconds, 3)}
        print(json.dumps(run), flush=True)
        results["runs"].append(run)
    if args.out:
        with open(args.out, "w") as stream:
            json.dump(results, stream, indent=2)


if __name__ == "__main__":
    main()
