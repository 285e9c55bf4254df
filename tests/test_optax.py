"""xopt.optax: xopt's rules as optax transformations, under jax.jit, against optax itself in float64."""

from __future__ import annotations

import pytest

STEPS = 100
RTOL, ATOL = 1e-11, 1e-13


@pytest.fixture
def jax():
    """jax with float64 for this test only: the flag goes back to what it was, whatever the test does."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield jax
    finally:
        jax.config.update("jax_enable_x64", before)


def _problem(jax):
    """Params (a pytree), and the grad of a least-squares loss over fixed data: fresh draws, never zeros."""
    jnp = jax.numpy
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w": jax.random.normal(k[0], (5, 3), jnp.float64), "b": jax.random.normal(k[1], (3,), jnp.float64)}
    x, y = jax.random.normal(k[2], (32, 5), jnp.float64), jax.random.normal(k[3], (32, 3), jnp.float64)

    def loss(p):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    return params, jax.grad(loss)


def _run(jax, *txs, steps=STEPS):
    """Each transformation's params and state after ``steps`` jitted updates from the same start (one compiled
    step runs them all: compiling costs more than the steps)."""
    import optax

    params, grad = _problem(jax)
    runs = [(params, tx.init(params)) for tx in txs]

    @jax.jit
    def step(runs):
        out = []
        for tx, (params, state) in zip(txs, runs):
            updates, state = tx.update(grad(params), state, params)
            out.append((optax.apply_updates(params, updates), state))
        return out

    for _ in range(steps):
        runs = step(runs)
    return runs


def _cases():
    import optax

    import xopt.optax as xo

    schedule = optax.cosine_decay_schedule(0.05, 100)
    return {
        "adam": (xo.adam(1e-2), optax.adam(1e-2)),
        "adam-betas-schedule": (xo.adam(schedule, b1=0.8, b2=0.99, eps=1e-6),
                                optax.adam(schedule, b1=0.8, b2=0.99, eps=1e-6)),
        "adamw": (xo.adamw(1e-2, weight_decay=0.1), optax.adamw(1e-2, weight_decay=0.1)),
        "sgd": (xo.sgd(0.05), optax.sgd(0.05)),
        "sgd-momentum": (xo.sgd(0.05, momentum=0.9), optax.sgd(0.05, momentum=0.9)),
        "sgd-nesterov-schedule": (xo.sgd(schedule, momentum=0.9, nesterov=True),
                                  optax.sgd(schedule, momentum=0.9, nesterov=True)),
        "rmsprop": (xo.rmsprop(1e-3), optax.rmsprop(1e-3, eps_in_sqrt=False)),  # 1e-2 oscillates: chaotic
        "rmsprop-centered-momentum": (xo.rmsprop(1e-3, centered=True, momentum=0.5),
                                      optax.rmsprop(1e-3, centered=True, momentum=0.5, eps_in_sqrt=False)),
        "adagrad-eps0": (xo.adagrad(0.1, eps=0.0), optax.adagrad(0.1, eps=0.0)),
        "adadelta": (xo.adadelta(1.0, weight_decay=0.01), optax.adadelta(1.0, weight_decay=0.01)),
        "adamax": (xo.adamax(1e-2), optax.adamax(1e-2)),
        "lion": (xo.lion(1e-3, weight_decay=0.1), optax.lion(1e-3, weight_decay=0.1)),
    }


CASES = ["adam", "adam-betas-schedule", "adamw", "sgd", "sgd-momentum", "sgd-nesterov-schedule", "rmsprop",
         "rmsprop-centered-momentum", "adagrad-eps0", "adadelta", "adamax", "lion"]


def _same(jax, a, b):
    import numpy as np

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype == np.float64
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", CASES)
def test_equals_optax_under_jit_in_float64(jax, case):
    (params, state), (want, _) = _run(jax, *_cases()[case])
    _same(jax, params, want)
    assert int(state.count) == STEPS


def test_adam_state_is_optax_moments(jax):
    import xopt.optax

    import optax

    (_, state), (_, theirs) = _run(jax, xopt.optax.adam(1e-2), optax.adam(1e-2), steps=20)
    _same(jax, state.buffers["m"], theirs[0].mu)
    _same(jax, state.buffers["v"], theirs[0].nu)


def test_inside_a_chain_with_clipping(jax):
    import optax

    import xopt.optax

    ours = optax.chain(optax.clip_by_global_norm(1.0), xopt.optax.adamw(1e-2, weight_decay=0.05))
    theirs = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.05))
    (params, _), (want, _) = _run(jax, ours, theirs)
    _same(jax, params, want)


def test_float32_without_x64_stays_float32():
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    if jax.config.jax_enable_x64:
        pytest.skip("x64 is on in this process")
    import xopt.optax

    params = {"w": jax.numpy.ones((3, 2))}
    tx = xopt.optax.adam(1e-2)
    updates, state = jax.jit(tx.update)({"w": jax.numpy.full((3, 2), 0.5)}, tx.init(params))
    assert updates["w"].dtype == state.buffers["v"]["w"].dtype == jax.numpy.float32


def test_what_it_refuses(jax):
    import xopt.optax

    with pytest.raises(ValueError, match=r"xopt.optax.adam: eps_root=1e-08 is not supported"):
        xopt.optax.adam(1e-3, eps_root=1e-8)
    with pytest.raises(ValueError, match=r"xopt.optax.rmsprop: eps_in_sqrt=True is not supported"):
        xopt.optax.rmsprop(1e-3, eps_in_sqrt=True)
    with pytest.raises(ValueError, match=r"xopt.optax.adam: beta1 must be in \[0, 1\)"):
        xopt.optax.adam(1e-3, b1=1.5)
    tx = xopt.optax.adamw(1e-3)
    params = {"w": jax.numpy.ones(3)}
    with pytest.raises(ValueError, match="xopt.optax.adamw: its weight decay reads the params"):
        tx.update(params, tx.init(params))


def test_learning_rate_and_hyperparameters_as_jax_scalars(jax):
    import optax

    import xopt.optax

    jnp = jax.numpy
    ours = xopt.optax.adamw(jnp.asarray(1e-2), b1=jnp.asarray(0.8), weight_decay=jnp.asarray(0.1))
    theirs = optax.adamw(jnp.asarray(1e-2), b1=jnp.asarray(0.8), weight_decay=jnp.asarray(0.1))
    (params, _), (want, _) = _run(jax, ours, theirs)
    _same(jax, params, want)

    import numpy as np

    ours = xopt.optax.sgd(np.asarray(0.05), momentum=np.asarray(0.9))
    (params, _), (want, _) = _run(jax, ours, optax.sgd(np.asarray(0.05), momentum=np.asarray(0.9)))
    _same(jax, params, want)


def test_learning_rate_traced_under_jit(jax):
    import optax

    import xopt.optax

    params, grad = _problem(jax)

    @jax.jit
    def step(lr, params, state, state_optax):
        updates, state = xopt.optax.sgd(lr, momentum=0.9).update(grad(params), state, params)
        want, state_optax = optax.sgd(lr, momentum=0.9).update(grad(params), state_optax, params)
        return updates, want, state, state_optax

    state, state_optax = xopt.optax.sgd(0.1, momentum=0.9).init(params), optax.sgd(0.1, momentum=0.9).init(params)
    for lr in (0.1, 0.05, 0.01):
        updates, want, state, state_optax = step(lr, params, state, state_optax)
        _same(jax, updates, want)
        params = optax.apply_updates(params, updates)


def test_inject_hyperparams_learning_rate(jax):
    """optax.inject_hyperparams: the learning rate (a schedule, then a value set in the state) is traced."""
    import optax

    import xopt.optax

    schedule = optax.linear_schedule(0.05, 0.005, 60)
    ours = optax.inject_hyperparams(xopt.optax.adamw, static_args=("b1", "b2", "eps", "eps_root", "weight_decay"))(
        learning_rate=schedule, weight_decay=0.1)
    theirs = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, weight_decay=0.1)
    (params, state), (want, state_optax) = _run(jax, ours, theirs)
    _same(jax, params, want)
    assert float(state.hyperparams["learning_rate"]) == float(state_optax.hyperparams["learning_rate"])

    ours = optax.inject_hyperparams(xopt.optax.sgd, static_args=("momentum",))(learning_rate=0.05, momentum=0.9)
    theirs = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05, momentum=0.9)
    params, grad = _problem(jax)
    runs = [(params, ours.init(params)), (params, theirs.init(params))]
    steps = [jax.jit(tx.update) for tx in (ours, theirs)]
    for i in range(40):
        if i == 20:
            runs = [(p, s._replace(hyperparams={**s.hyperparams, "learning_rate": s.hyperparams["learning_rate"] / 10}))
                    for p, s in runs]
        runs = [(optax.apply_updates(p, u), s) for (p, _), (u, s) in
                zip(runs, [step(grad(p), s, p) for step, (p, s) in zip(steps, runs)])]
    _same(jax, runs[0][0], runs[1][0])


def test_a_traced_hyperparameter_other_than_the_learning_rate_is_refused(jax):
    import optax

    import xopt.optax

    params = {"w": jax.numpy.ones(3)}
    tx = optax.inject_hyperparams(xopt.optax.adam)(learning_rate=1e-2)
    state = tx.init(params)
    with pytest.raises(TypeError, match=r"xopt.optax.adam: b1, b2, eps, eps_root are traced; only learning_rate may "
                                        r"be \(under optax.inject_hyperparams, "
                                        r"static_args=\('b1', 'b2', 'eps', 'eps_root'\)\)"):
        jax.jit(tx.update)(params, state, params)
    tx = optax.inject_hyperparams(xopt.optax.adam, static_args=("b1", "b2", "eps_root"))(learning_rate=1e-2)
    with pytest.raises(TypeError, match=r"xopt.optax.adam: eps is traced.*static_args=\('eps',\)"):
        jax.jit(tx.update)(params, tx.init(params), params)


@pytest.mark.parametrize("dtype", ["complex64", "int32", "bool"])
def test_params_not_real_floating_are_refused(jax, dtype):
    """Complex params would be stepped with g * g for |g|² (optax: |g|²), integer ones truncated: refused."""
    import xopt.optax

    jnp = jax.numpy
    tx = xopt.optax.adam(1e-2)
    bad = {"w": jnp.ones(2), "b": jnp.ones(3, dtype)}
    with pytest.raises(TypeError, match=rf"xopt.optax.adam: \['b'\] is {dtype}: params and updates must be real float"):
        tx.init(bad)
    params = {"w": jnp.ones(2), "b": jnp.ones(3)}
    with pytest.raises(TypeError, match=rf"xopt.optax.adam: \['b'\] is {dtype}"):
        jax.jit(tx.update)(bad, tx.init(params))


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_differentiable_in_the_learning_rate(jax, name):
    """jax.grad of the loss after a few updates with respect to the learning rate, jitted, as optax's."""
    import optax

    import xopt.optax

    params, grad = _problem(jax)
    kwargs = {"sgd": {"momentum": 0.9}, "adamw": {"weight_decay": 0.1}}.get(name, {})

    def meta(module):
        def loss(lr):
            tx = getattr(module, name)(lr, **kwargs)
            p, state = params, tx.init(params)
            for _ in range(5):
                updates, state = tx.update(grad(p), state, p)
                p = optax.apply_updates(p, updates)
            return sum(jax.numpy.sum(leaf ** 2) for leaf in jax.tree.leaves(p))

        return jax.jit(jax.grad(loss))(0.01)

    _same(jax, meta(xopt.optax), meta(optax))


_NAMES = ("adam", "adamw", "sgd", "rmsprop", "adagrad", "adadelta", "adamax", "lion")


@pytest.mark.parametrize("name", _NAMES)
def test_a_schedule_is_called_with_a_jax_count(jax, name):
    """optax calls a schedule with an int32 jax count: one that uses its array methods works here too."""
    import xopt.optax as xo

    jnp = jax.numpy
    schedule = lambda count: 1e-3 * jnp.minimum(1.0, count.astype(jnp.float32) / 10)  # noqa: E731
    tx = getattr(xo, name)(schedule)
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.full(3, 0.5)}, tx.init(params), params)
    assert updates["w"].shape == (3,)


@pytest.mark.parametrize("name, kwargs", [("lion", dict(weight_decay=0.5)), ("rmsprop", {}),
                                          ("sgd", dict(momentum=0.9)), ("adagrad", {}), ("adadelta", {}),
                                          ("adamax", {}), ("adamw", dict(weight_decay=0.1))])
def test_a_weakly_typed_float64_leaf_steps_in_float64(jax, name, kwargs):
    """A Python-number-like leaf (weakly typed float64 under x64) with a float32 schedule's lr steps in float64, as
    the same leaf strongly typed does (and optax does)."""
    import optax

    import xopt.optax as xo

    jnp = jax.numpy
    schedule = optax.linear_schedule(1e-3, 1e-4, 100)
    out = []
    for leaf in (jnp.asarray(0.3), jnp.asarray(0.3, jnp.float64)):  # weak, strong
        tx = getattr(xo, name)(schedule, **kwargs)
        params = {"s": leaf}
        state = tx.init(params)
        for _ in range(3):
            updates, state = tx.update({"s": jnp.asarray(2.7) + 0 * leaf}, state, params)
            params = optax.apply_updates(params, updates)
        out.append(float(params["s"]))
    assert out[0] == out[1]


@pytest.mark.parametrize("name", ["lion", "adamw"])
def test_a_decoupled_decay_update_is_not_rounded_to_the_params_ulp(jax, name):
    """adamw's and lion's update is the step minus lr wd W, not rule(W) - W in W's dtype: a bfloat16 step under half
    an ulp of W is not lost (a transformation after it, optax.apply_every here, sees it), and a float32 update is
    optax's to float32 rounding."""
    import numpy as np
    import optax

    import xopt.optax as xo

    jnp = jax.numpy
    ours = getattr(xo, name)(1e-3) if name == "lion" else xo.adamw(1e-3, weight_decay=0.01)
    theirs = getattr(optax, name)(1e-3) if name == "lion" else optax.adamw(1e-3, weight_decay=0.01)
    p0, g = {"w": jnp.ones(4, jnp.bfloat16)}, {"w": jnp.full(4, 0.5, jnp.bfloat16)}
    tx = optax.chain(ours, optax.apply_every(4))
    p, state = p0, tx.init(p0)
    for _ in range(4):
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
    assert float(p["w"][0]) < 1.0
    p = {"w": jnp.linspace(1, 100, 8, dtype=jnp.float32)}
    g = {"w": jnp.linspace(-1, 1, 8, dtype=jnp.float32)}
    a, _ = ours.update(g, ours.init(p), p)
    b, _ = theirs.update(g, theirs.init(p), p)
    a, b = np.asarray(a["w"], np.float64), np.asarray(b["w"], np.float64)
    np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "lion", "adadelta"])
def test_integer_params_given_to_a_decaying_update_are_refused(jax, name):
    """A rule with weight decay reads the params at update: integer ones (whose update apply_updates would
    truncate) are refused there as at init."""
    import xopt.optax

    jnp = jax.numpy
    tx = getattr(xopt.optax, name)(1e-2, weight_decay=0.1)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    with pytest.raises(TypeError, match=rf"xopt.optax.{name}: \['w'\] is int32"):
        tx.update({"w": jnp.ones(3)}, state, {"w": jnp.ones(3, jnp.int32)})
