#!/usr/bin/env bash
# Runs tools/first_gpu.py on a machine with an NVIDIA GPU, its results in $OUT (default ./out):
#   first-gpu.jsonl (one JSON object per result, written as each comes), first-gpu.log (every part's output),
#   gpu-tests.txt and gpu-tests.xml (pytest -m gpu).  Extra arguments go to first_gpu.py (--budget-s, --parts).
#
# For a GPU machine without network access whose Python has CuPy, numba, torch, ml_dtypes and pytest but not
# array-api-compat (which xopt imports): put that wheel in .whl/ beforehand, on a machine with network, from
# the repository's root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl array-api-compat
# (.whl/ is in .gitignore) and copy the tree with .whl/ to the GPU machine; this script installs it first.
# first_gpu.py's default budget (480 s for all its parts) leaves room for the install within a 10-minute limit.
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
exec python3 tools/first_gpu.py --out "${OUT:-out}" "$@"
