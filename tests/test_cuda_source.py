"""The CUDA kernel source, checked without a GPU: built by nvcc, and run on the CPU.

``tests/cuda_host.cpp`` builds ``xopt/engines/cuda/optimizers.cu`` with the host C++ compiler and runs
each launch block by block, thread by thread.  The tests below put that build in the place of
CuPy (``fused_cuda.DEVICE``), so ``update()`` goes through xopt.engines.fused_cuda's own dispatch, tables,
scalars and plan, and the results must equal the array-API reference bit for bit.  What they
cannot show is anything about the GPU itself; ``tests/test_fused_gpu.py`` does, on a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xopt
from xopt import _dispatch
from xopt.engines import fused_cpu, fused_cuda
from xopt._plan import FusedPlan
from test_edges import CONFIGS, make

pytestmark = pytest.mark.cuda_source

HERE = Path(__file__).parent
DTYPES = [np.float16, np.float32, np.float64]
C = fused_cuda.CHUNK
SHAPES = [(), (0,), (1, 0, 2), (7,), (3, 5), (C - 1,), (C,), (2 * C + 3,)]  # one launch for all of them


@pytest.fixture(scope="session")
def host_kernel(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build xopt/engines/cuda/optimizers.cu for the CPU")
    lib = tmp_path_factory.mktemp("cuda_host") / "cuda_host.so"
    subprocess.run([cxx, "-O1", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-Wall", "-Werror",
                    "-o", str(lib), str(HERE / "cuda_host.cpp")], check=True, capture_output=True)
    launch = ctypes.CDLL(str(lib)).xopt_host_launch
    launch.restype = ctypes.c_int
    return launch


class HostDevice:
    """fused_cuda.CupyDevice's interface over NumPy arrays and the CPU build of the kernel."""

    launches = 0
    launch_fn = None
    current = None  # the "GPU" entered with on()
    launched_on = []  # (current GPU, sizes in the table) per launch

    address = staticmethod(lambda a: a.ctypes.data)
    device_of = staticmethod(lambda a: 0)

    @classmethod
    @contextlib.contextmanager
    def on(cls, device_id):
        before, cls.current = cls.current, device_id
        try:
            yield
        finally:
            cls.current = before
    upload = staticmethod(lambda host: np.array(host, copy=True, order="C"))

    @staticmethod
    def set_row(table, row, host):
        table[row] = host

    @staticmethod
    def function(rule, dtype):
        return rule, np.dtype(dtype).itemsize * 8

    @classmethod
    def launch(cls, function, n_blocks, args):
        (rule, bits), (addresses, sizes, blocks, n_tensors), scalars = function, args[:4], args[4:]
        assert all(type(s) is type(scalars[0]) for s in scalars), "scalars of mixed types"
        s = np.array(scalars, dtype=np.float64)
        ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
        rc = cls.launch_fn(rule, bits, n_blocks, fused_cuda.THREADS, ptr(addresses), ptr(sizes), ptr(blocks),
                           int(n_tensors), ptr(s))
        assert rc == 0, f"no kernel for rule {rule}, {bits}-bit params"
        cls.launches += 1
        cls.launched_on.append((cls.current, sizes.tolist()))


@pytest.fixture
def cuda_on_cpu(host_kernel, monkeypatch):
    """Route NumPy arrays to xopt.engines.fused_cuda, running on the CPU build of its kernel."""
    monkeypatch.setattr(HostDevice, "launch_fn", host_kernel)
    monkeypatch.setattr(HostDevice, "launches", 0)
    monkeypatch.setattr(HostDevice, "launched_on", [])
    monkeypatch.setattr(fused_cuda, "DEVICE", HostDevice)
    monkeypatch.setattr(fused_cuda, "accepts",
                        lambda opt, e: type(e.p) is np.ndarray and type(e.g) is np.ndarray and not e.rebind
                        and e.p.dtype.name in fused_cuda.PTYPES)
    monkeypatch.setattr(_dispatch, "_fused_cpu", lambda: None)
    monkeypatch.setattr(_dispatch, "_fused_cuda", lambda: fused_cuda)
    return HostDevice


def _run(config, params, grads_seq, **extra):
    opt = make(config, **extra)
    params = {k: v.copy() for k, v in params.items()}
    with np.errstate(all="ignore"):
        for g in grads_seq:
            opt.update(params, g)
    return opt, params


def _assert_same(ref, ours, a, b, what):
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=f"{what}: param {k}")
        for name in ref.buffers():
            np.testing.assert_array_equal(ours.state[k][name], ref.state[k][name], err_msg=f"{what}: {name} of {k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", CONFIGS)
def test_kernel_equals_reference_bit_for_bit(config, dtype, cuda_on_cpu, rng):
    params = {f"p{i}": np.array(rng.standard_normal(s), dtype=dtype) for i, s in enumerate(SHAPES)}
    grads_seq = [{k: np.array(rng.standard_normal(v.shape) + 0.1, dtype=dtype) for k, v in params.items()}
                 for _ in range(4)]
    grads_seq[2]["p3"][4] = np.nan  # NaN goes where the reference sends it (amsgrad's maximum included)
    ref, a = _run(config, params, grads_seq, impl="reference")
    ours, b = _run(config, params, grads_seq, impl="fused")
    assert cuda_on_cpu.launches == 4, "one launch per step for all the tensors"
    _assert_same(ref, ours, a, b, config)


@pytest.mark.parametrize("config", ["SGD-nesterov-wd", "RMSprop-all", "Adam-amsgrad-wd"])
def test_non_contiguous_params_and_grads(config, cuda_on_cpu, rng):
    base = rng.standard_normal((8, 12)).astype(np.float32)
    a_base, b_base = base.copy(), base.copy()
    ref, ours = make(config, impl="reference"), make(config, impl="fused")
    for _ in range(3):
        g = {"p": rng.standard_normal((6, 4)).T, "q": rng.standard_normal((4, 12)).T}  # float64, transposed
        ref.update({"p": a_base[::2, 1::2], "q": a_base[1::2].T}, g)
        ours.update({"p": b_base[::2, 1::2], "q": b_base[1::2].T}, g)
    assert cuda_on_cpu.launches == 3
    np.testing.assert_array_equal(b_base, a_base)


def test_many_tensors_one_launch_per_step_through_the_plan(cuda_on_cpu, rng):
    sizes = rng.integers(64, 4097, 2000)
    params = {f"w{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)}
    grads_seq = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()} for _ in range(5)]
    ref, a = _run("Adam", params, grads_seq, impl="reference")
    ours, b = _run("Adam", params, grads_seq, impl="fused")
    assert cuda_on_cpu.launches == 5
    assert ours._plan is not None and ours._plan.engine is fused_cuda, "steps 2-5 should take the plan"
    _assert_same(ref, ours, a, b, "2,000 tensors")


def test_plan_sees_new_grad_arrays_each_step(cuda_on_cpu, rng):
    """The plan keeps the params' addresses but must read each step's grads where they are now."""
    p = {"a": rng.standard_normal(100), "b": rng.standard_normal(3)}
    ref, ours = xopt.Adam(impl="reference"), xopt.Adam(impl="fused")
    a, b = {k: v.copy() for k, v in p.items()}, {k: v.copy() for k, v in p.items()}
    for _ in range(4):
        g = {k: rng.standard_normal(v.shape) for k, v in p.items()}  # fresh arrays every step
        ref.update(a, g)
        ours.update(b, {k: v.copy() for k, v in g.items()})
    _assert_same(ref, ours, a, b, "fresh grads")


def test_one_launch_per_gpu_and_no_plan_across_gpus(cuda_on_cpu, monkeypatch, rng):
    """Params on two GPUs: a table and a launch for each, on its own GPU; the plan declines a mixed set."""
    monkeypatch.setattr(HostDevice, "device_of", staticmethod(lambda a: a.size % 2))  # odd sizes on "GPU 1"
    params = {f"w{i}": rng.standard_normal(n) for i, n in enumerate([10, 11, 12, 13, 1])}
    grads_seq = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(3)]
    ref, a = _run("Adam-amsgrad-wd", params, grads_seq, impl="reference")
    ours, b = _run("Adam-amsgrad-wd", params, grads_seq, impl="fused")
    assert cuda_on_cpu.launches == 6 and ours._plan is None
    for device_id, sizes in cuda_on_cpu.launched_on:
        assert {n % 2 for n in sizes} == {device_id}, "a launch touched another GPU's arrays"
    _assert_same(ref, ours, a, b, "two GPUs")


def test_plan_follows_a_change_of_impl(cuda_on_cpu, rng):
    """impl='auto' does not take the unverified CUDA kernel: switching to it must end the fused plan."""
    params, opt = {"w": rng.standard_normal(50)}, xopt.Adam(impl="fused")
    for _ in range(2):
        opt.update(params, {"w": rng.standard_normal(50)})
    assert cuda_on_cpu.launches == 2 and opt._plan is not None
    opt.impl = "auto"
    opt.update(params, {"w": rng.standard_normal(50)})
    assert cuda_on_cpu.launches == 2 and not isinstance(opt._plan, FusedPlan)


def test_half_params_keep_a_small_eps(cuda_on_cpu):
    """eps=1e-8 is 0 in float16: the kernel takes its scalars in float (the math type)."""
    p = np.zeros(4, dtype=np.float16)
    xopt.Adam(eps=1e-8, eps_hat=False, impl="fused").update({"p": p}, {"p": np.zeros(4, dtype=np.float16)})
    assert cuda_on_cpu.launches == 1 and not np.isnan(p).any()


@pytest.mark.parametrize("sizes", [[], [0], [0, 0, 5], [1, C, C + 1, 3 * C, 7], list(range(0, 5 * C, 997))])
def test_block_table_covers_each_element_once(sizes):
    blocks = fused_cuda.block_table(sizes)
    assert blocks.dtype == np.int32 and blocks.shape[1] == 2
    covered = [np.zeros(n, dtype=np.int64) for n in sizes]
    for t, chunk in blocks:
        lo = int(chunk) * C
        assert lo < sizes[t], "a block with nothing to do"
        covered[t][lo:lo + C] += 1
    assert all((c == 1).all() for c in covered)


def test_nvcc_builds_every_kernel_instance(tmp_path):
    """The kernels CuPy will ask for (kernel_name), built by nvcc with xopt's options, for Hopper."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    names = []
    lines = [f'#include "{fused_cuda.SOURCE}"']
    for rule in sorted({r for r, _, _ in fused_cuda.KERNELS.values()}):
        for dtype in DTYPES:
            name, math = fused_cuda.kernel_name(rule, dtype), fused_cuda.PTYPES[np.dtype(dtype).name][1]
            names.append(name)
            lines.append(f"template __global__ void {name}(const unsigned long long*, const long long*, "
                         f"const int*, int, {', '.join([math] * fused_cuda.N_SCALARS)});")
    src = tmp_path / "instances.cu"
    src.write_text("\n".join(lines) + "\n")
    ptx = tmp_path / "instances.ptx"
    subprocess.run([nvcc, "-arch=sm_90", *fused_cuda.OPTIONS, "-Werror", "all-warnings", "-ptx", str(src),
                    "-o", str(ptx)], check=True, capture_output=True, text=True)
    text = ptx.read_text()
    assert text.count(".entry ") == len(names) == 30
    assert "fma." not in text, "--fmad=false should leave no fused multiply-add"
    assert "cvt.rn.f16.f32" in text and "cvt.f32.f16" in text  # half params converted in the kernel


_ASAN_DRIVER = r"""
import ctypes, sys
import numpy as np
sys.path[:0] = [sys.argv[2], sys.argv[3]]
from xopt.engines import fused_cuda
from test_cuda_source import HostDevice, SHAPES, DTYPES
from test_edges import CONFIGS, make

HostDevice.launch_fn = ctypes.CDLL(sys.argv[1]).xopt_host_launch
fused_cuda.DEVICE = HostDevice
rng = np.random.default_rng(0)
for config in CONFIGS:
    for dtype in DTYPES:
        opt = make(config)
        math = np.float64 if dtype == np.float64 else np.float32
        ps = [np.array(rng.standard_normal(s), dtype=dtype) for s in SHAPES]   # each its own allocation
        gs = [np.array(rng.standard_normal(s), dtype=dtype) for s in SHAPES]
        states = [{name: np.full(s, 0.5, dtype=math) for name in opt.buffers()} for s in SHAPES]
        table = fused_cuda.Table(opt, ps, states, np.dtype(dtype))
        for step in (1, 2):
            table.run(opt, gs, opt.scalars(step))
print("launches", HostDevice.launches)
"""


def test_kernel_stays_in_bounds_under_address_sanitizer(tmp_path):
    """Every rule, dtype and configuration over the edge shapes, each array its own allocation, with
    AddressSanitizer watching every load and store of the kernel (a read or write one past an array fails)."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the kernel with AddressSanitizer")
    libasan = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not Path(libasan).is_file():
        pytest.skip("g++ has no AddressSanitizer runtime here")
    lib = tmp_path / "cuda_host_asan.so"
    subprocess.run([cxx, "-O1", "-g", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fsanitize=address",
                    "-o", str(lib), str(HERE / "cuda_host.cpp")], check=True, capture_output=True)
    env = {**os.environ, "LD_PRELOAD": libasan, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0"}
    out = subprocess.run([sys.executable, "-c", _ASAN_DRIVER, str(lib), str(HERE), str(HERE.parent)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert "AddressSanitizer" not in out.stderr, out.stderr[-3000:]
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"launches {len(CONFIGS) * len(DTYPES) * 2}" in out.stdout
