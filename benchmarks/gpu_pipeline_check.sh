#!/usr/bin/env bash
# One call on a GPU machine (the `device` tool) for what only a GPU shows about the whole job:
#  1. `sdedit run` of the README example with its Ray actor pool on the GPU (OUTPUT comes back
#     as example.tar: untar it and compare with a CPU run of the same commit,
#     `python benchmarks/compare_outputs.py GPU_OUTPUT CPU_OUTPUT`);
#  2. `sdedit bench` on the GPU: end to end against model-only for a church-256-shaped UNet in
#     bfloat16 (a user's workload) and for the bundled 32x32 prior at full speed (the CPU stages
#     under the most pressure);
#  3. gpu_noise_check.py: CUDA against CPU noise generators (cost, and agreement with a CPU);
#  4. bench_overhead.py: the pipeline with a model that costs nothing (the node's CPU ceiling);
#  5. gpu_actor_check.py: the actor's determinism across batchings, kept region, throughput.
# The machine has torch but not Ray or diffusers: `bash benchmarks/gpu_carry.sh` builds .gpu/
# (their wheels, Ray as a trimmed ray.tar.xz) for the call to carry. From the repository root:
#   OUT=/tmp/gpu_out bash benchmarks/gpu_pipeline_check.sh
# Each part runs under its own timeout and is skipped when the script's BUDGET (seconds) is
# nearly spent; PARTS names the parts to run, and sizes shrink with CHURCH_IMAGES,
# DEFAULT_IMAGES, ROWS, STEPS for a dry run on a CPU.
set -uo pipefail
: "${OUT:?set OUT to a folder for the results}"
BUDGET=${BUDGET:-540} STEPS=${STEPS:-20}
CHURCH_IMAGES=${CHURCH_IMAGES:-512} DEFAULT_IMAGES=${DEFAULT_IMAGES:-4096} ROWS=${ROWS:-1024}
PARTS=${PARTS:-example church-folder bench-church noise bench-default overhead actor}
started=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - started) )); }
part() {  # part NAME MIN_S MAX_S COMMAND...: COMMAND under min(MAX_S, what is left) seconds
  local name=$1 need=$2 most=$3 begun; shift 3
  case " $PARTS " in *" $name "*) ;; *) return ;; esac
  if [ "$(left)" -lt "$need" ]; then echo "== $name: skipped, $(left) s left"; return; fi
  local limit=$(( $(left) - 5 < most ? $(left) - 5 : most ))
  echo "== $name (limit $limit s)"; begun=$(date +%s)
  timeout "$limit" "$@"; echo "== $name: exit $? after $(( $(date +%s) - begun )) s"
}
mkdir -p "$OUT" /tmp/site /tmp/bin
printf '#!/bin/sh\nexec python3 -c "from pipeline.cli import main; main()" "$@"\n' >/tmp/bin/sdedit
chmod +x /tmp/bin/sdedit
export PATH=/tmp/bin:$PATH
{
  if [ -d .gpu ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .gpu/*.whl && xz -dc .gpu/ray.tar.xz | tar x -C /tmp/site || exit 1
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  nproc; uname -r; free -g | head -2  # kernel 4.4.0: gVisor (slower syscalls: Ray, files)
  python3 -c 'import sys, torch, diffusers, ray, pyarrow
print(sys.version.split()[0], "torch", torch.__version__, "diffusers", diffusers.__version__,
      "ray", ray.__version__, "pyarrow", pyarrow.__version__, "cuda", torch.cuda.is_available())'

  part example 60 150 bash -c 'sdedit run pipeline/examples/manifest.parquet /tmp/example \
    --steps 50 && tar cf "$OUT/example.tar" -C /tmp/example data summary.json'
  part church-folder 30 60 python3 -c 'import sys; sys.path.insert(0, "benchmarks")
from pathlib import Path; from bench_gpu_edit import church_folder; church_folder(Path("/tmp"))'
  part bench-church 120 240 sdedit bench --model /tmp/church --size 256 --images "$CHURCH_IMAGES" \
    --t0 0.5 --steps "$STEPS" --batch-size 64 --model-batch 64 --dtype bfloat16 \
    --workdir /tmp/bench-church --out "$OUT/bench_church.json"
  part noise 40 90 python3 benchmarks/gpu_noise_check.py --church --out "$OUT/noise.npz"
  part bench-default 60 150 sdedit bench --model default --size 32 --images "$DEFAULT_IMAGES" \
    --t0 0.5 --steps "$STEPS" --batch-size 512 --model-batch 256 --workdir /tmp/bench-default \
    --out "$OUT/bench_default.json"
  part overhead 40 90 python3 benchmarks/bench_overhead.py --images "$DEFAULT_IMAGES"
  part actor 60 180 python3 benchmarks/gpu_actor_check.py --rows "$ROWS" --model-batch 256 \
    --steps "$STEPS" --variants float32,bfloat16,bfloat16+compile --out "$OUT/actor_check.json"
  echo "total $(( $(date +%s) - started )) s"
} 2>&1 | tee "$OUT/check.log"
