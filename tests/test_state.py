"""state_dict, files, and resuming: bit-identical to never stopping; a misfit is refused and changes nothing."""

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
    elif case == "amsgrad buffer without amsgrad":
        sd["state"]["b"]["v_max"] = np.ones(5)
    elif case == "negative step":
        sd["state"]["b"]["step"] = -1
    elif case == "not an array":
        sd["state"]["b"]["m"] = [0.0] * 5
    return sd


MISFITS = {
    "other optimizer": (ValueError, "RMSprop"),
    "missing hyperparameter": (ValueError, "beta2"),
    "invalid hyperparameter": (ValueError, "beta1"),
    "buffer shape": (ValueError, "'b'"),
    "missing buffer": (ValueError, "'b'"),
    "amsgrad buffer without amsgrad": (ValueError, "v_max"),
    "negative step": (ValueError, "step"),
    "not an array": (TypeError, "'m'"),
}


@pytest.mark.parametrize("case", MISFITS)
def test_a_misfit_state_is_refused_and_changes_nothing(case, rng):
    source, _ = _trained(rng)
    target, params = _trained(rng, lr=0.01)
    before = target.state_dict()
    exc, culprit = MISFITS[case]
    with pytest.raises(exc, match=culprit):
        target.load_state_dict(_misfit(source.state_dict(), case))
    after = target.state_dict()
    assert after["hyperparameters"] == before["hyperparameters"] and after["iter"] == before["iter"]
    for k, st in before["state"].items():
        for n, v in st.items():
            np.testing.assert_array_equal(after["state"][k][n], v)


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
