#!/usr/bin/env bash
# One short call on a GPU machine (the `device` tool) for what only a GPU can show: the actor's
# determinism across batchings in float32 (the deterministic cuDNN/cuBLAS fix) and bfloat16,
# the kept region, and actor vs model-only throughput with and without torch.compile.
# Run from the repository root with OUT set, carrying .whl (diffusers, importlib_metadata):
#   OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh
# Writes $OUT/check.log and $OUT/actor_check.json. About 3 minutes on an H100/H200.
set -uo pipefail
: "${OUT:?set OUT to a folder for the results}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 -c 'import sys, torch, diffusers; print(sys.version.split()[0], torch.__version__, diffusers.__version__)'
  timeout 420 python3 benchmarks/gpu_actor_check.py --rows "${ROWS:-2048}" \
    --model-batch "${MODEL_BATCH:-256}" --variants "${VARIANTS:-float32,bfloat16,bfloat16+compile}" \
    --out "$OUT/actor_check.json"
} 2>&1 | tee "$OUT/check.log"
