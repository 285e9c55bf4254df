"""Adafactor, LAMB, ScheduleFreeAdamW and Muon against the libraries whose numbers they give.

Each case runs the same float64 params and grads through xopt and through the library (torch.optim's
Adafactor and Muon, optax.lamb, schedulefree.AdamWScheduleFree) for ``STEPS`` steps and compares every
param after every step and every state buffer at the end.  ``tools/make_new_golden.py`` stores the
libraries' trajectories in ``tests/golden/new_optimizers.npz``: the stored comparison runs everywhere,
the live one where the library is installed.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import xopt

GOLDEN = pathlib.Path(__file__).parent / "golden" / "new_optimizers.npz"
STEPS = 20
SHAPES = {"W": (6, 4), "V": (6, 4), "U": (3, 7), "T": (2, 3, 4), "b": (5,), "s": ()}  # W, V: one Muon stack
RTOL, ATOL = 1e-11, 1e-13


def _decay(lr):
    return lambda count: lr * 0.9 ** (count // 4)  # a step schedule: lr changes every 4 steps


# name -> (xopt optimizer, its arguments, whether lr follows _decay)
CASES = {
    "adafactor": ("Adafactor", dict(), False),
    "adafactor-wd-d": ("Adafactor", dict(lr=0.05, weight_decay=0.1, d=2.0, eps2=1e-2, beta2_decay=-0.5), False),
    "adafactor-eps1-schedule": ("Adafactor", dict(lr=0.3, eps1=1e-20), True),
    "lamb": ("LAMB", dict(lr=0.01), False),
    "lamb-wd-eps": ("LAMB", dict(lr=0.02, beta1=0.8, beta2=0.99, eps=1e-4, eps_root=1e-8, weight_decay=0.1), False),
    "lamb-schedule": ("LAMB", dict(lr=0.05, weight_decay=0.01), True),
    "schedule-free": ("ScheduleFreeAdamW", dict(lr=0.01), False),
    "schedule-free-warmup-r": ("ScheduleFreeAdamW", dict(lr=0.02, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05,
                                                         warmup_steps=6, r=1.0, weight_lr_power=1.0), False),
    "schedule-free-schedule": ("ScheduleFreeAdamW", dict(lr=0.03, warmup_steps=3, weight_decay=0.01), True),
    "muon": ("Muon", dict(lr=0.02), False),
    "muon-plain-rms": ("Muon", dict(lr=0.01, momentum=0.9, nesterov=False, weight_decay=0.05, ns_steps=3,
                                    adjust_lr_fn="match_rms_adamw", adamw_beta1=0.8, adamw_beta2=0.95,
                                    adamw_eps=1e-6), False),
    "muon-cubic-schedule": ("Muon", dict(lr=0.05, weight_decay=0.0, ns_coefficients=(1.5, -0.5, 0.0), ns_steps=8,
                                         adjust_lr_fn="original"), True),
}


def inputs(seed):
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s) + 0.1 for k, s in SHAPES.items()} for _ in range(STEPS)]
    return params, grads


def lrs(case):
    name, kwargs, scheduled = CASES[case]
    lr = kwargs.get("lr", getattr(xopt, name)().lr)
    return [_decay(lr)(t) if scheduled else lr for t in range(STEPS)]


def run_xopt(case, params, grads, asarray=np.asarray, to_numpy=np.asarray):
    """(params after each step, {param: {buffer: final value}}) as NumPy arrays."""
    name, kwargs, scheduled = CASES[case]
    kwargs = dict(kwargs)
    if scheduled:
        kwargs["lr"] = _decay(kwargs.get("lr", getattr(xopt, name)().lr))
    opt = getattr(xopt, name)(**kwargs)
    ps = {k: asarray(np.array(v, copy=True)) for k, v in params.items()}
    trajectory = []
    for g in grads:
        opt.update(ps, {k: asarray(v) for k, v in g.items()})
        trajectory.append({k: np.array(to_numpy(v)) for k, v in ps.items()})
    state = {k: {n: np.array(to_numpy(b)) for n, b in st.items() if n != "step"} for k, st in opt.state.items()}
    if hasattr(opt, "eval"):  # Schedule-Free: x, then y again
        opt.eval(ps)
        for k, v in ps.items():
            state[k]["x"] = np.array(to_numpy(v))
        opt.train(ps)
        for k, v in ps.items():
            state[k]["y"] = np.array(to_numpy(v))
    return trajectory, state


# -- the libraries -------------------------------------------------------------------------------
def _torch_run(make, params, grads, lr_list, state_names):
    import torch

    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    opt = make(list(tp.values()))
    trajectory = []
    for g, lr in zip(grads, lr_list):
        for group in opt.param_groups:
            group["lr"] = lr
        for k, p in tp.items():
            p.grad = torch.tensor(g[k], dtype=torch.float64)
        opt.step()
        trajectory.append({k: p.detach().numpy().copy() for k, p in tp.items()})
    state = {k: {ours: opt.state[p][theirs].detach().numpy().copy() for theirs, ours in state_names.items()
                 if theirs in opt.state[p]} for k, p in tp.items()}
    return trajectory, state


def torch_adafactor(kwargs, params, grads, lr_list):
    import torch

    kw = {k: v for k, v in kwargs.items() if k not in ("eps1", "eps2")}
    kw["eps"] = (kwargs.get("eps1"), kwargs.get("eps2", 1e-3))
    return _torch_run(lambda ps: torch.optim.Adafactor(ps, **kw), params, grads, lr_list,
                      {"row_var": "v_row", "col_var": "v_col", "variance": "v"})


def optax_lamb(kwargs, params, grads, lr_list):
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import optax

    kw = dict(kwargs)
    kw.pop("lr", None)
    names = {"beta1": "b1", "beta2": "b2"}
    kw = {names.get(k, k): v for k, v in kw.items()}
    schedule = jnp.asarray(lr_list, dtype=jnp.float64)
    tx = optax.lamb(learning_rate=lambda count: schedule[count], **kw)
    ps = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in params.items()}
    st = tx.init(ps)
    trajectory = []
    for g in grads:
        updates, st = tx.update({k: jnp.asarray(v, dtype=jnp.float64) for k, v in g.items()}, st, ps)
        ps = optax.apply_updates(ps, updates)
        trajectory.append({k: np.asarray(v).copy() for k, v in ps.items()})
    adam = st[0]
    state = {k: {"m": np.asarray(adam.mu[k]), "v": np.asarray(adam.nu[k])} for k in params}
    return trajectory, state


def schedulefree_adamw(kwargs, params, grads, lr_list):
    import schedulefree
    import torch

    kw = {k: v for k, v in kwargs.items() if k not in ("beta1", "beta2")}
    kw["betas"] = (kwargs.get("beta1", 0.9), kwargs.get("beta2", 0.999))
    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    opt = schedulefree.AdamWScheduleFree(list(tp.values()), **kw)
    opt.train()
    trajectory = []
    for g, lr in zip(grads, lr_list):
        for group in opt.param_groups:
            group["lr"] = lr
        for k, p in tp.items():
            p.grad = torch.tensor(g[k], dtype=torch.float64)
        opt.step()
        trajectory.append({k: p.detach().numpy().copy() for k, p in tp.items()})
    state = {k: {"z": opt.state[p]["z"].numpy().copy(), "v": opt.state[p]["exp_avg_sq"].numpy().copy()}
             for k, p in tp.items()}
    opt.eval()
    for k, p in tp.items():
        state[k]["x"] = p.detach().numpy().copy()
    opt.train()
    for k, p in tp.items():
        state[k]["y"] = p.detach().numpy().copy()
    return trajectory, state


def torch_newton_schulz_in_the_params_dtype():
    """torch.optim.Muon's own Newton-Schulz function with its cast to bfloat16 taken out (its source, with
    ``grad.bfloat16()`` made ``grad.clone()``): torch's numbers in float64."""
    import inspect

    from torch.optim import _muon

    source = inspect.getsource(_muon._zeropower_via_newtonschulz)
    changed = source.replace("ortho_grad = grad.bfloat16()", "ortho_grad = grad.clone()")
    assert changed != source, "torch.optim.Muon's Newton-Schulz no longer casts as it did: look again"
    namespace = dict(vars(_muon))
    exec(changed, namespace)
    return namespace["_zeropower_via_newtonschulz"]


def torch_muon(kwargs, params, grads, lr_list, bfloat16=False):
    """torch.optim.Muon for the 2-D params, torch.optim.AdamW for the others (what xopt.Muon does)."""
    import torch
    from torch.optim import _muon

    muon_names = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps", "adjust_lr_fn")
    kw = {k: v for k, v in kwargs.items() if k in muon_names}
    defaults = xopt.Muon(**kwargs)
    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    opts = [torch.optim.Muon([p for p in tp.values() if p.ndim == 2], **kw)]
    others = [p for p in tp.values() if p.ndim != 2]
    if others:
        opts.append(torch.optim.AdamW(others, lr=defaults.lr, betas=(defaults.adamw_beta1, defaults.adamw_beta2),
                                      eps=defaults.adamw_eps, weight_decay=defaults.weight_decay))
    real = _muon._zeropower_via_newtonschulz
    if not bfloat16:
        _muon._zeropower_via_newtonschulz = torch_newton_schulz_in_the_params_dtype()
    try:
        trajectory = []
        for g, lr in zip(grads, lr_list):
            for opt in opts:
                for group in opt.param_groups:
                    group["lr"] = lr
            for k, p in tp.items():
                p.grad = torch.tensor(g[k], dtype=torch.float64)
            for opt in opts:
                opt.step()
            trajectory.append({k: p.detach().numpy().copy() for k, p in tp.items()})
    finally:
        _muon._zeropower_via_newtonschulz = real
    names = {"momentum_buffer": "m", "exp_avg": "m", "exp_avg_sq": "v"}
    state = {k: {names[n]: b.numpy().copy() for opt in opts if p in opt.state for n, b in opt.state[p].items()
                 if n in names} for k, p in tp.items()}
    return trajectory, state


LIBRARIES = {"Adafactor": ("torch", torch_adafactor), "LAMB": ("optax", optax_lamb),
             "ScheduleFreeAdamW": ("schedulefree", schedulefree_adamw), "Muon": ("torch", torch_muon)}


def run_library(case, params, grads):
    name, kwargs, _ = CASES[case]
    return LIBRARIES[name][1](kwargs, params, grads, lrs(case))


# -- comparisons ---------------------------------------------------------------------------------
def _compare(case, ours, theirs):
    (traj, state), (ref_traj, ref_state) = ours, theirs
    assert len(traj) == len(ref_traj) == STEPS
    for step in range(STEPS):
        for k in ref_traj[step]:
            np.testing.assert_allclose(traj[step][k], ref_traj[step][k], rtol=RTOL, atol=ATOL,
                                       err_msg=f"{case}: param {k} after step {step + 1}")
    for k, bufs in ref_state.items():
        assert bufs, f"{case}: no state of {k} to compare"
        assert set(bufs) == set(state[k]), f"{case}: buffers of {k}: {sorted(state[k])} vs {sorted(bufs)}"
        for name, want in bufs.items():
            np.testing.assert_allclose(state[k][name], want, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{case}: state {name} of {k}")


def max_abs_diff(ours, theirs) -> float:
    (traj, state), (ref_traj, ref_state) = ours, theirs
    diffs = [np.max(np.abs(traj[s][k] - ref_traj[s][k]), initial=0.0) for s in range(STEPS) for k in ref_traj[s]]
    diffs += [np.max(np.abs(state[k][n] - v), initial=0.0) for k, b in ref_state.items() for n, v in b.items()]
    return float(max(diffs))


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    meta = json.loads(data.pop("meta").tobytes())
    assert sorted(CASES) == meta["cases"], "the cases changed: run tools/make_new_golden.py"
    return data


def golden_case(data, case):
    params = {k: data[f"input/param/{k}"] for k in SHAPES}
    grads = [{k: data[f"input/grad/{k}"][s] for k in SHAPES} for s in range(STEPS)]
    traj = [{k: data[f"{case}/param/{k}"][s] for k in SHAPES} for s in range(STEPS)]
    prefix = f"{case}/state/"
    state = {}
    for key in data:
        if key.startswith(prefix):
            k, name = key[len(prefix):].split("/")
            state.setdefault(k, {})[name] = data[key]
    return params, grads, (traj, state)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_stored_trajectory(case, golden, backend):
    params, grads, theirs = golden_case(golden, case)
    _compare(case, run_xopt(case, params, grads, backend.asarray, backend.to_numpy), theirs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_library_live(case, rng):
    pytest.importorskip(LIBRARIES[CASES[case][0]][0])
    params, grads = inputs(int(rng.integers(2**31)))
    _compare(case, run_xopt(case, params, grads), run_library(case, params, grads))


# -- the promises every optimizer keeps ------------------------------------------------------------
NEW = {"Adafactor": dict(lr=0.05, weight_decay=0.01), "LAMB": dict(lr=0.01, weight_decay=0.01),
       "ScheduleFreeAdamW": dict(lr=0.01, weight_decay=0.01, warmup_steps=2), "Muon": dict(lr=0.02)}


def _params(rng):
    return {"W": rng.standard_normal((6, 5)), "T": rng.standard_normal((2, 3, 4)), "b": rng.standard_normal(5)}


def _grads(rng, params):
    return {k: rng.standard_normal(v.shape) for k, v in params.items()}


def _run(opt, params, grad_list):
    for g in grad_list:
        opt.update(params, g)
    return params


@pytest.mark.parametrize("name", NEW)
def test_state_file_round_trip_resumes_the_same_run(name, rng, tmp_path):
    params = _params(rng)
    grad_list = [_grads(rng, params) for _ in range(6)]
    straight = _run(getattr(xopt, name)(**NEW[name]), {k: v.copy() for k, v in params.items()}, grad_list)
    first = getattr(xopt, name)(**NEW[name])
    resumed = _run(first, {k: v.copy() for k, v in params.items()}, grad_list[:3])
    first.save(tmp_path / "state.npz")
    second = getattr(xopt, name)(**NEW[name])
    second.load(tmp_path / "state.npz", resumed)
    third = getattr(xopt, name)(**NEW[name])
    third.load_state_dict(first.state_dict(), resumed)
    for k, st in first.state.items():
        for buf, value in st.items():
            np.testing.assert_array_equal(second.state[k][buf], value)
            np.testing.assert_array_equal(third.state[k][buf], value)
    _run(second, resumed, grad_list[3:])
    for k in params:
        np.testing.assert_array_equal(resumed[k], straight[k])


@pytest.mark.parametrize("name", NEW)
def test_a_state_of_the_wrong_shape_is_refused_whole(name, rng):
    params = _params(rng)
    opt = getattr(xopt, name)(**NEW[name])
    _run(opt, params, [_grads(rng, params)])
    sd = opt.state_dict()
    buf = sorted(n for n in sd["state"]["W"] if n != "step")[0]
    sd["state"]["W"][buf] = np.zeros((7, 7))
    fresh = getattr(xopt, name)(**NEW[name])
    with pytest.raises(ValueError, match=f"state '{buf}' of param 'W' has shape"):
        fresh.load_state_dict(sd, params)
    assert fresh.state == {}
    sd["state"]["W"]["nonsense"] = np.zeros(3)
    with pytest.raises(ValueError, match="nonsense"):
        fresh.load_state_dict(sd)
    # loaded without params, the wrong shape is caught by the next step, before anything is written
    del sd["state"]["W"]["nonsense"]
    if name == "ScheduleFreeAdamW":  # the elementwise optimizers' check: every buffer in one shape
        with pytest.raises(ValueError, match="differ in shape"):
            fresh.load_state_dict(sd)
        return
    fresh.load_state_dict(sd)
    before = {k: v.copy() for k, v in params.items()}
    with pytest.raises(ValueError, match=f"state {buf!r}"):
        fresh.update(params, _grads(rng, params))
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
    assert all(st["step"] == 1 for st in fresh.state.values())


@pytest.mark.parametrize("name", NEW)
def test_a_bad_call_changes_nothing(name, rng):
    params = _params(rng)
    opt = getattr(xopt, name)(**NEW[name])
    _run(opt, params, [_grads(rng, params)])
    before = {k: v.copy() for k, v in params.items()}
    state = {k: {n: np.array(b, copy=True) for n, b in st.items()} for k, st in opt.state.items()}
    bad = _grads(rng, params)
    bad["b"] = np.ones(4)
    with pytest.raises(ValueError, match="'b'"):
        opt.update(params, bad)
    shared = _grads(rng, params)
    shared["T"] = params["T"]  # a grad that is a param: refused before any write
    with pytest.raises(ValueError, match="share memory"):
        opt.update(params, shared)
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
        for n, b in state[k].items():
            np.testing.assert_array_equal(opt.state[k][n], b)
    assert opt.iter == 1


@pytest.mark.parametrize("name", NEW)
def test_clipping_is_the_step_on_clipped_grads(name, rng):
    params = _params(rng)
    grad_list = [{k: 10 * v for k, v in _grads(rng, params).items()} for _ in range(3)]
    clipped = _run(getattr(xopt, name)(**NEW[name], clip_grad_norm=1.0), {k: v.copy() for k, v in params.items()},
                   grad_list)
    by_hand = []
    for g in grad_list:
        norm = np.sqrt(sum(np.sum(v * v) for v in g.values()))
        by_hand.append({k: v * min(1.0, 1.0 / (norm + 1e-6)) for k, v in g.items()})
    want = _run(getattr(xopt, name)(**NEW[name]), {k: v.copy() for k, v in params.items()}, by_hand)
    for k in params:
        np.testing.assert_allclose(clipped[k], want[k], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", NEW)
def test_overrides_and_skip_nonfinite(name, rng):
    params = _params(rng)
    opt = getattr(xopt, name)(**NEW[name], overrides={"b": {"lr": 0.0}, "T": {"weight_decay": 0.5}},
                              skip_nonfinite=True)
    before = {k: v.copy() for k, v in params.items()}
    grad_list = [_grads(rng, params) for _ in range(2)]
    _run(opt, params, grad_list)
    np.testing.assert_array_equal(params["b"], before["b"])
    assert not np.array_equal(params["W"], before["W"])
    alone = _run(getattr(xopt, name)(**{**NEW[name], "weight_decay": 0.5}), {"T": before["T"].copy()},
                 [{"T": g["T"]} for g in grad_list])  # T with the override's hyperparameters, by itself
    np.testing.assert_array_equal(params["T"], alone["T"])
    after = {k: v.copy() for k, v in params.items()}
    g = _grads(rng, params)
    g["W"][0, 0] = np.nan
    opt.update(params, g)
    assert opt.skipped_steps == 1 and all(st["step"] == 2 for st in opt.state.values())
    for k in params:
        np.testing.assert_array_equal(params[k], after[k])


@pytest.mark.parametrize("name", [name for name in NEW if name not in ("ScheduleFreeAdamW", "LAMB", "Adafactor")])  # kernels
def test_fused_is_refused_in_the_constructor(name):
    with pytest.raises(TypeError, match=f"{name} has no fused kernel"):
        getattr(xopt, name)(impl="fused")


def test_a_large_param_is_read_whole(rng):
    """Larger than a reference chunk (2^17 bytes): the row means and norms are over the whole param."""
    torch = pytest.importorskip("torch")
    params = {"W": rng.standard_normal((300, 200))}
    grad_list = [{"W": rng.standard_normal((300, 200))} for _ in range(3)]
    ours = _run(xopt.Adafactor(lr=0.05), {"W": params["W"].copy()}, grad_list)
    theirs = torch_adafactor(dict(lr=0.05), params, grad_list, [0.05] * 3)[0][-1]
    np.testing.assert_allclose(ours["W"], theirs["W"], rtol=1e-12, atol=1e-14)
    ours = _run(xopt.LAMB(lr=0.05), {"W": params["W"].copy()}, grad_list)
    pytest.importorskip("optax")
    theirs = optax_lamb(dict(lr=0.05), params, grad_list, [0.05] * 3)[0][-1]
    np.testing.assert_allclose(ours["W"], theirs["W"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name, kwargs, exc, culprit", [
    ("Adafactor", dict(beta2_decay=0.1), ValueError, "beta2_decay"),
    ("Adafactor", dict(d=0.5), ValueError, "d must be >= 1"),
    ("Adafactor", dict(eps1=-1.0), ValueError, "eps1"),
    ("Adafactor", dict(eps=(None, 1e-3)), TypeError, "eps"),
    ("LAMB", dict(beta1=1.0), ValueError, "beta1"),
    ("LAMB", dict(eps_root=-1e-8), ValueError, "eps_root"),
    ("LAMB", dict(lr="0.1"), TypeError, "lr"),
    ("ScheduleFreeAdamW", dict(beta1=0.0), ValueError, "beta1"),
    ("ScheduleFreeAdamW", dict(warmup_steps=1.5), ValueError, "warmup_steps"),
    ("Muon", dict(ns_coefficients=(1.0, 2.0)), TypeError, "ns_coefficients"),
    ("Muon", dict(ns_steps=100), ValueError, "ns_steps"),
    ("Muon", dict(adjust_lr_fn="sqrt"), ValueError, "adjust_lr_fn"),
    ("Muon", dict(use_muon="yes"), ValueError, "use_muon"),
    ("Muon", dict(momentum=1.0), ValueError, "momentum"),
])
def test_bad_hyperparameters_raise_in_the_constructor(name, kwargs, exc, culprit):
    with pytest.raises(exc, match=culprit):
        getattr(xopt, name)(**kwargs)


def test_adafactor_keeps_factors_for_matrices_and_a_full_moment_for_vectors(rng):
    params = {"W": rng.standard_normal((6, 5)), "T": rng.standard_normal((2, 3, 4)), "b": rng.standard_normal(5),
              "s": np.float64(0.5)}
    opt = xopt.Adafactor()
    opt.update(params, {k: np.ones(np.shape(v)) for k, v in params.items()})
    shapes = {k: {n: b.shape for n, b in st.items() if n != "step"} for k, st in opt.state.items()}
    assert shapes == {"W": {"v_row": (6, 1), "v_col": (1, 5)}, "T": {"v_row": (2, 3, 1), "v_col": (2, 1, 4)},
                      "b": {"v": (5,)}, "s": {"v": ()}}
    empty = {"E": np.zeros((0, 3))}
    opt.update(empty, {"E": np.zeros((0, 3))})  # nothing to move; torch divides 0 by 0 here
    assert opt.state["E"]["step"] == 1


# -- Schedule-Free's two points ---------------------------------------------------------------------
def test_schedule_free_eval_and_train_switch_the_params_between_x_and_y(rng):
    params = _params(rng)
    opt = xopt.ScheduleFreeAdamW(lr=0.05, beta1=0.8)
    assert opt.training
    opt.eval(params)  # no state yet: nothing moves
    assert not opt.training
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.update(params, _grads(rng, params))
    opt.train(params)
    _run(opt, params, [_grads(rng, params) for _ in range(3)])
    y = {k: v.copy() for k, v in params.items()}
    opt.eval(params)
    opt.eval(params)  # already in eval mode: nothing moves
    for k in params:
        z = opt.state[k]["z"]
        np.testing.assert_allclose(params[k], y[k] + (1 - 1 / 0.8) * (z - y[k]), rtol=1e-13, atol=1e-15)
    assert opt.state_dict()["training"] is False
    with pytest.raises(KeyError, match="'b'"):
        opt.train({"W": params["W"], "T": params["T"]})
    assert not opt.training
    opt.train(params)
    for k in params:
        np.testing.assert_allclose(params[k], y[k], rtol=1e-12, atol=1e-14)
    copy = xopt.ScheduleFreeAdamW(lr=0.05, beta1=0.8)
    copy.load_state_dict({**opt.state_dict(), "training": False}, params)
    assert not copy.training


def test_schedule_free_eval_and_train_take_number_params_as_update_does():
    """Python-float and NumPy-float params switch as 0-d arrays do and stay numbers of their type (a Python
    float raised AttributeError: no shape)."""
    params = {"x": 1.0, "y": np.float64(2.0), "z": np.array(3.0)}
    twin = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
    opt, ref = xopt.ScheduleFreeAdamW(lr=0.1), xopt.ScheduleFreeAdamW(lr=0.1)
    for _ in range(3):
        opt.update(params, {"x": 0.5, "y": -0.5, "z": 0.25})
        ref.update(twin, {"x": np.array(0.5), "y": np.array(-0.5), "z": np.array(0.25)})
    for switch in ("eval", "train"):
        getattr(opt, switch)(params)
        getattr(ref, switch)(twin)
        assert type(params["x"]) is float and type(params["y"]) is np.float64
        assert [float(params[k]) for k in "xyz"] == [float(twin[k]) for k in "xyz"]


def test_schedule_free_eval_of_torch_tensors_keeps_them_in_place(rng):
    torch = pytest.importorskip("torch")
    params = {k: torch.tensor(v, requires_grad=True) for k, v in _params(rng).items()}
    opt = xopt.ScheduleFreeAdamW()
    ids = {k: id(v) for k, v in params.items()}
    opt.update(params, {k: torch.ones_like(v) for k, v in params.items()})
    opt.eval(params)
    opt.train(params)
    assert {k: id(v) for k, v in params.items()} == ids and all(v.requires_grad for v in params.values())


def test_schedule_free_averages_are_the_packages_sums():
    """The host's lr_max and weight sum, read at counts a step apart and after a jump, as a running sum has them."""
    opt = xopt.ScheduleFreeAdamW(lr=0.1, warmup_steps=5, r=0.5, weight_lr_power=2.0)
    lr_max, total, want = -1.0, 0.0, []
    for k in range(40):
        lr = 0.1 * ((k + 1) / 5 if k < 5 else 1.0)
        lr_max = max(lr, lr_max)
        weight = ((k + 1) ** 0.5) * (lr_max**2.0)
        total += weight
        want.append(weight / total)
    for t in (1, 2, 3, 2, 40, 39, 10):
        assert opt.scalars(t)["ckp1"] == want[t - 1]
    assert xopt.ScheduleFreeAdamW(lr=0.0).scalars(3)["ckp1"] == 0.0  # the package's ZeroDivisionError: 0


def test_schedule_free_sums_run_over_the_steps_taken():
    """An lr set mid-run (raised, then lowered) counts from its step on, as the package's running lr_max and
    weight sum have it; the sums kept stay a few entries, whatever the number of lr values."""
    opt = xopt.ScheduleFreeAdamW(lr=0.01, warmup_steps=3, r=0.5)
    lrs = [0.01] * 4 + [0.03] * 4 + [0.005] * 4 + [0.02 + 0.001 * k for k in range(40)]
    lr_max, total = -1.0, 0.0
    for k, lr in enumerate(lrs):
        opt.lr = lr
        t = k + 1
        eta = lr * (t / 3 if k < 3 else 1.0)
        lr_max = max(eta, lr_max)
        weight = (t**0.5) * (lr_max**2.0)
        total += weight
        s = opt.scalars(t)
        assert (s["lr"], s["ckp1"]) == (eta, weight / total), t
        assert opt.scalars(t)["ckp1"] == weight / total  # read again: the same
    assert sum(map(len, opt._averages.values())) <= 4


def test_schedule_free_with_a_raised_lr_resumes_bit_for_bit(tmp_path):
    rng = np.random.default_rng(3)
    p0, grads = rng.standard_normal(5), [rng.standard_normal(5) for _ in range(9)]
    lrs = [0.01] * 3 + [0.04] * 6

    def run(opt, p, ks):
        for k in ks:
            opt.lr = lrs[k]
            opt.update(p, {"w": grads[k].copy()})

    straight, p = xopt.ScheduleFreeAdamW(), {"w": p0.copy()}
    run(straight, p, range(9))
    first, q = xopt.ScheduleFreeAdamW(), {"w": p0.copy()}
    run(first, q, range(5))
    first.save(tmp_path / "sf.npz")
    resumed = xopt.ScheduleFreeAdamW()
    resumed.load(tmp_path / "sf.npz", params=q)
    run(resumed, q, range(5, 9))
    np.testing.assert_array_equal(q["w"], p["w"])
    again, r = xopt.ScheduleFreeAdamW(), {"w": p0.copy()}  # and through state_dict()
    run(again, r, range(5))
    other = xopt.ScheduleFreeAdamW()
    other.load_state_dict(again.state_dict())
    run(other, r, range(5, 9))
    np.testing.assert_array_equal(r["w"], p["w"])


def test_schedule_free_with_a_raised_lr_is_the_packages():
    schedulefree = pytest.importorskip("schedulefree")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0, grads = rng.standard_normal(6), [rng.standard_normal(6) for _ in range(10)]
    p = torch.nn.Parameter(torch.tensor(w0.copy()))
    ref = schedulefree.AdamWScheduleFree([p], lr=0.01, warmup_steps=0)
    ref.train()
    params, opt = {"w": w0.copy()}, xopt.ScheduleFreeAdamW(lr=0.01)
    for lr, g in zip([0.01] * 5 + [0.02] * 5, grads):
        ref.param_groups[0]["lr"] = opt.lr = lr
        p.grad = torch.tensor(g)
        ref.step()
        opt.update(params, {"w": g.copy()})
    np.testing.assert_allclose(params["w"], p.detach().numpy(), rtol=0, atol=1e-15)


# -- Muon --------------------------------------------------------------------------------------------
def test_muon_stacks_same_shaped_matrices_and_gives_the_numbers_of_one_at_a_time(rng, monkeypatch):
    from xopt.optimizers import muon

    shapes = {"A": (6, 4), "B": (6, 4), "C": (6, 4), "D": (4, 6), "E": (5,)}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    grad_list = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(4)]
    calls = []
    real = muon.orthogonalize
    monkeypatch.setattr(muon, "orthogonalize", lambda xp, x, *a: calls.append(tuple(x.shape)) or real(xp, x, *a))
    together = _run(xopt.Muon(lr=0.02), {k: v.copy() for k, v in params.items()}, grad_list)
    assert calls == [(3, 6, 4), (4, 6)] * 4  # A, B, C in one stack; D alone; E takes AdamW
    for k in params:
        alone = _run(xopt.Muon(lr=0.02), {k: params[k].copy()}, [{k: g[k]} for g in grad_list])
        np.testing.assert_allclose(together[k], alone[k], rtol=1e-14, atol=1e-15, err_msg=k)
    calls.clear()
    monkeypatch.setattr(xopt.Muon, "stack_max_elements", 23)  # 6x4 is larger: one at a time
    _run(xopt.Muon(lr=0.02), {k: v.copy() for k, v in params.items()}, grad_list[:1])
    assert calls == [(6, 4)] * 3 + [(4, 6)]


def test_muon_refuses_what_it_cannot_orthogonalise_and_falls_back_where_told(rng):
    params = {"W": rng.standard_normal((6, 4)), "b": rng.standard_normal(4)}
    before = {k: v.copy() for k, v in params.items()}
    opt = xopt.Muon(use_muon=True)
    with pytest.raises(ValueError, match=r"use_muon=True: .* shape \(4,\)"):
        opt.update(params, _grads(rng, params))
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
    assert opt.state == {}
    grad_list = [_grads(rng, params) for _ in range(3)]
    ours = _run(xopt.Muon(lr=0.01, weight_decay=0.1, overrides={"W": {"use_muon": False}}),
                {k: v.copy() for k, v in params.items()}, grad_list)
    adamw = _run(xopt.AdamW(lr=0.01, weight_decay=0.1), {k: v.copy() for k, v in params.items()}, grad_list)
    for k in params:
        np.testing.assert_array_equal(ours[k], adamw[k])


def test_muon_against_torch_in_bfloat16_differs_by_bfloat16s_rounding_only(rng):
    """torch.optim.Muon as it is (its Newton-Schulz in bfloat16) against xopt's in float64: close, not equal."""
    pytest.importorskip("torch")
    params = {"W": rng.standard_normal((32, 16)), "U": rng.standard_normal((16, 48))}
    grad_list = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(5)]
    ours = _run(xopt.Muon(lr=0.02), {k: v.copy() for k, v in params.items()}, grad_list)
    theirs = torch_muon(dict(lr=0.02), params, grad_list, [0.02] * 5, bfloat16=True)[0][-1]
    for k in params:
        moved = np.linalg.norm(theirs[k] - params[k])
        gap = np.linalg.norm(ours[k] - theirs[k]) / moved
        assert 1e-6 < gap < 0.03, (k, gap)


def test_orthogonalize_gives_singular_values_near_one(rng):
    x = rng.standard_normal((64, 32))
    o = xopt.optimizers.muon.orthogonalize(np, x, xopt.optimizers.muon.NS_COEFFICIENTS, 5, 1e-7)
    s = np.linalg.svd(o, compute_uv=False)
    assert 0.5 < s.min() and s.max() < 1.3, s  # the quintic's band, as Keller Jordan's post describes
    np.testing.assert_allclose(o, np.linalg.svd(x)[0][:, :32] @ np.linalg.svd(x)[2], atol=0.5)


# -- edges ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
def test_float16_and_float32_params_step_in_float32(name, rng):
    for dtype in (np.float16, np.float32):
        params = {k: v.astype(dtype) for k, v in _params(rng).items()}
        opt = getattr(xopt, name)(**NEW[name])
        _run(opt, params, [{k: v.astype(dtype) for k, v in _grads(rng, params).items()} for _ in range(3)])
        assert all(v.dtype == dtype and np.all(np.isfinite(v)) for v in params.values())
        assert {b.dtype for st in opt.state.values() for n, b in st.items() if n != "step"} == {np.dtype(np.float32)}


@pytest.mark.parametrize("name", NEW)
def test_zero_grads_and_zero_params_stay_finite(name):
    params = {"W": np.zeros((4, 3)), "b": np.zeros(3)}
    opt = getattr(xopt, name)(**NEW[name])
    _run(opt, params, [{k: np.zeros_like(v) for k, v in params.items()} for _ in range(3)])
    assert all(np.all(np.isfinite(v)) for v in params.values())
    assert all(np.all(np.isfinite(b)) for st in opt.state.values() for n, b in st.items() if n != "step")


@pytest.mark.parametrize("name", NEW)
def test_copies_and_pickles_step_as_the_original(name, rng):
    import copy
    import pickle

    params = _params(rng)
    grad_list = [_grads(rng, params) for _ in range(4)]
    opt = getattr(xopt, name)(**NEW[name])
    _run(opt, params, grad_list[:2])
    twins = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    states = [{k: v.copy() for k, v in params.items()} for _ in twins]
    _run(opt, params, grad_list[2:])
    for twin, ps in zip(twins, states):
        _run(twin, ps, grad_list[2:])
        for k in params:
            np.testing.assert_array_equal(ps[k], params[k])


@pytest.mark.parametrize("name, kwargs", [("Adafactor", dict(lr=0.05)), ("LAMB", dict(lr=0.02)),
                                          ("ScheduleFreeAdamW", dict(lr=0.05, warmup_steps=10)),
                                          ("Muon", dict(lr=0.02, weight_decay=0.0))])
def test_they_fit_a_least_squares_problem(name, kwargs, rng):
    x = rng.standard_normal((64, 8))
    w_true, b_true = rng.standard_normal((8, 3)), rng.standard_normal(3)
    t = x @ w_true + b_true
    params = {"W": np.zeros((8, 3)) + 0.01, "b": np.zeros(3)}

    def loss_and_grads(p):
        err = x @ p["W"] + p["b"] - t
        return float((err**2).mean()), {"W": 2 * x.T @ err / err.size, "b": 2 * err.sum(0) / err.size}

    opt = getattr(xopt, name)(**kwargs)
    first = loss_and_grads(params)[0]
    for _ in range(300):
        opt.update(params, loss_and_grads(params)[1])
    if name == "ScheduleFreeAdamW":
        opt.eval(params)  # evaluated at x
    assert loss_and_grads(params)[0] < 0.01 * first


@pytest.mark.parametrize("name", NEW)
def test_dask_params_step_as_numpy_ones(name, rng):
    da = pytest.importorskip("dask.array")
    params = _params(rng)
    grad_list = [_grads(rng, params) for _ in range(3)]
    want = _run(getattr(xopt, name)(**NEW[name]), {k: v.copy() for k, v in params.items()}, grad_list)
    chunked = {k: da.from_array(v.copy(), chunks=2) for k, v in params.items()}
    _run(getattr(xopt, name)(**NEW[name]), chunked, [{k: da.from_array(v, chunks=2) for k, v in g.items()}
                                                      for g in grad_list])
    for k in params:
        np.testing.assert_allclose(np.asarray(chunked[k]), want[k], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_adafactor_with_eps1_0_and_zero_grads_is_nan_as_torchs_without_a_warning(impl):
    import warnings

    opt, params = xopt.Adafactor(eps1=0.0, impl=impl), {"w": np.ones((3, 4))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.update(params, {"w": np.zeros((3, 4))})
    assert np.isnan(params["w"]).all()
