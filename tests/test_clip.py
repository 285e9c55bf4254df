"""clip_grad_norm= against torch.nn.utils.clip_grad_norm_ followed by torch.optim's step, float64."""

import numpy as np
import pytest

import xopt
from torch_cases import CASES

try:
    import torch
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

SHAPES = {"W": (3, 4), "b": (5,), "c": (2, 2)}
STEPS = 6
NO_GRAD = (3, "b")
MAX_NORM = 3.0


def _grads(rng):
    # Norms from about 1 to 10 over the steps: some steps are clipped, some are not.
    return [{k: rng.standard_normal(s) * (0.3 + 0.5 * step) for k, s in SHAPES.items()} for step in range(STEPS)]


def _run_torch(case, params, grads):
    _, _, torch_name, torch_kwargs, _ = CASES[case]
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    opt = getattr(torch.optim, torch_name)(list(tensors.values()), **torch_kwargs)
    out, norms = [], []
    for step, g in enumerate(grads, start=1):
        for k, t in tensors.items():
            t.grad = None if (step, k) == NO_GRAD else torch.tensor(g[k])
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(tensors.values()), MAX_NORM)))
        opt.step()
        out.append({k: t.detach().numpy().copy() for k, t in tensors.items()})
    return out, norms


BACKENDS = ["numpy-fused", "numpy-reference", "torch", "array_api_strict"]


def _backend(name):
    if name.startswith("numpy"):
        return np.array, np.asarray, {"impl": name.split("-")[1]}
    if name == "torch":
        return torch.tensor, lambda t: t.numpy(), {}
    xps = pytest.importorskip("array_api_strict")
    return xps.asarray, np.asarray, {}


@needs_torch
@pytest.mark.usefixtures("torch_float64")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_clip_grad_norm_matches_torch(case, backend):
    name, kwargs = CASES[case][0], CASES[case][1]
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = _grads(rng)
    want, norms = _run_torch(case, params, grads)
    to_array, to_numpy, options = _backend(backend)
    opt = getattr(xopt, name)(**kwargs, clip_grad_norm=MAX_NORM, **options)
    ours = {k: to_array(v) for k, v in params.items()}
    clipped = 0
    for step, (g, w, norm) in enumerate(zip(grads, want, norms), start=1):
        given = {k: None if (step, k) == NO_GRAD else to_array(v) for k, v in g.items()}
        opt.update(ours, given)
        for k in SHAPES:  # the grads passed in are not modified
            if given[k] is not None:
                np.testing.assert_array_equal(to_numpy(given[k]), g[k])
            np.testing.assert_allclose(to_numpy(ours[k]), w[k], rtol=1e-12, atol=1e-14,
                                       err_msg=f"{case} {backend}: {k} after step {step}")
        np.testing.assert_allclose(float(opt.last_grad_norm), norm, rtol=1e-13)
        clipped += norm > MAX_NORM
    assert 0 < clipped < STEPS  # both kinds of step were tried


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_a_non_finite_norm_skips_the_step_with_skip_nonfinite(impl, lane):
    opt = xopt.Adam(clip_grad_norm=1.0, skip_nonfinite=True, impl=impl)
    params = {"W": np.ones(4), "b": np.ones(2)}
    for _ in range(3):
        opt.update(params, {"W": np.full(4, 2.0), "b": np.ones(2)})
    before = {k: v.copy() for k, v in params.items()}
    opt.update(params, {"W": np.array([1.0, np.inf, 0.0, 0.0]), "b": np.ones(2)})
    assert lane[-1] == (impl != "reference"), "the lane's own norm decides"
    assert opt.iter == 3
    assert opt.skipped_steps == 1 and opt.state["W"]["step"] == 3 and np.isinf(opt.last_grad_norm)
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
    opt.update(params, {"W": np.full(4, 2.0), "b": np.ones(2)})
    assert opt.state["W"]["step"] == 4 and opt.last_grad_norm == pytest.approx(np.sqrt(18.0))


def test_without_skip_a_nan_grad_makes_every_param_nan_as_in_torch():
    opt = xopt.SGD(lr=0.1, clip_grad_norm=1.0)
    params = {"W": np.ones(2), "b": np.ones(2)}
    opt.update(params, {"W": np.array([np.nan, 0.0]), "b": np.ones(2)})
    assert np.isnan(params["b"]).all()  # torch: clip_coef is NaN, every grad times it


@pytest.mark.parametrize("dtype, state_dtype", [(np.float32, None), (np.float16, None), (np.float32, "bfloat16")])
def test_low_precision_fused_clipping_agrees_with_the_reference(dtype, state_dtype, rng):
    fused, ref = (xopt.Adam(clip_grad_norm=0.5, state_dtype=state_dtype, impl=impl) for impl in ("fused", "reference"))
    sizes = [3, 70_000, 1]  # a tensor of several kernel chunks
    p1 = {f"p{i}": rng.standard_normal(n).astype(dtype) for i, n in enumerate(sizes)}
    p2 = {k: v.copy() for k, v in p1.items()}
    for _ in range(4):
        g = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in p1.items()}
        fused.update(p1, g)
        ref.update(p2, g)
        assert fused.last_grad_norm == pytest.approx(ref.last_grad_norm, rel=1e-12)
    tol = 1e-6 if dtype == np.float32 else 1e-3
    for k in p1:
        np.testing.assert_allclose(p1[k], p2[k], rtol=tol, atol=tol)


def test_the_lane_clips_with_a_parallel_norm(rng, parallel_from, lane):
    """A step above PARALLEL_MIN elements: the norm's pass and the kernel run on the worker threads too."""
    parallel_from(1)
    xopt.set_num_threads(2)
    try:
        fused, ref = xopt.RMSprop(clip_grad_norm=2.0), xopt.RMSprop(clip_grad_norm=2.0, impl="reference")
        p1 = {f"p{i}": rng.standard_normal(50_000) for i in range(3)}
        p2 = {k: v.copy() for k, v in p1.items()}
        for _ in range(4):
            g = {k: rng.standard_normal(v.shape) for k, v in p1.items()}
            fused.update(p1, g)
            ref.update(p2, g)
        assert lane[0::2] == [True] * 4 and not any(lane[1::2])  # fused first, then its reference twin
        for k in p1:
            np.testing.assert_allclose(p1[k], p2[k], rtol=1e-12, atol=1e-15)
    finally:
        xopt.set_num_threads(None)


def test_clip_grad_norm_is_checked():
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="clip_grad_norm"):
            xopt.Adam(clip_grad_norm=bad)
    with pytest.raises(TypeError, match="clip_grad_norm must be a real number"):
        xopt.Adam(clip_grad_norm="1")
