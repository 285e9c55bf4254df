"""Backends every test can run on: NumPy, array-api-strict, torch (CPU), CuPy (GPU).

``backend`` gives an object with ``asarray`` (NumPy -> that library, on its
device) and ``to_numpy``.  A backend that is not installed is skipped with the
reason; CuPy needs a working GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from xopt import _backend

HERE = Path(__file__).parent

# The Dask clusters tests start (and their workers, which take the config from their nanny): no sampling profiler
# (every 10 ms), and the event loop's tick and the memory and system monitors every 1-2 s instead of every
# 20-500 ms.  An idle two-worker cluster then takes about 1 % of a core instead of 10 %; no test reads them.
# Environment variables: dask reads them when first imported, after this file.
for _key, _value in {"DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
                     "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "1s",
                     "DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL": "1s",
                     "DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL": "2s"}.items():
    os.environ.setdefault(_key, _value)


@dataclass
class Backend:
    name: str
    xp: Any
    asarray: Callable
    to_numpy: Callable = _backend.to_numpy

    def __repr__(self):
        return self.name


def _numpy():
    return Backend("numpy", np, lambda a: np.array(a, copy=True))


def _strict():
    xps = pytest.importorskip("array_api_strict")
    return Backend("array_api_strict", xps, lambda a: xps.asarray(np.array(a, copy=True)))


def _torch():
    torch = pytest.importorskip("torch")
    return Backend("torch", torch, lambda a: torch.asarray(np.array(a, copy=True)))


def _cupy():
    cupy = pytest.importorskip("cupy")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device
        pytest.skip(f"CuPy is installed but no GPU is usable: {exc}")
    return Backend("cupy", cupy, cupy.asarray)


BACKENDS = [
    pytest.param(_numpy, id="numpy"),
    pytest.param(_strict, id="array_api_strict"),
    pytest.param(_torch, id="torch"),
    pytest.param(_cupy, id="cupy", marks=pytest.mark.gpu),
]


@pytest.fixture(scope="session", autouse=True)
def one_thread_for_torch_and_blas():
    """torch's and BLAS's thread pools (the comparisons' and the examples' matmuls) on one thread; xopt's own
    threads are left alone.  Their idle threads spin after each small op: that was CPU time taken from the
    other core, and no test reads their timing or depends on their thread count (elementwise results are the
    same on any number of threads)."""
    torch = sys.modules.get("torch")  # imported by the test modules, if at all, at collection
    torch_threads = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits  # scikit-learn's dependency
    except ImportError:
        blas = contextlib.nullcontext()
    else:
        blas = threadpool_limits(1, user_api="blas")
    with blas:
        yield
    if torch:
        torch.set_num_threads(torch_threads)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param()


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: fresh inputs per test, the same on every run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def torch_float64():
    """torch's default dtype float64 for a test: torch keeps some per-step scalars (NAdam's mu_product) in it."""
    torch = pytest.importorskip("torch")
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.fixture
def lane(monkeypatch):
    """What the exact-type lane answered at each update (``xopt._lane.take``) and at each step of an xopt.torch
    optimizer (``take_tensors``, then ``take`` where it declines): True where it took the step."""
    from xopt import _lane

    answers = []

    def spy(real):
        def answer(*args):
            answers.append(real(*args))
            return answers[-1]

        return answer

    monkeypatch.setattr(_lane, "take", spy(_lane.take))
    if "torch" in sys.modules:  # imported by the test modules, if at all, at collection
        from xopt import _torch_front  # calls take_tensors by the name it imported

        monkeypatch.setattr(_torch_front, "take_tensors", spy(_torch_front.take_tensors))
    return answers


@pytest.fixture
def parallel_from(monkeypatch):
    """``parallel_from(n)``: steps of at least ``n`` elements split over threads, for the test.  Each engine
    module that reads ``PARALLEL_MIN`` holds its own name for it (imported from ``cpu_step``): all are set."""
    from xopt.engines import cpu_arrays, cpu_blockwise, cpu_factored, cpu_step, fused_cpu

    def set_to(n):
        for module in (cpu_step, cpu_arrays, cpu_blockwise, cpu_factored, fused_cpu):
            monkeypatch.setattr(module, "PARALLEL_MIN", n)

    return set_to


@pytest.fixture
def cuda_cache_dir(tmp_path, monkeypatch):
    """xopt's CUDA disk cache (kernels, self-check verdicts) in a new folder for this test."""
    from xopt.engines import cuda_cache

    folder = tmp_path / "cuda-cache"
    monkeypatch.setenv(cuda_cache.ENV, str(folder))
    cuda_cache.directory.cache_clear()
    yield folder
    cuda_cache.directory.cache_clear()


@pytest.fixture(scope="session")
def host_kernel(tmp_path_factory):
    """xopt/engines/cuda/optimizers.cu built for the CPU (``tests/cuda_host.cpp``), once for the whole session:
    the CUDA-source tests of every module share it."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build xopt/engines/cuda/optimizers.cu for the CPU")
    lib = tmp_path_factory.mktemp("cuda_host") / "cuda_host.so"
    subprocess.run([cxx, "-O1", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-Wall", "-Werror",
                    "-o", str(lib), str(HERE / "cuda_host.cpp")], check=True, capture_output=True)
    so = ctypes.CDLL(str(lib))
    so.xopt_host_launch.restype = ctypes.c_int
    so.xopt_host_wide_accesses.restype = ctypes.c_longlong
    return so
