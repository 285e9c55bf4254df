"""Adafactor, LAMB, ScheduleFreeAdamW and Muon at their edges: states of other dtypes and shapes, loads of torch's
state into xopt.torch's fronts, Schedule-Free's points and running sums across a load, Muon's empty matrices.
Each is held to a twin: the elementwise optimizers' behaviour, the run without the load, the run without the
edge."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import xopt

WHOLE = {"LAMB": dict(lr=0.01, weight_decay=0.01), "Adafactor": dict(lr=0.05, weight_decay=0.01),
         "Muon": dict(lr=0.02)}


def _start(rng):
    return {"W": rng.standard_normal((4, 3)), "T": rng.standard_normal((2, 3, 4)), "b": rng.standard_normal(5)}


def _grads(rng, params, n):
    return [{k: rng.standard_normal(np.shape(v)) for k, v in params.items()} for _ in range(n)]


# -- a float64 param's float32 state: widened, as the elementwise optimizers widen it ----------------------------
@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("how", ["at the step", "at a load with params"])
@pytest.mark.parametrize("name", sorted(WHOLE))
def test_float32_state_of_a_float64_param_is_widened_as_adams_is(name, how, impl, rng):
    """A run's state kept in float32 (a float32 run's, a user's), loaded for float64 params: Adam widens it
    exactly at the next step or at a load with params=; the optimizers that read whole params refused it. The
    steps from it are those from its float64 copy, to the bit."""
    start = _start(rng)
    grads = _grads(rng, start, 3)
    first = getattr(xopt, name)(**WHOLE[name])
    first.update({k: v.astype(np.float32) for k, v in start.items()}, {k: v.astype(np.float32)
                                                                      for k, v in grads[0].items()})
    narrow = first.state_dict()
    wide = copy.deepcopy(narrow)
    wide["state"] = {k: {n: (b if n == "step" else np.asarray(b, dtype=np.float64)) for n, b in st.items()}
                     for k, st in narrow["state"].items()}
    runs = []
    for sd in (wide, narrow):
        opt = getattr(xopt, name)(**WHOLE[name], impl=impl)
        params = {k: v.copy() for k, v in start.items()}
        opt.load_state_dict(sd, params=params if how == "at a load with params" else None)
        for g in grads[1:]:
            opt.update(params, g)
        runs.append((opt, params))
    (want, want_params), (got, got_params) = runs
    for k in start:
        np.testing.assert_array_equal(got_params[k], want_params[k], err_msg=k)
        for n, b in want.state[k].items():
            assert np.asarray(got.state[k][n]).dtype == np.asarray(b).dtype
            np.testing.assert_array_equal(got.state[k][n], b, err_msg=f"{n} of {k}")


@pytest.mark.parametrize("name", sorted(WHOLE))
def test_a_step_that_refuses_after_widening_writes_nothing(name, rng):
    """W's float32 state is widened, then b's float16 state is refused: nothing is written, W keeps its values."""
    start = _start(rng)
    opt = getattr(xopt, name)(**WHOLE[name])
    opt.update({k: v.copy() for k, v in start.items()}, _grads(rng, start, 1)[0])
    sd = opt.state_dict()
    for k, dtype in (("W", np.float32), ("b", np.float16)):
        sd["state"][k] = {n: (b if n == "step" else np.asarray(b, dtype=dtype)) for n, b in sd["state"][k].items()}
    opt.load_state_dict(sd)
    before = copy.deepcopy(opt.state)
    params = {k: v.copy() for k, v in start.items()}
    with pytest.raises(TypeError, match="'b'.*float16"):
        opt.update(params, _grads(rng, start, 1)[0])
    for k in start:
        np.testing.assert_array_equal(params[k], start[k])
        assert opt.state[k]["step"] == 1
        for n, b in before[k].items():
            np.testing.assert_array_equal(np.asarray(opt.state[k][n], dtype=np.float64), np.asarray(b, np.float64))


# -- xopt.torch: torch-shaped state of a buffer the param's shape does not keep ----------------------------
@pytest.fixture
def torch():
    torch = pytest.importorskip("torch")
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch
    torch.set_default_dtype(before)


def _stepped_front(torch, name):
    import xopt.torch

    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = getattr(xopt.torch, name)(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return params, opt


MISFITS = {  # (front, param index, the state that param is given, the name the error gives)
    "Adafactor: a matrix with variance": ("Adafactor", 0, lambda torch: {"step": torch.tensor(1.0),
                                                                          "variance": torch.zeros(4, 3)}, "variance"),
    "Adafactor: a vector with row_var": ("Adafactor", 1, lambda torch: {"step": torch.tensor(1.0),
                                                                         "row_var": torch.zeros(5, 1),
                                                                         "variance": torch.zeros(5)}, "row_var"),
    "Muon: a matrix with AdamW's state": ("Muon", 0, lambda torch: {"step": torch.tensor(3.0),
                                                                    "exp_avg": torch.zeros(4, 3),
                                                                    "exp_avg_sq": torch.ones(4, 3)}, "exp_avg_sq"),
    "Muon: a vector with exp_avg and momentum_buffer": ("Muon", 1, lambda torch: {
        "step": torch.tensor(3.0), "exp_avg": torch.zeros(5), "momentum_buffer": torch.ones(5),
        "exp_avg_sq": torch.ones(5)}, "momentum_buffer"),
}


@pytest.mark.parametrize("case", sorted(MISFITS))
def test_a_front_refuses_a_state_its_param_does_not_keep_and_changes_nothing(torch, case):
    """torch-shaped state of a buffer the param's shape does not keep (a matrix's AdamW moments for Muon, a
    factor for a vector's Adafactor): refused, naming the param and the buffer (Adafactor raised a bare KeyError,
    Muon took it and then stepped the matrix with Muon while its state_dict said AdamW)."""
    name, index, state, culprit = MISFITS[case]
    params, opt = _stepped_front(torch, name)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][index] = state(torch)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=f"param 0.{index}.*{culprit}"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["state"].keys() == before["state"].keys()
    for n, st in before["state"].items():
        assert st.keys() == after["state"][n].keys()
        for k, v in st.items():
            assert torch.equal(after["state"][n][k], v)


@pytest.mark.parametrize("name", ["Adafactor", "Muon"])
def test_a_front_still_loads_its_own_and_torchs_state(torch, name):
    """What the fronts keep loads back: their own state_dict, and torch.optim.Adafactor's."""
    import xopt.torch

    params, opt = _stepped_front(torch, name)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = getattr(xopt.torch, name)(copies)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    if name == "Adafactor":
        theirs = torch.optim.Adafactor(copies)
        for p in copies:
            p.grad = torch.ones_like(p)
        theirs.step()
        other.load_state_dict(copy.deepcopy(theirs.state_dict()))
        assert set(other.state_dict()["state"][0]) == {"step", "row_var", "col_var"}


# -- a param whose state was made for another shape, or for another rule ---------------------------------
@pytest.mark.parametrize("before, after", [((5,), (5, 1)), ((4, 3), (12,)), ((5, 1), (5,)), ((1,), (1, 1))])
def test_adafactor_refuses_a_param_whose_shape_changed_between_factored_and_not(before, after, rng):
    """A vector's state (v) for a param that is now a matrix, or a matrix's factors for a vector: refused, naming
    the param, as every other optimizer refuses a state made for another shape (Adafactor made new factors and
    went on at the old step count); nothing is written."""
    opt = xopt.Adafactor(lr=0.05)
    opt.update({"x": rng.standard_normal(before)}, {"x": rng.standard_normal(before)})
    state = copy.deepcopy(opt.state)
    params = {"x": rng.standard_normal(after)}
    start = params["x"].copy()
    with pytest.raises(ValueError, match=f"param 'x' of shape {after}".replace("(", r"\(").replace(")", r"\)")):
        opt.update(params, {"x": rng.standard_normal(after)})
    np.testing.assert_array_equal(params["x"], start)
    assert opt.state.keys() == state.keys() and opt.state["x"].keys() == state["x"].keys()
    assert opt.state["x"]["step"] == 1
    sd = {**opt.state_dict(), "state": {"x": state["x"]}}
    fresh = xopt.Adafactor(lr=0.05)
    fresh.load_state_dict(sd)  # without params the shapes are unknown: the step finds it
    with pytest.raises(ValueError, match="param 'x'"):
        fresh.update(params, {"x": rng.standard_normal(after)})
    np.testing.assert_array_equal(params["x"], start)


def test_muon_state_after_use_muon_changes_mid_run_resumes_bit_for_bit(rng, tmp_path):
    """A matrix stepped with AdamW (use_muon=False) and then with Muon keeps its AdamW v: the optimizer's own
    state_dict and state file load back with params= (they were refused: 'v' is not a matrix's under Muon) and
    the run goes on as it did, through another change back to AdamW."""
    start = {"W": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    grads = _grads(rng, start, 6)
    flags = [None, False, None, None, False, None]

    def run(opt, params, steps):
        for k in steps:
            opt.use_muon = flags[k]
            opt.update(params, grads[k])

    straight, want = xopt.Muon(lr=0.02), {k: v.copy() for k, v in start.items()}
    run(straight, want, range(6))
    first, params = xopt.Muon(lr=0.02), {k: v.copy() for k, v in start.items()}
    run(first, params, range(3))
    first.save(tmp_path / "muon.npz")
    for load in ("state_dict", "file"):
        resumed, ps = xopt.Muon(lr=0.02), {k: v.copy() for k, v in params.items()}
        if load == "file":
            resumed.load(tmp_path / "muon.npz", params=ps)
        else:
            resumed.load_state_dict(first.state_dict(), params=ps)
        run(resumed, ps, range(3, 6))
        for k in start:
            np.testing.assert_array_equal(ps[k], want[k], err_msg=f"{load}: {k}")
    bad = first.state_dict()
    bad["state"]["W"]["v"] = np.ones((3, 4))  # v of a matrix in another shape: still refused
    with pytest.raises(ValueError, match="'v' of param 'W' has shape"):
        xopt.Muon(lr=0.02).load_state_dict(bad, params=params)


# -- Schedule-Free's eval and train on a state loaded without the params ------------------------------------
@pytest.mark.parametrize("load", ["file", "state_dict"])
def test_schedule_free_eval_of_tensors_from_a_state_loaded_without_params(torch, load, rng, tmp_path):
    """A state loaded without params= is NumPy until its first step; eval() and train() of torch params from it
    crashed (AttributeError: 'numpy.ndarray' object has no attribute 'to').  They give the points the saving
    optimizer gives, and the step after them is its step."""
    start = {"W": rng.standard_normal((4, 3)), "b": rng.standard_normal(5)}
    grads = _grads(rng, start, 3)
    first = xopt.ScheduleFreeAdamW(lr=0.02, weight_decay=0.01)
    params = {k: torch.tensor(v) for k, v in start.items()}
    for g in grads[:2]:
        first.update(params, {k: torch.tensor(v) for k, v in g.items()})
    first.save(tmp_path / "sf.npz")
    sd = first.state_dict()
    sd["state"] = {k: {n: (b if n == "step" else b.numpy().copy()) for n, b in st.items()}
                   for k, st in sd["state"].items()}
    second = xopt.ScheduleFreeAdamW(lr=0.02, weight_decay=0.01)
    if load == "file":
        second.load(tmp_path / "sf.npz")
    else:
        second.load_state_dict(sd)
    ours = {k: v.clone() for k, v in params.items()}
    for opt, ps in ((first, params), (second, ours)):
        opt.eval(ps)
    for k in start:
        assert torch.equal(ours[k], params[k]), k
    for opt, ps in ((first, params), (second, ours)):
        opt.train(ps)
        opt.update(ps, {k: torch.tensor(v) for k, v in grads[2].items()})
    for k in start:
        assert torch.equal(ours[k], params[k]), k


# -- Muon: an empty matrix ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 0), (0, 0), (0, 3)])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_muon_leaves_an_empty_matrix_and_steps_the_others(shape, adjust_lr_fn, impl, rng):
    """A matrix with no columns raised ZeroDivisionError (√max(1, R/C)) and stopped the step; it is left as it
    is (nothing to move), as Adafactor leaves an empty param, and the others step as they do without it."""
    start = {"W": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    grads = _grads(rng, start, 3)
    alone, want = xopt.Muon(lr=0.02, adjust_lr_fn=adjust_lr_fn, impl=impl), {k: v.copy() for k, v in start.items()}
    opt = xopt.Muon(lr=0.02, adjust_lr_fn=adjust_lr_fn, impl=impl)
    params = {**{k: v.copy() for k, v in start.items()}, "E": np.zeros(shape), "F": np.zeros(shape)}
    for g in grads:
        alone.update(want, g)
        opt.update(params, {**g, "E": np.ones(shape), "F": np.ones(shape)})  # E, F: one stack
    for k in start:
        np.testing.assert_array_equal(params[k], want[k], err_msg=k)
    assert params["E"].shape == shape and opt.state["E"]["step"] == 3


# -- Schedule-Free: an override's running sums resume --------------------------------------------------------
@pytest.mark.parametrize("load", ["file", "state_dict"])
def test_schedule_free_override_sets_resume_bit_for_bit_after_an_lr_change(load, rng, tmp_path):
    """An lr raised mid-run counts from its step on, in each hyperparameter set's running sums (the package's
    groups each keep theirs).  A state file or state_dict held the optimizer's own set's sums only: a param with an
    override (a weight decay of its own) resumed with sums run again at the lr of now, off the run it continues."""
    start = {"w": rng.standard_normal(5), "b": rng.standard_normal(3), "c": rng.standard_normal(2)}
    grads = _grads(rng, start, 9)
    lrs = [0.01] * 3 + [0.04] * 6
    overrides = {"b": {"weight_decay": 0.1}, "c": {"warmup_steps": 4}}

    def run(opt, params, steps):
        for k in steps:
            opt.lr = lrs[k]
            opt.update(params, {n: v.copy() for n, v in grads[k].items()})

    straight, want = xopt.ScheduleFreeAdamW(overrides=overrides), {k: v.copy() for k, v in start.items()}
    run(straight, want, range(9))
    first, params = xopt.ScheduleFreeAdamW(overrides=overrides), {k: v.copy() for k, v in start.items()}
    run(first, params, range(5))
    resumed = xopt.ScheduleFreeAdamW()
    if load == "file":
        first.save(tmp_path / "sf.npz")
        resumed.load(tmp_path / "sf.npz", params=params)
    else:
        resumed.load_state_dict(first.state_dict(), params=params)
    run(resumed, params, range(5, 9))
    for k in start:
        np.testing.assert_array_equal(params[k], want[k], err_msg=k)


def test_use_muon_on_a_vector_names_the_param():
    """use_muon=True (by an override) on a param that is not 2-D: the error names the param, and nothing is written."""
    params = {"W": np.ones((4, 3)), "blocks.0.bias": np.ones(3)}
    grads = {k: np.ones_like(v) for k, v in params.items()}
    before = {k: v.copy() for k, v in params.items()}
    opt = xopt.Muon(overrides={"blocks.*": {"use_muon": True}})
    with pytest.raises(ValueError, match=r"param 'blocks\.0\.bias'.*2-D"):
        opt.update(params, grads)
    assert not opt.state and opt.iter == 0
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
