"""Front ends and 8-bit state at their edges: a tensor lr a scheduler fills in place, a state_dict with a bad
value, an optax schedule's float32 under x64, an empty param with 8-bit state."""

import copy

import numpy as np
import pytest

import xopt


# -- 1. xopt.torch: a tensor lr that a scheduler fills in place is never pushed ----------------------
def test_torch_front_follows_a_tensor_lr_that_a_scheduler_fills_in_place():
    torch = pytest.importorskip("torch")
    xt = pytest.importorskip("xopt.torch")

    def run(cls):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
        opt = cls([w], lr=torch.tensor(0.1))  # torch.optim accepts a Tensor lr (foreach=None)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)  # param_group["lr"].fill_(...)
        for _ in range(4):
            opt.zero_grad()
            (w ** 2).sum().backward()
            opt.step()
            sched.step()
        return w.detach()

    # torch computes with the float32 tensor (its step size in float32), xopt with its value in float64
    torch.testing.assert_close(run(xt.Adam), run(torch.optim.Adam), rtol=1e-6, atol=1e-8)


# -- 2. 8-bit state: an empty param with min_8bit_size=0 -------------------------------------------
@pytest.mark.parametrize("shape", [(0,), (3, 0)])
def test_8bit_state_takes_an_empty_param(shape):
    pytest.importorskip("xopt.engines.fused_cpu", reason="numba is not installed")
    opt = xopt.Adam(state_dtype="8bit", min_8bit_size=0)
    params = {"e": np.zeros(shape, dtype=np.float32), "w": np.ones(300, dtype=np.float32)}
    opt.update(params, {k: np.ones_like(v) for k, v in params.items()})
    assert opt.state["w"]["step"] == 1


# -- 3. xopt.torch load_state_dict: hyperparameters are not checked before the load commits ----------
def test_torch_load_state_dict_refuses_a_bad_hyperparameter_changing_nothing():
    torch = pytest.importorskip("torch")
    xt = pytest.importorskip("xopt.torch")
    w, v = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))
    opt = xt.Adam([{"params": [w]}, {"params": [v], "lr": 0.5}], lr=0.1)
    opt.zero_grad()
    ((w ** 2).sum() + (v ** 2).sum()).backward()
    opt.step()
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][1]["lr"] = -1.0
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"param_groups\[1\]: lr"):
        opt.load_state_dict(bad)
    assert opt.param_groups[1]["lr"] == before["param_groups"][1]["lr"]


# -- 4. xopt.optax.adamw: the decoupled decay factor is rounded in the schedule's float32 ----------------
def test_optax_adamw_with_a_schedule_matches_optax_in_float64():
    pytest.importorskip("optax")
    import jax

    jax.config.update("jax_enable_x64", True)
    try:
        import jax.numpy as jnp
        import optax

        import xopt.optax as xo

        sched = optax.exponential_decay(0.1, 1, 0.8)  # returns float32 even under x64
        outs = []
        for mod in (optax, xo):
            tx = mod.adamw(sched, weight_decay=0.1)
            params = {"a": jnp.arange(6.0, dtype=jnp.float64) / 7}
            state = tx.init(params)
            for i in range(5):
                g = {"a": jnp.sin(params["a"] * (i + 1)) + 0.1}
                u, state = tx.update(g, state, params)
                params = optax.apply_updates(params, u)
            outs.append(np.asarray(params["a"]))
        np.testing.assert_allclose(outs[1], outs[0], rtol=1e-13, atol=1e-15)
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_jax_half_params_keep_stepping_and_load_their_float32_state(dtype):
    """JAX's half-precision params keep float32 state, as NumPy's and torch's do: a second step and a load
    with params take it (its dtype, jnp.float32, a type object, was named "float32'>" and refused)."""
    jnp = pytest.importorskip("jax.numpy")
    params = {"w": jnp.linspace(-1, 1, 6, dtype=dtype)}
    opt = xopt.Adam(lr=0.01)
    for i in range(3):
        opt.update(params, {"w": jnp.full(6, 0.5 + i, dtype=dtype)})
    assert opt.state["w"]["step"] == 3 and str(opt.state["w"]["m"].dtype) == "float32"
    twin = xopt.Adam(lr=0.01)
    twin.load_state_dict(opt.state_dict(), params)
    assert twin.state["w"]["step"] == 3


def test_jax_tracers_are_refused_naming_the_param():
    """update inside jax.jit saw tracers as arrays: the state kept leaked tracers and each call replayed a first
    step.  Refused, naming the param and pointing to xopt.optax; nothing changes."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    opt = xopt.Adam(lr=0.1)

    @jax.jit
    def step(w, g):
        params = {"w": w}
        opt.update(params, {"w": g})
        return params["w"]

    with pytest.raises(TypeError, match="param 'w' is a traced JAX array.*xopt.optax"):
        step(jnp.ones(3), jnp.ones(3))
    assert opt.state == {} and opt.iter == 0
    with pytest.raises(TypeError, match="grad of param 'w' is a traced JAX array"):
        jax.grad(lambda g: (opt.update({"w": jnp.ones(3)}, {"w": g}) or 0.0))(jnp.ones(3))


def test_a_number_params_grad_of_another_library_is_named_as_such():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="param 'x' is a float, so its grad is a number or a NumPy array, not a "
                                        "torch array"):
        xopt.Adam().update({"x": 1.0}, {"x": torch.tensor(0.5, dtype=torch.float64)})


def _two_group_model(torch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    plain = [p for p in model.parameters() if p.dim() < 2]
    return model, [{"params": decay, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}]


def test_torch_front_lr_scheduled_every_step_with_groups_matches_torch():
    """A scheduler changing every group's lr each step (only the lr checked again), then a weight decay changed
    mid-run (every value checked again): torch.optim.AdamW's trajectory, float64."""
    torch = pytest.importorskip("torch")
    import xopt.torch as xt

    runs = []
    for make in (torch.optim.AdamW, xt.AdamW):
        model, groups = _two_group_model(torch)
        opt = make(groups, lr=0.01)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=30, cycle_momentum=False)
        x = torch.linspace(-1, 1, 48, dtype=torch.float64).reshape(8, 6)
        for step in range(30):
            if step == 12:
                opt.param_groups[1]["weight_decay"] = 0.05
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
            schedule.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bad", [{"lr": -0.1}, {"lr": -0.1, "eps": 1e-9}, {"eps": -1.0}])
def test_torch_front_a_bad_value_after_scheduled_lrs_is_refused_naming_its_group(bad):
    """After steps whose lr alone changed, a bad lr (alone or with another change) or another bad value raises,
    naming the group, and writes nothing."""
    torch = pytest.importorskip("torch")
    import xopt.torch as xt

    model, groups = _two_group_model(torch)
    opt = xt.AdamW(groups, lr=0.01)
    x = torch.linspace(-1, 1, 48, dtype=torch.float64).reshape(8, 6)
    for step in range(3):
        for group in opt.param_groups:
            group["lr"] = 0.01 * (step + 1)
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.param_groups[1].update(bad)
    with pytest.raises(ValueError, match=r"param_groups\[1\]"):
        opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)
    after = opt.state_dict()
    assert [s["step"] for s in after["state"].values()] == [s["step"] for s in state["state"].values()]


@pytest.mark.parametrize("name, buffer", [("Adam", "exp_avg"), ("SGD", "momentum_buffer")])
def test_torch_front_errors_name_state_buffers_by_torchs_names(name, buffer):
    """A param resized after its first step: the error names its state buffer as state_dict() does, and nothing
    is written."""
    torch = pytest.importorskip("torch")
    import xopt.torch as xt

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    opt = getattr(xt, name)(layer.parameters(), lr=0.1, **({"momentum": 0.9} if name == "SGD" else {}))
    layer(torch.randn(2, 4)).sum().backward()
    opt.step()
    layer.weight.data = torch.zeros(5, 4)
    layer.weight.grad = torch.zeros(5, 4)
    bias = layer.bias.detach().clone()
    with pytest.raises(ValueError, match=f"state '{buffer}'"):
        opt.step()
    assert torch.equal(layer.bias.detach(), bias)


def test_torch_front_refuses_sparse_grads_saying_where_they_step():
    torch = pytest.importorskip("torch")
    import xopt.torch as xt

    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(TypeError, match="sparse.*SparseAdam, SGD or Adagrad"):
        xt.SGD(emb.parameters(), lr=0.1).step()
    assert torch.equal(emb.weight.detach(), before)


@pytest.mark.parametrize("start, then", [(0.1, lambda count: 0.5), (lambda count: 0.1, 0.5)])
def test_torch_front_a_groups_lr_becoming_a_schedule_or_a_number_again_steps(start, then):
    """A group's lr that turns into an xopt schedule (a callable of the step count), or back, with nothing else
    changed: the next steps use it."""
    torch = pytest.importorskip("torch")
    import xopt.torch as xt

    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = xt.SGD([{"params": [a]}, {"params": [b], "lr": start}], lr=0.1)
    for step in range(3):
        a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
        if step == 1:
            opt.param_groups[1]["lr"] = then
        before = b.detach().clone()
        opt.step()
        if step >= 1:
            torch.testing.assert_close(before - b.detach(), torch.full_like(before, 0.5), rtol=0, atol=1e-15)


def test_torch_front_a_copy_of_its_xopt_optimizer_keeps_its_own_scheduled_lrs():
    """copy.copy of the xopt optimizer has its own hyperparameters: a scheduler's later lrs (set in place on the
    original) do not reach the copy's override sets."""
    torch = pytest.importorskip("torch")
    import xopt.torch as xt

    a = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = xt.Adam([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    snapshot = copy.copy(opt._xopt)
    want = copy.deepcopy(snapshot.overrides)
    for group in opt.param_groups:
        group["lr"] *= 0.1
    opt.step()
    assert snapshot.overrides == want
    assert opt._xopt.overrides["1.*"]["lr"] == pytest.approx(0.05)


def test_torch_front_muon_errors_name_an_adamw_params_first_moment_exp_avg():
    """Muon keeps m of a param AdamW steps as exp_avg in its state_dict: its errors call it that too."""
    torch = pytest.importorskip("torch")
    import xopt.torch as xt

    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    opt = xt.Muon([w, b], lr=0.01)
    w.grad, b.grad = torch.randn(4, 3), torch.randn(3)
    opt.step()
    assert "exp_avg" in opt.state_dict()["state"][1]
    b.data, b.grad = torch.zeros(4), torch.zeros(4)
    with pytest.raises(ValueError, match="state 'exp_avg'"):
        opt.step()


def test_torch_front_muon_names_each_params_buffer_in_an_error_about_two():
    """An overlap between a matrix and an AdamW param's first moment: that moment is named exp_avg, its param's
    name for it, though the message names the matrix first."""
    torch = pytest.importorskip("torch")
    import xopt.torch as xt

    w = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(9, dtype=torch.float64))
    opt = xt.Muon([w, b], lr=0.01)
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    opt.step()
    w.data = opt.state[b]["exp_avg"].view(3, 3)
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    with pytest.raises(ValueError, match="state 'exp_avg' of param '0.1'"):
        opt.step()


def test_torch_front_leaves_a_users_exception_as_it_is():
    """An exception a user's code raises inside the step (an xopt schedule given as the lr) keeps its message."""
    torch = pytest.importorskip("torch")
    import xopt.torch as xt

    def schedule(count):
        if count >= 1:
            raise ValueError("my scheduler: state 'm' of the run is missing")
        return 0.01

    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = xt.Adam([p], lr=schedule)
    p.grad = torch.ones_like(p)
    opt.step()
    with pytest.raises(ValueError, match="state 'm' of the run"):
        opt.step()


@pytest.mark.parametrize("name", ["Lion", "Muon", "Adam", "SGD"])
def test_torch_front_maximize_set_with_a_scheduled_lr_is_refused(name):
    """maximize=True set on a group mid-run, with the lr changed in the same step: refused, nothing written."""
    torch = pytest.importorskip("torch")
    import xopt.torch as xt

    w = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
    opt = getattr(xt, name)([w], lr=0.01)
    w.grad = torch.randn_like(w)
    opt.step()
    opt.param_groups[0]["lr"] = 0.02
    opt.param_groups[0]["maximize"] = True
    before = w.detach().clone()
    with pytest.raises(ValueError, match="maximize"):
        opt.step()
    assert torch.equal(w.detach(), before)
