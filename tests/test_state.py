"""state_dict, files, and resuming: bit-identical to never stopping; a misfit is refused and changes nothing."""

import io
import os
import pickle
import stat
import zipfile

import numpy as np
import pytest

import xopt
from test_edges import CONFIGS, make


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
        sd["state"]["b"]["v"] = sd["state"]["b"]["v"].astype(np.float32)
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
    "buffers differ in dtype": (TypeError, "param 'b' differ in dtype.*'v' is float32|'v' of param 'b' is float32"),
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
    "float32 state for a float64 param": ({}, np.float64, np.float32, "float64"),
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

    monkeypatch.setattr(np, "savez", broken)
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


FOREIGN = {
    "empty": lambda p, good: p.write_bytes(b""),
    "text": lambda p, good: p.write_text("step,loss\n1,0.5\n"),
    "json": lambda p, good: p.write_text('{"format": "xopt-state-1"}'),
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
    "a buffer's array missing": lambda p, good: _drop_member(p, good, "a1.npy"),
    "a buffer as an object array": lambda p, good: _replace_member(p, good, "a1.npy",
                                                                    _npy_bytes(np.array([None], dtype=object))),
    "a buffer not .npy": lambda p, good: _replace_member(p, good, "a1.npy", b"not an array"),
    "a header claiming 8 PB": lambda p, good: _replace_member(p, good, "a1.npy", _lying_npy((10**15,))),
    "a header claiming too little": lambda p, good: _replace_member(p, good, "a1.npy", _lying_npy((2,))),
}


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


@pytest.mark.parametrize("case", FOREIGN)
def test_a_foreign_file_is_refused_as_not_a_state_file(case, rng, tmp_path):
    good = _good_file(rng, tmp_path)
    path = tmp_path / "checkpoint.npz"
    FOREIGN[case](path, good)
    if case == "npy":
        path = tmp_path / "checkpoint.npz.npy"
    target, params = _trained(rng, lr=0.01)
    before = target.state_dict()
    with pytest.raises(ValueError, match="is not an xopt state file") as info:
        target.load(path, params=params)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="is not an xopt state file"):
        xopt.load_state(path)
    _assert_unchanged(target, before)


def test_a_truncated_file_is_refused_as_not_a_state_file(rng, tmp_path):
    good = _good_file(rng, tmp_path)
    path = tmp_path / "cut.npz"
    cuts = sorted(set(range(0, len(good), max(1, len(good) // 97))) | {1, 3, 4, 30, len(good) - 22, len(good) - 1})
    for cut in cuts:
        path.write_bytes(good[:cut])
        with pytest.raises(ValueError, match=f"{path} is not an xopt state file"):
            xopt.load_state(path)


def test_a_corrupted_file_is_refused_as_not_a_state_file(rng, tmp_path):
    """A flipped byte: the zip's CRC or headers catch it (or it sits in a field nobody reads), never a low-level error."""
    good = _good_file(rng, tmp_path)
    path = tmp_path / "bad.npz"
    refused = 0
    for at in range(0, len(good), max(1, len(good) // 97)):
        bad = bytearray(good)
        bad[at] ^= 0x5A
        path.write_bytes(bytes(bad))
        try:
            xopt.Adam().load(path)
        except ValueError as exc:
            assert f"{path} is not an xopt state file" in str(exc), (at, exc)
            refused += 1
    assert refused > 50


def test_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        xopt.Adam().load(tmp_path / "nothing.npz")


def test_a_newer_format_is_named(tmp_path):
    np.savez(tmp_path / "s.npz", meta=np.frombuffer(b'{"format": "xopt-state-9"}', np.uint8))
    with pytest.raises(ValueError, match="has format 'xopt-state-9'; this xopt reads 'xopt-state-1'"):
        xopt.Adam().load(tmp_path / "s.npz")
