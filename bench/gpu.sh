#!/usr/bin/env bash
# Every figure only a GPU can show, in one run of under 8 minutes on one H100/H200-class card:
# bench/gpu.py does the work (its docstring lists the rows); this wrapper only prepares Python.
#
#   bash bench/gpu.sh                          # on the GPU machine: prints one markdown table
#   bash bench/gpu.sh --device cpu --dry-run   # the same code path on the tiny config (tests/test_bench_gpu.py)
#   OUT=/some/dir bash bench/gpu.sh            # also writes gpu_results.md, gpu_results.json, gpu_log.txt there
#
# A machine without internet gets its missing packages as wheels in .whl/ at the repository root
# (bench/gpu_wheels.sh downloads them on a machine with internet; MINSDXL_WHEELS names another
# folder, or none when empty). They go into a folder of their own on PYTHONPATH, never over the
# machine's packages. The repository is used in place (PYTHONPATH): nothing of it is built or
# installed. PYTHON picks the interpreter (default python3).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="${MINSDXL_WHEELS-$ROOT/.whl}"
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE="${TMPDIR:-/tmp}/minsdxl-gpu-site"
  STAMP="$(ls -l "$WHEELS"/*.whl | cksum)"  # the same wheels as last time: already installed
  if [ "$(cat "$SITE/.wheels" 2>/dev/null)" != "$STAMP" ]; then
    echo "gpu.sh: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
    rm -rf "$SITE"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl; then
      echo "$STAMP" >"$SITE/.wheels"
    else
      echo "gpu.sh: the wheels did not install; the rows that need them will say so"
    fi
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec "$PY" "$ROOT/bench/gpu.py" "$@"
