#!/usr/bin/env bash
# One call on a GPU machine (the `device` tool): train the bundled default prior, evaluate it,
# and time `sdedit.edit` on the GPU. Run from the repository root with OUT set:
#   OUT=/tmp/gpu_out bash benchmarks/gpu_session.sh
# Needs the diffusers wheel (and importlib_metadata) in .whl/ when diffusers is not installed,
# and the emoji split in .devdata/{train,holdout} (benchmarks/evaluate_prior.py split, with
# the links copied as files). Writes 8 files under $OUT: session.log, model/ (configs and the
# weights in 15 MB parts: `cat model/weights.part_* > diffusion_pytorch_model.safetensors`)
# and eval/ (evaluation.json, samples.png, sdedit_by_t0.png).
set -uo pipefail
: "${OUT:?set OUT to a folder for the results}"
TRAIN_MINUTES=${TRAIN_MINUTES:-6.5}
DEVICE=${DEVICE:-cuda}
PRIOR=${PRIOR:-/tmp/prior}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
sdedit() { python3 -c 'from pipeline.cli import main; main()' "$@"; }
mkdir -p "$OUT/model" "$OUT/eval"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 -c 'import sys, torch, diffusers; print(sys.version.split()[0], torch.__version__, diffusers.__version__)'
  started=$(date +%s)
  sdedit train .devdata/train "$PRIOR" --resolution 32 --channels 64,128,128 --batch-size "${BATCH:-256}" \
    --lr 3e-4 --bf16 --device "$DEVICE" --steps 200000 --time-limit "$TRAIN_MINUTES" \
    --save-every 5000 --log-every 500
  echo "train wall $(( $(date +%s) - started )) s"
  cp "$PRIOR"/config.json "$PRIOR"/scheduler_config.json "$OUT/model/"
  split -b 15M "$PRIOR/diffusion_pytorch_model.safetensors" "$OUT/model/weights.part_"
  sha256sum "$PRIOR/diffusion_pytorch_model.safetensors"
  python3 benchmarks/evaluate_prior.py evaluate --train .devdata/train --holdout .devdata/holdout \
    --model "$PRIOR" --out "$OUT/eval" --guides "${GUIDES:-130}" --samples "${SAMPLES:-100}" --device "$DEVICE"
  if [ "$DEVICE" = cuda ]; then timeout 150 python3 benchmarks/bench_gpu_edit.py --prior "$PRIOR"; fi
} 2>&1 | tee "$OUT/session.log"
