#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one call of the device tool:
#   the GPU tests (CuPy reference path, tests/test_fused_gpu.py for the CUDA kernels) and the GPU benchmark.
#
# Here, once (the device image has Python 3.12, CuPy 14 for CUDA 13, numba, torch, ml-dtypes, matplotlib, tqdm,
# pytest, hypothesis: it lacks only array-api-compat, and array-api-strict for the strict backend's tests):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl array-api-compat array-api-strict \
#     nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump   # for tests/test_cuda_build.py's SASS checks (5.5 MB)
# Then: run(command="bash tools/gpu_run.sh", carry=[".whl"]) and commit $OUT/gpu-*/ under benchmarks/results/.
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
# The kernels' self-check on this GPU (what impl="auto" runs before it trusts a kernel), every rule and dtype.
python3 -c "
from xopt.engines import cuda_check, fused_cuda
for rule in sorted({r for r, _, _ in fused_cuda.KERNELS.values()}):
    for dtype in fused_cuda.PTYPES:
        print(cuda_check.self_check(rule, dtype))
" 2>&1 | tee "$OUT/self-check.txt"
# The gpu-marked tests, and the kernel source built and run on the CPU beside them (skipped if the image lacks
# g++/nvcc/nvdisasm).
python3 -m pytest -q -p no:cacheprovider -m "gpu or cuda_source" tests/ 2>&1 | tail -40 | tee "$OUT/gpu-tests.txt"
python3 -m xopt.bench.cli --device gpu --optimizers Adam,RMSprop,SGD --sizes 2^20,2^24,2^28 --tensors 10000 \
  --repeat 7 --out "$OUT/gpu-$(date +%F)" 2>"$OUT/bench-stderr.txt" | tee "$OUT/gpu-bench.txt"
