"""AdaDelta, Adamax, NAdam, RAdam, Lion beyond the shared tables; and how an optimizer finds its fused kernel.

The shared tables (``test_edges.CONFIGS``, ``torch_cases.CASES``) already run the new optimizers
through every path, edge and torch.optim comparison.  Here: Lion against a transcription of optax,
RAdam past its switch and NAdam's running product on every fused path, their hyperparameter
checks, and subclasses (a user's ``class MyAdam(xopt.Adam): pass`` keeps the fused path).
"""

import numpy as np
import pytest

import xopt
from xopt import _dispatch
from xopt.engines import fused_cpu, fused_cuda
from xopt.engines.kernels import RULES, kernel_of
from test_cuda_source import cuda_on_cpu  # noqa: F401  (a fixture)

EVERY_OPTIMIZER = ["SGD", "Momentum", "Nesterov", "AdaGrad", "RMSprop", "Adam", "AdamW", "AdaDelta", "Adamax",
                   "NAdam", "RAdam", "Lion", "ScheduleFreeAdamW"]


# -- Lion against optax ----------------------------------------------------------------------
def optax_lion(params, grads_seq, lrs, b1, b2, weight_decay):
    """optax.lion transcribed to NumPy (optax/_src/alias.py ``lion``: chain of ``scale_by_lion``,
    ``add_decayed_weights``, ``scale_by_learning_rate``; then ``apply_updates``); mu starts at zeros."""
    mu = {k: np.zeros_like(p) for k, p in params.items()}
    params = {k: p.copy() for k, p in params.items()}
    for grads, lr in zip(grads_seq, lrs):
        for k, g in grads.items():
            # scale_by_lion.update_fn
            updates = np.sign((1.0 - b1) * g + b1 * mu[k])
            mu[k] = (1 - b2) * g + b2 * mu[k]  # tree_update_moment(updates, mu, b2, order=1)
            # add_decayed_weights: updates + weight_decay * params
            updates = updates + weight_decay * params[k]
            # scale_by_learning_rate: -lr * updates; apply_updates: params + updates
            params[k] = params[k] + (-lr) * updates
    return params, mu


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("kwargs", [dict(lr=1e-4), dict(lr=0.01, beta1=0.5, beta2=0.9, weight_decay=0.1),
                                    dict(lr=0.003, beta1=0.0, beta2=0.0, weight_decay=1.0)], ids=str)
def test_lion_equals_optax(kwargs, impl, dtype, rng):
    params = {"W": rng.standard_normal((4, 6)).astype(dtype), "b": rng.standard_normal(7).astype(dtype)}
    grads_seq = [{k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()} for _ in range(8)]
    grads_seq[3]["b"][2] = 0.0  # with beta1 = 0 the sign of a zero: no step
    lrs = [kwargs["lr"] * f for f in (1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.125)]  # a schedule
    want, want_m = optax_lion(params, grads_seq, lrs, kwargs.get("beta1", 0.9), kwargs.get("beta2", 0.99),
                              kwargs.get("weight_decay", 0.0))
    opt = xopt.Lion(**kwargs, impl=impl)
    ours = {k: v.copy() for k, v in params.items()}
    for g, lr in zip(grads_seq, lrs):
        opt.lr = lr
        opt.update(ours, g)
    for k in params:
        np.testing.assert_array_equal(ours[k], want[k], err_msg=f"param {k}")
        np.testing.assert_array_equal(opt.state[k]["m"], want_m[k], err_msg=f"m of {k}")


def test_lion_moves_every_element_by_lr_without_decay(rng):
    p0 = rng.standard_normal(100)
    p = {"p": p0.copy()}
    xopt.Lion(lr=0.01).update(p, {"p": rng.standard_normal(100)})
    np.testing.assert_allclose(np.abs(p["p"] - p0), 0.01, rtol=1e-12)


# -- RAdam's switch and NAdam's product on every fused path ---------------------------------------
STEPS = 12
LONG_RUNS = {"RAdam": dict(lr=0.01, weight_decay=0.01), "RAdam-decoupled": dict(decoupled_weight_decay=True,
                                                                                weight_decay=0.1),
             "NAdam": dict(lr=0.01, momentum_decay=0.1), "NAdam-decoupled": dict(decoupled_weight_decay=True,
                                                                                 weight_decay=0.1)}


def _long_run(config, impl, dtype, rng_seed):
    rng = np.random.default_rng(rng_seed)
    params = {"a": rng.standard_normal(50).astype(dtype), "b": rng.standard_normal((3, 5)).astype(dtype)}
    opt = getattr(xopt, config.split("-")[0])(**LONG_RUNS[config], impl=impl)
    for _ in range(STEPS):
        opt.update(params, {k: (rng.standard_normal(v.shape) + 0.1).astype(dtype) for k, v in params.items()})
    return opt, params


def test_radam_switches_within_the_long_runs():
    flags = [xopt.RAdam().scalars(t)["rectified"] for t in range(1, STEPS + 1)]
    assert not any(flags[:5]) and all(flags[5:]), flags


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", LONG_RUNS)
def test_long_runs_fused_cpu_equal_the_reference(config, dtype, lane):
    ref, a = _long_run(config, "reference", dtype, 7)
    ours, b = _long_run(config, "fused", dtype, 7)
    assert lane[-1] == (dtype != np.float16)  # float16 goes through copies: the checked path
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6 if dtype != np.float64 else 1e-14, atol=0)
        for name in ref.buffers():
            np.testing.assert_allclose(ours.state[k][name], ref.state[k][name],
                                       rtol=1e-6 if dtype != np.float64 else 1e-14, atol=0)


@pytest.mark.cuda_source
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", LONG_RUNS)
def test_long_runs_cuda_source_equal_the_reference_bit_for_bit(config, dtype, cuda_on_cpu):
    ref, a = _long_run(config, "reference", dtype, 11)
    ours, b = _long_run(config, "fused", dtype, 11)
    assert cuda_on_cpu.launches == STEPS
    for k in a:
        np.testing.assert_array_equal(b[k], a[k])
        for name in ref.buffers():
            np.testing.assert_array_equal(ours.state[k][name], ref.state[k][name])


def test_nadam_mu_product_is_torchs_running_product():
    opt = xopt.NAdam(beta1=0.8, momentum_decay=0.1)
    product = 1.0
    for t in range(1, 200):
        product *= 0.8 * (1.0 - 0.5 * 0.96 ** (t * 0.1))  # torch: mu_product *= mu, step by step
        assert opt.mu_product(t) == product
    assert xopt.NAdam(beta1=0.8, momentum_decay=0.1).mu_product(199) == product  # from scratch: the same bits
    assert opt.mu_product(3) == xopt.NAdam(beta1=0.8, momentum_decay=0.1).mu_product(3)  # going back
    for t in range(4, 200):  # and on again
        assert opt.mu_product(t) == xopt.NAdam(beta1=0.8, momentum_decay=0.1).mu_product(t)
    opt.beta1 = 0.7  # a new beta1 counts from its step on, as in torch's running product (OneCycleLR cycles it)
    assert opt.mu_product(200) == product * 0.7 * (1.0 - 0.5 * 0.96 ** (200 * 0.1))
    assert opt.mu_product(199, taken=True) == product  # a step taken: its product as kept
    want = 1.0
    for t in range(1, 6):
        want *= 0.7 * (1.0 - 0.5 * 0.96 ** (t * 0.1))
    assert xopt.NAdam(beta1=0.7, momentum_decay=0.1).mu_product(5) == want  # nothing kept: from step 1


def test_nadam_step_declined_by_the_lane_equals_the_reference_after_a_beta1_change():
    """Params at different counts after a beta1 change, one of them strided: the lane tries the step, asking
    the products of mu, and declines; the checked path asks them again.  The kept products are as before the
    lane's try, so the default path steps as the reference does."""
    rng = np.random.default_rng(0)
    start = {k: rng.standard_normal(7).astype(np.float32) for k in "abc"}
    ours, ref = xopt.NAdam(weight_decay=0.01), xopt.NAdam(weight_decay=0.01, impl="reference")
    a, b = ({k: v.copy() for k, v in start.items()} for _ in range(2))

    def step(grads):
        ours.update(a, grads)
        ref.update(b, {k: v.copy() for k, v in grads.items()})

    grads = {k: rng.standard_normal(7).astype(np.float32) for k in start}
    step(grads)
    for key in "ab":  # a fresh start for two of them: counts 1 and 2 against 2 and 3
        del ours.state[key], ref.state[key]
    step(grads)
    step(grads)
    ours.beta1 = ref.beta1 = 0.5
    for params in (a, b):  # strided: the lane declines it
        base = np.full(14, 3.5, np.float32)
        base[::2] = params["a"]
        params["a"] = base[::2]
    ours.state["c"]["step"] = ref.state["c"]["step"] = 1
    step({k: rng.standard_normal(7).astype(np.float32) for k in start})
    for key in start:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_nadam_mu_product_matches_torchs_state():
    torch = pytest.importorskip("torch")
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # torch keeps mu_product in the default dtype
    try:
        opt = torch.optim.NAdam([w], momentum_decay=0.05)
        for _ in range(25):
            w.grad = torch.ones(3, dtype=torch.float64)
            opt.step()
    finally:
        torch.set_default_dtype(before)
    assert opt.state[w]["mu_product"].item() == xopt.NAdam(momentum_decay=0.05).mu_product(25)


def test_nadam_underflowed_product_stays_zero_and_a_huge_step_count_is_quick():
    opt = xopt.NAdam(beta1=0.5)
    assert opt.mu_product(2000) == 0.0
    assert opt.mu_product(2**62) == 0.0  # no 2**62 multiplications: 0.0 stays 0.0
    s = opt.scalars(2**40)
    assert np.isfinite(s["g_step"]) and np.isfinite(s["m_step"])


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_nadam_load_state_dict_runs_the_products_as_a_fresh_optimizer_does(impl):
    # the kept products belong to the hyperparameter sets they were made in: after a load that changes the
    # overrides, the optimizer steps on as a fresh one loading the same state_dict does (products from step 1)
    rng = np.random.default_rng(8)
    params = {k: rng.standard_normal(7).astype(np.float32) for k in "ab"}
    grads = [{k: rng.standard_normal(7).astype(np.float32) for k in "ab"} for _ in range(6)]
    opt = xopt.NAdam(weight_decay=0.01, impl=impl, overrides={"a": {"beta1": 0.8}})
    for g in grads[:4]:
        opt.update(params, g)
    saved = {**opt.state_dict(), "overrides": {"*": {"beta1": 0.5}}}
    fresh, params_fresh = xopt.NAdam(weight_decay=0.01, impl=impl), {k: v.copy() for k, v in params.items()}
    opt.load_state_dict(saved)
    fresh.load_state_dict(saved)
    for g in grads[4:]:
        opt.update(params, g)
        fresh.update(params_fresh, g)
    for k in params:
        np.testing.assert_array_equal(params[k], params_fresh[k])


# -- hyperparameters ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs, exc, culprit", [
    ("AdaDelta", dict(rho=1.0), ValueError, "rho"),
    ("AdaDelta", dict(eps=-1e-6), ValueError, "eps"),
    ("AdaDelta", dict(lr="1"), TypeError, "lr"),
    ("Adamax", dict(beta2=1.5), ValueError, "beta2"),
    ("Adamax", dict(weight_decay=float("nan")), ValueError, "weight_decay"),
    ("NAdam", dict(momentum_decay=-0.1), ValueError, "momentum_decay"),
    ("NAdam", dict(decoupled_weight_decay=1), TypeError, "decoupled_weight_decay"),
    ("RAdam", dict(beta1=-0.1), ValueError, "beta1"),
    ("RAdam", dict(decoupled_weight_decay="yes"), TypeError, "decoupled_weight_decay"),
    ("Lion", dict(beta1=1.0), ValueError, "beta1"),
    ("Lion", dict(lr=float("inf")), ValueError, "lr"),
    ("Lion", dict(eps=1e-8), TypeError, "eps"),  # Lion has no eps
])
def test_bad_hyperparameters_raise_in_the_constructor(name, kwargs, exc, culprit):
    with pytest.raises(exc, match=culprit):
        getattr(xopt, name)(**kwargs)


@pytest.mark.parametrize("name", ["AdaDelta", "Adamax", "NAdam", "RAdam", "Lion"])
def test_defaults_are_the_issues(name):
    want = {"AdaDelta": dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0),
            "Adamax": dict(lr=0.002, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0),
            "NAdam": dict(lr=0.002, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, momentum_decay=0.004,
                          decoupled_weight_decay=False),
            "RAdam": dict(lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                          decoupled_weight_decay=False),
            "Lion": dict(lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0, state_dtype=None, block_size=256,
                         min_8bit_size=4096)}[name]
    assert getattr(xopt, name)().hyperparameters() == want


# -- which kernel an optimizer runs ---------------------------------------------------------------
def test_every_optimizer_names_a_kernel_and_every_kernel_is_used():
    names = {kernel_of(getattr(xopt, name)()) for name in [*EVERY_OPTIMIZER, "LAMB", "Adafactor"]}  # the CPU engine's
    assert names == set(RULES)


@pytest.mark.parametrize("name", EVERY_OPTIMIZER)
def test_a_subclass_keeps_the_fused_path(name, rng, lane):
    parent = getattr(xopt, name)
    child = type(f"My{name}", (parent,), {})  # class MyAdam(xopt.Adam): pass
    assert kernel_of(child()) == kernel_of(parent()) is not None
    assert fused_cpu.supports(child()) and fused_cuda.supports(child())
    p0 = rng.standard_normal(300).astype(np.float32)
    grads = [rng.standard_normal(300).astype(np.float32) for _ in range(3)]
    results = []
    for cls in (parent, child):
        opt, params = cls(impl="fused"), {"p": p0.copy()}
        for g in grads:
            opt.update(params, {"p": g})
        assert lane[-1], "the lane (the CPU kernel) took the step"
        results.append(params["p"])
    np.testing.assert_array_equal(results[1], results[0])


def test_a_subclass_with_its_own_rule_runs_it_not_the_kernel(rng):
    class HalfStepSGD(xopt.SGD):
        def rule(self, xp, p, g, state, s):
            return p - 0.5 * s["lr"] * g, {}

    assert kernel_of(HalfStepSGD()) is None
    params = {"p": np.ones(4)}
    HalfStepSGD(lr=0.1).update(params, {"p": np.ones(4)})  # impl="auto": its own rule
    np.testing.assert_array_equal(params["p"], np.full(4, 0.95))
    with pytest.raises(TypeError, match="HalfStepSGD has no fused kernel"):
        HalfStepSGD(impl="fused")  # in the constructor
    opt = HalfStepSGD()
    with pytest.raises(TypeError, match="HalfStepSGD has no fused kernel"):
        opt.impl = "fused"  # set after: refused when set, as in the constructor
    assert opt.impl == "auto"


def test_fused_with_an_optimizer_without_a_kernel_says_so():
    class Sign(xopt.Optimizer):  # a user's own optimizer: no kernel attribute
        def scalars(self, step):
            return {}

        def rule(self, xp, p, g, state, s):
            return p - 0.01 * xp.sign(g), {}

    params = {"p": np.ones(3)}
    with pytest.raises(TypeError, match="Sign has no fused kernel") as info:
        Sign(impl="fused")
    assert "float64" not in str(info.value)  # not "no kernel takes a NumPy float64 array"
    Sign().update(params, {"p": np.ones(3)})
    np.testing.assert_array_equal(params["p"], np.full(3, 0.99))
    assert _dispatch._engines(Sign()) == []


# -- xopt-bench ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["AdaDelta", "Adamax", "NAdam", "RAdam", "Lion"])
def test_xopt_bench_runs_them(name):
    from xopt.bench import cli, roofline, runner

    assert name in runner.OPTIMIZERS and name in cli.FULL["optimizers"]
    case = runner.make_cases([name], ["float32"], [1000], [])[0]
    impls = ["xopt", "xopt-reference", "torch-forloop"]
    times = runner.measure_case(case, impls, np, repeat=1, min_seconds=1e-4, warmup_seconds=0.0)
    want = set(impls) if name != "Lion" else {"xopt", "xopt-reference"}  # torch.optim has no Lion
    if "torch-forloop" in want:
        pytest.importorskip("torch")
    assert set(times) == want and all(t > 0 for t in times.values())
    assert roofline.bytes_per_element(name, "float32") == (20 if name == "Lion" else 28)


def test_fused_bfloat16_state_without_an_engine_for_it_says_why(monkeypatch):
    monkeypatch.setattr(_dispatch, "_fused_cpu", lambda: None)
    monkeypatch.setattr(_dispatch, "_fused_cuda", lambda: fused_cuda)
    xopt.Adam(state_dtype="bfloat16", impl="fused")  # the CUDA engine runs Adam with bfloat16 state
    from xopt.engines import cuda_kinds

    monkeypatch.setattr(cuda_kinds, "STATE_RULES", ())  # a CUDA engine without it
    xopt.Adam(impl="fused")
    with pytest.raises(TypeError, match="no installed fused engine runs Adam.*bfloat16 state needs the CPU engine.*"
                                        "or the CUDA engine"):
        xopt.Adam(state_dtype="bfloat16", impl="fused")


def test_nadam_params_a_step_apart_cost_one_product_each(monkeypatch):
    """A param that missed a step is one count behind for good: the products must not start over each step."""
    opt = xopt.NAdam()
    calls = []
    real = opt._mu
    monkeypatch.setattr(opt, "_mu", lambda t: calls.append(t) or real(t))
    for t in range(2, 500):
        opt.mu_product(t)
        opt.mu_product(t - 1)
    assert len(calls) <= 2 * 500  # mu_{t+1} for the product, and scalars' own mu, mu_next are apart
    assert opt.mu_product(499) == xopt.NAdam().mu_product(499)
