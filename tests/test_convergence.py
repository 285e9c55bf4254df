"""Every optimizer minimises a parabola and makes progress on Rosenbrock (optax's table-driven check)."""

import numpy as np
import pytest

import xopt

# optimizer, its arguments, steps: tuned once by hand, the same for both problems.
OPTIMIZERS_UNDER_TEST = [
    ("SGD", dict(lr=0.1), 300),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True), 300),
    ("Momentum", dict(lr=0.05, momentum=0.9), 300),
    ("Nesterov", dict(lr=0.05, momentum=0.9), 300),
    ("AdaGrad", dict(lr=1.0), 300),
    ("RMSprop", dict(lr=0.05), 300),
    ("RMSprop", dict(lr=0.02, momentum=0.5, centered=True), 300),
    ("Adam", dict(lr=0.1), 300),
    ("Adam", dict(lr=0.1, amsgrad=True, eps_hat=False), 300),
    ("AdamW", dict(lr=0.1, weight_decay=1e-4), 300),
    ("AdaDelta", dict(lr=4.0, rho=0.99), 600),
    ("Adamax", dict(lr=0.3), 300),
    ("NAdam", dict(lr=0.1), 300),
    ("NAdam", dict(lr=0.1, weight_decay=1e-4, decoupled_weight_decay=True), 300),
    ("RAdam", dict(lr=0.05), 500),  # its first 5 steps are SGD with momentum: a larger lr leaves Rosenbrock
    ("Lion", dict(lr=0.1), 300),
    ("Lion", dict(lr=0.03, weight_decay=0.01), 300),
]


def _ids():
    return [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw, _ in OPTIMIZERS_UNDER_TEST]


@pytest.mark.parametrize("name, kwargs, steps", OPTIMIZERS_UNDER_TEST, ids=_ids())
def test_parabola(name, kwargs, steps, backend):
    scale = backend.asarray(np.array([1.0, 4.0]))
    params = {"x": backend.asarray(np.array([3.0, -2.0]))}
    opt = getattr(xopt, name)(**kwargs)
    for _ in range(steps):
        opt.update(params, {"x": 2.0 * scale * params["x"]})  # grad of sum(scale * x**2)
    x = backend.to_numpy(params["x"])
    assert np.linalg.norm(x) < 0.05, f"{name}{kwargs} ended at {x}"


@pytest.mark.parametrize("name, kwargs, steps", OPTIMIZERS_UNDER_TEST, ids=_ids())
def test_rosenbrock_progress(name, kwargs, steps):
    def f(x, y):
        return (1 - x) ** 2 + 100 * (y - x**2) ** 2

    params = {"x": np.array(-1.2), "y": np.array(1.0)}
    start = f(params["x"], params["y"])
    opt = getattr(xopt, name)(**{**kwargs, "lr": kwargs["lr"] * 0.01 if name in ("SGD", "Momentum", "Nesterov")
                                 else kwargs["lr"] * 0.1})
    for _ in range(10 * steps):
        x, y = params["x"], params["y"]
        opt.update(params, {"x": -2 * (1 - x) - 400 * x * (y - x**2), "y": 200 * (y - x**2)})
    end = f(params["x"], params["y"])
    assert np.isfinite(end) and end < 0.1 * start, f"{name}{kwargs}: f went {start:.3g} -> {end:.3g}"
