"""The SDEdit actor: loads a prior once and edits batches of work rows.

Determinism: a sample's output depends only on (model, guide, mask, t0, repeats, steps, seed)
and on `model_batch`. Rows are grouped by (number of model calls, repeats) and run in chunks of
exactly `model_batch` samples (the last chunk padded with throw-away samples), each with its own
generator and its own t0, so rows with different t0 values but as many steps (any t0 with
`steps=N`) share model batches instead of each padding their own. Every sample of a chunk takes
part in every model call, and kernels give the same bits for a sample whatever its neighbours
when the batch shape is fixed, so outputs do not change with --batch-size, actor counts or
restarts (on CUDA the actor asks for deterministic cuDNN/cuBLAS kernels in true float32, no
TF32, for this). Noise comes from CPU generators on every device, so a GPU makes the CPU's
images up to floating point. Changing `model_batch` (or the device) may change rare pixels by
one grey level.

Threads: a CPU actor with N threads edits up to N model batches at once, each on one torch
thread (`chunk_workers`), rather than one batch at a time on N torch threads. Its model batches
then never wait for each other inside an operator, so a thread that other processes preempt
delays only its own batch; and every batch is summed in the same order whatever N is, so CPU
outputs no longer change with --threads or --actors. Each batch holds its own activations, so
an actor runs fewer at once where N of them would not fit in its share of memory (`workers_for`).
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from functools import partial

import numpy as np
import pyarrow as pa

from pipeline.manifest import INTERNAL
from tasks.images import options_for

HALF_HINT = {"float16": ": its range is small, bfloat16 and float32 have more"}


class SDEditActor:
    """Ray Data callable class: `__call__(table) -> table` with `_sd_pixels` and `l2_to_guide`."""

    def __init__(self, model: str, dtype: str, storage_options: Mapping, model_batch: int,
                 steps: int | None, threads: int | None = None, allow_pickle: bool = False,
                 compile: bool = False, channels_last: bool = False,
                 expected_digest: str | None = None) -> None:
        import torch

        import sdedit

        if torch.cuda.is_available():
            prefer_deterministic_cuda()
        self.prior = sdedit.load(model, dtype=dtype, allow_pickle=allow_pickle,
                                 channels_last=channels_last, compile=compile,
                                 storage_options=options_for(model, storage_options))
        if expected_digest and self.prior.digest != expected_digest:
            from sdedit.loading import ModelLoadError

            raise ModelLoadError(
                f"model {model} changed since this run started: the driver read weights "
                f"{expected_digest}, this actor loaded {self.prior.digest}. Rerun, so that one "
                "model makes every output (OUTPUT refuses a different model unless --overwrite)")
        self.workers = workers_for(self.prior, threads, model_batch, compile)
        self.clock = BusyClock()
        self.model_batch = model_batch
        self.steps = steps
        self.calls: dict[float, int] = {}  # t0 -> model calls per pass (`steps_from`)
        self.dtype = dtype

    def __call__(self, table: pa.Table) -> pa.Table:
        """Edit a batch of work rows. Calls may run at once (Ray Data's threaded actor): their
        model batches share the actor's chunk workers."""
        started_at, call = time.time(), self.clock.start()
        try:
            pixels, l2, stages, errors = self._edit_rows(table)
        finally:
            busy = self.clock.stop(call)
        seconds = busy / max(table.num_rows, 1)
        return self._with_outputs(table, pixels, l2, stages, errors,
                                  (seconds, started_at, time.time()))

    def _edit_rows(self, table: pa.Table) -> tuple[list, list, list, list]:
        """(pixels, l2_to_guide, stage, error) per row; a chunk whose tensors are bad becomes
        its rows' errors, device errors propagate."""
        stages = table[INTERNAL + "stage"].to_pylist()
        errors = table[INTERNAL + "error"].to_pylist()
        pixels: list[bytes | None] = [None] * table.num_rows
        l2: list[float | None] = [None] * table.num_rows
        t0s = table["t0"].to_pylist()

        def edit(repeats: int, chunk: list[int]) -> list[tuple[bytes, float] | None]:
            return self._edit_chunk(
                [table[INTERNAL + "guide_pixels"][i].as_py() for i in chunk],
                [table[INTERNAL + "mask_pixels"][i].as_py() for i in chunk],
                [table["seed"][i].as_py() for i in chunk], [t0s[i] for i in chunk], repeats)

        chunks = self._chunks(table, t0s, stages)
        for (_, chunk), result in zip(chunks, self._scheduled(edit, chunks), strict=True):
            try:
                outputs = result()
            except (ValueError, TypeError) as error:  # bad tensors; device errors propagate
                for i in chunk:
                    stages[i] = "edit"
                    errors[i] = (f"SDEdit failed for id {table['id'][i].as_py()!r} at t0 "
                                 f"{t0s[i]}: {type(error).__name__}: {error}")
                continue
            for i, output in zip(chunk, outputs, strict=True):
                if output is None:
                    stages[i] = "edit"
                    errors[i] = (f"SDEdit gave NaN or infinite values for id "
                                 f"{table['id'][i].as_py()!r} at t0 {t0s[i]}, which would be "
                                 f"a black image (dtype {self.dtype}"
                                 f"{HALF_HINT.get(self.dtype, '')})")
                else:
                    pixels[i], l2[i] = output
        return pixels, l2, stages, errors

    def _scheduled(self, edit: Callable, chunks: list[tuple[int, list]]) -> list[Callable]:
        """Per chunk, a callable that returns its outputs: with chunk workers, the result of
        a job started now on them; without, the edit itself, run when called."""
        if self.workers is None:
            return [partial(edit, repeats, chunk) for repeats, chunk in chunks]
        return [self.workers.submit(edit, repeats, chunk).result for repeats, chunk in chunks]

    def _chunks(self, table: pa.Table, t0s: list, stages: list) -> list[tuple[int, list]]:
        """(repeats, row indices) chunks of at most model_batch rows that make the same number
        of model calls per pass, so every sample of a chunk is in every call."""
        groups = defaultdict(list)
        rows = zip(t0s, table["repeats"].to_pylist(), stages, strict=True)
        for index, (t0, repeats, stage) in enumerate(rows):
            if stage is None:
                groups[(self.steps_from(t0), repeats)].append(index)
        return [(repeats, members[first:first + self.model_batch])
                for (_, repeats), members in sorted(groups.items())
                for first in range(0, len(members), self.model_batch)]

    def steps_from(self, t0: float) -> int:
        """Sampler steps (model calls) of one pass from `t0`: --steps, or fewer where the
        schedule has fewer from there, or all of them without --steps."""
        if t0 not in self.calls:
            import sdedit

            self.calls[t0] = sdedit.model_calls(self.prior.schedule, t0, self.steps)
        return self.calls[t0]

    def _edit_chunk(self, guides: list[bytes], masks: list[bytes | None], seeds: list[int],
                    t0s: list[float], repeats: int) -> list[tuple[bytes, float] | None]:
        """Edit one chunk padded to model_batch; returns (uint8 RGB bytes, l2_to_guide) per
        row, None for a row whose output holds NaN or infinity (it would be written black).

        l2_to_guide is the mean squared error, in [-1, 1] units, between the 8-bit output and
        the guide at the model resolution: the stored image for PNG and WebP (lossless), the
        pixels before encoding for JPEG."""
        import torch

        import sdedit

        size = self.prior.resolution
        real = len(guides)
        pad = self.model_batch - real
        guide = to_tensor([*guides, *[guides[0]] * pad], size, 3)
        mask = None
        if any(m is not None for m in masks):
            full = bytes([255]) * (size * size)
            mask = to_tensor([m or full for m in [*masks, *[masks[0]] * pad]], size, 1)
            mask = (mask + 1) / 2
        device = self.prior.device
        # noise from CPU generators on every device: a GPU makes the CPU's images (to floating
        # point), not ones from CUDA's own random streams (see `sdedit.noise`)
        generators = sdedit.generators([*seeds, *[0] * pad])
        t0 = torch.tensor([*t0s, *[t0s[0]] * pad], dtype=torch.float64)
        out = sdedit.edit(self.prior.model, self.prior.schedule, guide.to(device), t0=t0,
                          mask=None if mask is None else mask.to(device), steps=self.steps,
                          repeats=repeats, generator=generators)
        quantised = ((out[:real].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        restored = quantised.float() / 127.5 - 1
        distances = ((restored - guide[:real]) ** 2).mean(dim=(1, 2, 3)).tolist()
        images = quantised.permute(0, 2, 3, 1).contiguous().numpy()
        finite = torch.isfinite(out[:real]).flatten(1).all(dim=1).tolist()
        return [(images[i].tobytes(), float(distances[i])) if finite[i] else None
                for i in range(real)]

    def _with_outputs(self, table, pixels, l2, stages, errors, timing) -> pa.Table:
        """The output columns; `timing` is (edit seconds per row, batch start, batch end)."""
        n, (seconds, started_at, finished_at) = table.num_rows, timing
        table = table.drop_columns([INTERNAL + "guide_pixels", INTERNAL + "mask_pixels",
                                    INTERNAL + "stage", INTERNAL + "error"])
        size = self.prior.resolution
        steps = [None if stage else self.steps_from(t0)
                 for t0, stage in zip(table["t0"].to_pylist(), stages, strict=True)]
        columns = {
            INTERNAL + "pixels": pa.array(pixels, pa.binary()),
            "l2_to_guide": pa.array(l2, pa.float64()),
            "width": pa.array([size] * n, pa.int32()),
            "height": pa.array([size] * n, pa.int32()),
            "model": pa.array([self.prior.name] * n, pa.string()),
            "model_digest": pa.array([self.prior.digest] * n, pa.string()),
            "steps": pa.array(steps, pa.int32()),
            INTERNAL + "stage": pa.array(stages, pa.string()),
            INTERNAL + "error": pa.array(errors, pa.string()),
            INTERNAL + "edit_seconds": pa.array([seconds] * n, pa.float64()),
            INTERNAL + "edit_started_at": pa.array([started_at] * n, pa.float64()),
            INTERNAL + "edit_finished_at": pa.array([finished_at] * n, pa.float64()),
        }
        for name, column in columns.items():
            table = table.append_column(name, column)
        return table


def chunk_workers(threads: int | None, device: str, compile: bool = False,
                  at_once: int | None = None) -> ThreadPoolExecutor | None:
    """How an actor on `device` uses its `threads`: on a CPU, with more than one, a pool of
    chunk workers (`at_once` of them, else one per thread), each running a model batch on one
    torch thread (torch's intra-op threads set to 1); otherwise none (model batches one at a
    time, on `threads` torch threads when given). On two cores with builtin:tiny, two one-thread
    workers edited 5.2-5.9 images/s against 4.5-5.1 for one batch at a time on two threads,
    with identical bytes. A compiled model keeps torch's threads: running compiled graphs from
    several threads is untested here."""
    import torch

    if edits_batches_at_once(threads, device, compile):
        torch.set_num_threads(1)
        return ThreadPoolExecutor(at_once or threads, thread_name_prefix="sdedit-chunk")
    if threads:
        torch.set_num_threads(threads)
    return None


def workers_for(prior, threads: int | None, model_batch: int, compile: bool = False,
                report: Callable[[str], None] = print) -> ThreadPoolExecutor | None:
    """`chunk_workers` for `prior`, with as many model batches at once as this actor's share of
    the memory holds (`chunks_at_once`): each batch holds its own activations, which for a
    church-256-shaped UNet were about 360 MiB per sample, so 16 threads with --model-batch 8
    would have wanted some 46 GiB. `report` says so when memory allows fewer than `threads`."""
    import torch

    device = prior.device.type
    if not edits_batches_at_once(threads, device, compile):
        return chunk_workers(threads, device, compile)
    torch.set_num_threads(1)
    per_batch, budget = batch_bytes(prior, model_batch), memory_budget(threads)
    at_once = chunks_at_once(threads, per_batch, budget)
    if at_once < threads:
        report(f"SDEdit actor: {at_once} model batch(es) at once, not {threads}: each takes "
               f"about {_size(per_batch)} (--model-batch {model_batch}), and {_size(budget)} "
               "is this actor's to use")
    return chunk_workers(threads, device, compile, at_once)


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


MEMORY_SHARE = 0.5  # of the available memory, over the actors, for model batches


def memory_budget(threads: int) -> int | None:
    """Bytes a CPU actor's model batches may take: MEMORY_SHARE of the memory available now,
    in proportion to its threads over this machine's cores (the actors of a node share it);
    None where unknown."""
    available = available_memory()
    if available is None:
        return None
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    return int(MEMORY_SHARE * available * min(1.0, threads / cores))


def chunks_at_once(threads: int, per_batch: int | None, budget: int | None) -> int:
    """Model batches a CPU actor with `threads` runs at once: one per thread, fewer when that
    many batches of `per_batch` bytes would take more than `budget`; at least one. Sizes not
    measured (not Linux) do not limit it."""
    if not per_batch or budget is None:
        return threads
    return max(1, min(threads, budget // per_batch))


def batch_bytes(prior, model_batch: int) -> int | None:
    """Memory a model batch of `model_batch` samples takes beyond the weights, from the peaks
    of this process's resident memory (reset through /proc/self/clear_refs) over an edit of
    one sample and one of two: the first's rise plus the difference per further sample (it
    overstates: 312 MiB for 32 samples of builtin:tiny, which take 200-220; 4.1 GiB for 8 of a
    church-256-shaped UNet, which take 2.9). None where the peak cannot be reset (not Linux) or
    the edit fails. Run it before the model's first batch."""
    import torch

    import sdedit

    try:
        base, size, peaks = _status_bytes("VmRSS"), prior.resolution, []
        for samples in (1, 2):
            with open("/proc/self/clear_refs", "w") as stream:
                stream.write("5")
            guide = torch.zeros(samples, 3, size, size, device=prior.device)
            prior.edit(guide, t0=0.5, steps=2, generator=sdedit.generators(range(samples)))
            peaks.append(_status_bytes("VmHWM"))
    except (OSError, ValueError, TypeError):  # no peak to reset, or an edit that cannot run
        return None  # (then the actor's chunks fail as its rows' errors, not its start)
    first, per_sample = max(0, peaks[0] - base), max(0, peaks[1] - peaks[0])
    return first + (model_batch - 1) * per_sample


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as stream:
        for line in stream:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no {field} in /proc/self/status")


def available_memory() -> int | None:
    """Bytes this process may still take: the machine's available memory, or less under a
    cgroup's (container's) limit; None where neither can be read."""
    values = []
    with suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as stream:
        values += [int(line.split()[1]) * 1024 for line in stream
                   if line.startswith("MemAvailable:")]
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        with suppress(OSError, ValueError), open(limit) as a, open(usage) as b:
            values.append(int(a.read()) - int(b.read()))  # "max": no limit, ValueError
    return min(values) if values else None


def edits_batches_at_once(threads: int | None, device: str, compile: bool) -> bool:
    """Whether an actor with these settings has chunk workers (`chunk_workers`): on a CPU,
    with more than one thread, the model not compiled."""
    return bool(threads and threads > 1 and device == "cpu" and not compile)


class BusyClock:
    """The actor's editing time, shared out among the calls that run at once: while k calls
    run, each is charged 1/k of the time, so the charges add up to the time the actor spent
    editing (not k times it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._charges: dict[int, float] = {}
        self._since = 0.0
        self._next = 0

    def start(self) -> int:
        with self._lock:
            self._advance()
            self._next += 1
            self._charges[self._next] = 0.0
            return self._next

    def stop(self, call: int) -> float:
        with self._lock:
            self._advance()
            return self._charges.pop(call)

    def _advance(self) -> None:
        now = time.perf_counter()
        if self._charges:
            share = (now - self._since) / len(self._charges)
            for call in self._charges:
                self._charges[call] += share
        self._since = now


def prefer_deterministic_cuda() -> None:
    """Ask cuDNN and cuBLAS for kernels whose result for a sample does not depend on run or
    neighbours, in true float32 (no TF32). On an H200 (benchmarks/gpu_determinism_check.py),
    float32 outputs of 16 of 256 rows changed when the rows were batched differently while TF32
    was on, with cuDNN's deterministic mode or without; with TF32 off none did, and the images
    agree with a CPU's. bfloat16 does not use TF32 and was batch-invariant either way. cuBLAS
    reads its workspace setting when CUDA starts, so this runs before the model loads."""
    import os

    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def to_tensor(buffers: list[bytes], size: int, channels: int):
    """uint8 HWC buffers to a float tensor [B, C, H, W] in [-1, 1]."""
    import torch

    array = np.stack([np.frombuffer(b, np.uint8).reshape(size, size, channels) for b in buffers])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1
