"""Schedule-Free AdamW's fused CPU kernel against its reference rule: the same bits, step after step."""

import numpy as np
import pytest

import xopt

pytest.importorskip("xopt.engines.fused_cpu", reason="numba is not installed")

CONFIGS = {
    "default": dict(),
    "decay-warmup-r": dict(lr=0.01, weight_decay=0.01, warmup_steps=3, r=0.5, weight_lr_power=1.0),
    "schedule": dict(lr=lambda count: 0.01 / (1 + count), beta1=0.8, beta2=0.99),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", CONFIGS)
def test_fused_kernel_is_the_reference_bit_for_bit(config, dtype):
    rng = np.random.default_rng(3)
    shapes = {"w": (33, 7), "b": (7,), "s": ()}
    start = {k: rng.standard_normal(shape).astype(dtype) for k, shape in shapes.items()}
    runs = {}
    for impl in ("reference", "fused"):
        opt = xopt.ScheduleFreeAdamW(impl=impl, overrides={"b": {"weight_decay": 0.0}}, **CONFIGS[config])
        params = {k: v.copy() for k, v in start.items()}
        grads_rng = np.random.default_rng(4)
        for _ in range(6):  # c_t: 1, then 1/2, then below 1/2: both ends of the lerp
            opt.update(params, {k: grads_rng.standard_normal(np.shape(v)).astype(dtype) for k, v in params.items()})
        opt.eval(params)
        runs[impl] = params, opt.state
    (p_ref, s_ref), (p_fused, s_fused) = runs["reference"], runs["fused"]
    for k in shapes:
        np.testing.assert_array_equal(p_fused[k], p_ref[k], err_msg=f"param {k}")
        for name in ("z", "v"):
            np.testing.assert_array_equal(s_fused[k][name], s_ref[k][name], err_msg=f"state {name} of {k}")


def test_the_lane_runs_the_kernel(monkeypatch):
    """A step of plain NumPy arrays goes through the compiled step (not the reference rule)."""
    from xopt.engines import reference

    def refuse(*args):
        raise AssertionError("the reference rule ran")

    monkeypatch.setattr(reference, "apply_reference", refuse)
    monkeypatch.setattr("xopt._dispatch.apply_reference", refuse)
    params = {"w": np.ones(10)}
    opt = xopt.ScheduleFreeAdamW()
    for _ in range(3):
        opt.update(params, {"w": np.full(10, 0.5)})
    assert opt.state["w"]["step"] == 3 and not np.array_equal(params["w"], np.ones(10))
