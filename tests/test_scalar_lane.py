"""The scalar lane (xopt._scalar_lane): float64 scalar params stepped in Python floats, the reference's bits.

Every optimizer with an element kernel, each of its kernel's hyperparameter sets, runs the same steps on
Python-float, NumPy-float64 and 0-d float64 params twice: by default (the scalar lane takes every step after
the first, which the tests check it did) and with ``impl="reference"`` (the checked path, the rule on 0-d
arrays).  Params, state and counts must agree bit for bit, edge values included.  What the lane must decline
falls to the other paths with the same results and the same errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

import xopt
from xopt import _scalar_lane
from xopt.engines.kernels import lookup

CLASSES = [c for name in xopt.__all__ for c in [getattr(xopt, name)]
           if isinstance(c, type) and issubclass(c, xopt.Optimizer) and lookup(c) is not None
           and not lookup(c).norms and not lookup(c).factored]
CASES = [(cls, config) for cls in CLASSES for config in lookup(cls).checks]
GRADS = [0.5, -1.25, 3.0, 1e-3, -0.0, 0.0, 2.0, -7.5]
EDGES = [0.0, -0.0, 5e-324, -1e-310, 1e300, -1e-300, math.inf, -math.inf, math.nan]


@pytest.fixture
def taken(monkeypatch):
    """Each answer of the scalar lane, in order."""
    answers = []
    original = _scalar_lane.take

    def spy(*args):
        answer = original(*args)
        answers.append(answer)
        return answer
    monkeypatch.setattr(_scalar_lane, "take", spy)
    return answers


def _params():
    return {"a": np.array(-1.5), "b": 2.0, "c": np.float64(0.25)}


def _grads(i):
    g = GRADS[i % len(GRADS)]
    return {"a": np.float64(g), "b": float(-g / 3), "c": np.array(g * 2)}


def _bits(x):
    """The float64 bits of ``x`` (a number or an array), every NaN alike."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(np.isnan(x), np.nan, x).tobytes()


def _snapshot(opt, params):
    state = {k: {n: (_bits(v) if isinstance(v, (np.ndarray, np.floating, float)) else v) for n, v in st.items()}
             for k, st in opt.state.items()}
    return {k: (type(v), _bits(v)) for k, v in params.items()}, state, opt.iter


def _run(cls, config, grads, steps, **kw):
    opt = cls(lr=0.01, **config, **kw)
    params = _params()
    for i in range(steps):
        opt.update(params, grads(i))
    return _snapshot(opt, params)


@pytest.mark.parametrize("cls,config", CASES, ids=lambda c: c.__name__ if isinstance(c, type) else str(c))
def test_steps_equal_the_reference(cls, config, taken):
    got = _run(cls, config, _grads, 6)
    assert taken[1:] == [True] * 5  # the first step makes the state (the exact-type lane)
    assert got == _run(cls, config, _grads, 6, impl="reference")


@pytest.mark.parametrize("cls,config", CASES, ids=lambda c: c.__name__ if isinstance(c, type) else str(c))
def test_edge_values_equal_the_reference(cls, config, taken):
    def grads(i):
        g = EDGES[i % len(EDGES)]
        return {"a": np.float64(g), "b": float(-g), "c": np.array(EDGES[(i + 3) % len(EDGES)])}
    with np.errstate(all="ignore"):
        got = _run(cls, config, grads, len(EDGES) + 2)
        assert got == _run(cls, config, grads, len(EDGES) + 2, impl="reference")
    assert True in taken


def test_float_params_come_back_as_their_type(taken):
    params = {"x": -1.5, "y": np.float64(2.0), "z": np.array(1.0)}
    z = params["z"]
    opt = xopt.SGD(lr=0.5)
    for _ in range(3):
        opt.update(params, {"x": 1.0, "y": 1.0, "z": 1.0})
    assert taken[1:] == [True, True]
    assert type(params["x"]) is float and params["x"] == -3.0
    assert type(params["y"]) is np.float64 and params["y"] == 0.5
    assert params["z"] is z and z == -0.5
    assert opt.iter == 3 and all(st["step"] == 3 for st in opt.state.values())


def test_a_schedule_is_read_at_each_count(taken):
    def lr(count):
        return 0.1 * 0.5 ** (count // 2)

    opt, ref = xopt.SGD(lr=lr), xopt.SGD(lr=lr, impl="reference")
    p, q = _params(), _params()
    for i in range(6):
        opt.update(p, _grads(i))
    assert taken[1:] == [True] * 5
    for i in range(6):
        ref.update(q, _grads(i))
    assert _snapshot(opt, p) == _snapshot(ref, q)


@pytest.mark.parametrize("case", ["overrides", "clip", "skip_nonfinite", "float32", "int grad", "view", "read-only",
                                  "mixed with a vector", "bfloat16 state", "first step"])
def test_declines_and_the_others_step_alike(case, taken):
    """What the lane declines steps as before: the same numbers as the reference."""
    kw, params, grads = {}, _params(), _grads
    if case == "overrides":
        kw = {"overrides": {"a": {"lr": 0.1}}}
    elif case == "clip":
        kw = {"clip_grad_norm": 1.0}
    elif case == "skip_nonfinite":
        kw = {"skip_nonfinite": True}
    elif case == "float32":
        params["a"] = np.array(-1.5, dtype=np.float32)
    elif case == "int grad":
        def grads(i):
            return {**_grads(i), "b": 2}
    elif case == "view":
        params["a"] = np.array([-1.5, 3.0])[0, ...]
    elif case == "read-only":
        params["a"].flags.writeable = False
    elif case == "mixed with a vector":
        params["v"] = np.arange(3.0)

        def grads(i):
            return {**_grads(i), "v": np.ones(3)}
    elif case == "bfloat16 state":
        kw = {"state_dtype": "bfloat16"}
    opt, ref = xopt.Adam(lr=0.01, **kw), xopt.Adam(lr=0.01, impl="reference", **kw)
    q = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in params.items()}
    if case == "read-only":
        with pytest.raises(ValueError, match="'a'"):
            opt.update(params, grads(0))
        assert not opt.state and params["a"] == -1.5
        return
    steps = 1 if case == "first step" else 4
    for i in range(steps):
        opt.update(params, grads(i))
        ref.update(q, grads(i))
    assert True not in taken
    assert _snapshot(opt, params) == _snapshot(ref, q)


def test_one_array_under_two_keys_is_refused_whole(taken):
    shared = np.array(1.0)
    params = {"a": shared, "b": shared}
    opt = xopt.SGD(lr=0.1)
    with pytest.raises(ValueError, match="'a'.*'b'|'b'.*'a'"):
        opt.update(params, {"a": 1.0, "b": 1.0})
    assert shared == 1.0 and opt.iter == 0 and True not in taken


def test_a_state_shared_with_a_param_is_declined(taken):
    params = {"a": np.array(1.0), "b": np.array(2.0)}
    opt = xopt.Momentum(lr=0.1, momentum=0.9)
    opt.update(params, {"a": 1.0, "b": 1.0})
    opt.state["b"]["v"] = params["a"]  # a buffer that is another param: never written twice in one step
    taken.clear()
    try:
        opt.update(params, {"a": 1.0, "b": 1.0})
    except (ValueError, TypeError):
        pass
    assert taken == [False]


def test_a_rule_that_raises_on_floats_is_declined(taken):
    """Python floats raise where NumPy's arrays give inf (1.0 / 0.0): such a step is the other paths'."""
    opt, ref = xopt.Adam(lr=0.1, eps=0.0), xopt.Adam(lr=0.1, eps=0.0, impl="reference")
    p, q = {"a": np.array(1.0)}, {"a": np.array(1.0)}
    with np.errstate(all="ignore"):
        for g in (0.0, 0.0, 1.0):
            opt.update(p, {"a": g})
        assert taken[1:] == [False, True]
        for g in (0.0, 0.0, 1.0):
            ref.update(q, {"a": g})
    assert _snapshot(opt, p) == _snapshot(ref, q)


@pytest.mark.parametrize("count", [np.int64(1), True, 1.0])
def test_a_step_count_of_another_type_is_the_other_paths(count, taken):
    """A count equal to the others but not an int (set by hand, or loaded by another tool): declined, and the
    step is what the lane-less path makes of it."""
    runs = []
    for lane in (True, False):
        opt = xopt.Adam(lr=0.1)
        params = _params()
        opt.update(params, _grads(0))
        opt.state["b"]["step"] = count
        taken.clear()
        try:
            if lane:
                opt.update(params, _grads(1))
            else:
                with pytest.MonkeyPatch.context() as m:
                    m.setattr(_scalar_lane, "take", lambda *a: False)
                    opt.update(params, _grads(1))
            runs.append(_snapshot(opt, params))
        except (TypeError, ValueError) as e:
            runs.append(type(e).__name__ + str(e))
        if lane:
            assert taken == [False]
    assert runs[0] == runs[1]


def _without_lane(f):
    """What ``f()`` gives with the scalar lane declining every step."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_scalar_lane, "take", lambda *a: False)
        return f()


@pytest.mark.parametrize("grad", ["another param", "its own param", "a state buffer"])
def test_a_grad_that_is_a_written_array_gets_the_other_paths_error(grad, taken):
    def run():
        opt = xopt.Adam(lr=0.1)
        params = {"a": np.array(1.0), "b": np.array(2.0)}
        opt.update(params, {"a": 1.0, "b": 1.0})
        g = {"another param": params["b"], "its own param": params["a"], "a state buffer": opt.state["a"]["m"]}[grad]
        with pytest.raises(ValueError, match="share memory") as e:
            opt.update(params, {"a": g, "b": 1.0})
        return str(e.value), _snapshot(opt, params)
    assert run() == _without_lane(run)
    assert True not in taken


@pytest.mark.parametrize("make,grads", [
    (lambda: xopt.Adamax(lr=0.1, eps=0.0), [{"a": 0.0}] * 3),
    (lambda: xopt.Lion(lr=0.1), [{"a": 0.0}, {"a": -0.0}, {"a": math.inf}]),
    (lambda: xopt.Adam(lr=0.1, amsgrad=True), [{"a": 1e-200}, {"a": 0.0}, {"a": math.nan}]),
])
def test_no_warning_the_other_paths_do_not_give(make, grads, taken, recwarn):
    """The lane's functions give Python floats (NumPy's scalars would carry on in NumPy's arithmetic, warning
    where the other paths compute quietly): under warnings as errors, the same outcome with the lane or without."""
    import warnings

    def run():
        opt, params = make(), {"a": np.array(1.0)}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for g in grads:
                try:
                    opt.update(params, g)
                except Warning as w:
                    return type(w).__name__
        return _snapshot(opt, params)
    assert run() == _without_lane(run)
