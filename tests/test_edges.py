"""Edges that caught other libraries: eps=0, zero/NaN/Inf grads, empty and 0-d shapes, views, float16."""

import numpy as np
import pytest

import xopt

# Every optimizer with its features switched on, so each branch of each rule is exercised.
CONFIGS = {
    "SGD": dict(lr=0.1),
    "SGD-nesterov-wd": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "Momentum": dict(),
    "Nesterov": dict(),
    "AdaGrad-all": dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01),
    "RMSprop": dict(),
    "RMSprop-all": dict(momentum=0.5, centered=True, weight_decay=0.01),
    "Adam": dict(),
    "Adam-amsgrad-wd": dict(amsgrad=True, weight_decay=0.01, eps_hat=False),
    "AdamW-amsgrad": dict(amsgrad=True),
    "AdaDelta": dict(),
    "AdaDelta-wd": dict(lr=0.5, rho=0.95, weight_decay=0.01),
    "Adamax-wd": dict(weight_decay=0.01),
    "NAdam": dict(),
    "NAdam-decoupled-wd": dict(weight_decay=0.01, decoupled_weight_decay=True),
    "RAdam-wd": dict(weight_decay=0.01),  # rectified from step 6 (tests/test_more_optimizers.py goes that far)
    "RAdam-decoupled-wd": dict(beta2=0.99, weight_decay=0.01, decoupled_weight_decay=True),
    "Lion": dict(),
    "Lion-wd": dict(lr=0.01, weight_decay=0.1),
    "ScheduleFreeAdamW-wd": dict(lr=0.01, weight_decay=0.01, warmup_steps=2, r=0.5),
    "LAMB-wd": dict(lr=0.01, weight_decay=0.01),
}
# The configurations whose rule the CUDA source has (LAMB's reads its tensors' norms: the CPU engine's alone).
CUDA_CONFIGS = {k: v for k, v in CONFIGS.items() if not getattr(xopt, k.split("-")[0]).kernel.norms}


def make(config, **extra):
    return getattr(xopt, config.split("-")[0])(**{**CONFIGS[config], **extra})


def numpy_run(config, params, grads_seq, **extra):
    """The same steps on float64 NumPy copies: the cross-backend reference."""
    opt = make(config, **extra)
    params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
    for g in grads_seq:
        opt.update(params, {k: np.array(v, dtype=np.float64) for k, v in g.items()})
    return params


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("shape", [(), (0,), (1, 0, 2), (7,), (2, 3, 4)])
def test_shapes_on_every_backend(config, shape, backend, rng):
    params = {"p": rng.standard_normal(shape)}
    grads_seq = [{"p": rng.standard_normal(shape)} for _ in range(3)]
    ours = {k: backend.asarray(v) for k, v in params.items()}
    opt = make(config)
    for g in grads_seq:
        opt.update(ours, {k: backend.asarray(v) for k, v in g.items()})
    assert tuple(ours["p"].shape) == shape
    np.testing.assert_allclose(backend.to_numpy(ours["p"]), numpy_run(config, params, grads_seq)["p"],
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.split("-")[0] in ("AdaGrad", "RMSprop", "Adam", "AdamW")])
def test_eps_zero_is_finite_on_nonzero_grads(config, rng):
    params = {"p": rng.standard_normal(50)}
    grads_seq = [{"p": rng.standard_normal(50) + 0.5} for _ in range(4)]
    out = numpy_run(config, params, grads_seq, eps=0.0)["p"]
    assert np.all(np.isfinite(out))
    assert not np.array_equal(out, params["p"])


@pytest.mark.parametrize("config", [c for c in CONFIGS if "wd" not in c and "all" not in c
                                    and not c.startswith("AdamW")])  # AdamW decays W by default
def test_zero_grads_leave_params_alone(config, backend, rng):
    params = {"p": backend.asarray(rng.standard_normal(10))}
    before = backend.to_numpy(params["p"])
    opt = make(config)
    for _ in range(3):
        opt.update(params, {"p": backend.asarray(np.zeros(10))})
    np.testing.assert_array_equal(backend.to_numpy(params["p"]), before)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_grads_propagate_by_default(config, bad, rng):
    params = {"p": rng.standard_normal(6), "q": rng.standard_normal(3)}
    g = {"p": rng.standard_normal(6), "q": rng.standard_normal(3)}
    g["p"][2] = bad
    opt = make(config)
    with np.errstate(invalid="ignore"):  # inf/inf in NumPy warns; the value is what is tested
        opt.update(params, g)
    if config.startswith("Lion") and np.isinf(bad):  # sign(±inf) is ±1: the step is finite, m holds the inf
        assert not np.isfinite(opt.state["p"]["m"][2]) and np.isfinite(params["p"][2])
    else:
        assert not np.isfinite(params["p"][2])
    assert np.all(np.isfinite(params["q"])), "a non-finite grad leaked into another param"
    assert opt.iter == 1


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_skip_nonfinite_skips_the_whole_step(config, bad, backend, rng):
    params = {"p": backend.asarray(rng.standard_normal(6)), "q": backend.asarray(rng.standard_normal(3))}
    opt = make(config, skip_nonfinite=True)
    opt.update(params, {"p": backend.asarray(rng.standard_normal(6)), "q": backend.asarray(rng.standard_normal(3))})
    before = {k: backend.to_numpy(v) for k, v in params.items()}
    state_before = {k: {n: (b if n == "step" else backend.to_numpy(b)) for n, b in st.items()}
                    for k, st in opt.state.items()}
    g = rng.standard_normal(3)
    g[1] = bad
    opt.update(params, {"p": backend.asarray(rng.standard_normal(6)), "q": backend.asarray(g)})
    assert opt.skipped_steps == 1 and opt.iter == 1
    for k in params:
        np.testing.assert_array_equal(backend.to_numpy(params[k]), before[k])
        assert opt.state[k]["step"] == state_before[k]["step"] == 1
        for n in opt.buffers():
            np.testing.assert_array_equal(backend.to_numpy(opt.state[k][n]), state_before[k][n])


@pytest.mark.parametrize("config", CONFIGS)
def test_non_contiguous_views_are_updated_in_place(config, rng):
    base = rng.standard_normal((6, 8))
    kept = base.copy()
    view = base[1:5, ::2]  # strided, not contiguous
    assert not view.flags.c_contiguous
    grads_seq = [{"p": rng.standard_normal(view.shape)} for _ in range(3)]
    want = numpy_run(config, {"p": view.copy()}, grads_seq)["p"]
    opt = make(config)
    params = {"p": view}
    for g in grads_seq:
        opt.update(params, g)
    assert params["p"] is view
    np.testing.assert_allclose(base[1:5, ::2], want, rtol=1e-12, atol=1e-15)
    mask = np.ones_like(base, dtype=bool)
    mask[1:5, ::2] = False
    np.testing.assert_array_equal(base[mask], kept[mask], err_msg="elements outside the view changed")


@pytest.mark.parametrize("config", CONFIGS)
def test_float16_params_compute_in_float32(config, rng):
    p16 = rng.standard_normal(64).astype(np.float16)
    g16 = rng.standard_normal(64).astype(np.float16)
    opt = make(config)
    params = {"p": p16.copy()}
    opt.update(params, {"p": g16})
    assert params["p"].dtype == np.float16
    for name in opt.buffers():
        assert opt.state["p"][name].dtype == np.float32, f"state {name} is not float32"
    ref = make(config)
    p32 = {"p": p16.astype(np.float32)}
    ref.update(p32, {"p": g16.astype(np.float32)})
    np.testing.assert_array_equal(params["p"], p32["p"].astype(np.float16))


@pytest.mark.parametrize("config", CONFIGS)
def test_none_grad_leaves_param_and_state_alone(config, rng):
    params = {"a": rng.standard_normal(4), "b": rng.standard_normal(4)}
    opt = make(config)
    opt.update(params, {k: rng.standard_normal(4) for k in params})
    b_before = params["b"].copy()
    b_state = {n: (v if n == "step" else v.copy()) for n, v in opt.state["b"].items()}
    opt.update(params, {"a": rng.standard_normal(4), "b": None})
    np.testing.assert_array_equal(params["b"], b_before)
    assert opt.state["a"]["step"] == 2 and opt.state["b"]["step"] == 1
    for n, v in b_state.items():
        np.testing.assert_array_equal(opt.state["b"][n], v)


def test_arrays_stay_the_same_objects(backend, rng):
    params = {"W": backend.asarray(rng.standard_normal((2, 3))), "b": backend.asarray(rng.standard_normal(3))}
    ids = {k: id(v) for k, v in params.items()}
    opt = xopt.Adam()
    opt.update(params, {k: backend.asarray(rng.standard_normal(tuple(v.shape))) for k, v in params.items()})
    assert {k: id(v) for k, v in params.items()} == ids


def test_list_and_tuple_params(rng):
    a, b = rng.standard_normal(3), rng.standard_normal(2)
    want = numpy_run("Adam", {"0": a, "1": b}, [{"0": np.ones(3), "1": np.ones(2)}])
    opt = xopt.Adam()
    params = (a, b)
    opt.update(params, [np.ones(3), np.ones(2)])
    np.testing.assert_allclose(a, want["0"], rtol=1e-15)
    np.testing.assert_allclose(b, want["1"], rtol=1e-15)


def test_torch_parameters_that_require_grad_are_updated_in_place(rng):
    """nn.Parameter-style leaves: written under no_grad as torch.optim does; they stay leaves with no history."""
    torch = pytest.importorskip("torch")
    w0 = rng.standard_normal((3, 4))
    w = torch.tensor(w0, requires_grad=True)
    g = rng.standard_normal((3, 4))
    opt = xopt.Adam(lr=0.1)
    opt.update({"w": w}, {"w": torch.tensor(g)})
    want = numpy_run("Adam", {"w": w0}, [{"w": g}], lr=0.1)["w"]
    assert w.requires_grad and w.is_leaf and w.grad_fn is None
    assert opt.state["w"]["m"].grad_fn is None and not opt.state["w"]["m"].requires_grad
    np.testing.assert_allclose(w.detach().numpy(), want, rtol=1e-14)
