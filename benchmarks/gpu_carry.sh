#!/usr/bin/env bash
# Builds .gpu/, what benchmarks/gpu_pipeline_check.sh needs carried to a GPU machine whose image
# has torch (Python 3.12) but neither Ray nor diffusers: their wheels and the missing needs, and
# Ray itself as ray.tar.xz, because its wheel (79 MB) is over the 64 MiB a `device` call carries.
# The tarball leaves out what the job never loads (ray/jars, ray/rllib, ray/llm and the
# dashboard's web build; the job starts Ray without its dashboard): 25 MB. Run from the
# repository root, with pip able to reach PyPI; .gpu/ is added to .git/info/exclude.
#   bash benchmarks/gpu_carry.sh      # then carry [".gpu"]
set -euo pipefail
RAY=${RAY:-2.60.0} DIFFUSERS=${DIFFUSERS:-0.42.1}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo /.gpu/ >>.git/info/exclude; }
rm -rf .gpu && mkdir -p .gpu
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$scratch" "ray==$RAY" "diffusers==$DIFFUSERS" \
  importlib_metadata==8.7.0 jsonschema jsonschema-specifications referencing rpds-py
mv "$scratch"/diffusers-* "$scratch"/importlib_metadata-* "$scratch"/jsonschema* \
  "$scratch"/referencing-* "$scratch"/rpds_py-* .gpu/
mkdir "$scratch/ray" && unzip -q "$scratch"/ray-*.whl -d "$scratch/ray"  # keeps exec bits
rm -rf "$scratch"/ray/ray/{jars,rllib,llm,dashboard/client/build}
tar cf - -C "$scratch/ray" . | xz -9 -T0 >.gpu/ray.tar.xz
du -sh .gpu/*
