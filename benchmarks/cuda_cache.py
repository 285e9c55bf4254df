"""First use of CUDA kernels in a first and a second process sharing the disk cache (xopt.engines.cuda_cache).

Each process takes the kernel instances through ``cuda_device._function``, the path a launch takes on a GPU,
and reports how many times NVRTC compiled and how long the calls took.  No GPU is needed: CuPy's ``-arch`` rule
is given an H100's compute capability (sm_90, as tests/test_cuda_build.py does) and the driver's part
(``cupy.cuda.function.Module``: loading the cubin into a context) is a stub that keeps the cubin.  The import of
xopt is left out of the time.  tests/test_cuda_cache.py runs the same child processes.

    python benchmarks/cuda_cache.py [--instances 4:float32,4:float16,7:float64,norm:float32]
    python benchmarks/cuda_cache.py --child DIR NAME...   (one process: prints one JSON line)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(folder, names):
    """One process's first use of the kernels ``names`` with the cache in ``folder``: a JSON line."""
    os.environ["XOPT_CUDA_CACHE_DIR"] = folder
    from cupy.cuda import compiler, function

    compiler._get_arch_for_options_for_nvrtc = lambda arch=None: ("-arch=sm_90", "cubin")  # CuPy's rule, an H100
    compiles, real = [], compiler._NVRTCProgram.compile
    compiler._NVRTCProgram.compile = lambda self, *a, **k: (compiles.append(1), real(self, *a, **k))[1]

    class Module:  # the driver's part of cupy.cuda.function.Module
        def load(self, cubin):
            self.cubin = cubin

        def get_function(self, name):
            return hashlib.sha256(self.cubin).hexdigest(), name

    function.Module = Module
    from xopt.engines import cuda_device

    t0 = time.perf_counter()
    found = [cuda_device._function(0, name) for name in names]
    print(json.dumps({"nvrtc": len(compiles), "functions": found, "seconds": time.perf_counter() - t0}))


def run_child(folder, names):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, __file__, "--child", str(folder), *names], capture_output=True,
                          text=True, timeout=600, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the process failed: {done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    parser.add_argument("--instances", default="4:float32,4:float16,7:float64,norm:float32",
                        help="RULE:DTYPE or norm:DTYPE, comma-separated")
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child[0], args.child[1:])
    sys.path.insert(0, str(ROOT))
    from xopt.engines import cuda_device

    names = [cuda_device.norm_name(d) if r == "norm" else cuda_device.kernel_name(int(r), d)
             for r, d in (item.split(":") for item in args.instances.split(","))]
    with tempfile.TemporaryDirectory() as folder:
        for which in ("first", "second"):
            found = run_child(folder, names)
            print(f"{which} process: {len(names)} instances, NVRTC called {found['nvrtc']} times, "
                  f"{found['seconds']:.3f} s")


if __name__ == "__main__":
    main()
