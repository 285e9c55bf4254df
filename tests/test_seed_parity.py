"""With default arguments, xopt gives the seed's numbers; the seed's own loop runs unchanged."""

import numpy as np
import pytest

import xopt
from xopt.bench import seed

SEED_CLASSES = ["SGD", "Momentum", "Nesterov", "AdaGrad", "RMSprop", "Adam"]
SHAPES = {"W1": (4, 3), "b1": (3,), "W2": (3, 2), "b2": (2,)}


def _draw(rng):
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


@pytest.mark.parametrize("name", SEED_CLASSES)
def test_defaults_match_the_seed(name, backend, rng):
    params = _draw(rng)
    ref_params = {k: v.copy() for k, v in params.items()}
    ours = {k: backend.asarray(v) for k, v in params.items()}
    opt, ref = getattr(xopt, name)(), getattr(seed, name)()
    for step in range(8):
        grads = _draw(rng)
        ref.update(ref_params, grads)
        opt.update(ours, {k: backend.asarray(v) for k, v in grads.items()})
        for k in SHAPES:
            np.testing.assert_allclose(backend.to_numpy(ours[k]), ref_params[k], rtol=1e-12, atol=1e-15,
                                       err_msg=f"{name} param {k} after step {step + 1}")
    for attr in ("v", "h", "m"):  # the seed's state attributes, same names, same values
        if hasattr(ref, attr):
            for k in SHAPES:
                np.testing.assert_allclose(backend.to_numpy(getattr(opt, attr)[k]), getattr(ref, attr)[k],
                                           rtol=1e-12, atol=1e-15, err_msg=f"{name}.{attr}[{k}]")


@pytest.mark.parametrize("name, args", [("SGD", (0.1,)), ("Momentum", (0.05, 0.8)), ("AdaGrad", (0.2,)),
                                        ("RMSprop", (0.02, 0.9)), ("Adam", (0.01, 0.8, 0.99))])
def test_seed_positional_arguments(name, args, rng):
    params = _draw(rng)
    ref_params = {k: v.copy() for k, v in params.items()}
    opt, ref = getattr(xopt, name)(*args), getattr(seed, name)(*args)
    for _ in range(5):
        grads = _draw(rng)
        opt.update(params, grads)
        ref.update(ref_params, grads)
    for k in SHAPES:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-12, atol=1e-15)


def test_seed_attributes_before_and_after_the_first_step():
    opt = xopt.Adam()
    assert opt.m is None and opt.v is None and opt.iter == 0  # as the seed's Adam before its first update
    params = {"W": np.ones(3)}
    opt.update(params, {"W": np.full(3, 0.5)})
    assert opt.iter == 1
    np.testing.assert_allclose(opt.m["W"], np.full(3, 0.05))


def test_seed_training_loop_runs_unchanged():
    """The book's loop: a two-layer net as a dict, grads from backprop, ``optimizer.update(params, grads)``."""
    from xopt import AdaGrad, Adam, Momentum, RMSprop, SGD

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4))
    t = (x @ rng.standard_normal((4, 1)) > 0).astype(float)
    for optimizer in (SGD(lr=0.1), Momentum(lr=0.1), AdaGrad(lr=0.1), RMSprop(lr=0.01), Adam(lr=0.01)):
        params = {"W1": 0.1 * rng.standard_normal((4, 8)), "b1": np.zeros(8),
                  "W2": 0.1 * rng.standard_normal((8, 1)), "b2": np.zeros(1)}
        losses = []
        for _ in range(200):
            h = np.tanh(x @ params["W1"] + params["b1"])
            y = 1 / (1 + np.exp(-(h @ params["W2"] + params["b2"])))
            losses.append(float(-np.mean(t * np.log(y + 1e-12) + (1 - t) * np.log(1 - y + 1e-12))))
            dy = (y - t) / len(x)
            dh = (dy @ params["W2"].T) * (1 - h**2)
            grads = {"W1": x.T @ dh, "b1": dh.sum(0), "W2": h.T @ dy, "b2": dy.sum(0)}
            optimizer.update(params, grads)
        assert losses[-1] < 0.8 * losses[0], f"{optimizer!r} did not train: {losses[0]:.3f} -> {losses[-1]:.3f}"
