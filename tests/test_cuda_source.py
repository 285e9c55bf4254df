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
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xopt
from xopt import _dispatch
from xopt.engines import cuda_check, fused_cpu, fused_cuda
from test_edges import CUDA_CONFIGS as CONFIGS, make

pytestmark = pytest.mark.cuda_source

HERE = Path(__file__).parent
ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float16, BF16, np.float32, np.float64]
C = fused_cuda.CHUNK
SHAPES = [(), (0,), (1, 0, 2), (7,), (3, 5), (C - 1,), (C,), (2 * C + 3,)]  # one launch for all of them


def type_code(dtype):
    """How tests/cuda_host.cpp names a type: 16 half, 116 bfloat16, 32 float, 64 double."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    return {"float16": 16, "bfloat16": 116, "float32": 32, "float64": 64}[name]


def tensor_numpy(t):
    """A NumPy view of CPU tensor ``t``'s memory; a bfloat16 one as ml_dtypes' bfloat16 (torch's .numpy() has none)."""
    import torch

    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def at(address, dtype, count):
    """``count`` elements of ``dtype`` at ``address`` (a NumPy view: what a launch's table holds there)."""
    dtype = np.dtype(dtype)
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.frombuffer((ctypes.c_char * (count * dtype.itemsize)).from_address(int(address)), dtype)


class HostDevice:
    """fused_cuda.CupyDevice's interface over NumPy arrays and the CPU build of the kernel.

    The lane takes NumPy arrays here (and CuPy arrays made over host memory: their addresses are the host's)."""

    launches = 0
    lib = None
    current = None  # the "GPU" entered with on()
    launched_on = []  # (current GPU, sizes in the table) per step launch
    wide = []  # 16-byte accesses per step launch
    uploads = []  # the tables uploaded
    norms = 0  # norm-pass launches

    address = staticmethod(lambda a: a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr)
    device_of = staticmethod(lambda a: 0 if isinstance(a, np.ndarray) else a.data.device_id)
    download = staticmethod(np.asarray)

    @staticmethod
    def takes(array_type):
        cupy = sys.modules.get("cupy")
        return array_type is np.ndarray or (cupy is not None and array_type is cupy.ndarray)

    @classmethod
    def current_device(cls):
        return 0 if cls.current is None else cls.current

    @staticmethod
    def identity(device_id):
        return f"the kernel's CPU build ({device_id})"

    exclusive = staticmethod(lambda device_id: False)  # the compute mode: any process may use the "GPU"
    takes_tensor = staticmethod(lambda t: t.is_cpu)  # torch's CPU tensors stand for its CUDA ones
    tensor_device = staticmethod(lambda t: 0)
    tensor_devices = staticmethod(lambda ts: {0 if t.is_cpu else -1 for t in ts})  # CPU tensors: "GPU" 0
    tensor_stream = staticmethod(lambda t: contextlib.nullcontext())

    @classmethod
    @contextlib.contextmanager
    def on(cls, device_id):
        before, cls.current = cls.current, device_id
        try:
            yield
        finally:
            cls.current = before

    @classmethod
    def upload(cls, host):
        if host.dtype == np.uint8:  # a step's table (the self-check uploads its arrays too)
            cls.uploads.append(host.copy())
        return np.array(host, copy=True, order="C")

    scratch = staticmethod(lambda nbytes: np.full(nbytes, 0xFF, dtype=np.uint8))  # not zeroed, as on a GPU
    scale = staticmethod(lambda clip, dtype: np.array(clip, dtype=dtype).reshape(1))

    @staticmethod
    def function(rule, dtype, state=None):
        return rule, type_code(dtype), 0 if state is None else type_code(state)

    @staticmethod
    def norm_function(dtype):
        return "norm", type_code(dtype)

    @staticmethod
    def function8(rule, dtype):
        return "8bit", rule, type_code(dtype)

    @classmethod
    def launcher(cls, function, n_blocks, args):
        return functools.partial(cls.launch, function, n_blocks, args)

    @classmethod
    def select(cls, device_id):
        return functools.partial(setattr, cls, "current", device_id)

    stream = 0  # the "current stream"
    last = {}  # GPU -> the stream of the last launch recorded (CupyDevice.ordered's bookkeeping)
    waits = []  # (GPU, the stream that waited, the stream it waited for)

    @classmethod
    def ordered(cls, device_id):
        last = cls.last.get(device_id)
        if last is not None and last != cls.stream:
            cls.waits.append((device_id, cls.stream, last))
        return [functools.partial(cls.last.__setitem__, device_id, cls.stream)]

    @classmethod
    def launch(cls, function, n_blocks, args):
        if function[0] == "8bit":
            return cls.launch8(function, n_blocks, args)
        kernel, bits, state = function if len(function) == 3 else (*function, 0)
        assert type(args[3]) is np.int32 and all(type(a) is np.uint64 for a in args[:3]), "table, sizes, blocks, n"
        n_tensors = int(args[3])
        ptrs, sizes, blocks = (ctypes.c_void_p(int(a)) for a in args[:3])
        if kernel == "norm":
            sums, done, out, scale, max_norm = args[4:]
            assert all(type(a) is np.uint64 for a in (sums, done, out, scale)) and type(max_norm) is np.float64
            rc = cls.lib.xopt_host_norm(bits, n_blocks, fused_cuda.THREADS, ptrs, sizes, blocks, n_tensors,
                                        *(ctypes.c_void_p(int(a)) for a in (sums, done, out, scale)),
                                        ctypes.c_double(max_norm))
            assert rc == 0, f"no norm kernel for {bits}-bit grads"
            cls.norms += 1
            return
        clip, scalars = args[4:]
        assert type(clip) is np.uint64 and type(scalars) is np.uint64, "the clip scale's and the scalars' addresses"
        rc = cls.lib.xopt_host_launch(kernel, bits, state, n_blocks, fused_cuda.THREADS, ptrs, sizes, blocks,
                                      n_tensors, ctypes.c_void_p(int(clip)), ctypes.c_void_p(int(scalars)))
        assert rc != 2, "a 16-byte access at an address that is not 16-byte aligned"
        assert rc == 0, f"no kernel for rule {kernel}, params of type {bits}, state of type {state}"
        cls.launches += 1
        cls.launched_on.append((cls.current, at(args[1], np.int64, n_tensors).tolist()))
        cls.wide.append(cls.lib.xopt_host_wide_accesses())


    launches8 = []  # (rule, param type, blocks, sizes, block_size, maps) per 8-bit step launch

    @classmethod
    def launch8(cls, function, n_blocks, args):
        """xopt_step8's launch (xopt.engines.cuda_blockwise): the table, sizes, blocks, n, clip, scalars, the
        quantization block and the maps."""
        _, rule, bits = function
        assert all(type(a) is np.uint64 for a in (*args[:3], *args[4:6])) and type(args[3]) is np.int32
        assert type(args[6]) is np.int32 and type(args[7]) is np.int32, "block_size and maps as int32"
        n_tensors = int(args[3])
        rc = cls.lib.xopt_host_step8(rule, bits, n_blocks, fused_cuda.THREADS,
                                     *(ctypes.c_void_p(int(a)) for a in args[:3]), n_tensors,
                                     *(ctypes.c_void_p(int(a)) for a in args[4:6]), int(args[6]), int(args[7]))
        assert rc == 0, f"no 8-bit kernel for rule {rule}, params of type {bits}, block_size {int(args[6])}"
        cls.launches8.append((rule, bits, n_blocks, at(args[1], np.int64, n_tensors).tolist(), int(args[6]),
                              int(args[7])))


def grads_read(args):
    """The grad row of a step launch's table: the addresses the kernel reads its grads from."""
    n = int(args[3])
    return at(int(args[0]) + 8 * n, np.int64, n).tolist()


def nudge_first_scalar(function, n_blocks, args):
    """The first scalar of each part a step launch runs, one ulp up (a kernel made wrong)."""
    math = np.float64 if function[1] == 64 else np.float32
    for part in set(at(args[2], np.int32, 4 * n_blocks)[3::4].tolist()):
        first = at(int(args[5]) + part * fused_cuda.N_SCALARS * np.dtype(math).itemsize, math, 1)
        first[0] = np.nextafter(first[0], math(np.inf))


@pytest.fixture
def cuda_on_cpu(host_kernel, monkeypatch):
    """Route NumPy arrays to xopt.engines.fused_cuda, running on the CPU build of its kernel."""
    monkeypatch.setattr(HostDevice, "lib", host_kernel)
    monkeypatch.setattr(HostDevice, "launches", 0)
    monkeypatch.setattr(HostDevice, "launched_on", [])
    monkeypatch.setattr(HostDevice, "wide", [])
    monkeypatch.setattr(HostDevice, "uploads", [])
    monkeypatch.setattr(HostDevice, "norms", 0)
    monkeypatch.setattr(HostDevice, "launches8", [])
    monkeypatch.setattr(HostDevice, "stream", 0)
    monkeypatch.setattr(HostDevice, "last", {})
    monkeypatch.setattr(HostDevice, "waits", [])
    monkeypatch.setattr(fused_cuda, "DEVICE", HostDevice)
    monkeypatch.setattr(fused_cuda, "accepts",
                        lambda opt, e: type(e.p) is np.ndarray and type(e.g) is np.ndarray and not e.rebind
                        and fused_cuda.grad_fits(e) and fused_cuda.kind(opt, e.p.dtype) is not None)
    monkeypatch.setattr(_dispatch, "_fused_cpu", lambda: None)
    monkeypatch.setattr(_dispatch, "_fused_cuda", lambda: fused_cuda)
    monkeypatch.setattr(cuda_check, "RESULTS", {})
    monkeypatch.setattr(cuda_check, "ISOLATED", False)  # the self-check here: this process holds the CPU build
    return HostDevice


def _placed(values, offset=0):
    """A copy of ``values`` that starts ``offset`` elements past a 16-byte boundary (1: not 16-byte aligned)."""
    values = np.asarray(values)
    item = values.dtype.itemsize
    buf = np.empty(values.size + offset + 16 // item, dtype=values.dtype)
    skip = (-buf.ctypes.data % 16) // item + offset
    out = buf[skip:skip + values.size].reshape(values.shape)
    out[...] = values
    return out


def _offset(a):
    return (a.ctypes.data % 16) // a.itemsize


def _run(config, params, grads_seq, **extra):
    opt = make(config, **extra) if isinstance(config, str) else getattr(xopt, config[0])(**config[1], **extra)
    params = {k: _placed(v, _offset(v)) for k, v in params.items()}  # the same alignment
    with np.errstate(all="ignore"):
        for g in grads_seq:
            opt.update(params, g)
    return opt, params


def _comparable(x):
    """``x``, or for a dtype NumPy does not know (ml_dtypes' bfloat16) its float32 widening, exact: NumPy before
    2.3 (2.2 is the last for Python 3.10) counts NaNs in the same places of such a dtype as mismatches."""
    x = np.asarray(x)
    return x if x.dtype.kind in "biuf" else x.astype(np.float32)


def _assert_same(ref, ours, a, b, what):
    for k in a:
        np.testing.assert_array_equal(_comparable(b[k]), _comparable(a[k]), err_msg=f"{what}: param {k}")
        for name in ref.buffers():
            np.testing.assert_array_equal(ours.state[k][name], ref.state[k][name], err_msg=f"{what}: {name} of {k}")


# Configurations beyond test_edges.CONFIGS that take other branches of the element rules.
MORE_CONFIGS = [("SGD", dict(momentum=0.9, dampening=0.1)), ("RMSprop", dict(momentum=0.5)),
                ("RMSprop", dict(centered=True)), ("AdaGrad", {}), ("AdamW", dict(weight_decay=0.1))]
ALL_CONFIGS = list(CONFIGS) + MORE_CONFIGS


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", ALL_CONFIGS, ids=str)
def test_kernel_equals_reference_bit_for_bit(config, dtype, cuda_on_cpu, rng):
    """Every shape twice in one launch: 16-byte aligned (its grad too, or every other one not on odd steps) and
    offset by one element (the scalar path); sizes that are and are not multiples of the elements per thread."""
    values = [np.array(rng.standard_normal(s), dtype=dtype) for s in SHAPES]
    params = {**{f"p{i}": _placed(v) for i, v in enumerate(values)},
              **{f"q{i}": _placed(v, 1) for i, v in enumerate(values)}}
    unaligned_grad = lambda k, step: step % 2 and k[0] == "p" and int(k[1:]) % 2  # noqa: E731
    grads_seq = [{k: _placed(np.array(rng.standard_normal(v.shape) + 0.1, dtype=dtype), unaligned_grad(k, step))
                  for k, v in params.items()} for step in range(4)]
    grads_seq[2]["p3"][4] = grads_seq[2]["q4"][1, 2] = np.nan  # NaN goes where the reference sends it
    ref, a = _run(config, params, grads_seq, impl="reference")
    ours, b = _run(config, params, grads_seq, impl="fused")
    assert cuda_on_cpu.launches == 4, "one launch per step for all the tensors"
    assert all(cuda_on_cpu.wide), "the aligned tensors took no 16-byte access"
    _assert_same(ref, ours, a, b, config)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", ALL_CONFIGS, ids=str)
def test_subnormals_as_numpy_has_them(config, dtype, cuda_on_cpu, rng):
    """Params and grads around the smallest normal number, most of them subnormal: the kernel's results
    equal NumPy's (the GPU build keeps them too: no -ftz, tests/test_cuda_build.py; on a GPU, test_fused_gpu.py)."""
    tiny = ml_dtypes.finfo(dtype).smallest_normal
    params = {"w": _placed(np.array(rng.standard_normal(300) * tiny, dtype=dtype)),
              "u": _placed(np.array(rng.standard_normal(77) * tiny, dtype=dtype), 1)}
    grads_seq = [{k: np.array(rng.standard_normal(v.shape) * tiny, dtype=dtype) for k, v in params.items()}
                 for _ in range(3)]
    ref, a = _run(config, params, grads_seq, impl="reference")
    ours, b = _run(config, params, grads_seq, impl="fused")
    _assert_same(ref, ours, a, b, config)
    subnormal = np.abs(grads_seq[0]["w"]) < tiny  # what a flush-to-zero build would read as 0
    # bfloat16 keeps 8 bits: lr * g of a subnormal g can be below a subnormal param's resolution; its state moves
    moved = [not np.array_equal(a["w"], params["w"])] + [np.any(ref.state["w"][n] != 0) for n in ref.buffers()]
    assert subnormal.mean() > 0.5 and any(moved)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", ["Adam-amsgrad-wd", "RMSprop-all", "Momentum"])
@pytest.mark.parametrize("offset", [0, 1])
def test_wide_accesses_exactly_where_aligned(config, dtype, offset, cuda_on_cpu, rng):
    """Aligned: every whole group of W elements by 16-byte accesses (p, g and each kept buffer loaded, p and the
    buffers stored), the rest one by one; offset by one element: no 16-byte access at all."""
    n = 3 * C + 13
    params = {"w": _placed(np.array(rng.standard_normal(n), dtype=dtype), offset)}
    grads = {"w": _placed(np.array(rng.standard_normal(n), dtype=dtype), offset)}
    ref, a = _run(config, params, [grads], impl="reference")
    ours, b = _run(config, params, [grads], impl="fused")
    _assert_same(ref, ours, a, b, config)
    item, math = np.dtype(dtype).itemsize, (8 if dtype == np.float64 else 4)
    width = 8 if item == 2 else 4
    per_group = 2 * width * item // 16 + 2 * len(ours.buffers()) * width * math // 16 + width * item // 16
    assert cuda_on_cpu.wide == [0 if offset else (n // width) * per_group]


@pytest.mark.parametrize("dtype, grad", [(np.float16, np.float32), (np.float16, np.float64), (np.float32, np.float64),
                                         (np.float64, np.float32)], ids=str)
def test_grads_of_another_dtype_as_the_reference_converts_them(dtype, grad, cuda_on_cpu, rng):
    """The kernel reads a grad as the param's type: a float32 param's float64 grad rounds once, as the reference
    rounds it to the math type, and a float64 param's widens exactly; a float16 param's float32 grad would round
    to 16 bits before the math, which the reference does in float32, so those steps are the reference's."""
    params = {"w": np.array(rng.standard_normal(1000), dtype=dtype)}
    grads_seq = [{"w": np.array(rng.standard_normal(1000) * 1.001, dtype=grad)} for _ in range(3)]
    ref, a = _run("Adam", params, grads_seq, impl="reference")
    declined = np.dtype(dtype).itemsize == 2
    ours, b = _run("Adam", params, grads_seq, impl="auto" if declined else "fused")
    assert cuda_on_cpu.launches == (0 if declined else 3)
    _assert_same(ref, ours, a, b, f"{np.dtype(dtype).name} params, {np.dtype(grad).name} grads")


def test_grads_rewritten_in_place_between_steps(cuda_on_cpu, rng):
    """Each step's table carries the grads' addresses of that step, whether the grads are new or rewritten."""
    params = {f"w{i}": rng.standard_normal(n) for i, n in enumerate([5, 300, 2 * C + 1])}
    same = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    other = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    ref, ours = xopt.Adam(impl="reference"), xopt.Adam(impl="fused")
    a, b = {k: v.copy() for k, v in params.items()}, {k: v.copy() for k, v in params.items()}
    steps = [same, same, same, same, other, other, same]  # grads rewritten in place between steps
    for g in steps:
        for v in g.values():
            v[...] = rng.standard_normal(v.shape)
        ref.update(a, g)
        ours.update(b, g)
    assert cuda_on_cpu.launches == len(steps)
    _assert_same(ref, ours, a, b, "grads in place")


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


def test_many_tensors_one_launch_per_step(cuda_on_cpu, rng):
    sizes = rng.integers(64, 4097, 2000)
    params = {f"w{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)}
    grads_seq = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()} for _ in range(5)]
    ref, a = _run("Adam", params, grads_seq, impl="reference")
    ours, b = _run("Adam", params, grads_seq, impl="fused")
    assert cuda_on_cpu.launches == 5
    _assert_same(ref, ours, a, b, "2,000 tensors")


def test_new_grad_arrays_each_step(cuda_on_cpu, rng):
    """Each step reads its grads where they are now."""
    p = {"a": rng.standard_normal(100), "b": rng.standard_normal(3)}
    ref, ours = xopt.Adam(impl="reference"), xopt.Adam(impl="fused")
    a, b = {k: v.copy() for k, v in p.items()}, {k: v.copy() for k, v in p.items()}
    for _ in range(4):
        g = {k: rng.standard_normal(v.shape) for k, v in p.items()}  # fresh arrays every step
        ref.update(a, g)
        ours.update(b, {k: v.copy() for k, v in g.items()})
    _assert_same(ref, ours, a, b, "fresh grads")


class _GradSubclass(np.ndarray):
    pass


def test_a_grad_of_another_type_is_refused_whole(cuda_on_cpu, rng):
    """A grad the engine would not take: refused before anything is written."""
    params, opt = {"w": rng.standard_normal(50)}, xopt.Adam(impl="fused")
    for _ in range(2):
        opt.update(params, {"w": rng.standard_normal(50)})
    before, state = params["w"].copy(), opt.state["w"]["m"].copy()
    with pytest.raises(TypeError, match="no fused kernel takes param"):
        opt.update(params, {"w": rng.standard_normal(50).view(_GradSubclass)})
    assert cuda_on_cpu.launches == 2
    np.testing.assert_array_equal(params["w"], before)
    np.testing.assert_array_equal(opt.state["w"]["m"], state)


def test_one_launch_per_gpu(cuda_on_cpu, monkeypatch, rng):
    """Params on two GPUs: a table and a launch for each, on its own GPU."""
    monkeypatch.setattr(HostDevice, "device_of", staticmethod(lambda a: a.size % 2))  # odd sizes on "GPU 1"
    params = {f"w{i}": rng.standard_normal(n) for i, n in enumerate([10, 11, 12, 13, 1])}
    grads_seq = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(3)]
    ref, a = _run("Adam-amsgrad-wd", params, grads_seq, impl="reference")
    ours, b = _run("Adam-amsgrad-wd", params, grads_seq, impl="fused")
    assert cuda_on_cpu.launches == 6
    for device_id, sizes in cuda_on_cpu.launched_on:
        assert {n % 2 for n in sizes} == {device_id}, "a launch touched another GPU's arrays"
    _assert_same(ref, ours, a, b, "two GPUs")


def test_a_change_of_impl_is_followed(cuda_on_cpu, rng):
    """Switching impl to auto: the kernel runs again once its self-check passed."""
    params, opt = {"w": rng.standard_normal(50)}, xopt.Adam(impl="fused")
    for _ in range(2):
        opt.update(params, {"w": rng.standard_normal(50)})
    assert cuda_on_cpu.launches == 2
    opt.impl = "auto"
    opt.update(params, {"w": rng.standard_normal(50)})
    checks = len(cuda_check.CONFIGS[4]) * 2  # the self-check: one launch per configuration and step
    assert cuda_on_cpu.launches == 2 + checks + 1
    assert list(cuda_check.RESULTS) == [(0, 4, "float64")] and cuda_check.RESULTS[(0, 4, "float64")].passed


def _break_rule(monkeypatch, rule):
    """The kernel of ``rule`` made wrong: its first scalar one ulp off."""
    launch = HostDevice.launch.__func__

    def broken(cls, function, n_blocks, args):
        if function[0] == rule:
            nudge_first_scalar(function, n_blocks, args)
        launch(cls, function, n_blocks, args)
    monkeypatch.setattr(HostDevice, "launch", classmethod(broken))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("rule", sorted(cuda_check.CONFIGS))
def test_self_check_passes_on_the_kernel(rule, dtype, cuda_on_cpu):
    result = cuda_check.self_check(rule, dtype)
    assert result.passed and result.mismatch is None, str(result)
    steps = sum(config[2] if len(config) > 2 else 2 for config in cuda_check.configs_for(rule, dtype))
    assert cuda_on_cpu.launches == steps, "one launch per configuration and step"
    assert str(result).startswith(f"self-check of {fused_cuda.kernel_name(rule, dtype)} on GPU 0: passed")


def test_readme_shows_what_self_check_prints(cuda_on_cpu):
    readme = (HERE.parent / "README.md").read_text()
    line = str(cuda_check.self_check("Adam", "float32"))
    assert f">>> print(cuda_check.self_check(\"Adam\", \"float32\"))" in readme and f"\n{line}\n" in readme


def test_self_check_names_the_case_it_fails_on(cuda_on_cpu, monkeypatch):
    _break_rule(monkeypatch, 3)
    result = cuda_check.self_check("RMSprop", np.float32)
    assert not result.passed
    assert result.mismatch.startswith("RMSprop() step 1, tensor (3, 5) (param offset 0, grad offset 0), param element ")
    assert "FAILED: RMSprop() step 1" in str(result)


def test_auto_warns_once_and_keeps_the_reference_where_the_self_check_fails(cuda_on_cpu, monkeypatch, rng):
    _break_rule(monkeypatch, 4)
    p = {"w": rng.standard_normal(40).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    ref, ours = xopt.Adam(impl="reference"), xopt.Adam()
    a, b = {k: v.copy() for k, v in p.items()}, {k: v.copy() for k, v in p.items()}
    with pytest.warns(cuda_check.SelfCheckWarning, match=r"xopt_step<4, float, float> on GPU 0: FAILED: Adam\(\) "):
        ours.update(b, {k: np.ones_like(v) for k, v in p.items()})
    checked = cuda_on_cpu.launches
    for _ in range(3):  # no second warning (filterwarnings = error), no kernel launch
        g = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p.items()}
        ours.update(b, g)
        ref.update(a, g) if _ else (ref.update(a, {k: np.ones_like(v) for k, v in p.items()}), ref.update(a, g))
    assert cuda_on_cpu.launches == checked
    _assert_same(ref, ours, a, b, "reference after a failed self-check")
    assert not cuda_check.RESULTS[(0, 4, "float32")].passed
    sgd = xopt.SGD(momentum=0.9)  # another rule: checked on its own, and it passes
    sgd.update(b, {k: np.ones_like(v) for k, v in p.items()})
    assert cuda_check.RESULTS[(0, 0, "float32")].passed and cuda_on_cpu.launches > checked


def test_self_check_fails_cleanly_where_the_kernel_cannot_run(cuda_on_cpu, monkeypatch):
    def no_kernel(rule, dtype, state=None):
        raise RuntimeError("NVRTC not found")
    monkeypatch.setattr(HostDevice, "function", staticmethod(no_kernel))
    result = cuda_check.self_check("Adam", np.float64)
    assert not result.passed and "the kernel raised RuntimeError('NVRTC not found')" in result.mismatch


def test_half_params_keep_a_small_eps(cuda_on_cpu):
    """eps=1e-8 is 0 in float16: the kernel takes its scalars in float (the math type)."""
    p = np.zeros(4, dtype=np.float16)
    xopt.Adam(eps=1e-8, eps_hat=False, impl="fused").update({"p": p}, {"p": np.zeros(4, dtype=np.float16)})
    assert cuda_on_cpu.launches == 1 and not np.isnan(p).any()


@pytest.mark.parametrize("sizes", [[], [0], [0, 0, 5], [1, C, C + 1, 3 * C, 7], list(range(0, 5 * C, 997))])
def test_block_table_covers_each_element_once(sizes):
    aligned = [t % 2 for t in range(len(sizes))]
    part = [t % 3 for t in range(len(sizes))]
    blocks = fused_cuda.block_table(sizes, aligned, part)
    assert blocks.dtype == np.int32 and blocks.shape[1] == 4
    covered = [np.zeros(n, dtype=np.int64) for n in sizes]
    for t, chunk, flag, row in blocks:
        assert flag == aligned[t] and row == part[t], "a block without its tensor's alignment or part"
        lo = int(chunk) * C
        assert lo < sizes[t], "a block with nothing to do"
        covered[t][lo:lo + C] += 1
    assert all((c == 1).all() for c in covered)


_ASAN_DRIVER = r"""
import ctypes, sys
import numpy as np
sys.path[:0] = [sys.argv[2], sys.argv[3]]
from xopt.engines import fused_cuda
from test_cuda_source import HostDevice, SHAPES, DTYPES
from test_edges import CUDA_CONFIGS as CONFIGS, make

HostDevice.lib = ctypes.CDLL(sys.argv[1])
HostDevice.lib.xopt_host_wide_accesses.restype = ctypes.c_longlong
fused_cuda.DEVICE = HostDevice
rng = np.random.default_rng(0)


def ending(values, offset):  # its own allocation, ending where the array ends, starting offset elements before it
    out = np.empty(values.size + offset, dtype=values.dtype)[offset:].reshape(values.shape)
    out[...] = values
    return out


for config in CONFIGS:
    for dtype in DTYPES:
        for offset in (0, 1):  # 16-byte accesses, and one at a time (with the norm pass before the step)
            opt = make(config, impl="fused", clip_grad_norm=1.0 if offset else None, skip_nonfinite=bool(offset))
            math = np.float64 if dtype == np.float64 else np.float32
            ps = [ending(np.array(rng.standard_normal(s), dtype=dtype), offset) for s in SHAPES]
            gs = [ending(np.array(rng.standard_normal(s), dtype=dtype), offset) for s in SHAPES]
            states = [{name: ending(np.full(s, 0.5, dtype=math), offset) for name in opt.buffers()} | {"step": 1}
                      for s in SHAPES]
            found = fused_cuda.kind(opt, np.dtype(dtype))
            for step in (1, 2):  # the lane's step, as update() calls it, over arrays each in its own allocation
                values = [found.order(opt.scalars(step))]
                seen = []
                took = fused_cuda.step(opt, found, [opt], values, ps, gs, states, [st["step"] for st in states], None,
                                       lambda norm, skipped: seen.append((norm, skipped)) or [])
                assert took is True and seen[-1][1] is False and (seen[-1][0] is None) == (not offset)
print("norms", HostDevice.norms, "launches", HostDevice.launches, "wide", sum(HostDevice.wide))
"""


def run_under_asan(tmp_path, driver, timeout):
    """The kernel's CPU build made with AddressSanitizer (g++), and ``driver`` (Python source: argv[1] the library,
    argv[2] tests/, argv[3] the repository) run under it; skips where g++ or its ASan runtime is missing.  Returns
    the finished process, checked: no sanitizer report, exit status 0."""
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
    out = subprocess.run([sys.executable, "-c", driver, str(lib), str(HERE), str(HERE.parent)],
                         capture_output=True, text=True, env=env, timeout=timeout)
    assert "AddressSanitizer" not in out.stderr, out.stderr[-3000:]
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow  # a second build of the kernel, with ASan, and a run under it
def test_kernel_stays_in_bounds_under_address_sanitizer(tmp_path):
    """Every rule, dtype and configuration over the edge shapes, each array its own allocation, with
    AddressSanitizer watching every load and store of the kernel (a read or write one past an array fails)."""
    out = run_under_asan(tmp_path, _ASAN_DRIVER, timeout=300)
    assert f"norms {len(CONFIGS) * len(DTYPES) * 2} launches {len(CONFIGS) * len(DTYPES) * 2 * 2} wide " in out.stdout
    assert int(out.stdout.split()[-1]) > 0, "no 16-byte access ran under the sanitizer"
