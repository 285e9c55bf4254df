"""Properties that hold for any input (hypothesis): elementwise rules, known closed forms, backends agree."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import xopt
from test_edges import CONFIGS, make

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)


@st.composite
def param_and_grads(draw, steps=3):
    shape = draw(shapes)
    p = draw(hnp.arrays(np.float64, shape, elements=finite))
    gs = [draw(hnp.arrays(np.float64, shape, elements=finite)) for _ in range(steps)]
    return p, gs


# LAMB's rule reads its param's norms (the trust ratio): splitting a param changes them
ELEMENTWISE = sorted(k for k in CONFIGS if not getattr(xopt, k.split("-")[0]).kernel.norms)


@settings(max_examples=60, deadline=None)
@given(data=param_and_grads(), config=st.sampled_from(ELEMENTWISE))
def test_rules_are_elementwise_so_splitting_a_param_changes_nothing(data, config):
    """One param updated whole equals its flattened halves updated as two params."""
    p, gs = data
    flat = p.reshape(-1)
    cut = flat.size // 2
    whole, halves = {"p": p.copy()}, {"a": flat[:cut].copy(), "b": flat[cut:].copy()}
    o1, o2 = make(config), make(config)
    with np.errstate(all="ignore"):
        for g in gs:
            o1.update(whole, {"p": g})
            gf = g.reshape(-1)
            o2.update(halves, {"a": gf[:cut], "b": gf[cut:]})
    np.testing.assert_array_equal(whole["p"].reshape(-1), np.concatenate([halves["a"], halves["b"]]))


@settings(max_examples=60, deadline=None)
@given(data=param_and_grads(steps=1), lr=st.floats(1e-4, 1.0))
def test_sgd_is_w_minus_lr_g(data, lr):
    p, (g,) = data
    params = {"p": p.copy()}
    xopt.SGD(lr=lr).update(params, {"p": g})
    np.testing.assert_array_equal(params["p"], p - lr * g)


@settings(max_examples=60, deadline=None)
@given(data=param_and_grads(steps=1), lr=st.floats(1e-4, 1.0))
def test_first_adam_step_moves_every_element_by_lr_against_its_grad(data, lr):
    """With eps=0 the first bias-corrected step is exactly -lr * sign(g), whatever the scale of g."""
    p, (g,) = data
    g = np.where(np.abs(g) < 1e-100, 1.0, g)  # g*g must not underflow to 0
    params = {"p": p.copy()}
    xopt.Adam(lr=lr, eps=0.0, eps_hat=False).update(params, {"p": g})
    np.testing.assert_allclose(params["p"] - p, -lr * np.sign(g), rtol=1e-9,
                               atol=1e-12 * (1.0 + np.abs(p).max(initial=0.0)))


@settings(max_examples=40, deadline=None)
@given(data=param_and_grads(), config=st.sampled_from(sorted(CONFIGS)))
def test_array_api_strict_agrees_with_numpy(data, config):
    """The same rule on the strict namespace (standard only) gives NumPy's numbers."""
    xps = pytest.importorskip("array_api_strict")
    p, gs = data
    a, b = {"p": p.copy()}, {"p": xps.asarray(p.copy())}
    o1, o2 = make(config), make(config)
    with np.errstate(all="ignore"):
        for g in gs:
            o1.update(a, {"p": g})
            o2.update(b, {"p": xps.asarray(g)})
    np.testing.assert_allclose(np.from_dlpack(b["p"]), a["p"], rtol=1e-13, atol=0, equal_nan=True)
