"""8-bit state (``state_dtype="8bit"``) in the CUDA kernel, on its CPU build (as tests/test_cuda_source.py runs it):
``xopt_step8`` through xopt.engines.cuda_blockwise's own tables, its phases run for every thread of a block before
the next, bit for bit the reference rule over 8-bit state (xopt.engines.blockwise.apply_reference): params, codes
and absmax, several steps, every 8-bit optimizer, float16/bfloat16/float32/float64 params, edge inputs."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import xopt
from xopt import _dispatch
from xopt.engines import blockwise, cuda_blockwise, cuda_check, fused_cuda
from xopt.engines.blockwise import SIGNED, SUFFIX, UNSIGNED, midpoints
from test_cuda_source import HostDevice, _placed, at, cuda_on_cpu, run_under_asan  # noqa: F401  (a fixture)
from test_state_8bit import same_bits

ml_dtypes = pytest.importorskip("ml_dtypes")
pytestmark = pytest.mark.cuda_source
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float16, BF16, np.float32, np.float64]
Q = cuda_blockwise.CHUNK8

CONFIGS = {  # every optimizer that takes state_dtype="8bit", and the branches of their rules
    "Adam": (xopt.Adam, {}),
    "Adam-amsgrad-wd": (xopt.Adam, dict(amsgrad=True, weight_decay=0.01, eps_hat=False)),
    "AdamW": (xopt.AdamW, dict(weight_decay=0.1)),
    "AdamW-amsgrad": (xopt.AdamW, dict(amsgrad=True)),
    "Lion": (xopt.Lion, dict(lr=0.01, weight_decay=0.1)),
    "RMSprop": (xopt.RMSprop, dict(lr=0.01)),
    "RMSprop-momentum-wd": (xopt.RMSprop, dict(lr=0.01, momentum=0.5, weight_decay=0.01)),
    "AdaGrad": (xopt.AdaGrad, dict(lr=0.1, initial_accumulator_value=0.1)),
    "AdaGrad-wd": (xopt.AdaGrad, dict(lr=0.1, weight_decay=0.01)),
    "SGD": (xopt.SGD, dict(lr=0.01, momentum=0.9, dampening=0.1)),
    "SGD-nesterov-wd": (xopt.SGD, dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "Momentum": (xopt.Momentum, dict(lr=0.01)),
    "Nesterov": (xopt.Nesterov, dict(lr=0.01)),
}
# sizes: a tail shorter than a block, a whole chunk, a chunk and a tail, blocks within one chunk and across chunks
SIZES = [1, 7, 255, 256, 300, Q, Q + 5, 3 * Q + 257]


@pytest.fixture
def cuda8(cuda_on_cpu, monkeypatch):  # noqa: F811
    """NumPy arrays with 8-bit state routed to xopt_step8 on the CPU build (as cuda_on_cpu routes the float ones)."""
    monkeypatch.setattr(cuda_blockwise, "_takes", lambda e: type(e.p) is np.ndarray
                        and type(e.g) is np.ndarray and not e.rebind and cuda_blockwise._dtypes_ok(e))
    return cuda_on_cpu


def _opt(config, impl, **extra):
    cls, hyper = CONFIGS[config]
    return cls(state_dtype="8bit", impl=impl, **{"min_8bit_size": 1, **hyper, **extra})


def _run(config, impl, params, grads_seq, **extra):
    opt = _opt(config, impl, **extra)
    params = {k: _placed(v) for k, v in params.items()}
    with np.errstate(all="ignore"):
        for g in grads_seq:
            opt.update(params, g)
    return opt, params


def _assert_same(ref, ours, a, b, what):
    for k in a:
        assert same_bits(b[k], a[k]), f"{what}: param {k}"
        assert set(ours.state[k]) == set(ref.state[k]), f"{what}: the buffers of {k}"
        for name, buf in ref.state[k].items():
            if name == "step":
                assert ours.state[k][name] == buf
                continue
            mine = ours.state[k][name]
            assert mine.dtype == buf.dtype and mine.shape == buf.shape, f"{what}: {name} of {k}"
            assert same_bits(mine, buf), f"{what}: {name} of {k}"


def _both(config, params, grads_seq, **extra):
    ref, a = _run(config, "reference", params, grads_seq, **extra)
    ours, b = _run(config, "fused", params, grads_seq, **extra)
    return ref, a, ours, b


def _random(rng, sizes, dtype):
    return {f"w{i}": np.array(rng.standard_normal(n), dtype=dtype) for i, n in enumerate(sizes)}


def _grads(rng, params, steps, scale=1.0):
    return [{k: np.array(rng.standard_normal(v.shape) * scale + 0.01, dtype=v.dtype) for k, v in params.items()}
            for _ in range(steps)]


# -- the maps' codes and values, as C ------------------------------------------------------------------------------
def _codes(lib, y, unsigned):
    y = np.ascontiguousarray(y, dtype=np.float32)
    out = np.empty(y.size, np.uint8)
    lib.xopt_host_codes8(ctypes.c_void_p(y.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_longlong(y.size),
                         int(unsigned))
    return out


@pytest.mark.parametrize("code", [SIGNED, UNSIGNED], ids=["signed", "unsigned"])
def test_codes_and_values_are_the_maps(code, host_kernel, rng):
    """Every code's value is the map's, bit for bit; the code of a float is searchsorted on the midpoints (NaN 255)
    at every threshold, its neighbours, every value, the edges, and 2^22 random bit patterns."""
    unsigned = code is UNSIGNED
    values = np.empty(256, np.float32)
    codes = np.arange(256, dtype=np.uint8)
    host_kernel.xopt_host_values8(ctypes.c_void_p(codes.ctypes.data), ctypes.c_void_p(values.ctypes.data),
                                  ctypes.c_longlong(256), int(unsigned))
    assert np.array_equal(values.view(np.uint32), code.view(np.uint32))
    mid = midpoints(code)[:255]
    edges = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 3e38, -3e38, 2.0, -2.0],
                     dtype=np.float32)
    y = np.concatenate([mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf)), code,
                        -code, edges, rng.integers(0, 2**32, 1 << 22, dtype=np.uint64).astype(np.uint32).view(
                            np.float32)])
    want = np.searchsorted(mid, y, side="left")
    want[np.isnan(y)] = 255
    np.testing.assert_array_equal(_codes(host_kernel, y, unsigned), want)


# -- the kernel against the reference rule --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", CONFIGS)
def test_kernel_equals_the_reference_bit_for_bit(config, dtype, cuda8, rng):
    """Tensors of many sizes (tails shorter than a block, more than a chunk) in one launch a step, four steps: the
    params, the codes and the absmax of every buffer those of the reference rule, bit for bit."""
    params = _random(rng, SIZES, dtype)
    grads_seq = _grads(rng, params, 4)
    ref, a, ours, b = _both(config, params, grads_seq)
    assert len(cuda8.launches8) == 4 and cuda8.launches == 0, "one 8-bit launch per step for all the tensors"
    assert cuda8.launches8[0][3] == SIZES
    _assert_same(ref, ours, a, b, config)
    assert any(np.any(ours.state[k][name + SUFFIX] != ours.state[k][name + SUFFIX][0]) for k in b
               for name in ours.buffers()), "the state moved"


def _edge_grads(rng, n, dtype, kind):
    g = np.array(rng.standard_normal(n), dtype=np.float64)
    if kind == "zeros":
        g[:] = 0.0
    elif kind == "huge":  # one huge value a block: the rest of the block far below its absmax
        g[::256] *= {np.float16: 1e4, np.float32: 1e30, np.float64: 1e200}[dtype]
    elif kind == "nan-inf":
        g[[5, 300 % n, 301 % n, -1]] = [np.nan, np.inf, -np.inf, np.nan]
    elif kind == "subnormal":
        tiny = ml_dtypes.finfo(dtype).smallest_normal
        g = g * float(tiny)
    elif kind == "mixed":  # every magnitude
        g = g * 10.0 ** rng.integers(-40, 30, n)
    with np.errstate(all="ignore"):
        return np.array(g, dtype=dtype)


@pytest.mark.parametrize("kind", ["zeros", "huge", "nan-inf", "subnormal", "mixed"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", ["Adam-amsgrad-wd", "Lion", "RMSprop-momentum-wd", "AdaGrad", "SGD-nesterov-wd",
                                    "Nesterov"])
def test_edge_inputs(config, dtype, kind, cuda8, rng):
    """Zero grads (all-zero blocks: absmax 0), one huge value a block, NaN and Inf (the block's absmax NaN), subnormal
    params and grads, every magnitude; three steps, a tail in the last block."""
    n = 2 * Q + 300
    p = np.array(rng.standard_normal(n), dtype=dtype)
    if kind == "subnormal":
        p = np.array(p * float(ml_dtypes.finfo(dtype).smallest_normal), dtype=dtype)
    params = {"w": p, "u": np.zeros(77, dtype=dtype)}
    grads_seq = [{"w": _edge_grads(rng, n, dtype, kind), "u": _edge_grads(rng, 77, dtype, kind)} for _ in range(3)]
    ref, a, ours, b = _both(config, params, grads_seq)
    assert len(cuda8.launches8) == 3
    _assert_same(ref, ours, a, b, f"{config} {kind}")
    if kind == "nan-inf":
        assert any(np.isnan(ours.state["w"][name + SUFFIX]).any() for name in ours.buffers())
    if kind == "zeros" and config != "AdaGrad":  # AdaGrad starts h at 0.1
        assert any((ours.state["u"][name + SUFFIX] == 0).any() for name in ours.buffers())


@pytest.mark.parametrize("block", [32, 64, 100, 256, 1000, Q])
@pytest.mark.parametrize("config", ["Adam", "RMSprop-momentum-wd"])
def test_block_sizes_the_kernel_takes(config, block, cuda8, rng):
    """Any block_size from XOPT_QBLOCK_MIN to XOPT_CHUNK8, powers of two or not: whole quantization blocks a CUDA
    block."""
    params = _random(rng, [5, block - 1, block, block + 1, 3 * Q + 11], np.float32)
    ref, a, ours, b = _both(config, params, _grads(rng, params, 3), block_size=block)
    assert len(cuda8.launches8) == 3 and {launch[4] for launch in cuda8.launches8} == {block}
    _assert_same(ref, ours, a, b, f"{config} block_size={block}")


@pytest.mark.parametrize("block", [16, 31, Q + 1, 4096])
def test_block_sizes_the_kernel_declines_take_the_reference(block, cuda8, rng):
    """Outside 32..XOPT_CHUNK8: impl="auto" runs the reference rule (here, on NumPy, the CPU kernel), impl="fused"
    says why before anything is written."""
    params = _random(rng, [5000], np.float32)
    assert not cuda_blockwise.supports(_opt("Adam", "fused", block_size=block))
    ref, a = _run("Adam", "reference", params, _grads(rng, params, 2), block_size=block)
    monkey = pytest.MonkeyPatch()
    with monkey.context() as m:
        m.setattr(_dispatch._numba, "usable", lambda: False)  # no CPU kernel either: impl="fused" has none
        p = {k: v.copy() for k, v in params.items()}
        with pytest.raises(TypeError, match="no fused kernel computes the 8-bit state"):
            _opt("Adam", "fused", block_size=block).update(p, _grads(rng, params, 1)[0])
        np.testing.assert_array_equal(p["w0"], params["w0"])
    assert cuda8.launches8 == []


def test_clip_scale_read_as_the_step_reads_it(cuda8, rng):
    """clip_grad_norm: each grad times the clip scale in the math type, as the reference scales it."""
    params = _random(rng, [300, Q + 3], np.float32) | _random(rng, [3000], np.float16)
    grads_seq = _grads(rng, params, 3, scale=5.0)
    for config in ("Adam", "Lion", "SGD"):
        ref, a, ours, b = _both(config, params, grads_seq, clip_grad_norm=1.0)
        _assert_same(ref, ours, a, b, f"{config} clipped")
        assert ref.last_grad_norm > 1.0 and ours.last_grad_norm == ref.last_grad_norm
    assert len(cuda8.launches8) == 3 * 3 * 2, "a launch per step and param dtype"


def test_small_params_keep_float_state_beside(cuda8, rng):
    """Params below min_8bit_size keep float32 state: the float kernel runs them in the same step, the 8-bit one the
    others, each launch once a step; maps: bit j for slot j on the unsigned map (Adam's v and v_max)."""
    params = _random(rng, [10, 5000, 100, 4096], np.float32)
    grads_seq = _grads(rng, params, 3)
    ref, a, ours, b = _both("Adam-amsgrad-wd", params, grads_seq, min_8bit_size=4096)
    assert cuda8.launches == 3 and [launch[3] for launch in cuda8.launches8] == [[5000, 4096]] * 3
    assert {launch[5] for launch in cuda8.launches8} == {0b110}
    assert ours.state["w0"]["m"].dtype == np.float32 and ours.state["w1"]["m"].dtype == np.uint8
    _assert_same(ref, ours, a, b, "mixed sizes")


def test_non_contiguous_params_are_written_back(cuda8, rng):
    base = rng.standard_normal((80, 120)).astype(np.float32)
    a_base, b_base = base.copy(), base.copy()
    ref, ours = _opt("Adam", "reference"), _opt("Adam", "fused")
    for _ in range(3):
        g = {"p": rng.standard_normal((40, 40)).T}  # float64, transposed
        ref.update({"p": a_base[::2, 1::3]}, g)
        ours.update({"p": b_base[::2, 1::3]}, g)
    assert len(cuda8.launches8) == 3
    np.testing.assert_array_equal(b_base, a_base)
    for name in ("m", "v", "m" + SUFFIX, "v" + SUFFIX):
        assert same_bits(ours.state["p"][name], ref.state["p"][name])


def test_auto_runs_the_kernel_once_its_self_check_passed(cuda8, rng):
    """Under impl="auto" the first 8-bit step on a GPU runs the self-check of the case "DTYPE/8bit" for the rule
    (the rule's configurations that take 8-bit state), then the kernel."""
    params = _random(rng, [5000], np.float32)
    grads_seq = _grads(rng, params, 3)
    ref, a = _run("Adam", "reference", params, grads_seq)
    assert cuda_check.RESULTS == {}
    ours, b = _run("Adam", "auto", params, grads_seq)
    assert list(cuda_check.RESULTS) == [(0, 4, "float32/8bit")] and cuda_check.RESULTS[0, 4, "float32/8bit"].passed
    checks = sum(config[2] if len(config) > 2 else 2 for config in cuda_check.configs_for(4, "float32", "8bit"))
    assert len(cuda8.launches8) == checks + 3
    _assert_same(ref, ours, a, b, "auto")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("rule", cuda_blockwise.RULES8)
def test_self_check_of_8bit_state_passes_on_the_kernel(rule, dtype, cuda8):
    case = fused_cuda.case_name(dtype, "8bit")
    result = cuda_check.self_check(rule, case)
    assert result.passed, str(result)
    assert result.kernel == cuda_blockwise.step8_name(rule, dtype)
    configs = cuda_check.configs_for(rule, dtype, "8bit")
    assert configs and all(hyper["state_dtype"] == "8bit" for _, hyper, *_ in configs)
    assert len(cuda8.launches8) == sum(config[2] if len(config) > 2 else 2 for config in configs)


def test_self_check_of_8bit_state_fails_on_a_broken_kernel_and_auto_keeps_the_reference(cuda8, monkeypatch, rng):
    """The 8-bit kernel made wrong (its first scalar one ulp up): the self-check names the case it fails on;
    impl="auto" warns once and steps by the reference rule."""
    launch8 = HostDevice.launch8.__func__

    def broken(cls, function, n_blocks, args):
        math = np.float64 if function[2] == 64 else np.float32
        first = at(int(args[5]), math, 1)
        first[0] = np.nextafter(first[0], math(np.inf))
        launch8(cls, function, n_blocks, args)
    monkeypatch.setattr(HostDevice, "launch8", classmethod(broken))
    result = cuda_check.self_check("Adam", "float32/8bit")
    assert not result.passed and result.mismatch.startswith("Adam(state_dtype='8bit', min_8bit_size=1) step 1, ")
    params = _random(rng, [5000], np.float32)
    grads_seq = _grads(rng, params, 3)
    ref, a = _run("Adam", "reference", params, grads_seq)
    with pytest.warns(cuda_check.SelfCheckWarning, match=r"xopt_step8<4, float, float> on GPU 0: FAILED"):
        ours, b = _run("Adam", "auto", params, grads_seq)
    _assert_same(ref, ours, a, b, "reference after a failed self-check")
    assert not cuda_check.RESULTS[0, 4, "float32/8bit"].passed


def test_8bit_self_check_configurations():
    assert [c[0] for c in cuda_check.configs_for(0, "float32", "8bit")] and all(
        c[1].get("momentum", 0) > 0 for c in cuda_check.configs_for(0, "float32", "8bit"))
    assert not any(c[1].get("centered") for c in cuda_check.configs_for(3, "float32", "8bit"))
    with pytest.raises(ValueError, match="rule 7 has no kernel with 8bit state"):
        cuda_check.configs_for(7, "float32", "8bit")
    assert fused_cuda.kernel_name(4, "float16/8bit") == "xopt_step8<4, unsigned short, float>"


def test_the_kernels_maps_are_the_formats():
    assert (cuda_blockwise._FORMATS == (*blockwise.SIGNED_FORMAT, *blockwise.UNSIGNED_FORMAT))
    assert cuda_blockwise.chunk_of(256) == Q and cuda_blockwise.chunk_of(100) == Q // 100 * 100
    assert cuda_blockwise.step8_name(4, "float16") == "xopt_step8<4, unsigned short, float>"
    assert cuda_blockwise.step8_name(9, np.float64) == "xopt_step8<9, double, double>"


def test_rules8_are_those_of_the_optimizers_that_take_8bit_state():
    from xopt.engines.kernels import lookup
    from xopt.optimizers._state_storage import StateStorage

    classes = [c for c in vars(xopt).values() if isinstance(c, type) and issubclass(c, StateStorage)]
    assert {lookup(c).rule for c in classes} == set(cuda_blockwise.RULES8)


_ASAN_DRIVER = r"""
import ctypes, sys
import numpy as np
sys.path[:0] = [sys.argv[2], sys.argv[3]]
from xopt import _dispatch
from xopt.engines import cuda_blockwise, fused_cuda
from test_cuda_source import HostDevice
from test_cuda_8bit import CONFIGS, _opt

HostDevice.lib = ctypes.CDLL(sys.argv[1])
fused_cuda.DEVICE = HostDevice
cuda_blockwise._takes = lambda e: type(e.p) is np.ndarray
_dispatch._fused_cpu = lambda: None
rng = np.random.default_rng(0)
for config in CONFIGS:
    for dtype in (np.float16, np.float32, np.float64):
        for block in (32, 100, cuda_blockwise.CHUNK8):
            opt = _opt(config, "fused", block_size=block)
            sizes = [1, 33, 64, 2048, 2049, 4000, 4197]
            ps = {f"w{i}": np.array(rng.standard_normal(n), dtype=dtype) for i, n in enumerate(sizes)}
            for _ in range(2):
                opt.update(ps, {k: np.array(rng.standard_normal(v.shape), dtype=dtype) for k, v in ps.items()})
print("launches8", len(HostDevice.launches8))
"""


@pytest.mark.slow  # a build of the kernel with ASan, and a run under it
def test_8bit_kernel_stays_in_bounds_under_address_sanitizer(tmp_path):
    """Every 8-bit optimizer, three dtypes, block sizes 32, 100 and XOPT_CHUNK8 over tensors with short tails and
    tensors that end on a chunk, two
    steps: AddressSanitizer watching every load and store of xopt_step8's phases (a read or write one past a param,
    grad, codes or absmax fails)."""
    out = run_under_asan(tmp_path, _ASAN_DRIVER, timeout=600)
    assert f"launches8 {len(CONFIGS) * 3 * 3 * 2}" in out.stdout


@pytest.mark.parametrize("config", ["Adam-amsgrad-wd", "Lion", "RMSprop-momentum-wd"])
def test_shapes_0d_and_empty_with_min_8bit_size_0(config, cuda8, rng):
    """min_8bit_size=0: a 0-d param (one element, one block) and empty ones (no block) keep 8-bit state too; the
    empty ones get no CUDA block, and a step of empty params alone launches nothing."""
    shapes = [(), (0,), (1, 0, 2), (3, 5), (300,)]
    params = {f"w{i}": np.array(rng.standard_normal(s), dtype=np.float32) for i, s in enumerate(shapes)}
    grads_seq = [{k: np.array(rng.standard_normal(v.shape), dtype=np.float32) for k, v in params.items()}
                 for _ in range(3)]
    ref, a, ours, b = _both(config, params, grads_seq, min_8bit_size=0)
    assert [launch[3] for launch in cuda8.launches8] == [[1, 0, 0, 15, 300]] * 3
    first = ours.buffers()[0]
    assert ours.state["w1"][first].dtype == np.uint8 and ours.state["w1"][first + SUFFIX].shape == (0,)
    _assert_same(ref, ours, a, b, f"{config} 0-d and empty")
    empty = {"e": np.zeros((0, 3), np.float32)}
    opt = _opt(config, "fused", min_8bit_size=0)
    opt.update(empty, {"e": np.zeros((0, 3), np.float32)})
    assert len(cuda8.launches8) == 3 and opt.state["e"]["step"] == 1


def test_compile_all_builds_the_8bit_instances_too(cuda_on_cpu, monkeypatch):  # noqa: F811
    asked = []
    monkeypatch.setattr(HostDevice, "function8", staticmethod(lambda rule, dtype: asked.append((rule, str(dtype)))))
    fused_cuda.compile_all()
    assert sorted(asked) == sorted((rule, dtype) for rule in cuda_blockwise.RULES8 for dtype in fused_cuda.PTYPES)


@pytest.mark.parametrize("dtype, grad", [(np.float16, np.float32), (BF16, np.float32), (np.float16, BF16),
                                         (np.float32, np.float64), (np.float64, np.float32)],
                         ids=lambda d: np.dtype(d).name)
def test_grads_of_another_dtype(dtype, grad, cuda8, rng):
    """A grad of another dtype than the param's: the kernel reads grads as the param's type, so it takes those that
    convert to it as the reference converts them to the math type (float32 params: float64 grads rounded once;
    float64 params: exact) and declines a 16-bit param's (rounded twice): the reference rule (here, on NumPy, the CPU
    kernel) steps those, impl="fused" without another kernel refuses them before any write."""
    params = {"w": np.array(rng.standard_normal(5000), dtype=dtype)}
    grads_seq = [{"w": np.array(rng.standard_normal(5000) * 1.001, dtype=grad)} for _ in range(2)]
    ref, a = _run("Adam", "reference", params, grads_seq)
    takes = np.dtype(dtype).itemsize != 2
    if takes:
        ours, b = _run("Adam", "fused", params, grads_seq)
        assert len(cuda8.launches8) == 2
        _assert_same(ref, ours, a, b, f"{np.dtype(dtype).name} params, {np.dtype(grad).name} grads")
    else:
        ours, b = _run("Adam", "fused", params, grads_seq)  # NumPy params: the CPU kernel takes them
        assert cuda8.launches8 == []
        _assert_same(ref, ours, a, b, "declined")
        b = {"w": params["w"].copy()}
        with pytest.MonkeyPatch.context() as m:
            m.setattr(_dispatch._numba, "usable", lambda: False)
            with pytest.raises(TypeError, match="no fused kernel computes the 8-bit state"):
                _opt("Adam", "fused").update(b, grads_seq[0])
        assert cuda8.launches8 == [] and np.array_equal(b["w"], params["w"])
