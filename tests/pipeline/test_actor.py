"""The SDEdit actor without Ray: fixed-size model batches make outputs batch-invariant."""

from __future__ import annotations

import os
import re
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from run_helpers import write_images

import sdedit
from pipeline.actor import BusyClock, SDEditActor, chunks_at_once, prefer_deterministic_cuda
from pipeline.fetch import fetch_batch
from pipeline.manifest import Plan, expand_table, keys_table


@pytest.fixture(scope="module")
def actor():
    threads = torch.get_num_threads()  # the actor sets one thread in this process: restored
    yield SDEditActor("builtin:tiny", "float32", {}, model_batch=3, steps=2, threads=1)
    torch.set_num_threads(threads)


@pytest.fixture
def work(tmp_path) -> pa.Table:
    names = write_images(tmp_path, 4)
    manifest = pa.table({"id": ["a", "b", "c", "d"], "guide": names,
                         "t0": [[0.3, 0.6], None, None, [0.6]]})
    rows = expand_table(manifest, Plan(base=str(tmp_path), seed=1, t0=(0.3,)),
                        committed=keys_table([]))
    return fetch_batch(rows, 64, {}, 10**7)


def outputs(table: pa.Table) -> dict:
    keys = zip(table["id"].to_pylist(), table["t0"].to_pylist(), strict=True)
    return dict(zip(keys, table["_sd_pixels"].to_pylist(), strict=True))


def two_calls_at_once(actor: SDEditActor, work: pa.Table) -> dict:
    """The outputs of `work` edited in two calls at once, as Ray Data's threaded actor makes
    them."""
    calls = []
    threads = [threading.Thread(target=lambda part=part: calls.append(actor(part)))
               for part in (work.slice(0, 2), work.slice(2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {k: v for call in calls for k, v in outputs(call).items()}


def test_outputs_do_not_depend_on_which_rows_share_a_call(actor, work):
    together = outputs(actor(work))
    alone = {}
    for index in range(work.num_rows):
        alone.update(outputs(actor(work.slice(index, 1))))
    assert together == alone
    assert len(together) == 5 and all(len(v) == 64 * 64 * 3 for v in together.values())


def test_an_actor_with_threads_edits_model_batches_at_once_with_the_same_bytes(work):
    torch_threads = torch.get_num_threads()
    try:
        expected = outputs(SDEditActor("builtin:tiny", "float32", {}, model_batch=1, steps=2,
                                       threads=1)(work))
        actor = SDEditActor("builtin:tiny", "float32", {}, model_batch=1, steps=2, threads=2)
        assert torch.get_num_threads() == 1  # one torch thread per chunk worker
        both_running = threading.Barrier(2, timeout=20)  # broken unless two chunks overlap
        first_calls = set()

        def meet(*_):
            if threading.current_thread().name not in first_calls:
                first_calls.add(threading.current_thread().name)
                both_running.wait()

        actor.prior.model.unet.register_forward_pre_hook(meet)
        assert outputs(actor(work)) == expected  # 5 rows, 5 chunks of one
        assert len(first_calls) == 2 and all(n.startswith("sdedit-chunk") for n in first_calls)
        assert two_calls_at_once(actor, work) == expected
    finally:
        torch.set_num_threads(torch_threads)


def test_a_cpu_actor_runs_as_many_model_batches_at_once_as_its_memory_holds(work, monkeypatch,
                                                                           capsys):
    """Every model batch holds its own activations: with one chunk worker per thread, a
    church-256-shaped UNet at --model-batch 8 on 16 threads would want some 46 GiB. An actor
    whose memory holds one batch runs one at a time (still on one torch thread, so the same
    bytes) and says why."""
    import pipeline.actor

    torch_threads = torch.get_num_threads()
    try:
        expected = outputs(SDEditActor("builtin:tiny", "float32", {}, model_batch=1, steps=2,
                                       threads=2)(work))
        monkeypatch.setattr(pipeline.actor, "memory_budget", lambda threads: 15 * 2**20)
        monkeypatch.setattr(pipeline.actor, "batch_bytes", lambda prior, batch: 10 * 2**20)
        capsys.readouterr()
        actor = SDEditActor("builtin:tiny", "float32", {}, model_batch=1, steps=2, threads=2)
        lines = capsys.readouterr().out.splitlines()
        assert actor.workers._max_workers == 1 and torch.get_num_threads() == 1
        assert len(lines) == 1 and re.fullmatch(
            r"SDEdit actor: 1 model batch\(es\) at once, not 2: each takes about 10 MiB "
            r"\(--model-batch 1\), and 15 MiB is this actor's to use", lines[0]), lines
        running, most, names = set(), [], set()

        def enter(*_):
            running.add(threading.current_thread().name)
            most.append(len(running))
            names.add(threading.current_thread().name)

        def leave(*_):
            running.discard(threading.current_thread().name)

        actor.prior.model.unet.register_forward_pre_hook(enter)
        actor.prior.model.unet.register_forward_hook(leave)
        assert two_calls_at_once(actor, work) == expected
        assert max(most) == 1 and len(most) == 10  # 5 one-row chunks, 2 model calls each
        assert names == {"sdedit-chunk_0"}
    finally:
        torch.set_num_threads(torch_threads)


def test_chunks_at_once_fit_the_budget_and_the_threads():
    gib = 2**30
    assert chunks_at_once(16, 4 * gib, 30 * gib) == 7
    assert chunks_at_once(16, 4 * gib, 100 * gib) == 16
    assert chunks_at_once(16, 4 * gib, gib) == 1  # at least one
    assert chunks_at_once(16, None, gib) == chunks_at_once(16, 4 * gib, None) == 16


def test_a_model_batchs_memory_is_measured_before_the_first_batch():
    """From a fresh process, as an actor measures it: builtin:tiny's 32 samples took 200-220
    MiB above the loaded model; the estimate must cover that and stay the same order."""
    code = """
import torch, sdedit
from pipeline.actor import batch_bytes
torch.set_num_threads(1)
print(batch_bytes(sdedit.load("builtin:tiny"), 32), batch_bytes(sdedit.load("builtin:tiny"), 1))
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    many, one = (int(value) for value in done.stdout.split())
    assert 150 * 2**20 < many < 1500 * 2**20, many
    assert one < many


def test_calls_that_run_at_once_share_the_actors_editing_time():
    clock = BusyClock()
    started = time.perf_counter()
    first = clock.start()
    time.sleep(0.2)
    second_started = time.perf_counter()
    second = clock.start()
    time.sleep(0.2)
    first_stopped = time.perf_counter()
    first_seconds = clock.stop(first)
    time.sleep(0.3)
    second_seconds = clock.stop(second)
    wall = time.perf_counter() - started
    overlap = first_stopped - second_started
    assert first_seconds == pytest.approx(second_started - started + overlap / 2, abs=0.01)
    assert second_seconds == pytest.approx(wall - first_seconds, abs=0.01)
    assert first_seconds + second_seconds == pytest.approx(wall, abs=0.01)  # not wall + overlap


def test_rows_with_different_t0_but_as_many_steps_share_model_batches(work):
    actor = SDEditActor("builtin:tiny", "float32", {}, model_batch=5, steps=2, threads=1)
    samples = []
    actor.prior.model.unet.register_forward_pre_hook(lambda _, args: samples.append(len(args[0])))
    together = outputs(actor(work))  # t0 0.3 and 0.6, 5 rows: one chunk, 2 steps
    assert samples == [5, 5]
    samples.clear()
    alone = {}
    for index in range(work.num_rows):
        alone.update(outputs(actor(work.slice(index, 1))))
    assert samples == [5, 5] * 5
    assert together == alone


def test_rows_whose_t0_takes_more_steps_get_their_own_chunks(work):
    actor = SDEditActor("builtin:tiny", "float32", {}, model_batch=5, steps=None, threads=1)
    assert [sdedit.model_calls(actor.prior.schedule, t0) for t0 in (0.3, 0.6)] == [300, 600]
    chunks = actor._chunks(work, work["t0"].to_pylist(), [None] * work.num_rows)
    t0s = work["t0"].to_pylist()
    assert [sorted({t0s[i] for i in chunk}) for _, chunk in chunks] == [[0.3], [0.6]]
    assert sorted(i for _, chunk in chunks for i in chunk) == list(range(work.num_rows))


def test_each_output_records_the_steps_its_pass_took(tmp_path):
    """`steps` is --steps where the schedule has that many from t0, fewer where it has fewer
    (t0 0.003 of 1,000 timesteps: 3), all of them without --steps; none for a failed row."""
    names = write_images(tmp_path, 3)
    manifest = pa.table({"id": ["a", "b", "c"], "guide": names,
                         "t0": [[0.003, 0.3], [0.004], [0.3]]})
    rows = fetch_batch(expand_table(manifest, Plan(base=str(tmp_path), seed=1, t0=(0.3,)),
                                    committed=keys_table([])), 64, {}, 10**7)
    stage = pa.array([None if i != "c" else "decode" for i in rows["id"].to_pylist()])
    rows = rows.set_column(rows.schema.get_field_index("_sd_stage"), "_sd_stage", stage)

    def steps(table: pa.Table) -> dict:
        keys = zip(table["id"].to_pylist(), table["t0"].to_pylist(), strict=True)
        return dict(zip(keys, table["steps"].to_pylist(), strict=True))

    asked = SDEditActor("builtin:tiny", "float32", {}, model_batch=4, steps=5, threads=1)
    assert steps(asked(rows)) == {("a", 0.003): 3, ("a", 0.3): 5, ("b", 0.004): 4,
                                  ("c", 0.3): None}
    every = SDEditActor("builtin:tiny", "float32", {}, model_batch=4, steps=None, threads=1)
    small = rows.filter(pc.less(rows["t0"], 0.1))
    assert steps(every(small)) == {("a", 0.003): 3, ("b", 0.004): 4}


def test_a_compiled_actor_is_batch_invariant_and_close_to_eager(actor, work):
    compiled = SDEditActor("builtin:tiny", "float32", {}, model_batch=3, steps=2, threads=1,
                           compile=True, channels_last=True)
    assert type(compiled.prior.model._forward).__name__ == "OptimizedModule"
    together = outputs(compiled(work))
    alone = {}
    for index in range(work.num_rows):
        alone.update(outputs(compiled(work.slice(index, 1))))
    assert together == alone
    eager = outputs(actor(work))
    assert together.keys() == eager.keys()
    for key, pixels in together.items():
        difference = np.abs(np.frombuffer(pixels, np.uint8).astype(int)
                            - np.frombuffer(eager[key], np.uint8).astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_an_actor_refuses_weights_other_than_the_drivers():
    from sdedit.loading import ModelLoadError, describe

    digest = describe("builtin:tiny").digest
    assert SDEditActor("builtin:tiny", "float32", {}, model_batch=2, steps=2,
                       expected_digest=digest).prior.digest == digest
    with pytest.raises(ModelLoadError, match=r"builtin:tiny changed since this run started.*"
                                             r"sha256:0{64}, this actor loaded " + digest):
        SDEditActor("builtin:tiny", "float32", {}, model_batch=2, steps=2,
                    expected_digest="sha256:" + "0" * 64)


def test_l2_to_guide_matches_the_stored_pixels(actor, work):
    result = actor(work.slice(0, 1))
    out = np.frombuffer(result["_sd_pixels"][0].as_py(), np.uint8).astype(float) / 127.5 - 1
    guide = np.frombuffer(work["_sd_guide_pixels"][0].as_py(), np.uint8).astype(float) / 127.5 - 1
    assert result["l2_to_guide"][0].as_py() == pytest.approx(((out - guide) ** 2).mean())
    assert result["width"][0].as_py() == result["height"][0].as_py() == 64


def test_rows_that_already_failed_pass_through_untouched(actor, work):
    stage = pa.array(["read"] + [None] * (work.num_rows - 1), pa.string())
    failed = work.set_column(work.schema.get_field_index("_sd_stage"), "_sd_stage", stage)
    result = actor(failed)
    assert result["_sd_stage"][0].as_py() == "read"
    assert result["_sd_pixels"][0].as_py() is None
    assert result["_sd_pixels"][1].as_py() is not None


def test_cuda_actors_ask_for_deterministic_kernels_in_true_float32(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    # cuda.matmul.allow_tf32 is a property that monkeypatch cannot undo: restored by hand
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        prefer_deterministic_cuda()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        # TF32 made float32 outputs change with batching on an H200; true float32 did not
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's own choice is kept
        prefer_deterministic_cuda()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def test_an_output_holding_nan_is_an_edit_error_not_a_black_image(work):
    """NaN became 0 in the uint8 cast: a network that overflows (float16) had its outputs
    written as black images."""
    actor = SDEditActor("builtin:tiny", "float32", {}, model_batch=2, steps=2, threads=1)
    with torch.no_grad():
        actor.prior.model.unet.conv_out.bias.fill_(float("inf"))
    result = actor(work.slice(0, 2))
    assert result["_sd_pixels"].to_pylist() == [None, None]
    assert result["_sd_stage"].to_pylist() == ["edit", "edit"]
    assert result["_sd_error"][0].as_py() == (
        "SDEdit gave NaN or infinite values for id 'a' at t0 0.3, which would be a black image "
        "(dtype float32)")
