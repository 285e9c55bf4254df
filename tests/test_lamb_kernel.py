"""LAMB's fused CPU kernel (xopt.engines.cpu_norms) against its reference rule: the same bits, step after step.

The norms are the one place where order matters: ``xopt._norms`` defines it (chunks, 16 lanes, pairwise,
chunks in order), the reference rule follows it in NumPy, the kernel in its two phases.  The first test
holds ``_norms`` to that definition written as plain loops.
"""

import math

import numpy as np
import pytest

import xopt
from xopt import _norms

pytest.importorskip("xopt.engines.fused_cpu", reason="numba is not installed")

from xopt.engines import cpu_arrays, cpu_drivers  # noqa: E402

CONFIGS = {
    "default": dict(lr=0.01),
    "decay-eps-root": dict(lr=0.02, beta1=0.8, beta2=0.99, eps=1e-4, eps_root=1e-8, weight_decay=0.1),
    "schedule": dict(lr=lambda count: 0.05 / (1 + count), weight_decay=0.01),
    "overrides": dict(lr=0.01, weight_decay=0.01, overrides={"b*": {"weight_decay": 0.0, "lr": 0.03}}),
    "clip": dict(lr=0.01, weight_decay=0.01, clip_grad_norm=0.5),
}
SHAPES = {"w": (33, 7), "b": (7,), "b1": (1,), "s": (), "e": (0,), "big": (2 * _norms.CHUNK + 37,), "zero": (5, 3),
          "quiet": (4, 4)}


def _plain_squared_norm(x):
    """The order of xopt._norms written as loops over Python floats."""
    x = [float(v) for v in np.asarray(x).reshape(-1)]
    total = 0.0
    for at in range(0, len(x), _norms.CHUNK):
        chunk = x[at:at + _norms.CHUNK]
        lanes = [0.0] * _norms.LANES
        for i, v in enumerate(chunk):
            lanes[i % _norms.LANES] += v * v
        while len(lanes) > 1:
            lanes = [lanes[k] + lanes[k + 1] for k in range(0, len(lanes), 2)]
        total += lanes[0]
    return total


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1000, _norms.CHUNK, _norms.CHUNK + 1, 2 * _norms.CHUNK + 33])
def test_squared_norm_is_its_definition(size, dtype, rng):
    x = (rng.standard_normal(size) * np.exp(rng.uniform(-30, 30, size))).astype(dtype)  # order shows in the bits
    assert _norms.squared_norm(np, x) == _plain_squared_norm(x)
    assert _norms.CHUNK == cpu_drivers.CHUNK


def test_the_kernel_reads_the_scalars_where_lamb_puts_them():
    from xopt.engines import cpu_norms

    kernel = xopt.LAMB.kernel
    assert kernel.size == len(kernel.scalars) + 1 == cpu_norms.RATIO + 1  # the ratio last, then the clip scale
    assert kernel.scalars[9] == "weight_decay" and kernel.order(xopt.LAMB().scalars(1))[-1] == -1.0


def _spread(rng, size, dtype):
    """Values over many magnitudes: a sum of their squares in another order would show in its bits."""
    return (rng.standard_normal(size) * np.exp(rng.uniform(-20, 20, size))).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("size", [0, 5, 16, 37, 1000, _norms.CHUNK])
@pytest.mark.parametrize("decay, clip", [(0.0, 1.0), (0.1, 1.0), (0.0, 0.5), (0.1, 0.5)])
def test_the_norms_phase_of_a_chunk_is_the_order_of_norms(size, dtype, decay, clip, rng):
    """The kernel's norms' phase over one chunk (sixteen lanes in registers, u a vector at a time, a tail): Σ p²
    and Σ u² of xopt._norms, u as the reference rule computes it, bit for bit."""
    from xopt.engines import cpu_norms

    p, g, m = (_spread(rng, size, dtype) for _ in range(3))
    v = np.abs(_spread(rng, size, dtype))
    opt = xopt.LAMB(lr=0.01, beta1=0.8, beta2=0.99, eps_root=1e-8, weight_decay=decay)
    scalars = opt.scalars(3)
    row = np.array([*opt.kernel.order(scalars), clip], dtype=dtype)
    k = {name: dtype(value) for name, value in scalars.items()}
    with np.errstate(all="ignore"):
        g_clipped = g * dtype(clip) if clip != 1.0 else g
        m_new = k["one_minus_beta1"] * g_clipped + k["beta1"] * m
        v_new = k["one_minus_beta2"] * (g_clipped * g_clipped) + k["beta2"] * v
        u = ((m_new * k["inverse_bias_correction1"])
             / (np.sqrt(v_new * k["inverse_bias_correction2"] + k["eps_root"]) + k["eps"]))
        if decay:
            u = u + k["weight_decay"] * p
        sums = cpu_norms._chunk_sums(p, g, m, v, row)
    assert sums == (_norms.squared_norm(np, p), _norms.squared_norm(np, u))


def _grads(rng, shapes, dtype):
    out = {k: rng.standard_normal(shape).astype(dtype) for k, shape in shapes.items()}
    for name in ("zero", "quiet"):  # params whose grads are always 0: u is 0 (weight decay aside)
        if name in out:
            out[name][...] = 0.0
    return out


def _run(config, impl, dtype, steps=5, shapes=SHAPES, grads=None, **extra):
    rng = np.random.default_rng(3)
    params = {k: rng.standard_normal(shape).astype(dtype) for k, shape in shapes.items()}
    if "zero" in params:
        params["zero"][...] = 0.0  # a param whose norm is 0: the ratio is 1
    opt = xopt.LAMB(impl=impl, **{**CONFIGS[config], **extra})
    grads_rng = np.random.default_rng(4)
    with np.errstate(all="ignore"):
        for step in range(steps):
            g = _grads(grads_rng, shapes, dtype) if grads is None else grads[step]
            if step < 2:  # "late" joins at the third step: parts of two step counts
                g = {k: v for k, v in g.items() if k != "late"}
            opt.update({k: v for k, v in params.items() if k in g}, g)
    return params, opt


def _assert_same(a, b, what):
    (p_a, opt_a), (p_b, opt_b) = a, b
    for k in p_a:
        np.testing.assert_array_equal(p_b[k], p_a[k], err_msg=f"{what}: param {k}")
        for name in ("m", "v"):
            np.testing.assert_array_equal(opt_b.state[k][name], opt_a.state[k][name], err_msg=f"{what}: {name} of {k}")
        assert opt_b.state[k]["step"] == opt_a.state[k]["step"]
    assert (opt_a.iter, opt_a.skipped_steps) == (opt_b.iter, opt_b.skipped_steps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", CONFIGS)
def test_fused_kernel_is_the_reference_bit_for_bit(config, dtype):
    shapes = {**SHAPES, "late": (9, 2)}
    ref = _run(config, "reference", dtype, shapes=shapes)
    fused = _run(config, "fused", dtype, shapes=shapes)
    _assert_same(ref, fused, config)
    assert not np.array_equal(fused[0]["w"], _run(config, "fused", dtype, steps=0, shapes=shapes)[0]["w"])


@pytest.mark.parametrize("skip", [False, True])
def test_nonfinite_grads_as_the_reference(skip):
    rng = np.random.default_rng(5)
    shapes = {"w": (40,), "b": (3,)}
    grads = [_grads(rng, shapes, np.float32) for _ in range(4)]
    grads[2]["w"][7] = np.nan
    grads[3]["b"][1] = np.inf
    ref = _run("decay-eps-root", "reference", np.float32, steps=4, shapes=shapes, grads=grads, skip_nonfinite=skip)
    fused = _run("decay-eps-root", "fused", np.float32, steps=4, shapes=shapes, grads=grads, skip_nonfinite=skip)
    _assert_same(ref, fused, "skip" if skip else "propagate")
    assert fused[1].skipped_steps == (2 if skip else 0)
    assert np.all(np.isfinite(fused[0]["w"])) == skip


def test_several_threads_are_one_thread_bit_for_bit(monkeypatch):
    """A step of at least PARALLEL_MIN elements splits over threads: the norms chunk by chunk on every thread,
    added in chunk order, then the elements with each tensor's ratio: the bits of one thread, and the reference's."""
    split = []
    ratios = cpu_arrays.Arrays._ratios
    monkeypatch.setattr(cpu_arrays.Arrays, "_ratios", lambda self, threads: split.append(threads) or ratios(self, threads))
    shapes = {"big": (cpu_arrays.PARALLEL_MIN + 3 * cpu_drivers.CHUNK + 11,), "b": (5,)}
    before = xopt.set_num_threads(1)
    try:
        one = _run("decay-eps-root", "fused", np.float32, steps=3, shapes=shapes)
        xopt.set_num_threads(2)
        two = _run("decay-eps-root", "fused", np.float32, steps=3, shapes=shapes)
        clipped = _run("clip", "fused", np.float32, steps=2, shapes=shapes)
    finally:
        xopt.set_num_threads(before)
    assert split == [2] * 5, "the two-thread steps did not take the norms' phase over threads"
    _assert_same(one, two, "two threads")
    _assert_same(_run("decay-eps-root", "reference", np.float32, steps=3, shapes=shapes), two, "reference")
    _assert_same(_run("clip", "reference", np.float32, steps=2, shapes=shapes), clipped, "clipped, two threads")


def test_float16_params_step_through_float32_copies(rng):
    start = {"w": rng.standard_normal((6, 5)).astype(np.float16), "b": rng.standard_normal(5).astype(np.float16)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float16) for k, v in start.items()} for _ in range(3)]
    runs = {}
    for impl in ("reference", "fused"):
        opt = xopt.LAMB(lr=0.01, weight_decay=0.01, impl=impl)
        params = {k: v.copy() for k, v in start.items()}
        for g in grads:
            opt.update(params, g)
        runs[impl] = params, opt
    _assert_same(runs["reference"], runs["fused"], "float16")
    assert runs["fused"][0]["w"].dtype == np.float16 and runs["fused"][1].state["w"]["m"].dtype == np.float32


def test_the_kernel_runs_not_the_rule(monkeypatch):
    """NumPy float32/64 params: the first step (the checked path) and the next (the lane) run the kernel."""
    def refuse(*args):
        raise AssertionError("the reference rule ran")

    monkeypatch.setattr(xopt.LAMB, "rule", refuse)
    params = {"w": np.ones(10), "b": np.ones(3, dtype=np.float32)}
    opt = xopt.LAMB(weight_decay=0.01)
    for _ in range(3):
        opt.update(params, {"w": np.full(10, 0.5), "b": np.full(3, 0.5, dtype=np.float32)})
    assert opt.state["w"]["step"] == 3 and not np.array_equal(params["w"], np.ones(10))


def test_trust_ratio_is_one_where_a_norm_is_zero():
    """Zero param (no decay): ‖W‖ = 0, the ratio is 1 and the step is Adam's; zero grads and zero state with
    no decay: ‖u‖ = 0 and nothing moves."""
    opt = xopt.LAMB(lr=0.1, impl="fused")
    params = {"zero": np.zeros(4), "still": np.ones(4)}
    opt.update(params, {"zero": np.full(4, 2.0), "still": np.zeros(4)})
    u = 2.0 / (math.sqrt(4.0) + opt.eps)  # m̂ = g, v̂ = g²: u = g / (|g| + eps)
    np.testing.assert_allclose(params["zero"], np.full(4, -0.1 * u), rtol=1e-12)
    np.testing.assert_array_equal(params["still"], np.ones(4))


def test_the_cuda_engine_declines_lamb():
    from xopt.engines import kernels

    assert xopt.LAMB.kernel.norms and kernels.RULES["lamb"] not in kernels.CUDA_RULES
    fused_cuda = pytest.importorskip("xopt.engines.fused_cuda")
    assert not fused_cuda.supports(xopt.LAMB()) and fused_cuda.kind(xopt.LAMB(), np.dtype(np.float32)) is None
    assert fused_cuda.supports(xopt.Adam())
    from xopt.engines import cuda_check

    with pytest.raises(ValueError, match="no CUDA kernel"):
        cuda_check.rule_of("LAMB")
    assert kernels.RULES["lamb"] not in cuda_check.CONFIGS


def test_fused_refuses_arrays_it_cannot_take_and_writes_nothing():
    torch = pytest.importorskip("torch")
    opt = xopt.LAMB(impl="fused")
    params = {"a": np.ones(3), "t": torch.ones(3, dtype=torch.float64)}
    with pytest.raises(TypeError, match="param 't'"):
        opt.update(params, {"a": np.ones(3), "t": torch.ones(3, dtype=torch.float64)})
    assert opt.state == {} and np.array_equal(params["a"], np.ones(3))


def test_torch_cpu_tensors_step_as_numpy_arrays():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    start = {"w": rng.standard_normal((20, 3)), "b": rng.standard_normal(3)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in start.items()} for _ in range(4)]
    outs = []
    for make in (np.array, torch.tensor):
        opt = xopt.LAMB(lr=0.01, weight_decay=0.01)
        params = {k: make(v.copy()) for k, v in start.items()}
        for g in grads:
            opt.update(params, {k: make(v) for k, v in g.items()})
        outs.append({k: np.asarray(v) for k, v in params.items()})
    for k in start:
        np.testing.assert_array_equal(outs[1][k], outs[0][k])


def test_a_run_resumed_from_a_state_file_is_the_reference_run(tmp_path):
    rng = np.random.default_rng(7)
    start = {"w": rng.standard_normal((12, 5)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()} for _ in range(6)]
    kwargs = dict(lr=lambda count: 0.02 * 0.9**count, weight_decay=0.01, overrides={"b": {"weight_decay": 0.0}})
    straight, params = xopt.LAMB(impl="reference", **kwargs), {k: v.copy() for k, v in start.items()}
    for g in grads:
        straight.update(params, g)
    first, resumed = xopt.LAMB(impl="fused", **kwargs), {k: v.copy() for k, v in start.items()}
    for g in grads[:3]:
        first.update(resumed, g)
    first.save(tmp_path / "lamb.npz")
    second = xopt.LAMB(impl="fused", **kwargs)
    second.load(tmp_path / "lamb.npz", resumed)
    for g in grads[3:]:
        second.update(resumed, g)
    _assert_same((params, straight), (resumed, second), "resumed")
