"""bfloat16 in the CUDA kernel, on its CPU build (as tests/test_cuda_source.py runs it): bfloat16 params (their 16
bits, math in float32) and Adam's state_dtype="bfloat16" (m, v, v_max stored as bfloat16, math in float32), bit for
bit the reference rule; the edge values of the rounding (ties, subnormals, huge, Inf, NaN)."""

from __future__ import annotations

import numpy as np
import pytest

import xopt
from xopt.engines import cuda_check, fused_cuda
from test_cuda_source import (ALL_CONFIGS, C, _assert_same, _placed, _run, cuda_on_cpu,  # noqa: F401  (a fixture)
                              make)

ml_dtypes = pytest.importorskip("ml_dtypes")
pytestmark = pytest.mark.cuda_source
BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = [(), (0,), (7,), (3, 5), (C - 1,), (C + 9,)]


def _bits(a):
    return np.asarray(a).view(np.uint16)


def _hard_bfloat16(n_random, rng):
    """bfloat16 values the rounding must get right (as float32), then random ones over many magnitudes."""
    one = np.float32(1.0)
    hard = np.array([one, -one, 1 + 2**-7, 1 + 2**-6, 3.3895e38, -3.3895e38, 1e-40, -1e-40, 9.2e-41, 0.0, -0.0,
                     np.inf, -np.inf, np.nan], dtype=np.float32)
    payload = np.array([0x7FE1, 0xFFA5], dtype=np.uint16).view(BF16)  # NaNs with payloads
    spread = rng.standard_normal(n_random).astype(np.float32) * np.float32(10.0) ** rng.integers(-38, 38, n_random)
    return np.concatenate([hard.astype(BF16), payload, spread.astype(BF16)])


@pytest.mark.parametrize("offset", [0, 1])
def test_the_param_rounds_as_ml_dtypes_rounds(offset, cuda_on_cpu, rng):  # noqa: F811
    """SGD with lr=1: the new param is p - g in float32, then bfloat16.  Grads chosen so that p - g is a tie
    (half way between two bfloat16 numbers: to even), just off a tie, past the largest bfloat16 (to Inf), in the
    subnormals, Inf - Inf (NaN) and NaN (with a payload, which ml_dtypes drops); then random values of every
    magnitude."""
    p = _hard_bfloat16(3000, rng)
    f = p.astype(np.float32)
    g = np.zeros_like(f)
    # ties to even: 1 + 2^-8 -> 1, -1 - 2^-8 -> -1, 1 + 2^-7 + 2^-8 -> 1 + 2^-6; past a tie: up;
    # half way from the largest bfloat16 to 2^128: Inf; short of it: the largest
    g[:6] = [-2**-8, 2**-8, -2**-8, -1.5 * 2**-8, -2.0**119, 2.0**118]
    g[6:9] = [2e-40, -1e-40, 1e-41]  # subnormal results
    g[11] = np.inf  # Inf - Inf: NaN
    g[16:] = rng.standard_normal(g.size - 16).astype(np.float32) * np.abs(f[16:]) * np.float32(0.01)
    grads = g.astype(BF16)
    assert np.array_equal(grads.astype(np.float32)[:6], g[:6])  # exact in bfloat16
    with np.errstate(invalid="ignore"):
        exact = f - grads.astype(np.float32)  # what the rounding gets: the float32 result
    assert exact[0] == 1 + 2**-8 and exact[2] == 1 + 2**-7 + 2**-8 and np.isfinite(exact[4])  # ties, as meant
    params = {"w": _placed(p, offset)}
    ref, a = _run(("SGD", dict(lr=1.0)), params, [{"w": _placed(grads, offset)}], impl="reference")
    ours, b = _run(("SGD", dict(lr=1.0)), params, [{"w": _placed(grads, offset)}], impl="fused")
    assert cuda_on_cpu.launches == 1
    np.testing.assert_array_equal(_bits(b["w"]), _bits(a["w"]))  # every bit: NaN as ml_dtypes writes it too
    np.testing.assert_array_equal(_bits(b["w"]), _bits(exact.astype(BF16)))
    want = [1.0, -1.0, 1 + 2**-6, 1 + 2**-6 + 2**-7, np.inf, f[5]]
    np.testing.assert_array_equal(b["w"][:6].astype(np.float32), np.array(want, dtype=np.float32))
    assert np.isnan(b["w"][11])


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=str)
def test_edge_values_in_every_rule(config, cuda_on_cpu, rng):  # noqa: F811
    """Params and grads of every magnitude, NaN, Inf, subnormal and huge, through every rule: the reference's bits
    in the param and every state buffer (float32), three steps in one launch each."""
    params = {"w": _placed(_hard_bfloat16(500, rng)), "u": _placed(_hard_bfloat16(77, rng), 1)}
    grads_seq = [{k: np.array(rng.permutation(_hard_bfloat16(v.size - 16, rng))).reshape(v.shape)
                  for k, v in params.items()} for _ in range(3)]
    ref, a = _run(config, params, grads_seq, impl="reference")
    ours, b = _run(config, params, grads_seq, impl="fused")
    assert cuda_on_cpu.launches == 3
    _assert_same(ref, ours, a, b, config)
    for k in a:
        np.testing.assert_array_equal(np.isnan(b[k]), np.isnan(a[k]))


STATE_CONFIGS = [("Adam", {}), ("Adam", dict(amsgrad=True, weight_decay=0.01, eps_hat=False)), ("AdamW", {}),
                 ("AdamW", dict(amsgrad=True, clip_grad_norm=1.0))]


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", STATE_CONFIGS, ids=str)
def test_bfloat16_state_equals_the_reference_bit_for_bit(config, dtype, cuda_on_cpu, rng):  # noqa: F811
    """state_dtype="bfloat16": every shape aligned and offset by one element in one launch, four steps, a NaN grad;
    the param and each state buffer (bfloat16) with the reference's bits."""
    name, hyper = config
    values = [np.array(rng.standard_normal(s), dtype=dtype) for s in SHAPES]
    params = {**{f"p{i}": _placed(v) for i, v in enumerate(values)},
              **{f"q{i}": _placed(v, 1) for i, v in enumerate(values)}}
    grads_seq = [{k: _placed(np.array(rng.standard_normal(v.shape) + 0.1, dtype=dtype)) for k, v in params.items()}
                 for _ in range(4)]
    grads_seq[2]["p3"][1, 2] = np.nan
    config = (name, dict(hyper, state_dtype="bfloat16"))
    ref, a = _run(config, params, grads_seq, impl="reference")
    ours, b = _run(config, params, grads_seq, impl="fused")
    assert cuda_on_cpu.launches == 4
    assert all(cuda_on_cpu.wide), "the aligned tensors took 16-byte accesses"
    for k in a:
        np.testing.assert_array_equal(_bits(b[k]) if dtype != np.float32 else b[k],
                                      _bits(a[k]) if dtype != np.float32 else a[k], err_msg=k)
        for buf in ref.buffers():
            assert ours.state[k][buf].dtype == ref.state[k][buf].dtype == BF16
            same = (_bits(ours.state[k][buf]) == _bits(ref.state[k][buf])) | (
                np.isnan(ours.state[k][buf]) & np.isnan(ref.state[k][buf]))
            assert same.all(), f"{buf} of {k}"


@pytest.mark.parametrize("offset", [0, 1])
def test_bfloat16_state_of_float32_params_takes_wide_accesses_where_aligned(offset, cuda_on_cpu, rng):  # noqa: F811
    """float32 params, bfloat16 state: 8 elements a thread, so each operand's group is whole 16-byte words (p and g
    two each, m and v one each): loads of p, g, m, v and stores of p, m, v."""
    n = 2 * C + 13
    params = {"w": _placed(rng.standard_normal(n).astype(np.float32), offset)}
    grads = {"w": _placed(rng.standard_normal(n).astype(np.float32), offset)}
    ref, a = _run(("Adam", dict(state_dtype="bfloat16")), params, [grads], impl="reference")
    ours, b = _run(("Adam", dict(state_dtype="bfloat16")), params, [grads], impl="fused")
    np.testing.assert_array_equal(b["w"], a["w"])
    per_group = 2 + 2 + 1 + 1 + 2 + 1 + 1
    assert cuda_on_cpu.wide == [0 if offset else (n // 8) * per_group]


def test_float64_params_with_bfloat16_state_take_the_reference(cuda_on_cpu, rng):  # noqa: F811
    """No kernel keeps bfloat16 state for float64 math: impl="fused" says so before anything is written,
    impl="auto" runs the reference rule."""
    params = {"w": rng.standard_normal(10)}
    auto = xopt.Adam(state_dtype="bfloat16")
    auto.update(params, {"w": rng.standard_normal(10)})
    assert cuda_on_cpu.launches == 0 and auto.state["w"]["m"].dtype == BF16
    before = params["w"].copy()
    with pytest.raises(TypeError, match="no fused kernel takes param 'w'.*float64"):
        xopt.Adam(state_dtype="bfloat16", impl="fused").update(params, {"w": rng.standard_normal(10)})
    np.testing.assert_array_equal(params["w"], before)
    assert fused_cuda.kind(auto, np.dtype(np.float64)) is None
    assert fused_cuda.kind(auto, BF16).state == BF16 and fused_cuda.kind(make("Adam"), BF16).state == np.float32


def test_kernel_names():
    assert fused_cuda.kernel_name(4, BF16) == "xopt_step<4, xopt_bf16, float>"
    assert fused_cuda.kernel_name(4, "float32", "bfloat16") == "xopt_step<4, float, float, xopt_bf16>"
    assert fused_cuda.norm_name("bfloat16") == "xopt_norm<xopt_bf16, float>"
    with pytest.raises(ValueError, match="no kernel keeps bfloat16 state for float64 params"):
        fused_cuda.kernel_name(4, "float64", "bfloat16")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_self_check_of_bfloat16_state_is_its_own_case(dtype, cuda_on_cpu, rng):  # noqa: F811
    """The self-check of "float32/bfloat16" runs every Adam configuration with bfloat16 state (and passes); under
    impl="auto" a step with bfloat16 state asks for that case's verdict, apart from the params' own."""
    case = f"{dtype}/bfloat16"
    result = cuda_check.self_check("Adam", case)
    assert result.passed, str(result)
    assert result.kernel == f"xopt_step<4, {fused_cuda.PTYPES[dtype][0]}, float, xopt_bf16>"
    assert cuda_on_cpu.launches == 2 * len(cuda_check.CONFIGS[4])
    params = {"w": np.array(rng.standard_normal(40), dtype=BF16 if dtype == "bfloat16" else dtype)}
    opt = xopt.Adam(state_dtype="bfloat16")
    for _ in range(3):
        opt.update(params, {"w": np.ones_like(params["w"])})
    assert list(cuda_check.RESULTS) == [(0, 4, case)] and cuda_check.RESULTS[0, 4, case].passed
    assert opt.state["w"]["m"].dtype == BF16


def test_self_check_of_bfloat16_state_needs_float_math():
    with pytest.raises(ValueError, match="no kernel keeps bfloat16 state for float64 params"):
        cuda_check.configs_for(4, "float64", "bfloat16")
    with pytest.raises(ValueError, match="rule 3 has no kernel with bfloat16 state"):
        cuda_check.configs_for(3, "float32", "bfloat16")
