"""The default path (the exact-type lane, xopt._lane) under the training features: overrides, schedules, clipping.

Each test runs the same calls on twins, ``impl="reference"`` (the oracle) and the default path (the numba
kernel through the lane), with a change between steps that a fast path must notice.  Found by
tests/test_stateful.py's rules for overrides and schedules against earlier fast paths; each is the
shortest form of one finding.
"""

import numpy as np
import pytest

import xopt
from xopt.schedules import linear_schedule

IMPLS = ("reference", "auto")


def _params(dtype=np.float64):
    return {"a": np.linspace(-1.0, 1.0, 7).astype(dtype), "b": np.linspace(0.5, 2.0, 5).astype(dtype)}


def _grads(rng, params):
    return {k: rng.standard_normal(p.shape).astype(p.dtype) for k, p in params.items()}


def _twins(make, steps, between=None, seed=0):
    """The params and state of each impl after ``steps`` updates, ``between(opt, i)`` before step i."""
    out = {}
    for impl in IMPLS:
        rng = np.random.default_rng(seed)
        params, opt = _params(), make(impl)
        for i in range(steps):
            if between is not None:
                between(opt, i)
            opt.update(params, _grads(rng, params))
        out[impl] = (params, opt)
    return out


def _agree(out):
    (ref, ref_opt), (dut, dut_opt) = out["reference"], out["auto"]
    for k in ref:
        np.testing.assert_allclose(dut[k], ref[k], rtol=1e-13, atol=1e-15, err_msg=f"param {k!r}")
        assert sorted(dut_opt.state[k]) == sorted(ref_opt.state[k]), f"state of {k!r}"
        for name, buf in ref_opt.state[k].items():
            np.testing.assert_allclose(dut_opt.state[k][name], buf, rtol=1e-13, atol=1e-15,
                                       err_msg=f"state[{k!r}][{name!r}]")


@pytest.mark.parametrize("first, then", [(0.1, linear_schedule(0.1, 0.0, 4)), (linear_schedule(0.1, 0.0, 4), 0.05),
                                         (linear_schedule(0.1, 0.0, 4), linear_schedule(0.2, 0.1, 3))],
                         ids=["number-to-schedule", "schedule-to-number", "schedule-to-schedule"])
def test_lr_set_between_steps_is_read(first, then, lane):
    """A cross-step plan made while lr was a number once read the schedule set since at its first step only."""

    def between(opt, i):
        if i == 3:
            opt.lr = then

    out = _twins(lambda impl: xopt.SGD(lr=first, momentum=0.9, impl=impl), 8, between)
    assert lane[-1]
    _agree(out)


@pytest.mark.parametrize("name, kwargs, override", [
    ("RMSprop", dict(momentum=0.5, centered=True), {"centered": False}),
    ("Adam", dict(amsgrad=True), {"amsgrad": False}),
    ("SGD", dict(momentum=0.9), {"momentum": 0.0}),
], ids=["RMSprop-centered", "Adam-amsgrad", "SGD-momentum"])
def test_an_override_that_keeps_fewer_buffers_takes_the_lane(name, kwargs, override, lane):
    """Params whose override keeps fewer buffers than the optimizer's own: a fast path once read the buffers
    of the optimizer's set from every param and raised KeyError after the step had been applied."""
    out = _twins(lambda impl: getattr(xopt, name)(**kwargs, overrides={"a": override}, impl=impl), 4)
    _agree(out)
    assert lane[-1]


@pytest.mark.parametrize("action", ["replace", "delete"])
def test_a_buffer_only_an_override_keeps_is_followed(action):
    """SGD without momentum but for param 'b': its buffer replaced (a fused plan once went on writing the old
    one) or deleted (a reference plan raised KeyError having written param 'a') between steps."""

    def between(opt, i):
        if i == 3:
            if action == "replace":
                opt.state["b"]["b"] = np.full(5, 0.25)
            else:
                del opt.state["b"]["b"]

    out = _twins(lambda impl: xopt.SGD(lr=0.1, overrides={"b": {"momentum": 0.9}}, impl=impl), 6, between)
    _agree(out)
    for impl in IMPLS:
        assert out[impl][1].iter == 6


@pytest.mark.parametrize("impl", IMPLS)
def test_an_overrides_initial_accumulator_value_starts_its_params_state(impl):
    """AdaGrad's h starts at the override's initial_accumulator_value (it started at the optimizer's own).
    torch.optim.Adagrad reads only its constructor's value for every group; xopt's overrides apply whole."""
    params, g = _params(), {"a": np.full(7, 0.5), "b": np.full(5, 0.5)}
    opt = xopt.AdaGrad(lr=0.1, initial_accumulator_value=0.1, overrides={"b": {"initial_accumulator_value": 2.0}},
                       impl=impl)
    opt.update(params, g)
    np.testing.assert_array_equal(opt.state["a"]["h"], np.full(7, 0.1 + 0.25))
    np.testing.assert_array_equal(opt.state["b"]["h"], np.full(5, 2.0 + 0.25))
    np.testing.assert_allclose(params["b"], _params()["b"] - 0.1 * 0.5 / (np.sqrt(2.25) + 1e-7), rtol=1e-15)


def test_a_clipped_call_that_raises_leaves_last_grad_norm():
    """impl='fused' refusing a param is found after the norm: the call raised but had set last_grad_norm."""
    xps = pytest.importorskip("array_api_strict")
    opt = xopt.Adam(clip_grad_norm=1.0, impl="fused")
    opt.update({"w": np.ones(3)}, {"w": np.full(3, 2.0)})
    assert opt.last_grad_norm == pytest.approx(np.sqrt(12.0), rel=1e-15)
    with pytest.raises(TypeError, match="no fused kernel takes param 'w'"):
        opt.update({"w": xps.ones(3, dtype=xps.float64)}, {"w": xps.full(3, 5.0, dtype=xps.float64)})
    assert opt.last_grad_norm == pytest.approx(np.sqrt(12.0), rel=1e-15)


@pytest.mark.parametrize("impl", IMPLS)
def test_nadam_with_a_scheduled_lr_goes_on_from_the_last_product(impl, monkeypatch):
    """A scheduled lr makes a new view of the optimizer every step; NAdam's kept products stayed in each
    view, so every step multiplied its product again from step 1 (37 ms a step at step 20,000, beta1=0.99)."""
    calls = []
    mu = xopt.NAdam._mu
    monkeypatch.setattr(xopt.NAdam, "_mu", lambda self, step: calls.append(step) or mu(self, step))
    opt = xopt.NAdam(lr=linear_schedule(1e-3, 1e-4, 100), impl=impl, overrides={"b": {"beta1": 0.8}})
    params, rng = _params(), np.random.default_rng(1)
    for _ in range(100):
        opt.update(params, _grads(rng, params))
    assert len(calls) <= 100 * 2 * 3  # per step and hyperparameter set: mu_t, mu_t+1 and one more factor
    product = 1.0
    for t in range(1, 101):
        product *= 0.8 * (1.0 - 0.5 * 0.96 ** (t * 0.004))  # torch: mu_product *= mu, step by step
    assert opt._at(1, 99).mu_product(100) == product


def test_a_hyperparameter_an_override_cannot_go_with_is_refused_where_it_is_set():
    """opt.nesterov = True was accepted although the override of 'b' (momentum 0) cannot take it: every
    later update raised.  Refused at the assignment now, as the constructor refuses it, and nothing changes."""
    opt = xopt.SGD(lr=0.1, momentum=0.9, overrides={"b": {"momentum": 0.0}})
    with pytest.raises(ValueError, match=r"overrides\['b'\]: nesterov=True requires momentum > 0"):
        opt.nesterov = True
    assert opt.nesterov is False
    with pytest.raises(ValueError, match=r"overrides\['b'\]"):
        xopt.SGD(lr=0.1, momentum=0.9, nesterov=True, overrides={"b": {"momentum": 0.0}})
    params = _params()
    opt.update(params, {k: np.ones_like(p) for k, p in params.items()})
    np.testing.assert_allclose(params["b"], _params()["b"] - 0.1)


class MyAdam(xopt.Adam):
    """A user's subclass that keeps Adam's rule."""


class FixedBetaAdam(xopt.Adam):
    """A user's subclass whose constructor fixes some hyperparameters (takes fewer arguments)."""

    def __init__(self, lr=1e-3, **options):
        super().__init__(lr=lr, beta1=0.8, beta2=0.99, **options)


@pytest.mark.parametrize("through", ["state_dict", "file"])
def test_a_subclass_loads_its_parents_state_and_its_own(through, tmp_path):
    """A user's subclass of an xopt optimizer loads the state that optimizer saved (it was refused: 'state_dict
    is for Adam, not MyAdam'), and a subclass whose constructor takes fewer arguments loads its own state
    (it was refused: TypeError from its constructor).  xopt's own optimizers still refuse each other's."""
    params = _params()
    adam = xopt.Adam(lr=0.01, overrides={"b": {"lr": 0.001}})
    adam.update(params, {k: np.ones_like(p) for k, p in params.items()})

    def moved(opt, into):
        if through == "file":
            opt.save(tmp_path / "state.npz")
            into.load(tmp_path / "state.npz", params)
        else:
            into.load_state_dict(opt.state_dict(), params)
        return into

    mine = moved(adam, MyAdam())
    assert (mine.lr, mine.overrides, mine.iter) == (0.01, {"b": {"lr": 0.001}}, 1)
    np.testing.assert_array_equal(mine.state["a"]["v"], adam.state["a"]["v"])
    fixed = FixedBetaAdam(lr=0.02)
    fixed.update(params, {k: np.ones_like(p) for k, p in params.items()})
    again = moved(fixed, FixedBetaAdam())
    assert (again.lr, again.beta1, again.beta2, again.iter) == (0.02, 0.8, 0.99, 1)
    with pytest.raises(ValueError, match="state_dict is for Adam, not AdamW"):
        moved(adam, xopt.AdamW())
    with pytest.raises(ValueError, match="state_dict is for MyAdam, not Adam"):
        moved(mine, xopt.Adam())
    with pytest.raises(TypeError, match="lr must be a real number"):
        FixedBetaAdam().load_state_dict({**fixed.state_dict(), "hyperparameters": {
            **fixed.state_dict()["hyperparameters"], "lr": "0.1"}})


def test_setting_hyperparameters_with_overrides_does_not_keep_old_params_alive():
    """Each override's view copied the optimizer's dict, with the views and the plan of the moment: every
    hyperparameter set (opt.lr = ... each epoch) made a chain one link longer, each link holding a plan,
    its tables and the params it was built on (a new model's arrays each time: all of them kept)."""
    import gc
    import weakref

    opt = xopt.Adam(lr=1e-3, overrides={"b": {"lr": 1e-4}})
    arrays = []
    for i in range(6):
        params = _params()
        arrays.append(weakref.ref(params["a"]))
        opt.lr = 1e-3 * (i + 1)
        for _ in range(2):  # the second step builds on the first's plan
            opt.update(params, {k: np.ones_like(p) for k, p in params.items()})
    del params
    gc.collect()
    assert sum(ref() is not None for ref in arrays) <= 1  # the last plan's (the optimizer's own)


def test_a_state_from_before_clipping_keeps_the_optimizers_clip_grad_norm():
    """A state_dict saved before clip_grad_norm existed set it to None on load: clipping silently off in the
    optimizer made with it.  It keeps the optimizer's own, as a state without 'overrides' keeps its overrides."""
    params = _params()
    saved = xopt.Adam(lr=0.01)
    saved.update(params, {k: np.ones_like(p) for k, p in params.items()})
    old_style = saved.state_dict()
    del old_style["hyperparameters"]["clip_grad_norm"], old_style["overrides"]
    opt = xopt.Adam(clip_grad_norm=0.5)
    opt.load_state_dict(old_style)
    assert (opt.clip_grad_norm, opt.lr, opt.iter) == (0.5, 0.01, 1)
    opt.load_state_dict(saved.state_dict())  # a state that says None: None
    assert opt.clip_grad_norm is None


@pytest.mark.usefixtures("torch_float64")
@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("impl", IMPLS)
def test_nadam_with_overrides_a_schedule_and_clipping_equals_torch_param_groups(impl, clip):
    """NAdam's mu_product is derived from the step count on the host, per hyperparameter set: against
    torch.optim.NAdam's per-param running product, with a group of another beta1 and momentum_decay, an lr
    schedule (LambdaLR) and clip_grad_norm_, float64."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    start = {"W": rng.standard_normal(4), "b": rng.standard_normal(3)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in start.items()} for _ in range(12)]
    schedule = linear_schedule(0.01, 0.001, 8)
    w, b = (torch.tensor(start[k], requires_grad=True) for k in ("W", "b"))
    ref = torch.optim.NAdam([{"params": [w]}, {"params": [b], "betas": (0.6, 0.9), "momentum_decay": 0.01,
                                                "weight_decay": 0.1}], lr=1.0)
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(ref, schedule)
    opt = xopt.NAdam(lr=schedule, clip_grad_norm=clip, impl=impl, overrides={
        "b": {"beta1": 0.6, "beta2": 0.9, "momentum_decay": 0.01, "weight_decay": 0.1}})
    ours = {k: v.copy() for k, v in start.items()}
    for step, g in enumerate(grads, start=1):
        w.grad, b.grad = torch.tensor(g["W"]), torch.tensor(g["b"])
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([w, b], clip)
        ref.step()
        lambda_lr.step()
        opt.update(ours, {k: v.copy() for k, v in g.items()})
        for k, t in (("W", w), ("b", b)):
            np.testing.assert_allclose(ours[k], t.detach().numpy(), rtol=1e-13, atol=1e-15,
                                       err_msg=f"param {k} after step {step}")
    assert ref.state[b]["mu_product"].item() == opt._at(1, 12).mu_product(12)
