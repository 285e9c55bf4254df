"""The CUDA kernels (CuPy) against the array-API reference on the same GPU arrays.

Runs wherever CuPy sees an NVIDIA GPU; skipped elsewhere.  Until it has passed on a
real GPU, xopt.engines.fused_cuda.VERIFIED stays False and impl="auto" uses a kernel only after
its self-check (xopt.engines.cuda_check) has passed on that GPU.
"""

import numpy as np
import pytest

from test_edges import CUDA_CONFIGS, make
from xopt.engines.kernels import CUDA_RULES

pytestmark = pytest.mark.gpu

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)  # CuPy 14's bfloat16
DTYPES = [np.float16, BF16, np.float32, np.float64]
SHAPES = [(), (0,), (1, 0, 2), (7,), (3, 5), (1 << 20,)]
TOL = {np.float16: dict(rtol=2e-3, atol=1e-3), BF16: dict(rtol=2e-2, atol=1e-2), np.float32: dict(rtol=1e-5, atol=1e-6),
       np.float64: dict(rtol=1e-13, atol=1e-14)}


@pytest.fixture(scope="module")
def cupy():
    cp = pytest.importorskip("cupy")
    try:
        cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        pytest.skip(f"CuPy is installed but no GPU is usable: {exc}")
    return cp


def count_launches(monkeypatch, fused_cuda) -> list:
    """A list that gains an item at each kernel launch of the CUDA engine (a step's, a norm pass's): the launcher's
    call, which ``CupyDevice.launch`` makes too."""
    launches, real = [], fused_cuda.CupyDevice.launcher

    def launcher(function, n_blocks, args):
        call = real(function, n_blocks, args)
        return lambda: (launches.append(1), call())[1]

    monkeypatch.setattr(fused_cuda.CupyDevice, "launcher", staticmethod(launcher))
    return launches


def _check(ref, fused, a, b, dtype, what, cupy):
    for k in a:
        np.testing.assert_allclose(cupy.asnumpy(b[k]), cupy.asnumpy(a[k]), **TOL[dtype], err_msg=f"{what}: {k}")
        for name in ref.buffers():
            np.testing.assert_allclose(cupy.asnumpy(fused.state[k][name]), cupy.asnumpy(ref.state[k][name]),
                                       **TOL[dtype], err_msg=f"{what}: state {name} of {k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", CUDA_CONFIGS)
def test_cuda_kernels_match_reference(config, shape, dtype, rng, cupy):
    ref, fused = make(config, impl="reference"), make(config, impl="fused")
    p0 = rng.standard_normal(shape).astype(dtype)
    a, b = {"p": cupy.asarray(p0)}, {"p": cupy.asarray(p0)}
    for step in range(4):
        g = cupy.asarray((rng.standard_normal(shape) + 0.1).astype(dtype))
        ref.update(a, {"p": g})
        fused.update(b, {"p": g})
        _check(ref, fused, a, b, dtype, f"{config} step {step + 1}", cupy)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", CUDA_CONFIGS)
def test_cuda_kernels_equal_reference_bit_for_bit(config, dtype, rng, cupy):
    """Expected, not just close: the kernel is built with --fmad=false, divides and takes roots IEEE-rounded
    (NVRTC's defaults), and rounds half params as CuPy's astype does; the CPU build already is bit-equal
    (tests/test_cuda_source.py).  A failure here with the test above passing points at rounding, not logic."""
    ref, fused = make(config, impl="reference"), make(config, impl="fused")
    p0 = rng.standard_normal(1000).astype(dtype)
    a, b = {"p": cupy.asarray(p0)}, {"p": cupy.asarray(p0)}
    for _ in range(4):
        g = cupy.asarray((rng.standard_normal(1000) + 0.1).astype(dtype))
        ref.update(a, {"p": g})
        fused.update(b, {"p": g})
    np.testing.assert_array_equal(cupy.asnumpy(b["p"]), cupy.asnumpy(a["p"]))
    for name in ref.buffers():
        np.testing.assert_array_equal(cupy.asnumpy(fused.state["p"][name]), cupy.asnumpy(ref.state["p"][name]))


@pytest.mark.parametrize("config", CUDA_CONFIGS)
def test_cuda_kernels_on_non_contiguous_params(config, rng, cupy):
    base = rng.standard_normal((8, 12)).astype(np.float32)
    a_base, b_base = cupy.asarray(base), cupy.asarray(base)
    ref, fused = make(config, impl="reference"), make(config, impl="fused")
    for _ in range(3):
        g = cupy.asarray(rng.standard_normal((4, 6)).astype(np.float32))
        ref.update({"p": a_base[::2, 1::2]}, {"p": g})
        fused.update({"p": b_base[::2, 1::2]}, {"p": g})
    np.testing.assert_allclose(cupy.asnumpy(b_base), cupy.asnumpy(a_base), **TOL[np.float32])


def test_float16_params_keep_a_small_eps(rng, cupy):
    """eps=1e-8 is 0 in float16: the kernel must take it as float (the state's type)."""
    import xopt

    p = cupy.zeros(4, dtype=cupy.float16)
    opt = xopt.Adam(eps=1e-8, eps_hat=False, impl="fused")
    opt.update({"p": p}, {"p": cupy.zeros(4, dtype=cupy.float16)})  # m = v = 0: 0 / (0 + eps) must be 0
    assert not bool(cupy.isnan(p).any())


def test_many_tensors_take_one_launch(rng, cupy, monkeypatch):
    """10,000 tensors of 64-4096 elements: one launch a step (the lane's from step 2), the reference's numbers."""
    import xopt
    from xopt.engines import fused_cuda

    launches = count_launches(monkeypatch, fused_cuda)
    sizes = rng.integers(64, 4097, 10_000)
    host = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    a = {f"w{i}": cupy.asarray(h) for i, h in enumerate(host)}
    b = {f"w{i}": cupy.asarray(h) for i, h in enumerate(host)}
    ref, fused = xopt.Adam(impl="reference"), xopt.Adam(impl="fused")
    for _ in range(3):
        g = {k: cupy.asarray(rng.standard_normal(v.shape).astype(np.float32)) for k, v in a.items()}
        ref.update(a, g)
        fused.update(b, g)
    assert len(launches) == 3
    flat = lambda d: cupy.asnumpy(cupy.concatenate([v for v in d.values()]))  # noqa: E731
    np.testing.assert_allclose(flat(b), flat(a), **TOL[np.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", CUDA_CONFIGS)
def test_subnormals_as_numpy(config, dtype, rng, cupy):
    """Built without -ftz: on values around the smallest normal number the kernel gives NumPy's bits."""
    tiny = ml_dtypes.finfo(dtype).smallest_normal
    p0 = (rng.standard_normal(1000) * tiny).astype(dtype)
    grads = [(rng.standard_normal(1000) * tiny).astype(dtype) for _ in range(3)]
    ref, fused = make(config, impl="reference"), make(config, impl="fused")
    a, b = {"p": p0.copy()}, {"p": cupy.asarray(p0)}
    with np.errstate(all="ignore"):
        for g in grads:
            ref.update(a, {"p": g})
            fused.update(b, {"p": cupy.asarray(g)})
    np.testing.assert_array_equal(cupy.asnumpy(b["p"]), a["p"])
    for name in ref.buffers():
        np.testing.assert_array_equal(cupy.asnumpy(fused.state["p"][name]), ref.state["p"][name])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("rule", CUDA_RULES)
def test_self_check_passes(rule, dtype, cupy):
    from xopt.engines import cuda_check, fused_cuda

    result = cuda_check.self_check(rule, dtype)
    assert result.passed, str(result)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_bfloat16_state_self_check_passes(dtype, cupy):
    from xopt.engines import cuda_check

    result = cuda_check.self_check("Adam", f"{dtype}/bfloat16")
    assert result.passed, str(result)


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", ["Adam", "Adam-amsgrad-wd", "AdamW-amsgrad"])
def test_bfloat16_state_equals_reference_bit_for_bit(config, dtype, rng, cupy):
    ref, fused = make(config, impl="reference", state_dtype="bfloat16"), make(config, impl="fused",
                                                                              state_dtype="bfloat16")
    p0 = rng.standard_normal(1000).astype(dtype)
    a, b = {"p": cupy.asarray(p0)}, {"p": cupy.asarray(p0)}
    for _ in range(4):
        g = cupy.asarray((rng.standard_normal(1000) + 0.1).astype(dtype))
        ref.update(a, {"p": g})
        fused.update(b, {"p": g})
    np.testing.assert_array_equal(cupy.asnumpy(b["p"]), cupy.asnumpy(a["p"]))
    for name in ref.buffers():
        assert fused.state["p"][name].dtype == BF16
        np.testing.assert_array_equal(cupy.asnumpy(fused.state["p"][name]).view(np.uint16),
                                      cupy.asnumpy(ref.state["p"][name]).view(np.uint16))


def test_auto_runs_the_kernel_after_its_self_check(rng, cupy, monkeypatch, cuda_cache_dir):
    """The self-check runs in a child process (this one launches the step only, its kernel read from the disk
    cache the child filled), its verdict kept on disk: asked again, as a new process would, it is read there and
    no child starts."""
    import xopt
    from cupy.cuda import compiler
    from xopt.engines import cuda_check, cuda_device, fused_cuda

    cuda_device._function.cache_clear()
    compiles, real_compile = [], compiler._NVRTCProgram.compile  # xopt's builds (not CuPy's own kernels)
    monkeypatch.setattr(compiler._NVRTCProgram, "compile", lambda self, *a, **k: (
        compiles.append(1) if "xopt_step" in str(getattr(self, "src", "")) else None, real_compile(self, *a, **k))[1])
    monkeypatch.setattr(cuda_check, "RESULTS", {})
    launches, children, real_child = count_launches(monkeypatch, fused_cuda), [], cuda_check.in_child
    monkeypatch.setattr(cuda_check, "in_child", lambda *args: (children.append(args), real_child(*args))[1])
    p = {"w": cupy.asarray(rng.standard_normal(1000).astype(np.float32))}
    xopt.Adam().update(p, {"w": cupy.ones(1000, dtype=cupy.float32)})
    key = (cupy.cuda.Device().id, 4, "float32")
    assert cuda_check.RESULTS[key].passed, str(cuda_check.RESULTS[key])
    assert len(launches) == 1 and len(children) == 1
    assert "configurations" in cuda_check.RESULTS[key].checked and cuda_check.RESULTS[key].kept
    assert compiles == [], "the child built the kernel: this process read it from the disk cache"
    assert cuda_check.verdict(*key).passed and len(children) == 1


@pytest.mark.parametrize("extra", [{}, dict(clip_grad_norm=1.0), dict(overrides={"b*": {"lr": 0.1}}),
                                   dict(clip_grad_norm=1.0, skip_nonfinite=True)], ids=str)
def test_lane_one_upload_and_one_launch_a_step_on_the_current_stream(extra, rng, cupy, monkeypatch):
    """From the second step the lane takes each step: one table upload and one step launch (after the norm pass
    where clip_grad_norm or skip_nonfinite asks), new grad arrays each step, all on the current stream; the
    reference's numbers (a non-finite grad skips a step); the lane's norm the reference's up to its last bits."""
    import xopt
    from xopt import _lane
    from xopt.engines import fused_cuda

    uploads, answers, launches = [], [], count_launches(monkeypatch, fused_cuda)
    real_upload, real_take = fused_cuda.CupyDevice.upload, _lane.take
    monkeypatch.setattr(fused_cuda.CupyDevice, "upload", staticmethod(lambda h: (uploads.append(1), real_upload(h))[1]))
    monkeypatch.setattr(_lane, "take", lambda *args: (answers.append(real_take(*args)), answers[-1])[1])
    host = {"w": rng.standard_normal(5000).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    a, b = ({k: cupy.asarray(v) for k, v in host.items()} for _ in range(2))
    ref, fused = xopt.Adam(impl="reference", **extra), xopt.Adam(impl="fused", **extra)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for i in range(5):
            g = {k: cupy.asarray(rng.standard_normal(v.shape).astype(np.float32) * 3) for k, v in host.items()}
            if i == 3 and extra.get("skip_nonfinite"):
                g["w"][7] = cupy.inf
            ref.update(a, g)
            answers.clear()
            fused.update(b, {k: v.copy() for k, v in g.items()})
            assert answers == [i > 0]
    stream.synchronize()
    norm_pass = "clip_grad_norm" in extra
    skipped = 1 if extra.get("skip_nonfinite") else 0
    first = 2 if "overrides" in extra else 1
    assert len(uploads) == first + 4 and len(launches) == first + 4 - skipped + (4 if norm_pass else 0)
    assert fused.skipped_steps == ref.skipped_steps == skipped
    for k in host:
        np.testing.assert_allclose(cupy.asnumpy(b[k]), cupy.asnumpy(a[k]), **TOL[np.float32])
    if norm_pass:
        assert float(fused.last_grad_norm) == pytest.approx(float(ref.last_grad_norm), rel=1e-14)


def test_lane_declines_what_it_must_not_take(rng, cupy):
    """A grad that is its param, of another dtype, or not contiguous: the lane declines; the checked path raises
    or takes the step as it would without the lane."""
    import xopt

    p = {"w": cupy.asarray(rng.standard_normal(100).astype(np.float32))}
    opt = xopt.Adam(impl="fused")
    for _ in range(2):
        opt.update(p, {"w": cupy.ones(100, dtype=cupy.float32)})
    with pytest.raises(ValueError):
        opt.update(p, {"w": p["w"]})
    opt.update(p, {"w": cupy.ones(100, dtype=cupy.float64)})
    opt.update(p, {"w": cupy.ones(200, dtype=cupy.float32)[::2]})
    assert opt.iter == 4
