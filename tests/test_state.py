"""state_dict, files, and resuming: bit-identical to never stopping; a misfit is refused and changes nothing."""

import io
import json
import os
import pathlib
import pickle
import stat
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest

import xopt
from xopt import _backend
from test_edges import CONFIGS, make

GOLDEN = pathlib.Path(__file__).parent / "golden"


def _grads(rng, steps):
    return [{"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)} for _ in range(steps)]


@pytest.mark.parametrize("config", CONFIGS)
def test_resume_from_file_is_bit_identical(config, backend, rng, tmp_path):
    params0 = {"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    grads = _grads(rng, 6)

    def arrays(d):
        return {k: backend.asarray(v) for k, v in d.items()}

    straight, opt = arrays(params0), make(config)
    for g in grads:
        opt.update(straight, arrays(g))

    resumed, first = arrays(params0), make(config)
    for g in grads[:3]:
        first.update(resumed, arrays(g))
    first.save(tmp_path / "state.npz")
    second = make(config, lr=123.0)  # hyperparameters come from the file too
    second.load(tmp_path / "state.npz", params=resumed)
    for g in grads[3:]:
        second.update(resumed, arrays(g))

    assert second.iter == opt.iter == 6
    for k in params0:
        np.testing.assert_array_equal(backend.to_numpy(resumed[k]), backend.to_numpy(straight[k]))
        for name in opt.buffers():
            np.testing.assert_array_equal(backend.to_numpy(second.state[k][name]),
                                          backend.to_numpy(opt.state[k][name]))


def test_state_moves_between_libraries(rng, tmp_path):
    torch = pytest.importorskip("torch")
    params = {"W": rng.standard_normal((3, 4))}
    opt = xopt.Adam()
    opt.update(params, {"W": rng.standard_normal((3, 4))})
    opt.save(tmp_path / "s.npz")
    g = rng.standard_normal((3, 4))
    tparams = {"W": torch.asarray(params["W"].copy())}
    topt = xopt.Adam()
    topt.load(tmp_path / "s.npz")
    topt.update(tparams, {"W": torch.asarray(g)})
    opt.update(params, {"W": g})
    np.testing.assert_array_equal(tparams["W"].numpy(), params["W"])
    assert isinstance(topt.state["W"]["m"], torch.Tensor)


def test_state_dict_is_a_snapshot(rng):
    params = {"W": rng.standard_normal(4)}
    opt = xopt.Adam()
    opt.update(params, {"W": rng.standard_normal(4)})
    sd = opt.state_dict()
    m = sd["state"]["W"]["m"].copy()
    opt.update(params, {"W": rng.standard_normal(4)})
    np.testing.assert_array_equal(sd["state"]["W"]["m"], m)
    assert sd["state"]["W"]["step"] == 1


def _trained(rng, **kwargs):
    params = {"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    opt = xopt.Adam(**kwargs)
    for g in _grads(rng, 2):
        opt.update(params, g)
    return opt, params


def _misfit(sd, case):
    sd = {**sd, "state": {k: dict(v) for k, v in sd["state"].items()}, "hyperparameters": dict(sd["hyperparameters"])}
    if case == "other optimizer":
        sd["optimizer"] = "RMSprop"
    elif case == "missing hyperparameter":
        del sd["hyperparameters"]["beta2"]
    elif case == "invalid hyperparameter":
        sd["hyperparameters"]["beta1"] = 1.5
    elif case == "buffer shape":
        sd["state"]["b"]["v"] = np.ones(6)
    elif case == "missing buffer":
        del sd["state"]["b"]["v"]
    elif case == "a buffer no Adam keeps":
        sd["state"]["b"]["h"] = np.ones(5)
    elif case == "negative step":
        sd["state"]["b"]["step"] = -1
    elif case == "not an array":
        sd["state"]["b"]["m"] = [0.0] * 5
    elif case == "buffers differ in dtype":
        sd["state"]["b"]["v"] = sd["state"]["b"]["v"].astype(np.float16)
    elif case == "buffers differ in shape":
        sd["state"]["b"]["m"], sd["state"]["b"]["v"] = np.ones(5), np.ones((5, 1))
    elif case == "step beyond int64":
        sd["state"]["b"]["step"] = 10**400
    elif case == "step of 2**63":
        sd["state"]["b"]["step"] = 2**63
    elif case == "bool step":
        sd["state"]["b"]["step"] = True
    elif case == "float step":
        sd["state"]["b"]["step"] = 2.0
    elif case == "numpy float step":
        sd["state"]["b"]["step"] = np.float64(2.0)
    elif case == "NaN iter":
        sd["iter"] = float("nan")
    elif case == "infinite skipped_steps":
        sd["skipped_steps"] = float("inf")
    elif case == "iter beyond int64":
        sd["iter"] = 2**64
    elif case == "negative iter":
        sd["iter"] = np.int64(-1)
    return sd


MISFITS = {
    "other optimizer": (ValueError, "RMSprop"),
    "missing hyperparameter": (ValueError, "beta2"),
    "invalid hyperparameter": (ValueError, "beta1"),
    "buffer shape": (ValueError, "'b'"),
    "missing buffer": (ValueError, "'b'"),
    "a buffer no Adam keeps": (ValueError, "'b'.*'h'.*no Adam keeps"),
    "negative step": (ValueError, "step"),
    "not an array": (TypeError, "'m'"),
    "buffers differ in dtype": (TypeError, "param 'b' differ in dtype.*'v' is float16|'v' of param 'b' is float16"),
    "buffers differ in shape": (ValueError, "param 'b' differ in shape|'v' of param 'b' has shape \\(5, 1\\)"),
    "step beyond int64": (ValueError, "step of param 'b'.*below 2\\*\\*63"),
    "step of 2**63": (ValueError, "step of param 'b'.*below 2\\*\\*63"),
    "bool step": (ValueError, "step of param 'b'.*bool"),
    "float step": (ValueError, "step of param 'b'.*float"),
    "numpy float step": (ValueError, "step of param 'b'.*float64"),
    "NaN iter": (ValueError, "iter.*nan"),
    "infinite skipped_steps": (ValueError, "skipped_steps.*inf"),
    "iter beyond int64": (ValueError, "iter.*below 2\\*\\*63"),
    "negative iter": (ValueError, "iter.*-1"),
}


def _assert_unchanged(opt, before):
    after = opt.state_dict()
    assert after["hyperparameters"] == before["hyperparameters"]
    assert (after["iter"], after["skipped_steps"]) == (before["iter"], before["skipped_steps"])
    assert after["state"].keys() == before["state"].keys()
    for k, st in before["state"].items():
        assert after["state"][k].keys() == st.keys()
        for n, v in st.items():
            if n == "step":
                assert after["state"][k][n] == v
            else:
                assert after["state"][k][n].dtype == v.dtype
                np.testing.assert_array_equal(after["state"][k][n], v)


@pytest.mark.parametrize("with_params", [False, True], ids=["alone", "with params"])
@pytest.mark.parametrize("case", MISFITS)
def test_a_misfit_state_is_refused_and_changes_nothing(case, with_params, rng):
    source, _ = _trained(rng)
    target, params = _trained(rng, lr=0.01)
    before = target.state_dict()
    exc, culprit = MISFITS[case]
    with pytest.raises(exc, match=culprit):
        target.load_state_dict(_misfit(source.state_dict(), case), params=params if with_params else None)
    _assert_unchanged(target, before)


def test_a_numpy_integer_step_is_taken_as_an_int(rng):
    source, params = _trained(rng)
    sd = source.state_dict()
    sd["state"]["b"]["step"], sd["iter"] = np.int64(2), np.uint8(2)
    opt = xopt.Adam()
    opt.load_state_dict(sd, params=params)
    assert type(opt.state["b"]["step"]) is int and type(opt.iter) is int and opt.state["b"]["step"] == 2


# Buffers in the dtype the params keep them in, but not the dtype the optimizer would keep: with params, each is
# refused naming the param and the buffer (without params they are self-consistent, so only update could tell).
DTYPE_MISFITS = {
    "float16 state for a float64 param": ({}, np.float64, np.float16, "float64"),
    "float64 state for a float32 param": ({}, np.float32, np.float64, "float32"),
    "float16 state for a float16 param": ({}, np.float16, np.float16, "float32"),  # float16 keeps float32 state
    "float32 state with state_dtype=bfloat16": ({"state_dtype": "bfloat16"}, np.float32, np.float32, "bfloat16"),
}


@pytest.mark.parametrize("case", DTYPE_MISFITS)
def test_a_buffer_dtype_that_does_not_fit_the_param_is_refused(case, rng):
    hyper, param_dtype, buffer_dtype, kept = DTYPE_MISFITS[case]
    if hyper.get("state_dtype"):
        pytest.importorskip("ml_dtypes")
    params = {"W": rng.standard_normal((3, 4)).astype(param_dtype), "b": rng.standard_normal(5).astype(param_dtype)}
    sd = xopt.Adam(**hyper).state_dict()
    sd["state"] = {k: {"step": 2, "m": np.ones(p.shape, buffer_dtype), "v": np.ones(p.shape, buffer_dtype)}
                   for k, p in params.items()}
    target, _ = _trained(rng, lr=0.01)
    before = target.state_dict()
    with pytest.raises(TypeError, match=f"state 'm' of param 'W' is {np.dtype(buffer_dtype).name} .* in {kept}"):
        target.load_state_dict(sd, params=params)
    _assert_unchanged(target, before)
    target.load_state_dict(sd)  # alone it is self-consistent; update would refuse it
    with pytest.raises(TypeError, match="'W'"):
        target.update(params, {k: np.ones_like(p) for k, p in params.items()})


def test_a_float32_buffer_the_step_does_not_use_is_left_alone_on_every_path(rng):
    """A float64 param's float32 v_max after amsgrad was turned off: the checked path (``impl="reference"``)
    widened every float32 buffer of the state, the lane only those it steps, so the two paths left v_max in
    different dtypes.  Now a step widens what it uses; v_max is widened when a step uses it again."""
    params0 = {"w": rng.standard_normal(7)}
    grads = {"w": rng.standard_normal(7)}
    seen = {}
    for impl in ("auto", "reference"):
        opt, params = xopt.AdamW(amsgrad=True, impl=impl), {k: p.copy() for k, p in params0.items()}
        opt.update(params, grads)
        opt.state["w"]["v_max"] = opt.state["w"]["v_max"].astype(np.float32)
        opt.amsgrad = False
        opt.update(params, grads)
        assert opt.state["w"]["v_max"].dtype == np.float32, impl
        opt.amsgrad = True
        opt.update(params, grads)
        assert opt.state["w"]["v_max"].dtype == np.float64, impl
        seen[impl] = params["w"], opt.state["w"]["v_max"]
    assert all(np.array_equal(a, b) for a, b in zip(seen["auto"], seen["reference"]))


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_float32_state_of_a_float64_param_is_widened_as_it_steps_and_loads(impl, library, rng):
    # float32 values are float64 values: a float64 param's float32 state (what 8-bit or bfloat16 state converted
    # without the params comes back as, or a user's) steps, and loads with params=, as its float64 copy does,
    # to the bit; torch.optim's load_state_dict casts a state to its param's dtype too
    if library == "torch":
        torch = pytest.importorskip("torch")
        as_param = torch.tensor
    else:
        as_param = np.array
    params0 = {"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    state = {k: {"step": 3, "m": rng.standard_normal(p.shape).astype(np.float32),
                 "v": rng.random(p.shape).astype(np.float32)} for k, p in params0.items()}
    grads = {k: as_param(rng.standard_normal(p.shape)) for k, p in params0.items()}
    runs = {}
    for how in ("float64", "float32", "loaded with params"):
        opt = xopt.Adam(lr=0.01, amsgrad=False, impl=impl)
        sd = opt.state_dict()
        wide = how == "float64"
        sd["state"] = {k: {n: (b.astype(np.float64) if wide and n != "step" else b) for n, b in st.items()}
                       for k, st in state.items()}
        params = {k: as_param(p.copy()) for k, p in params0.items()}
        opt.load_state_dict(sd, params=params if how == "loaded with params" else None)
        expected_dtype = np.float32 if how == "float32" else np.float64
        assert np.asarray(opt.state["W"]["m"]).dtype == expected_dtype
        opt.update(params, grads)
        opt.update(params, grads)
        runs[how] = opt, params
    opt64, p64 = runs["float64"]
    for how in ("float32", "loaded with params"):
        opt, params = runs[how]
        for k in params0:
            assert np.array_equal(np.asarray(params[k]), np.asarray(p64[k]))
            assert type(opt.state[k]["m"]) is type(p64[k])
            for n in ("m", "v"):
                assert np.array_equal(np.asarray(opt.state[k][n]), np.asarray(opt64.state[k][n]))
                assert np.asarray(opt.state[k][n]).dtype == np.float64


def test_a_step_that_refuses_after_widening_writes_nothing(rng):
    # "W"'s float32 state is widened before "b"'s bad state is found: the step writes nothing, W's state keeps
    # its values (in float64) and its count
    params = {"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    opt = xopt.Adam()
    m, v = rng.standard_normal((3, 4)).astype(np.float32), rng.random((3, 4)).astype(np.float32)
    opt.state["W"] = {"step": 2, "m": m.copy(), "v": v.copy()}
    opt.state["b"] = {"step": 2, "m": np.zeros(5, np.float16), "v": np.zeros(5, np.float16)}
    before = {k: p.copy() for k, p in params.items()}
    with pytest.raises(TypeError, match="'b'.*float16"):
        opt.update(params, {k: np.ones_like(p) for k, p in params.items()})
    assert all(np.array_equal(params[k], before[k]) for k in params)
    assert opt.state["W"]["step"] == 2
    assert np.array_equal(opt.state["W"]["m"], m) and np.array_equal(opt.state["W"]["v"], v)


def test_state_must_fit_the_params_when_given(rng):
    opt, params = _trained(rng)
    sd = opt.state_dict()
    with pytest.raises(KeyError, match="'b'"):
        xopt.Adam().load_state_dict(sd, params={"W": params["W"]})
    with pytest.raises(ValueError, match="'W'"):
        xopt.Adam().load_state_dict(sd, params={"W": np.ones((4, 3)), "b": params["b"]})


def test_a_loaded_state_that_does_not_fit_is_caught_at_update(rng):
    opt, params = _trained(rng)
    other = xopt.Adam()
    other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="'W'.*state 'm' was made for shape"):
        other.update({"W": np.ones((4, 3)), "b": params["b"]}, {"W": np.ones((4, 3)), "b": params["b"]})


def test_a_file_that_is_not_a_state_is_refused(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.ones(3))
    with pytest.raises(ValueError, match="not an xopt state file"):
        xopt.Adam().load(tmp_path / "x.npz")


def test_state_files_hold_no_pickles(rng, tmp_path):
    opt, _ = _trained(rng)
    opt.save(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz", allow_pickle=False) as f:
        assert all(f[k].dtype != object for k in f.files)
    assert xopt.load_state(tmp_path / "s.npz")["hyperparameters"] == opt.state_dict()["hyperparameters"]


# -- options turned off and on mid-run: every state an optimizer reaches saves and loads ---------------------------
# (class, the options on, the same options off, in the order they can be set)
TOGGLES = {
    "Adam-amsgrad": (xopt.Adam, dict(amsgrad=True), dict(amsgrad=False)),
    "AdamW-amsgrad": (xopt.AdamW, dict(amsgrad=True), dict(amsgrad=False)),
    "Adam-amsgrad-bfloat16": (xopt.Adam, dict(amsgrad=True, state_dtype="bfloat16"), dict(amsgrad=False)),
    "SGD-momentum": (xopt.SGD, dict(momentum=0.9), dict(momentum=0.0)),
    "SGD-nesterov": (xopt.SGD, dict(momentum=0.9, nesterov=True), dict(nesterov=False, momentum=0.0)),
    "RMSprop-centered": (xopt.RMSprop, dict(centered=True), dict(centered=False)),
    "RMSprop-momentum": (xopt.RMSprop, dict(momentum=0.5), dict(momentum=0.0)),
    "RMSprop-centered-momentum": (xopt.RMSprop, dict(centered=True, momentum=0.5), dict(centered=False, momentum=0.0)),
}

# From the options on: off (the buffer stays, unused), a step, on again (it is used again), a step with b's grad
# None.  From the options off: on (the buffer is not made until the next step), a step with b's grad None (W has
# the new buffer, b not yet), a step.  The state is saved and loaded at every "check".
SCRIPTS = {
    "on-off-on": ("step", "step", "off", "check", "step", "check", "on", "check", "step b=None", "check", "step",
                  "check"),
    "off-on": ("step", "step", "on", "check", "step b=None", "check", "step", "check"),
}


def _set(opt, options):
    for name, value in options.items():
        setattr(opt, name, value)


def _same_state(a, b):
    assert a.hyperparameters() == b.hyperparameters()
    assert (a.iter, a.skipped_steps) == (b.iter, b.skipped_steps)
    assert a.state.keys() == b.state.keys()
    for k in a.state:
        assert a.state[k].keys() == b.state[k].keys(), k
        assert type(b.state[k]["step"]) is int and a.state[k]["step"] == b.state[k]["step"]
        for n in set(a.state[k]) - {"step"}:
            x, y = np.asarray(a.state[k][n]), np.asarray(b.state[k][n])
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), (k, n)


def _reloaded(opt, via, params, tmp_path):
    fresh = type(opt)(lr=0.5)  # every hyperparameter comes from the state
    if via == "file":
        opt.save(tmp_path / "state.npz")
        fresh.load(tmp_path / "state.npz", params=params)
    else:
        fresh.load_state_dict(opt.state_dict(), params=params)
    return fresh


@pytest.mark.parametrize("via", ["file", "state_dict"])
@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", TOGGLES)
def test_a_state_left_by_options_turned_off_or_on_saves_and_loads(case, script, via, rng, tmp_path):
    cls, on, off = TOGGLES[case]
    dtype = np.float64
    if on.get("state_dtype"):
        pytest.importorskip("ml_dtypes")
        dtype = np.float32
    base = {k: v for k, v in on.items() if k == "state_dtype"}
    p0 = {"W": rng.standard_normal((3, 4)).astype(dtype), "b": rng.standard_normal(5).astype(dtype)}
    straight, resumed = ({k: v.copy() for k, v in p0.items()} for _ in range(2))
    opt = cls(**(on if script.startswith("on") else base))
    twin = cls(**(on if script.startswith("on") else base))
    reloads = 0
    for action in SCRIPTS[script]:
        if action.startswith("step"):
            g = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in p0.items()}
            if action == "step b=None":
                g["b"] = None
            opt.update(straight, g)
            twin.update(resumed, {k: None if v is None else v.copy() for k, v in g.items()})
        elif action in ("on", "off"):
            _set(opt, on if action == "on" else off)
            _set(twin, on if action == "on" else off)
        else:
            twin = _reloaded(twin, via, resumed, tmp_path)
            _same_state(opt, twin)
            reloads += 1
    assert reloads >= 3
    for k in p0:
        assert straight[k].tobytes() == resumed[k].tobytes(), k
    _same_state(opt, twin)


def test_a_buffer_kept_from_an_option_turned_off_is_kept_and_used_again(rng, tmp_path):
    """As torch.optim does: v_max survives amsgrad=False and a file, and counts again when amsgrad is back on."""
    params = {"W": rng.standard_normal(4)}
    opt = xopt.Adam(amsgrad=True)
    opt.update(params, {"W": 10.0 * rng.standard_normal(4)})
    v_max = opt.state["W"]["v_max"].copy()
    opt.amsgrad = False
    opt.update(params, {"W": rng.standard_normal(4)})
    opt.save(tmp_path / "s.npz")
    back = xopt.Adam()
    back.load(tmp_path / "s.npz", params=params)
    assert not back.amsgrad
    np.testing.assert_array_equal(back.state["W"]["v_max"], v_max)


@pytest.mark.parametrize("cls, buffers, stranger", [
    (xopt.SGD, {}, "v"),  # Momentum's buffer, not SGD's
    (xopt.RMSprop, {"h": np.ones(5)}, "m"),
    (xopt.AdaGrad, {"h": np.ones(5)}, "g_avg"),
    (xopt.Adam, {"m": np.ones(5), "v": np.ones(5)}, "b"),
])
def test_a_buffer_no_configuration_keeps_is_refused(cls, buffers, stranger):
    sd = cls().state_dict()
    sd["state"] = {"b": {"step": 3, **buffers, stranger: np.ones(5)}}
    opt = cls()
    with pytest.raises(ValueError, match=f"param 'b' holds \\['{stranger}'\\], which no {cls.__name__} keeps"):
        opt.load_state_dict(sd)
    assert not opt.state


@pytest.mark.parametrize("cls, buffers, lacking", [
    (xopt.RMSprop, {"g_avg": np.ones(5)}, "h"),
    (xopt.Adam, {"m": np.ones(5), "v_max": np.ones(5)}, "v"),
    (xopt.Momentum, {}, "v"),
])
def test_a_buffer_every_configuration_keeps_must_be_there_after_a_step(cls, buffers, lacking):
    sd = cls().state_dict()
    sd["state"] = {"b": {"step": 0, **buffers}}
    cls().load_state_dict(sd)  # before its first step a param may lack it: the step makes it
    sd["state"]["b"]["step"] = 1
    with pytest.raises(ValueError, match=f"param 'b' lacks \\['{lacking}'\\]"):
        cls().load_state_dict(sd)


# -- byte order: whatever a file or state_dict holds, the state is kept in native order -----------------------------
def _rewrite(path, change):
    """Re-save every array of an .npz file through ``change`` (as another tool might)."""
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    np.savez(path, **{k: (v if k == "meta" else change(v)) for k, v in arrays.items()})


def _big_endian(a):
    return a.astype(a.dtype.newbyteorder(">"))


@pytest.mark.parametrize("config", ["Adam-amsgrad-wd", "RMSprop-all", "bfloat16"])
def test_a_big_endian_state_file_is_loaded_in_native_byte_order(config, rng, tmp_path):
    if config == "bfloat16":
        pytest.importorskip("ml_dtypes")
        dtype, new = np.float32, lambda: xopt.Adam(amsgrad=True, state_dtype="bfloat16")
    else:
        dtype, new = np.float64, lambda: make(config)
    p0 = rng.standard_normal(1000).astype(dtype)
    grads = [rng.standard_normal(1000).astype(dtype) for _ in range(4)]
    straight, resumed = {"p": p0.copy()}, {"p": p0.copy()}
    opt, first = new(), new()
    for g in grads:
        opt.update(straight, {"p": g})
    for g in grads[:2]:
        first.update(resumed, {"p": g})
    first.save(tmp_path / "s.npz")
    _rewrite(tmp_path / "s.npz", _big_endian)
    with np.load(tmp_path / "s.npz") as f:
        assert any(f[k].dtype.byteorder == ">" for k in f.files)
    for loaded in (xopt.load_state(tmp_path / "s.npz")["state"]["p"], ):
        assert all(v.dtype.isnative for n, v in loaded.items() if n != "step")
    second = new()
    second.load(tmp_path / "s.npz", params=resumed)
    for name, buf in second.state["p"].items():
        if name != "step":
            assert buf.dtype.isnative, name
            assert buf.dtype == first.state["p"][name].dtype
            assert buf.tobytes() == first.state["p"][name].tobytes()
    for g in grads[2:]:
        second.update(resumed, {"p": g})
    assert resumed["p"].tobytes() == straight["p"].tobytes()


@pytest.mark.parametrize("change", ["compressed", "fortran order"])
def test_a_state_file_resaved_another_way_loads_the_same(change, rng, tmp_path):
    opt, params = _trained(rng, amsgrad=True)
    opt.save(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as f:
        arrays = {k: f[k] for k in f.files}
    if change == "compressed":
        np.savez_compressed(tmp_path / "s.npz", **arrays)
    else:
        np.savez(tmp_path / "s.npz", **{k: np.asfortranarray(v) for k, v in arrays.items()})
    back = xopt.Adam()
    back.load(tmp_path / "s.npz", params=params)
    _same_state(opt, back)
    assert all(b.flags.c_contiguous for st in back.state.values() for n, b in st.items() if n != "step")


def test_a_big_endian_state_dict_is_loaded_in_native_byte_order(rng):
    params = {"p": rng.standard_normal(1000)}
    opt = xopt.Adam(amsgrad=True)
    opt.update(params, {"p": rng.standard_normal(1000)})
    sd = opt.state_dict()
    sd["state"]["p"] = {n: (v if n == "step" else _big_endian(v)) for n, v in sd["state"]["p"].items()}
    other = xopt.Adam()
    other.load_state_dict(sd)
    for name in opt.buffers():
        assert other.state["p"][name].dtype.isnative and other.state["p"][name].dtype == np.float64
        np.testing.assert_array_equal(other.state["p"][name], opt.state["p"][name])
    twin = {"p": params["p"].copy()}
    g = rng.standard_normal(1000)
    opt.update(params, {"p": g})
    other.update(twin, {"p": g.copy()})
    assert twin["p"].tobytes() == params["p"].tobytes()


# -- save: atomic, through symlinks, keeping the file's mode ------------------------------------------------------
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes and symlinks")


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@posix_only
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o664, 0o600])
def test_save_keeps_the_mode_of_the_file_it_replaces(mode, rng, tmp_path, umask_022):
    opt, _ = _trained(rng)
    path = tmp_path / "s.npz"
    path.write_bytes(b"old")
    os.chmod(path, mode)
    opt.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert xopt.load_state(path)["iter"] == 2


@posix_only
def test_save_makes_a_new_file_with_the_umask_mode(rng, tmp_path, umask_022):
    opt, _ = _trained(rng)
    opt.save(tmp_path / "s.npz")
    assert stat.S_IMODE(os.stat(tmp_path / "s.npz").st_mode) == 0o644
    assert os.listdir(tmp_path) == ["s.npz"]  # no temp file left


@posix_only
@pytest.mark.parametrize("relative", [False, True], ids=["absolute link", "relative link"])
def test_save_writes_through_a_symlink(relative, rng, tmp_path, umask_022):
    opt, _ = _trained(rng)
    (tmp_path / "real").mkdir()
    (tmp_path / "links").mkdir()
    target, link = tmp_path / "real" / "s.npz", tmp_path / "links" / "s.npz"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    os.symlink(os.path.join("..", "real", "s.npz") if relative else target, link)
    opt.save(link)
    assert link.is_symlink() and os.path.samefile(link, target)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    assert xopt.load_state(target)["iter"] == 2
    assert sorted(os.listdir(tmp_path / "real")) == ["s.npz"] and sorted(os.listdir(tmp_path / "links")) == ["s.npz"]


@posix_only
def test_save_through_a_dangling_symlink_makes_its_target(rng, tmp_path):
    opt, _ = _trained(rng)
    os.symlink(tmp_path / "target.npz", tmp_path / "link.npz")
    opt.save(tmp_path / "link.npz")
    assert (tmp_path / "link.npz").is_symlink() and xopt.load_state(tmp_path / "target.npz")["iter"] == 2


def test_a_failed_save_leaves_the_old_file_and_no_temp_file(rng, tmp_path, monkeypatch):
    opt, _ = _trained(rng)
    path = tmp_path / "s.npz"
    opt.save(path)
    old = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(xopt.state_write, "_write_block", broken)
    with pytest.raises(OSError, match="disk full"):
        opt.save(path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["s.npz"]


# -- load: anything but an xopt state file is refused as such, naming the path --------------------------------------
def _zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def _npy_bytes(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _meta_bytes(meta):
    return _npy_bytes(np.frombuffer(json.dumps(meta).encode(), np.uint8))


FOREIGN = {
    "empty": lambda p, good: p.write_bytes(b""),
    "text": lambda p, good: p.write_text("step,loss\n1,0.5\n"),
    "json": lambda p, good: p.write_text('{"format": "xopt-state-2"}'),
    "random bytes": lambda p, good: p.write_bytes(bytes(range(256)) * 4),
    "npy": lambda p, good: np.save(p, np.ones(3)),
    "npy named .npz": lambda p, good: p.write_bytes(_npy_bytes(np.ones(3))),
    "pickle": lambda p, good: p.write_bytes(pickle.dumps({"state": 1})),
    "zip magic only": lambda p, good: p.write_bytes(b"PK\x03\x04"),
    "empty zip": lambda p, good: _zip(p, {}),
    "zip of text": lambda p, good: _zip(p, {"meta": "hello", "a0.npy": "x"}),
    "npz without meta": lambda p, good: np.savez(p, a=np.ones(3)),
    "npz with float meta": lambda p, good: np.savez(p, meta=np.ones(3)),
    "npz with object meta": lambda p, good: np.savez(p, meta=np.array([{"a": 1}], dtype=object)),
    "meta not JSON": lambda p, good: np.savez(p, meta=np.frombuffer(b"\xff\xfe{", np.uint8)),
    "meta a JSON list": lambda p, good: np.savez(p, meta=np.frombuffer(b"[1, 2]", np.uint8)),
    "meta of another format": lambda p, good: np.savez(p, meta=np.frombuffer(b'{"format": "keras"}', np.uint8)),
    "meta without state": lambda p, good: np.savez(
        p, meta=np.frombuffer(b'{"format": "xopt-state-1", "optimizer": "Adam"}', np.uint8)),
    "meta without keys": lambda p, good: np.savez(
        p, meta=np.frombuffer(b'{"format": "xopt-state-2", "optimizer": "Adam"}', np.uint8)),
}

# Format 2 (what save writes): the good file of _good_file with one member changed, dropped or added.
DATA = "data_float64.npy"
FOREIGN_V2 = {
    "the data missing": lambda m: m.pop(DATA),
    "the table missing": lambda m: m.pop("table.npy"),
    "the steps missing": lambda m: m.pop("steps.npy"),
    "the data as an object array": lambda m: m.update({DATA: _npy_bytes(np.array([None], dtype=object))}),
    "the data not .npy": lambda m: m.update({DATA: b"not an array"}),
    "the data's header claiming 8 PB": lambda m: m.update({DATA: _lying_npy((10**15,))}),
    "the data's header claiming too little": lambda m: m.update({DATA: _lying_npy((2,))}),
    "the data in float32": lambda m: m.update({DATA: _npy_bytes(_array(m, DATA).astype(np.float32))}),
    "the data 2-d": lambda m: m.update({DATA: _npy_bytes(_array(m, DATA).reshape(1, -1))}),
    "the data one number short": lambda m: m.update({DATA: _npy_bytes(_array(m, DATA)[:-1])}),
    "the data one number long": lambda m: m.update({DATA: _npy_bytes(np.append(_array(m, DATA), 1.0))}),
    "the table in float64": lambda m: _table(m, lambda t: t.astype(np.float64)),
    "the table 1-d": lambda m: _table(m, lambda t: t.ravel()),
    "the table with 3 columns": lambda m: _table(m, lambda t: t[:, :3]),
    "the table with 100 columns": lambda m: _table(m, lambda t: np.ones((len(t), 100), np.int64)),
    "a param out of range": lambda m: _table(m, lambda t: _put(t, (0, 0), 2)),
    "a negative param": lambda m: _table(m, lambda t: _put(t, (0, 0), -1)),
    "a buffer name out of range": lambda m: _table(m, lambda t: _put(t, (0, 1), 2)),
    "a dtype out of range": lambda m: _table(m, lambda t: _put(t, (0, 2), 1)),
    "an ndim beyond the columns": lambda m: _table(m, lambda t: _put(t, (0, 3), 3)),
    "a negative ndim": lambda m: _table(m, lambda t: _put(t, (0, 3), -1)),
    "a negative dim": lambda m: _table(m, lambda t: _put(t, (1, 4), -12)),
    "a padding dim not 1": lambda m: _table(m, lambda t: _put(t, (2, 5), 2)),
    "a buffer named twice": lambda m: _table(m, lambda t: _put(t, (1, 1), 0)),
    "a buffer named twice, rows shuffled": lambda m: _table(m, lambda t: _put(t[::-1].copy(), (0, 1), 0)),
    "a dim claiming more than the data": lambda m: _table(m, lambda t: _put(t, (0, 4), 2**40)),
    "dims whose product overflows int64": lambda m: _table(m, lambda t: _put(_put(t, (0, 4), 2**32), (0, 5), 2**32)),
    "dims of a shape too large": lambda m: _table(m, lambda t: _put(_put(t, (0, 4), 3), (0, 5), 5)),
    "the steps in float64": lambda m: m.update({"steps.npy": _npy_bytes(np.array([2.0, 2.0]))}),
    "a step too few": lambda m: m.update({"steps.npy": _npy_bytes(np.array([2], np.int64))}),
    "a param named twice": lambda m: _meta(m, keys=["W", "W"]),
    "a bool param name": lambda m: _meta(m, keys=["W", True]),
    "a float param name": lambda m: _meta(m, keys=["W", 1.5]),
    "keys not a list": lambda m: _meta(m, keys={"W": 0}),
    "a buffer name not str": lambda m: _meta(m, buffers=["m", 1]),
    "a buffer named step": lambda m: _meta(m, buffers=["m", "step"]),
    "buffer names twice": lambda m: _meta(m, buffers=["m", "m"]),
    "an unknown dtype": lambda m: _meta(m, dtypes=["float64x"]),
    "bfloat16 data not uint16": lambda m: (_meta(m, dtypes=["bfloat16"]),
                                           m.update({"data_bfloat16.npy": m.pop(DATA)})),
}


def _array(members, name):
    return np.load(io.BytesIO(members[name]), allow_pickle=False)


def _table(members, change):
    members["table.npy"] = _npy_bytes(change(_array(members, "table.npy")))


def _put(a, at, value):
    a[at] = value
    return a


def _meta(members, **fields):
    meta = json.loads(_array(members, "meta.npy").tobytes())
    members["meta.npy"] = _meta_bytes({**meta, **fields})


def _lying_npy(shape):
    """An .npy member whose header claims ``shape`` but which holds 3 float64s."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buf.getvalue() + np.ones(3).tobytes()


def _members(good):
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        return {n: z.read(n) for n in z.namelist()}


def _drop_member(p, good, name):
    members = _members(good)
    del members[name]
    _zip(p, members)


def _replace_member(p, good, name, data):
    _zip(p, {**_members(good), name: data})


def _good_file(rng, tmp_path):
    opt, _ = _trained(rng)
    opt.save(tmp_path / "good.npz")
    return (tmp_path / "good.npz").read_bytes()


def _refused_whole(path, rng):
    target, params = _trained(rng, lr=0.01)
    before = target.state_dict()
    with pytest.raises(ValueError, match="is not an xopt state file") as info:
        target.load(path, params=params)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="is not an xopt state file"):
        xopt.load_state(path)
    _assert_unchanged(target, before)
    return str(info.value)


@pytest.mark.parametrize("case", FOREIGN)
def test_a_foreign_file_is_refused_as_not_a_state_file(case, rng, tmp_path):
    good = _good_file(rng, tmp_path)
    path = tmp_path / "checkpoint.npz"
    FOREIGN[case](path, good)
    if case == "npy":
        path = tmp_path / "checkpoint.npz.npy"
    _refused_whole(path, rng)


def test_the_good_file_of_these_tests_is_format_2_and_loads(rng, tmp_path):
    members = _members(_good_file(rng, tmp_path))
    assert sorted(members) == ["data_float64.npy", "meta.npy", "steps.npy", "table.npy"]
    assert json.loads(_array(members, "meta.npy").tobytes())["format"] == "xopt-state-2"
    assert _array(members, "table.npy").shape == (4, 6)  # W's m and v (2-d), b's m and v (1-d, padded)
    _zip(tmp_path / "rezipped.npz", members)
    assert xopt.load_state(tmp_path / "rezipped.npz")["iter"] == 2


@pytest.mark.parametrize("case", FOREIGN_V2)
def test_a_format_2_file_with_a_member_wrong_is_refused_as_not_a_state_file(case, rng, tmp_path):
    members = _members(_good_file(rng, tmp_path))
    FOREIGN_V2[case](members)
    path = tmp_path / "checkpoint.npz"
    _zip(path, members)
    _refused_whole(path, rng)


# Format 1 (what xopt wrote before format 2): one .npy member per buffer, the v1 fixture with one changed.
FOREIGN_V1 = {
    "a buffer's array missing": lambda p, good: _drop_member(p, good, "a1.npy"),
    "a buffer as an object array": lambda p, good: _replace_member(p, good, "a1.npy",
                                                                    _npy_bytes(np.array([None], dtype=object))),
    "a buffer not .npy": lambda p, good: _replace_member(p, good, "a1.npy", b"not an array"),
    "a header claiming 8 PB": lambda p, good: _replace_member(p, good, "a1.npy", _lying_npy((10**15,))),
    "a header claiming too little": lambda p, good: _replace_member(p, good, "a1.npy", _lying_npy((2,))),
    "a malformed entry": lambda p, good: _replace_member(p, good, "meta.npy", _meta_bytes(
        {**json.loads(_array(_members(good), "meta.npy").tobytes()), "state": [{"key": "W"}]})),
}


@pytest.mark.parametrize("case", FOREIGN_V1)
def test_a_format_1_file_with_a_member_wrong_is_refused_as_not_a_state_file(case, rng, tmp_path):
    path = tmp_path / "checkpoint.npz"
    FOREIGN_V1[case](path, (GOLDEN / "state-v1-adamw.npz").read_bytes())
    _refused_whole(path, rng)


def _good_bytes(which, rng, tmp_path):
    return _good_file(rng, tmp_path) if which == "format 2" else (GOLDEN / "state-v1-adamw.npz").read_bytes()


@pytest.mark.parametrize("which", ["format 2", "format 1"])
def test_a_truncated_file_is_refused_as_not_a_state_file(which, rng, tmp_path):
    good = _good_bytes(which, rng, tmp_path)
    path = tmp_path / "cut.npz"
    cuts = sorted(set(range(0, len(good), max(1, len(good) // 97))) | {1, 3, 4, 30, len(good) - 22, len(good) - 1})
    for cut in cuts:
        path.write_bytes(good[:cut])
        with pytest.raises(ValueError, match=f"{path} is not an xopt state file"):
            xopt.load_state(path)


@pytest.mark.parametrize("which", ["format 2", "format 1"])
def test_a_corrupted_file_is_refused_as_not_a_state_file(which, rng, tmp_path):
    """A flipped byte: the zip's CRC or headers catch it (or it sits in a field nobody reads), never a low-level error."""
    good = _good_bytes(which, rng, tmp_path)
    path = tmp_path / "bad.npz"
    refused = 0
    for at in range(0, len(good), max(1, len(good) // 97)):
        bad = bytearray(good)
        bad[at] ^= 0x5A
        path.write_bytes(bytes(bad))
        try:
            xopt.load_state(path)
        except ValueError as exc:
            assert f"{path} is not an xopt state file" in str(exc), (at, exc)
            refused += 1
    assert refused > 50


def _claiming(good, member, size):
    """``good`` re-zipped (stored, no zip64), the zip's local and central headers of ``member`` claiming ``size``
    bytes and its .npy header a shape to match: what a crafted file could say to make a reader allocate."""
    data = bytearray(_zip_bytes(_members(good)))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        info = z.getinfo(member)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                  "shape": ((size - 128) // 8,)})
    assert info.compress_type == zipfile.ZIP_STORED and len(header.getvalue()) == 128
    local = info.header_offset
    assert data[local:local + 4] == b"PK\x03\x04"
    name_len, extra_len = struct.unpack("<HH", data[local + 26:local + 30])
    start = local + 30 + name_len + extra_len
    assert data[start:start + 6] == b"\x93NUMPY" and info.file_size >= 128
    data[start:start + 128] = header.getvalue()  # in place of the member's own .npy header, 128 bytes too
    data[local + 18:local + 26] = struct.pack("<II", size, size)
    central = 0
    while True:  # the central directory record of ``member``
        central = bytes(data).index(b"PK\x01\x02", central)
        name_len = struct.unpack("<H", data[central + 28:central + 30])[0]
        if data[central + 46:central + 46 + name_len] == member.encode():
            break
        central += 4
    data[central + 20:central + 28] = struct.pack("<II", size, size)
    return bytes(data)


# A file whose headers claim more than it holds: refused before anything of that size is allocated.
HUGE = {
    "the data's .npy header": lambda m, good: _zip_bytes({**m, DATA: _lying_npy((10**15,))}),
    "the table's dims": lambda m, good: (_table(m, lambda t: _put(t, (0, 4), 2**40)), _zip_bytes(m))[1],
    "the zip headers of the data": lambda m, good: _claiming(good, DATA, 2**32 - 8),
    "the zip headers of the table": lambda m, good: _claiming(good, "table.npy", 2**32 - 8),
    "the zip headers of format 1": lambda m, good: _claiming((GOLDEN / "state-v1-adamw.npz").read_bytes(),
                                                             "a1.npy", 2**32 - 8),
}


def _zip_bytes(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("case", HUGE)
def test_a_header_claiming_a_huge_array_is_refused_without_allocating_it(case, rng, tmp_path):
    good = _good_file(rng, tmp_path)
    path = tmp_path / "huge.npz"
    path.write_bytes(HUGE[case](_members(good), good))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="is not an xopt state file"):
            xopt.load_state(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**24, peak  # NumPy's allocations are traced too: far below the 4 GB to 8 PB claimed


def test_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        xopt.Adam().load(tmp_path / "nothing.npz")


def test_a_newer_format_is_named(tmp_path):
    np.savez(tmp_path / "s.npz", meta=np.frombuffer(b'{"format": "xopt-state-9"}', np.uint8))
    with pytest.raises(ValueError, match="has format 'xopt-state-9'; this xopt reads 'xopt-state-1' and "
                                         "'xopt-state-2'"):
        xopt.Adam().load(tmp_path / "s.npz")


# -- format 2: every state round-trips bit for bit ----------------------------------------------------------------
def _same_state_dict(a, b, ordered=True):
    """Two state_dicts alike: param names in order, buffer names (in order unless not ``ordered``: an
    optimizer's loaded state has them sorted), steps (as int), every buffer's dtype, shape and bytes."""
    assert b["optimizer"] == a["optimizer"]
    assert b["hyperparameters"] == a["hyperparameters"] and b["overrides"] == a["overrides"]
    assert (b["iter"], b["skipped_steps"]) == (a["iter"], a["skipped_steps"])
    assert list(b["state"]) == list(a["state"])
    for k, st in a["state"].items():
        assert (list if ordered else sorted)(b["state"][k]) == (list if ordered else sorted)(st), k
        assert type(b["state"][k]["step"]) is int and b["state"][k]["step"] == st["step"], k
        for n, v in st.items():
            if n != "step":
                w = b["state"][k][n]
                assert isinstance(w, np.ndarray) and w.dtype == v.dtype and w.shape == v.shape, (k, n)
                assert w.tobytes() == np.asarray(v).tobytes(), (k, n)


def _own_buffers(sd):
    """Each loaded buffer: C-contiguous, native, writeable, and sharing no byte with any other."""
    bufs = [b for st in sd["state"].values() for n, b in st.items() if n != "step"]
    assert all(b.flags.c_contiguous and b.flags.writeable and b.dtype.isnative for b in bufs)
    spans = sorted((b.__array_interface__["data"][0], b.nbytes) for b in bufs if b.nbytes)
    assert all(lo + size <= next_lo for (lo, size), (next_lo, _) in zip(spans, spans[1:]))


ROUND_TRIPS = {
    "float64 dict, Adam amsgrad": (lambda: xopt.Adam(amsgrad=True), np.float64, "dict"),
    "float32 list, AdamW": (lambda: xopt.AdamW(weight_decay=0.1), np.float32, "list"),
    "float16 params (float32 state), RMSprop": (lambda: xopt.RMSprop(centered=True, momentum=0.5), np.float16, "dict"),
    "bfloat16 state, list": (lambda: xopt.Adam(state_dtype="bfloat16", amsgrad=True), np.float32, "list"),
    "mixed float32 and float64, dict": (lambda: xopt.Adam(), "mixed", "dict"),
    "overrides and schedules": (lambda: xopt.AdamW(
        lr=xopt.schedules.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=2, decay_steps=10),
        overrides={"b*": {"weight_decay": 0.0, "lr": xopt.schedules.exponential_decay(1e-3, 3, 0.5)},
                   "W": {"beta1": 0.8}}), np.float64, "dict"),
    "list with override by index": (lambda: xopt.SGD(lr=0.1, momentum=0.9, overrides={1: {"lr": 0.5}}),
                                    np.float32, "list"),
}
SHAPES = [(3, 4), (5,), (), (0,), (2, 3, 2), (1,), (7,)]


def _round_trip_params(dtype, kind, rng):
    dtypes = [np.float32 if i % 2 else np.float64 for i in range(len(SHAPES))] if dtype == "mixed" else \
        [dtype] * len(SHAPES)
    arrays = [rng.standard_normal(s).astype(d) for s, d in zip(SHAPES, dtypes)]
    if kind == "list":
        return arrays
    return {name: a for name, a in zip(["W", "b", "scale", "empty", "conv", "b2", "bias"], arrays)}


@pytest.mark.parametrize("case", ROUND_TRIPS)
def test_a_format_2_file_gives_the_state_back_bit_for_bit(case, rng, tmp_path):
    new, dtype, kind = ROUND_TRIPS[case]
    if "bfloat16" in case:
        pytest.importorskip("ml_dtypes")
    params = _round_trip_params(dtype, kind, rng)
    keys = list(params) if kind == "dict" else list(range(len(params)))
    opt = new()
    for step in range(3):
        grads = [None if step < 2 and i == 1 else rng.standard_normal(np.shape(params[k])).astype(params[k].dtype)
                 for i, k in enumerate(keys)]  # the second param's state starts at the third step
        opt.update(params, dict(zip(keys, grads)) if kind == "dict" else grads)
    opt.save(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz", allow_pickle=False) as f:
        assert json.loads(f["meta"].tobytes())["format"] == "xopt-state-2"
        assert len(f.files) <= 5  # meta, steps, table and one array per dtype: not one per buffer
    loaded = xopt.load_state(tmp_path / "s.npz")
    _same_state_dict(opt.state_dict(), loaded)
    _own_buffers(loaded)
    for with_params in (None, params):
        back = type(opt)()
        back.load(tmp_path / "s.npz", params=with_params)
        _same_state_dict(opt.state_dict(), back.state_dict(), ordered=False)
        assert repr(back) == repr(opt)
    twin = {k: v.copy() for k, v in params.items()} if kind == "dict" else [p.copy() for p in params]
    grads = [rng.standard_normal(np.shape(params[k])).astype(params[k].dtype) for k in keys]
    opt.update(params, dict(zip(keys, grads)) if kind == "dict" else grads)
    back.update(twin, dict(zip(keys, [g.copy() for g in grads])) if kind == "dict" else [g.copy() for g in grads])
    for k in keys:
        assert twin[k].tobytes() == params[k].tobytes(), k


def test_a_state_dict_of_any_buffers_round_trips(tmp_path):
    """save_state saves what it is given (load_state_dict checks it): a param with no buffer yet, int keys
    beyond the list, byte-swapped and Fortran-ordered buffers, a step of 2**63 - 1."""
    sd = xopt.Adam().state_dict()
    w = np.arange(6, dtype=">f8").reshape(2, 3)
    sd["state"] = {"early": {"step": 0}, 7: {"step": 2**63 - 1, "m": w, "v": np.asfortranarray(w.astype("<f8"))},
                   "i": {"step": 1, "m": np.arange(3, dtype=np.int16)}}
    xopt.save_state(sd, tmp_path / "s.npz")
    back = xopt.load_state(tmp_path / "s.npz")
    assert list(back["state"]) == ["early", 7, "i"] and back["state"]["early"] == {"step": 0}
    assert back["state"][7]["step"] == 2**63 - 1
    for name in ("m", "v"):
        assert back["state"][7][name].dtype == np.float64 and back["state"][7][name].dtype.isnative
        np.testing.assert_array_equal(back["state"][7][name], w)
    assert back["state"]["i"]["m"].dtype == np.int16
    _own_buffers(back)


@pytest.mark.parametrize("change, error", [
    (lambda st: st.update(step=2**63), (ValueError, "step of param 'W' cannot be saved")),
    (lambda st: st.update({1: np.ones(3)}), (TypeError, "state 1 of param 'W' cannot be saved: buffer names")),
    (lambda st: st.update(m=np.array(["a"])), (TypeError, "state 'm' of param 'W' has dtype <U1, which a state")),
])
def test_what_a_state_file_cannot_hold_is_refused_at_save(change, error, rng, tmp_path):
    opt, _ = _trained(rng)
    opt.save(tmp_path / "s.npz")
    old = (tmp_path / "s.npz").read_bytes()
    sd = opt.state_dict()
    change(sd["state"]["W"])
    with pytest.raises(error[0], match=error[1]):
        xopt.save_state(sd, tmp_path / "s.npz")
    assert (tmp_path / "s.npz").read_bytes() == old and os.listdir(tmp_path) == ["s.npz"]


def test_param_names_a_state_file_cannot_hold_are_refused_at_save(tmp_path):
    sd = xopt.Adam().state_dict()
    for key in (True, 1.5, ("a", 1.5), ("a", True), None):  # str, int, NumPy ints and tuples of them are saved
        sd["state"] = {key: {"step": 0}}
        with pytest.raises(TypeError, match="cannot be saved: names must be str"):
            xopt.save_state(sd, tmp_path / "s.npz")


# -- format 1: files written before format 2 still load ---------------------------------------------------------
# tests/golden/state-v1-*.npz were written by xopt's save at e4e676a (format 1), from
#   rng = np.random.default_rng(20261125)
#   adamw: params {"W": (3, 4), "b": (5,), "s": ()} float64; AdamW(lr=warmup_cosine_decay_schedule(0.0, 1e-2,
#          warmup_steps=2, decay_steps=10), amsgrad=True, weight_decay=0.01, overrides={"b": {"weight_decay": 0.0}});
#          two updates, amsgrad=False, one update;
#   bfloat16: list params of float32 (2, 3), (7,), (4,); Adam(state_dtype="bfloat16"); three updates, the last
#          param's grad None (it has no state);
# each with the params after those updates in state-v1-<name>-params.npz.
V1_FILES = {"adamw": (xopt.AdamW, "dict"), "bfloat16": (xopt.Adam, "list")}


def _v1_params(name, kind):
    with np.load(GOLDEN / f"state-v1-{name}-params.npz") as f:
        return {k: f[k] for k in f.files} if kind == "dict" else [f[f"arr_{i}"] for i in range(len(f.files))]


@pytest.mark.parametrize("name", V1_FILES)
def test_a_format_1_file_still_loads(name, tmp_path):
    pytest.importorskip("ml_dtypes")
    cls, kind = V1_FILES[name]
    path = GOLDEN / f"state-v1-{name}.npz"
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(f["meta"].tobytes())
        members = {k: f[k] for k in f.files}
    assert meta["format"] == "xopt-state-1"
    loaded = xopt.load_state(path)
    assert [e["key"] for e in meta["state"]] == list(loaded["state"])
    for entry in meta["state"]:  # every buffer is the bits its member holds
        st = loaded["state"][entry["key"]]
        assert st["step"] == entry["step"] and set(st) == {"step", *entry["buffers"]}
        for buf, ref in entry["buffers"].items():
            assert st[buf].tobytes() == members[ref].tobytes() and st[buf].shape == members[ref].shape
            assert st[buf].dtype.name == ("bfloat16" if entry["bits_of"].get(buf) else members[ref].dtype.name)
    params = _v1_params(name, kind)
    for with_params in (None, params):
        opt = cls(lr=0.5)
        opt.load(path, params=with_params)
        assert opt.iter == 3
        _same_state_dict(loaded, {**opt.state_dict(), "hyperparameters": loaded["hyperparameters"],
                                  "overrides": loaded["overrides"]}, ordered=False)
    if name == "adamw":
        assert opt.lr == xopt.schedules.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=2, decay_steps=10)
        assert opt.overrides == {"b": {"weight_decay": 0.0}} and not opt.amsgrad and "v_max" in opt.state["W"]
    else:
        assert opt.state_dtype == "bfloat16" and set(opt.state) == {0, 1}
    # Saved again it is format 2, the same state; the step after either is the same.
    opt.save(tmp_path / "v2.npz")
    again = cls()
    again.load(tmp_path / "v2.npz", params=params)
    _same_state_dict(opt.state_dict(), again.state_dict(), ordered=False)
    twin = {k: v.copy() for k, v in params.items()} if kind == "dict" else [p.copy() for p in params]
    grads = {k: np.full(np.shape(v), 0.25, v.dtype) for k, v in params.items()} if kind == "dict" else \
        [np.full(p.shape, 0.25, p.dtype) for p in params]
    opt.update(params, grads)
    again.update(twin, grads)
    for k in (params if kind == "dict" else range(len(params))):
        assert twin[k].tobytes() == params[k].tobytes()


@pytest.mark.parametrize("config", ["Adam-amsgrad-wd", "RMSprop-all", "SGD-nesterov-wd", "bfloat16"])
def test_a_format_1_file_of_the_kept_writer_loads_as_format_2_does(config, rng, tmp_path):
    from xopt.state_io import _save_v1

    if config == "bfloat16":
        pytest.importorskip("ml_dtypes")
        opt, dtype = xopt.Adam(state_dtype="bfloat16"), np.float32
    else:
        opt, dtype = make(config), np.float64
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    for _ in range(2):
        opt.update(params, [rng.standard_normal(p.shape).astype(dtype) for p in params])
    _save_v1(opt.state_dict(), tmp_path / "v1.npz")
    opt.save(tmp_path / "v2.npz")
    with np.load(tmp_path / "v1.npz") as f:
        assert json.loads(f["meta"].tobytes())["format"] == "xopt-state-1" and len(f.files) > len(SHAPES)
    v1, v2 = xopt.load_state(tmp_path / "v1.npz"), xopt.load_state(tmp_path / "v2.npz")
    _same_state_dict(v2, v1)
    _same_state_dict(opt.state_dict(), v1)


# -- checked_state: the quick lane takes only what the full checks take, and makes the same entry ---------------------
def _checks(opt, sd, params):
    from xopt.state_check import _buffer_sets, _EntryChecks, _param_arrays

    trial = xopt.optimizer.fresh(type(opt), impl=opt.impl, **sd["hyperparameters"])
    return _EntryChecks(type(opt).__name__, trial, *_buffer_sets(trial),
                        None if params is None else _param_arrays(params))


@pytest.mark.parametrize("with_params", [False, True], ids=["alone", "with params"])
@pytest.mark.parametrize("case", [*MISFITS, "fits"])
def test_the_quick_lane_of_the_checks_takes_only_what_the_full_checks_take(case, with_params, rng):
    source, params = _trained(rng)
    sd = source.state_dict() if case == "fits" else _misfit(source.state_dict(), case)
    checks = _checks(source, source.state_dict(), params if with_params else None)
    for key, st in sd["state"].items():
        quick = checks.quick(key, st)
        try:
            slow = checks.slow(key, st)
        except (TypeError, ValueError, KeyError):
            assert quick is None, (case, key)
            continue
        if quick is not None:
            assert list(quick) == list(slow) and quick["step"] == slow["step"]
            for n in slow:
                if n != "step":
                    assert quick[n].dtype == slow[n].dtype and quick[n].tobytes() == slow[n].tobytes()
                    assert quick[n].flags.c_contiguous and not np.shares_memory(quick[n], st[n])
        else:
            assert case != "fits", key


@pytest.mark.parametrize("odd", ["big-endian", "Fortran order", "a memmap", "a read-only view", "a torch tensor",
                                 "a float16 param", "a subclass that keeps state by name"])
def test_the_checks_of_odd_buffers_and_params_give_what_they_gave(odd, rng, tmp_path):
    """Buffers and params the quick lane leaves to the full checks: loaded as before, or refused as before."""
    opt, params = _trained(rng)
    sd = opt.state_dict()
    m = sd["state"]["W"]["m"]
    cls = xopt.Adam
    if odd == "big-endian":
        sd["state"]["W"]["m"] = m.astype(">f8")
    elif odd == "Fortran order":
        sd["state"]["W"]["m"] = np.asfortranarray(m)
    elif odd == "a memmap":
        mm = np.lib.format.open_memmap(tmp_path / "m.npy", mode="w+", dtype=m.dtype, shape=m.shape)
        mm[...] = m
        sd["state"]["W"]["m"] = mm
    elif odd == "a read-only view":
        view = m.view()
        view.flags.writeable = False
        sd["state"]["W"]["m"] = view
    elif odd == "a torch tensor":
        torch = pytest.importorskip("torch")
        sd["state"]["W"]["m"] = torch.asarray(m.copy())
    elif odd == "a float16 param":
        params = {**params, "b": params["b"].astype(np.float16)}  # keeps float64 state: refused with params
        with pytest.raises(TypeError, match="state 'm' of param 'b' is float64 but .* in float32"):
            xopt.Adam().load_state_dict(sd, params=params)
        return
    else:
        class Keyed(xopt.Adam):
            def buffer_dtype(self, e):  # W's state in float32, the others' as Adam keeps them
                return np.dtype(np.float32) if e.key == "W" else super().buffer_dtype(e)

        cls = Keyed
        with pytest.raises(TypeError, match="state 'm' of param 'W' is float64 but .* in float32"):
            cls().load_state_dict(sd, params=params)
        sd["state"]["W"] = {n: (v if n == "step" else v.astype(np.float32)) for n, v in sd["state"]["W"].items()}
    back = cls()
    back.load_state_dict(sd, params=params)
    for k, st in sd["state"].items():
        for n, v in st.items():
            if n != "step":
                got = back.state[k][n]
                assert type(got) is (np.ndarray if isinstance(v, np.ndarray) else type(v))
                assert _native_bytes(got) == _native_bytes(v)
                if isinstance(got, np.ndarray):
                    assert got.flags.c_contiguous and got.flags.writeable and got.dtype.isnative
                    assert not np.shares_memory(got, np.asarray(v))


def _native_bytes(a):
    a = _backend.to_numpy(a)
    return a.astype(a.dtype.newbyteorder("="), order="C").tobytes()


@pytest.mark.parametrize("make_array", [lambda: np.ones(3), lambda: np.ones((2, 2), ">f4"),
                                        lambda: np.zeros(2, [("a", "f4")]), lambda: np.ones(3).view(np.matrix)])
def test_the_namespace_of_a_numpy_array_is_array_namespaces(make_array):
    """namespace() answers a plain NumPy array from a cache (state_dict asks it once per buffer): the answer
    array_api_compat gives, and any other array (a structured dtype, a subclass) is asked of it every time."""
    import array_api_compat

    a = make_array()
    assert _backend.namespace(a) is array_api_compat.array_namespace(a)
    assert _backend.namespace(a, np.ones(1)) is array_api_compat.array_namespace(a, np.ones(1))


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_a_zero_tensor_state_buffer_is_stepped_as_a_copy_whole(impl, rng):
    """A torch ZeroTensor (no memory of its own, immutable) as a state buffer of the second param: the step writes
    a copy of it, as of any read-only buffer, and takes the whole step; it used to write the first param, then
    raise on the second, its count and ``iter`` left behind."""
    torch = pytest.importorskip("torch")
    params = {k: torch.tensor(rng.standard_normal(5)) for k in "ab"}
    twin = {k: v.clone() for k, v in params.items()}
    ours, ref = xopt.Adam(impl=impl), xopt.Adam(impl=impl)
    g = {k: torch.tensor(rng.standard_normal(5)) for k in "ab"}
    ours.update(params, g)
    ref.update(twin, g)
    ours.state["b"]["m"] = torch._efficientzerotensor(5, dtype=torch.float64)
    ref.state["b"]["m"] = torch.zeros(5, dtype=torch.float64)
    g = {k: torch.tensor(rng.standard_normal(5)) for k in "ab"}
    ours.update(params, g)
    ref.update(twin, g)
    assert ours.iter == ref.iter == 2 and ours.state["b"]["step"] == 2
    assert not ours.state["b"]["m"]._is_zerotensor()
    for k in params:
        torch.testing.assert_close(params[k], twin[k], rtol=0, atol=0)
        torch.testing.assert_close(ours.state[k]["m"], ref.state[k]["m"], rtol=0, atol=0)
