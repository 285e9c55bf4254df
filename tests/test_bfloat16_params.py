"""bfloat16 params compute in float32, as float16 params do: float32 state, the new param rounded to bfloat16
(nearest even) once at the end of each step."""

import math

import numpy as np
import pytest

import xopt
from xopt.state_io import load_state, save_state

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.float32

CONFIGS = {
    "Adam": dict(),
    "Adam-wd-eps": dict(weight_decay=0.01, eps_hat=False, eps=1e-6),
    "AdamW-amsgrad": dict(amsgrad=True, weight_decay=0.1),
}


def by_hand(config, p0, grads):
    """Adam in float32, written out here: every operation on float32 arrays with float32 scalars (the Python
    floats the rule multiplies with are exact in float64 and round to float32 as NumPy rounds them), the new
    param rounded to bfloat16 at the end of each step.  Returns (param, m, v, v_max) after the steps."""
    kw = {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-7, "weight_decay": 0.0, "amsgrad": False,
          "eps_hat": True, **CONFIGS[config]}
    if config.startswith("AdamW"):
        kw = {**kw, "eps": 1e-8, "eps_hat": False}
    b1, b2 = kw["beta1"], kw["beta2"]
    p = p0
    m = np.zeros(p0.shape, F32)
    v = np.zeros(p0.shape, F32)
    v_max = np.zeros(p0.shape, F32)
    for t, g in enumerate(grads, start=1):
        x, gf = p.astype(F32), g.astype(F32)
        if config.startswith("AdamW"):
            x = x * F32(1.0 - kw["lr"] * kw["weight_decay"])
        elif kw["weight_decay"]:
            gf = gf + F32(kw["weight_decay"]) * x
        m = m + F32(1.0 - b1) * (gf - m)
        v = F32(b2) * v + F32(1.0 - b2) * gf * gf
        v_max = np.maximum(v_max, v)
        vi = v_max if kw["amsgrad"] else v
        if kw["eps_hat"]:
            step_size = kw["lr"] * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
            x = x - F32(step_size) * (m / (np.sqrt(vi) + F32(kw["eps"])))
        else:
            step_size = kw["lr"] / (1.0 - b1**t)
            x = x - F32(step_size) * (m / (np.sqrt(vi) / F32(math.sqrt(1.0 - b2**t)) + F32(kw["eps"])))
        assert x.dtype == F32
        p = x.astype(BF16)  # ml_dtypes: nearest even, NaN stays NaN
    return p, m, v, v_max


def _inputs(rng, shape, steps=5):
    p0 = rng.standard_normal(shape).astype(BF16)
    grads = [rng.standard_normal(shape).astype(BF16) for _ in range(steps)]
    return p0, grads


@pytest.mark.parametrize("shape", [(), (7,), (40, 30)], ids=str)
@pytest.mark.parametrize("config", CONFIGS)
def test_numpy_bfloat16_params_step_as_float32_math_rounded_each_step(config, shape, rng):
    p0, grads = _inputs(rng, shape)
    opt, params = getattr(xopt, config.split("-")[0])(**CONFIGS[config], impl="reference"), {"w": p0.copy()}
    for g in grads:
        opt.update(params, {"w": g})
    p, m, v, v_max = by_hand(config, p0, grads)
    assert params["w"].dtype == BF16
    np.testing.assert_array_equal(params["w"].view(np.uint16), p.view(np.uint16))
    st = opt.state["w"]
    assert st["m"].dtype == st["v"].dtype == F32
    np.testing.assert_array_equal(st["m"], m)
    np.testing.assert_array_equal(st["v"], v)
    if "amsgrad" in config:
        np.testing.assert_array_equal(st["v_max"], v_max)


def test_torch_bfloat16_tensors_step_as_numpy_bfloat16_arrays(rng):
    torch = pytest.importorskip("torch")
    p0, grads = _inputs(rng, (9, 11))
    as_torch = lambda a: torch.from_numpy(a.view(np.uint16).astype(np.int16)).view(torch.bfloat16)  # noqa: E731
    ours, theirs = xopt.AdamW(amsgrad=True), xopt.AdamW(amsgrad=True)
    a, b = {"w": p0.copy()}, {"w": as_torch(p0).clone()}
    for g in grads:
        ours.update(a, {"w": g})
        theirs.update(b, {"w": as_torch(g)})
    assert b["w"].dtype == torch.bfloat16 and theirs.state["w"]["v"].dtype == torch.float32
    np.testing.assert_array_equal(b["w"].view(torch.int16).numpy().view(np.uint16), a["w"].view(np.uint16))
    for name in ("m", "v", "v_max"):
        np.testing.assert_array_equal(theirs.state["w"][name].numpy(), ours.state["w"][name])


def test_v_decays_where_bfloat16_math_would_hold_it():
    """beta2 = 0.999 is 1.0 in bfloat16: v computed in bfloat16 would never decay.  In float32 it does."""
    assert F32(0.999).astype(BF16) == 1.0
    opt, params = xopt.Adam(), {"w": np.ones(4, BF16)}
    opt.update(params, {"w": np.full(4, 2.0, BF16)})
    first = opt.state["w"]["v"].copy()
    for _ in range(20):
        opt.update(params, {"w": np.zeros(4, BF16)})
    np.testing.assert_allclose(opt.state["w"]["v"], first * F32(0.999) ** 20, rtol=1e-5)
    assert np.all(opt.state["w"]["v"] < first)


def test_bfloat16_state_stays_bfloat16_for_bfloat16_params(rng):
    p0, grads = _inputs(rng, (33,))
    opt, params = xopt.Adam(state_dtype="bfloat16"), {"w": p0.copy()}
    for g in grads:
        opt.update(params, {"w": g})
    assert opt.state["w"]["m"].dtype == opt.state["w"]["v"].dtype == BF16 and params["w"].dtype == BF16


def _old_state(rng, shape=(6, 5)):
    """The state of bfloat16 params as xopt kept it when their math ran in bfloat16: bfloat16 buffers."""
    return {"optimizer": "Adam", "hyperparameters": dict(xopt.Adam(amsgrad=True)._hyper), "iter": 3,
            "skipped_steps": 0, "state": {"w": {"step": 3, "m": (rng.standard_normal(shape) * 0.1).astype(BF16),
                                                "v": (rng.random(shape) * 0.01).astype(BF16),
                                                "v_max": (rng.random(shape) * 0.02).astype(BF16)}}}


@pytest.mark.parametrize("how", ["file", "state_dict"])
def test_an_old_bfloat16_state_loads_as_float32_exactly(how, rng, tmp_path):
    old = _old_state(rng)
    p0 = rng.standard_normal((6, 5)).astype(BF16)
    opt = xopt.Adam(amsgrad=True)
    if how == "file":
        save_state(old, tmp_path / "old.npz")
        assert load_state(tmp_path / "old.npz")["state"]["w"]["m"].dtype == BF16  # the file holds bfloat16
        opt.load(tmp_path / "old.npz", {"w": p0})
    else:
        opt.load_state_dict(old, {"w": p0})
    for name in ("m", "v", "v_max"):
        assert opt.state["w"][name].dtype == F32
        np.testing.assert_array_equal(opt.state["w"][name], old["state"]["w"][name].astype(F32))
        assert old["state"]["w"][name].dtype == BF16  # the caller's dict is left as it was
    # It steps as the same state given in float32 does.
    same = xopt.Adam(amsgrad=True)
    same.load_state_dict({**old, "state": {"w": {k: v if k == "step" else v.astype(F32)
                                                 for k, v in old["state"]["w"].items()}}})
    g = rng.standard_normal((6, 5)).astype(BF16)
    a, b = {"w": p0.copy()}, {"w": p0.copy()}
    opt.update(a, {"w": g})
    same.update(b, {"w": g})
    np.testing.assert_array_equal(a["w"].view(np.uint16), b["w"].view(np.uint16))
    np.testing.assert_array_equal(opt.state["w"]["v"], same.state["w"]["v"])


def test_a_bfloat16_state_loads_as_it_is_where_the_state_is_bfloat16(rng, tmp_path):
    old = _old_state(rng)
    old["hyperparameters"]["state_dtype"] = "bfloat16"
    save_state(old, tmp_path / "low.npz")
    opt = xopt.Adam()
    opt.load(tmp_path / "low.npz")
    assert opt.state_dtype == "bfloat16" and opt.state["w"]["m"].dtype == BF16
    np.testing.assert_array_equal(opt.state["w"]["m"].view(np.uint16), old["state"]["w"]["m"].view(np.uint16))
