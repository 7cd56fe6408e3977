#!/usr/bin/env bash
# The wheels bench/gpu.sh needs on a GPU machine without internet, downloaded here (with internet)
# into .whl/ at the repository root (ignored by git; carry it along with the repository).
#
#   bash bench/gpu_wheels.sh
#
# For this workplace's H200 image (/work/.library/device/KINDS.md): Python 3.12 on x86-64 Linux with
# torch 2.11 (CUDA 13.0), transformers, peft and safetensors, but no diffusers and no bitsandbytes.
# So: diffusers at constraints.txt's version and the two packages it needs that the image lacks
# (importlib_metadata and its lazy-importer), and bitsandbytes 0.50.2, whose wheel carries a CUDA 13.0
# library (libbitsandbytes_cuda130.so). About 47 MiB; each wheel without its dependencies (--no-deps).
# PYVER=3.11 (say) fetches for another Python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
pin() { grep -i "^$1==" "$ROOT/constraints.txt"; }
mkdir -p "$ROOT/.whl"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$ROOT/.whl" "$(pin diffusers)" "$(pin importlib_metadata)" "$(pin lazy-importer)" bitsandbytes==0.50.2
ls -l "$ROOT/.whl"
