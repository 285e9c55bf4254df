"""bfloat16 NumPy params on the fused CPU engine: stepped through float32 copies (as float16 params are), the new
param rounded back once; bit for bit the reference rule, params and every state buffer, with float32 state and
with Adam's bfloat16 state, on edge values."""

import numpy as np
import pytest

import xopt
from test_edges import CONFIGS, make
from xopt.engines import fused_cpu

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = [(), (0,), (7,), (3, 5), (2 * 2**14 + 3,)]


def _bits(a):
    return np.asarray(a).view(np.uint16) if a.dtype.itemsize == 2 else np.asarray(a).view(np.uint32)


def _same(a, b, what):
    """Every bit, where neither is NaN; NaN where the other is NaN."""
    nan = np.isnan(np.asarray(a, dtype=np.float32))
    np.testing.assert_array_equal(nan, np.isnan(np.asarray(b, dtype=np.float32)), err_msg=what)
    np.testing.assert_array_equal(_bits(a)[~nan], _bits(b)[~nan], err_msg=what)


def _edge_values(n, rng):
    hard = np.array([1.0, -1.0, 1 + 2**-7, 3.3895e38, -3.3895e38, 1e-40, -1e-40, 0.0, -0.0, np.inf, -np.inf, np.nan],
                    dtype=np.float32).astype(BF16)
    spread = (rng.standard_normal(n) * 10.0 ** rng.integers(-38, 38, n)).astype(np.float32).astype(BF16)
    return np.concatenate([hard, spread])


def _run(opt, params, grads_seq):
    params = {k: v.copy() for k, v in params.items()}
    with np.errstate(all="ignore"):
        for g in grads_seq:
            opt.update(params, g)
    return params


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS)
def test_fused_bfloat16_params_equal_the_reference_bit_for_bit(config, shape, rng):
    params = {"p": rng.standard_normal(shape).astype(BF16)}
    grads_seq = [{"p": (rng.standard_normal(shape) + 0.1).astype(BF16)} for _ in range(4)]
    ref, fused = make(config, impl="reference"), make(config, impl="fused")
    a, b = _run(ref, params, grads_seq), _run(fused, params, grads_seq)
    assert b["p"].dtype == BF16
    _same(b["p"], a["p"], f"{config}: param")
    for name in ref.buffers():
        assert fused.state["p"][name].dtype == ref.state["p"][name].dtype == np.float32
        _same(fused.state["p"][name], ref.state["p"][name], f"{config}: {name}")


@pytest.mark.parametrize("config", CONFIGS)
def test_fused_bfloat16_params_on_edge_values(config, rng):
    """NaN, Inf, huge, subnormal params and grads, values of every magnitude: the reference's bits."""
    params = {"p": _edge_values(400, rng)}
    grads_seq = [{"p": rng.permutation(_edge_values(400, rng))} for _ in range(3)]
    ref, fused = make(config, impl="reference"), make(config, impl="fused")
    a, b = _run(ref, params, grads_seq), _run(fused, params, grads_seq)
    _same(b["p"], a["p"], f"{config}: param")
    for name in ref.buffers():
        _same(fused.state["p"][name], ref.state["p"][name], f"{config}: {name}")


@pytest.mark.parametrize("config", [dict(), dict(amsgrad=True, weight_decay=0.01, eps_hat=False)], ids=str)
def test_fused_bfloat16_params_with_bfloat16_state(config, rng):
    params = {"p": rng.standard_normal(5000).astype(BF16), "q": rng.standard_normal((3, 4)).astype(BF16)}
    grads_seq = [{k: (rng.standard_normal(v.shape) + 0.1).astype(BF16) for k, v in params.items()} for _ in range(4)]
    ref = xopt.Adam(impl="reference", state_dtype="bfloat16", **config)
    fused = xopt.Adam(impl="fused", state_dtype="bfloat16", **config)
    a, b = _run(ref, params, grads_seq), _run(fused, params, grads_seq)
    for k in params:
        _same(b[k], a[k], f"param {k}")
        for name in ref.buffers():
            assert fused.state[k][name].dtype == BF16
            _same(fused.state[k][name], ref.state[k][name], f"{name} of {k}")


def test_the_fused_engine_takes_bfloat16_params(monkeypatch, rng):
    """impl="fused" runs them (through the engine's checked path), not the reference."""
    calls = []
    real = fused_cpu.apply
    monkeypatch.setattr(fused_cpu, "apply", lambda opt, entries: calls.append(len(entries)) or real(opt, entries))
    opt, params = xopt.Adam(impl="fused"), {"p": rng.standard_normal(10).astype(BF16)}
    opt.update(params, {"p": np.ones(10, BF16)})
    assert calls == [1]
