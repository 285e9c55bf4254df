"""Bad input is refused with an error naming the culprit, and a refused call changes nothing."""

import numpy as np
import pytest

import xopt

ALL = ["SGD", "Momentum", "Nesterov", "AdaGrad", "RMSprop", "Adam", "AdamW"]


def _setup(rng, name="Adam"):
    opt = getattr(xopt, name)()
    params = {"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    for _ in range(2):
        opt.update(params, {k: rng.standard_normal(v.shape) for k, v in params.items()})
    return opt, params


def _snapshot(opt, params):
    sd = opt.state_dict()
    return ({k: np.array(v, copy=True) for k, v in params.items()}, sd["iter"],
            {k: {n: (b if n == "step" else np.array(b)) for n, b in st.items()} for k, st in sd["state"].items()})


def _assert_unchanged(opt, params, before):
    after = _snapshot(opt, params)
    for k in before[0]:
        np.testing.assert_array_equal(after[0][k], before[0][k], err_msg=f"param {k} changed")
    assert after[1] == before[1], "iter changed"
    for k, st in before[2].items():
        for n, b in st.items():
            np.testing.assert_array_equal(after[2][k][n], b, err_msg=f"state {n} of {k} changed")


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


# Each case builds (params, grads) from good ones; the culprit is always "b", the *last* param, so a
# library that wrote "W" before checking "b" fails the no-change check.
BAD_CALLS = {
    "grad missing": (lambda p, g: (p, {"W": g["W"]}), KeyError, "'b'"),
    "grad with no param": (lambda p, g: (p, {**g, "c": g["b"]}), KeyError, "'c'"),
    "grad shape": (lambda p, g: (p, {**g, "b": g["b"][:4]}), ValueError, "'b'"),
    "grad broadcastable": (lambda p, g: (p, {**g, "b": g["b"][None, :]}), ValueError, "'b'"),
    "grad int dtype": (lambda p, g: (p, {**g, "b": np.ones(5, dtype=np.int64)}), TypeError, "'b'"),
    "grad complex": (lambda p, g: (p, {**g, "b": g["b"] + 0j}), TypeError, "'b'"),
    "grad not an array": (lambda p, g: (p, {**g, "b": list(g["b"])}), TypeError, "'b'"),
    "param int dtype": (lambda p, g: ({**p, "b": np.ones(5, dtype=np.int32)}, g), TypeError, "'b'"),
    "param read-only": (lambda p, g: ({**p, "b": _readonly(p["b"])}, g), ValueError, "'b'"),
    "param shape changed since its state": (lambda p, g: ({**p, "b": np.ones(6)}, {**g, "b": np.ones(6)}),
                                            ValueError, "'b'"),
    "param dtype changed since its state": (lambda p, g: ({**p, "b": p["b"].astype(np.float32)},
                                                          {**g, "b": g["b"].astype(np.float32)}), TypeError, "'b'"),
    "the same array twice": (lambda p, g: ({**p, "b": p["W"]}, {**g, "b": g["W"]}), ValueError, "'W' and 'b'"),
    "grads not a mapping": (lambda p, g: (p, list(g.values())), TypeError, "grads"),
    "params not a container": (lambda p, g: (p["W"], g), TypeError, "params"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_bad_call_is_refused_and_changes_nothing(case, name, rng):
    if name == "SGD" and "since its state" in case:
        pytest.skip("plain SGD keeps no buffers, so a param may change shape or dtype freely")
    opt, params = _setup(rng, name)
    make, exc, culprit = BAD_CALLS[case]
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    bad_params, bad_grads = make(params, grads)
    before = _snapshot(opt, params)
    with pytest.raises(exc, match=culprit):
        opt.update(bad_params, bad_grads)
    _assert_unchanged(opt, params, before)


def test_param_and_grad_from_different_libraries(rng):
    torch = pytest.importorskip("torch")
    opt, params = _setup(rng)
    before = _snapshot(opt, params)
    grads = {"W": rng.standard_normal((3, 4)), "b": torch.ones(5, dtype=torch.float64)}
    with pytest.raises(TypeError, match=r"'b' is a numpy array but its grad is a torch array"):
        opt.update(params, grads)
    _assert_unchanged(opt, params, before)


def test_list_params_are_named_by_index(rng):
    opt = xopt.SGD()
    params = [rng.standard_normal(3), rng.standard_normal(2)]
    with pytest.raises(ValueError, match=r"\[1\]"):
        opt.update(params, [rng.standard_normal(3), rng.standard_normal(3)])
    with pytest.raises(ValueError, match="2 arrays but grads has 1"):
        opt.update(params, [rng.standard_normal(3)])


def test_grads_are_never_written(rng):
    opt = xopt.Adam(weight_decay=0.1)
    params = {"W": rng.standard_normal((3, 4))}
    grads = {"W": _readonly(rng.standard_normal((3, 4)))}
    kept = grads["W"].copy()
    opt.update(params, grads)
    np.testing.assert_array_equal(grads["W"], kept)


INVALID_HYPERPARAMETERS = [
    ("SGD", {"lr": -0.1}, ValueError, "lr"),
    ("SGD", {"lr": float("nan")}, ValueError, "lr"),
    ("SGD", {"lr": float("inf")}, ValueError, "lr"),
    ("SGD", {"lr": "0.1"}, TypeError, "lr"),
    ("SGD", {"momentum": -0.5}, ValueError, "momentum"),
    ("SGD", {"dampening": 1.5}, ValueError, "dampening"),
    ("SGD", {"weight_decay": -1e-4}, ValueError, "weight_decay"),
    ("SGD", {"nesterov": True}, ValueError, "nesterov"),
    ("SGD", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, ValueError, "dampening"),
    ("SGD", {"nesterov": 1}, TypeError, "nesterov"),
    ("Momentum", {"momentum": -0.9}, ValueError, "momentum"),
    ("Nesterov", {"lr": -1.0}, ValueError, "lr"),
    ("AdaGrad", {"eps": -1e-7}, ValueError, "eps"),
    ("AdaGrad", {"lr_decay": -0.1}, ValueError, "lr_decay"),
    ("AdaGrad", {"initial_accumulator_value": -1.0}, ValueError, "initial_accumulator_value"),
    ("RMSprop", {"decay_rate": 1.0}, ValueError, "decay_rate"),
    ("RMSprop", {"decay_rate": -0.1}, ValueError, "decay_rate"),
    ("RMSprop", {"centered": "yes"}, TypeError, "centered"),
    ("Adam", {"beta1": 1.0}, ValueError, "beta1"),
    ("Adam", {"beta2": -0.001}, ValueError, "beta2"),
    ("Adam", {"beta2": float("nan")}, ValueError, "beta2"),
    ("Adam", {"eps": -1e-8}, ValueError, "eps"),
    ("AdamW", {"weight_decay": -0.01}, ValueError, "weight_decay"),
    ("AdamW", {"amsgrad": None}, TypeError, "amsgrad"),
    ("Adam", {"impl": "fast"}, ValueError, "impl"),
    ("Adam", {"skip_nonfinite": 1}, TypeError, "skip_nonfinite"),
]


@pytest.mark.parametrize("name, kwargs, exc, culprit", INVALID_HYPERPARAMETERS)
def test_invalid_hyperparameter_raises_in_constructor(name, kwargs, exc, culprit):
    with pytest.raises(exc, match=culprit):
        getattr(xopt, name)(**kwargs)


def test_unknown_keyword_is_refused():
    with pytest.raises(TypeError, match="betas"):
        xopt.Adam(betas=(0.9, 0.999))


@pytest.mark.parametrize("name", ALL)
def test_schedule_sets_are_validated_and_a_bad_one_changes_nothing(name, rng):
    opt, params = _setup(rng, name)
    opt.lr = 0.5 * opt.lr
    assert opt.lr == 0.5 * getattr(xopt, name)().lr
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -1.0
    assert opt.lr == 0.5 * getattr(xopt, name)().lr


def test_a_set_that_breaks_a_combination_is_undone():
    opt = xopt.SGD(momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        opt.momentum = 0.0
    assert opt.momentum == 0.9


def test_a_new_lr_takes_effect_on_the_next_step(rng):
    opt = xopt.SGD(lr=0.1)
    params = {"w": np.ones(2)}
    opt.update(params, {"w": np.ones(2)})
    opt.lr = 0.01
    opt.update(params, {"w": np.ones(2)})
    np.testing.assert_allclose(params["w"], 1 - 0.1 - 0.01)


def test_a_misspelt_hyperparameter_set_on_the_optimizer_raises():
    """``opt.learning_rate = 0.1`` (torch's name) was kept and never read: now it raises, naming the real names,
    and the optimizer is as it was; a user's subclass still sets attributes of its own."""
    opt = xopt.Adam(lr=0.01)
    with pytest.raises(AttributeError, match="'learning_rate'.*lr, beta1"):
        opt.learning_rate = 0.1
    assert opt.lr == 0.01 and "learning_rate" not in vars(opt)
    opt.lr, opt.iter = 0.1, 3  # hyperparameters and the counts are set as before
    assert opt.lr == 0.1 and opt.iter == 3

    class Mine(xopt.Adam):
        pass

    mine = Mine()
    mine.note = "kept"
    assert mine.note == "kept"
