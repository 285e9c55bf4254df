"""xopt.torch and xopt.optax at their edges, against torch.optim and optax as the reference."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
xt = pytest.importorskip("xopt.torch")


@pytest.fixture(autouse=True)
def _float64_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # torch keeps its per-param scalars in the default dtype
    yield
    torch.set_default_dtype(before)


def _params(n=3, seed=0):
    torch.manual_seed(seed)
    return [torch.randn(5, requires_grad=True) for _ in range(n)]


def _grads(ps, s):
    for k, p in enumerate(ps):
        p.grad = torch.sin(p.detach() * (k + 1) + s)


@pytest.mark.parametrize("move", ["pop", "reverse", "to_new_group", "out_and_back"])
@pytest.mark.parametrize("name, kwargs", [("SGD", dict(lr=0.05, momentum=0.9)), ("Adam", dict(lr=1e-2))])
def test_a_params_state_follows_it_when_param_groups_change(name, kwargs, move):
    """xopt keys a param's state by its place in param_groups ("i.j"): a param popped from a group's list, a
    reordered list or a param moved to another group stepped with another param's state (same shape: silently
    other numbers than torch.optim's, which keys its state by the param)."""
    results = []
    for cls in (getattr(xt, name), getattr(torch.optim, name)):
        ps = _params()
        opt = cls(ps, **kwargs)
        for s in range(8):
            _grads(ps, s)
            if s == 3:
                if move == "pop":
                    opt.param_groups[0]["params"].pop(0)
                elif move == "reverse":
                    opt.param_groups[0]["params"].reverse()
                elif move == "to_new_group":
                    opt.param_groups[0]["params"].pop(0)
                    opt.add_param_group({"params": [ps[0]], "lr": kwargs["lr"] / 2})
                else:
                    opt.param_groups[0]["params"].pop(1)
            if s == 5 and move == "out_and_back":
                opt.param_groups[0]["params"].append(ps[1])
            opt.step()
        results.append((ps, opt))
    (ours, x), (theirs, t) = results
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    held = [p for g in x.param_groups for p in g["params"]]
    assert len(x.state) == len(held)
    for p in held:  # torch.optim's state_dict() raises for a param taken out of its groups: its state, param by param
        want = t.state[theirs[[id(q) for q in ours].index(id(p))]]
        assert set(x.state[p]) == set(want)
        for k, v in want.items():
            torch.testing.assert_close(x.state[p][k].to(v.dtype), v, rtol=1e-12, atol=1e-14)


def test_a_state_kept_aside_comes_back_after_a_deepcopy():
    """The state of a param taken out of param_groups is kept aside by the param, found again in a deepcopy
    (where every param is another object)."""
    ps = _params()
    opt = xt.Adam(ps, lr=1e-2)
    _grads(ps, 0)
    opt.step()
    want = opt.state[ps[0]]["exp_avg"].clone()
    opt.param_groups[0]["params"].pop(0)
    _grads(ps, 1)
    opt.step()
    twin = copy.deepcopy({"opt": opt, "p": ps[0]})
    twin["opt"].param_groups[0]["params"].append(twin["p"])
    assert float(twin["opt"].state[twin["p"]]["step"]) == 1
    torch.testing.assert_close(twin["opt"].state[twin["p"]]["exp_avg"], want, rtol=0, atol=0)


@pytest.mark.parametrize("name, kwargs", [("adamw", dict(weight_decay=0.1)), ("adam", {}), ("sgd", dict(momentum=0.9)),
                                          ("lion", dict(weight_decay=0.1))])
def test_optax_takes_numpy_and_python_leaves_as_optax_does(name, kwargs):
    """Outside jit, params and grads may be NumPy arrays or Python floats, as optax's own take them: AdamW's decay
    (a traced scalar) times a NumPy param made a NumPy array of objects and the update raised TypeError, and a
    Python float grad had no dtype for its update (AttributeError)."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    np = pytest.importorskip("numpy")
    import xopt.optax as xo

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        params = {"a": np.linspace(-1.0, 1.0, 4), "b": np.ones((2, 2)), "c": 0.5}
        grads = {"a": np.full(4, 0.3), "b": np.full((2, 2), -0.2), "c": 0.1}
        out = []
        for tx in (getattr(xo, name)(0.1, **kwargs), getattr(optax, name)(0.1, **kwargs)):
            state, p = tx.init(params), params
            for _ in range(3):
                updates, state = tx.update(grads, state, p)
                p = optax.apply_updates(p, updates)
            out.append(p)
        for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-15)
    finally:
        jax.config.update("jax_enable_x64", before)


@pytest.mark.parametrize("momentum", [None, 0.0])
def test_optax_sgd_nesterov_without_momentum_is_plain_sgd_as_optaxs(momentum):
    """optax.sgd(lr, nesterov=True) without a momentum is plain SGD; xopt.optax.sgd raised ValueError (xopt's SGD
    refuses nesterov without momentum, naming a dampening optax does not have)."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    np = pytest.importorskip("numpy")
    import xopt.optax as xo

    params = {"a": jax.numpy.linspace(-1.0, 1.0, 4)}
    grads = {"a": jax.numpy.full(4, 0.3)}
    out = []
    for tx in (xo.sgd(0.1, momentum=momentum, nesterov=True), optax.sgd(0.1, momentum=momentum, nesterov=True)):
        state, p = tx.init(params), params
        for _ in range(3):
            updates, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        out.append(p)
    np.testing.assert_allclose(np.asarray(out[0]["a"]), np.asarray(out[1]["a"]), rtol=1e-6)


def test_load_state_dict_copies_the_saved_groups_values():
    """load_state_dict put the saved groups' values themselves into the groups: a tensor lr or beta loaded from
    another optimizer's state_dict was that optimizer's own tensor, so its scheduler (which fills a tensor lr in
    place) changed this optimizer's lr too.  torch.optim's load copies them."""
    p, q = _params(2)
    a = xt.Adam([p], lr=torch.tensor(0.01), betas=(torch.tensor(0.9), torch.tensor(0.999)))
    b = xt.Adam([q], lr=torch.tensor(0.01), betas=(torch.tensor(0.9), torch.tensor(0.999)))
    b.load_state_dict(a.state_dict())
    scheduler = torch.optim.lr_scheduler.StepLR(a, 1, 0.5)
    p.grad = torch.ones(5)
    a.step()
    scheduler.step()
    a.param_groups[0]["betas"][0].fill_(0.5)
    assert float(a.param_groups[0]["lr"]) == 0.005
    assert float(b.param_groups[0]["lr"]) == 0.01 and float(b.param_groups[0]["betas"][0]) == 0.9


@pytest.mark.parametrize("name, kwargs", [("Adam", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9)),
                                          ("Adagrad", dict(lr=0.1, initial_accumulator_value=0.1))])
def test_assigning_an_empty_state_drops_every_params_state_as_torch_optims(name, kwargs):
    """torch's idiom for dropping an optimizer's state, ``opt.state = defaultdict(dict)``, replaced the state view
    with a dict no step read: training went on with the old state (other numbers than torch.optim's), and
    ``opt.state`` answered that it held none.  Any other assignment is refused."""
    import collections

    out = []
    for cls in (getattr(xt, name), getattr(torch.optim, name)):
        ps = _params(2)
        opt = cls(ps, **kwargs)
        for s in range(6):
            _grads(ps, s)
            if s == 3:
                opt.state = collections.defaultdict(dict)
            opt.step()
        out.append((ps, opt))
    (ours, x), (theirs, t) = out
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    for p, q in zip(ours, theirs):
        assert set(x.state[p]) == set(t.state[q])
        for k, v in t.state[q].items():
            torch.testing.assert_close(x.state[p][k].to(v.dtype), v, rtol=1e-12, atol=1e-14)
    before = copy.deepcopy(x.state_dict())
    with pytest.raises(TypeError, match="load_state_dict"):
        x.state = {ours[0]: {"step": torch.tensor(1.0)}}
    with pytest.raises(TypeError, match="load_state_dict"):
        getattr(xt, name)(_params(2), **kwargs).state = x.state  # another optimizer's state, not a copy of it
    x.state = x.state  # its own view: nothing changes
    assert repr(x.state_dict()) == repr(before)


def _malformed(sd):
    return [
        ("a group without 'params'", lambda: sd["param_groups"][1].pop("params"), "'params'"),
        ("'state' a list", lambda: sd.__setitem__("state", [1, 2]), "'state' must be a dict"),
        ("a group a list", lambda: sd["param_groups"].__setitem__(1, [1]), "list of dicts"),
        ("a step of two elements", lambda: sd["state"][1].__setitem__("step", torch.tensor([1.0, 2.0])), "param 1.0"),
        ("a complex buffer", lambda: sd["state"][1].__setitem__("exp_avg", torch.ones(5, dtype=torch.complex128)),
         "'exp_avg' of param 1.0"),
        ("a sparse buffer", lambda: sd["state"][1].__setitem__("exp_avg", torch.ones(5).to_sparse()),
         "'exp_avg' of param 1.0"),
        ("a meta buffer", lambda: sd["state"][1].__setitem__("exp_avg", torch.ones(5, device="meta")),
         "'exp_avg' of param 1.0"),
    ]


@pytest.mark.parametrize("case", range(7))
def test_a_malformed_state_dict_raises_naming_what_and_changes_nothing(case):
    """A state_dict with a group lacking 'params', a 'state' or group that is not a dict, a step of several
    elements, or a complex, sparse or meta buffer raised torch's or Python's own error (KeyError 'params',
    AttributeError, RuntimeError), naming no param; a complex buffer loaded with its imaginary part dropped."""
    ps = _params(2)
    opt = xt.Adam([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.5}], lr=0.01)
    _grads(ps, 0)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    what, spoil, named = _malformed(sd)[case]
    spoil()
    before = repr(opt.state_dict()), repr(opt.param_groups)
    with pytest.raises((TypeError, ValueError), match=named):
        opt.load_state_dict(sd)
    assert (repr(opt.state_dict()), repr(opt.param_groups)) == before, what


def test_adamw_groups_are_torch_optim_adamws():
    """xopt.torch.AdamW's groups lacked torch.optim.AdamW's ``decoupled_weight_decay=True``, so its state_dict
    loaded into torch.optim.Adam stepped as Adam with L2 decay (torch.optim.AdamW's loads as AdamW)."""
    out = []
    for cls in (xt.AdamW, torch.optim.AdamW):
        ps = _params(1)
        opt = cls(ps, lr=0.1, weight_decay=0.5)
        _grads(ps, 0)
        opt.step()
        assert opt.defaults == torch.optim.AdamW(_params(1), lr=0.1, weight_decay=0.5).defaults
        q = ps[0].detach().clone().requires_grad_()
        other = torch.optim.Adam([q])
        other.load_state_dict(copy.deepcopy(opt.state_dict()))
        for s in range(1, 4):
            _grads([q], s)
            other.step()
        out.append(q)
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("start", [False, True])
def test_adam_refuses_a_group_that_changes_decoupled_weight_decay(start):
    """xopt.torch.Adam fixes decoupled_weight_decay in its constructor (one xopt rule for every group), but only
    read it at a step where another value had changed: a group switched to the other kind stepped on as before,
    silently (torch.optim.Adam switches that group), where a change is to be refused."""
    ps = _params(2)
    opt = xt.Adam([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.01, weight_decay=0.1,
                  decoupled_weight_decay=start)
    _grads(ps, 0)
    opt.step()
    opt.param_groups[1]["decoupled_weight_decay"] = not start
    before = [p.detach().clone() for p in ps], repr(opt.state_dict())
    _grads(ps, 1)
    with pytest.raises(ValueError, match=r"param_groups\[1\].*decoupled_weight_decay"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before[0])) and repr(opt.state_dict()) == before[1]


@pytest.mark.parametrize("name, kwargs, turned_on", [
    ("Adam", dict(lr=0.01), dict(amsgrad=True)),
    ("AdamW", dict(lr=0.01), dict(amsgrad=True)),
    ("RMSprop", dict(lr=0.01), dict(centered=True)),
    ("RMSprop", dict(lr=0.01), dict(momentum=0.5)),
])
def test_own_state_dict_loads_back_after_an_option_is_turned_on(name, kwargs, turned_on):
    """After a group turns on an option that keeps a buffer (amsgrad, centered, momentum), the state lacks it
    until the next step makes it: the optimizer's own state_dict then failed to load back ("lacks state
    max_exp_avg_sq"), into itself or into a copy.  Loaded, the training goes on as without the round trip."""
    out = []
    for round_trip in (False, True):
        ps = _params(2)
        opt = getattr(xt, name)(ps, **kwargs)
        for s in range(5):
            _grads(ps, s)
            if s == 2:
                opt.param_groups[0].update(turned_on)
                if round_trip:
                    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            opt.step()
        out.append(ps)
    for p, q in zip(*out):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_adamw_refuses_a_group_turned_to_l2_decay_and_loads_adam_state_dicts_as_adamw():
    """xopt.torch.AdamW ignored a group's decoupled_weight_decay=False, silently (torch.optim.AdamW steps that
    group as Adam with L2 decay); now refused, naming the group.  A torch.optim.Adam state_dict still loads,
    as AdamW, as into torch.optim.AdamW."""
    ps = _params(2)
    opt = xt.AdamW([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.1, weight_decay=0.5)
    _grads(ps, 0)
    opt.step()
    opt.param_groups[1]["decoupled_weight_decay"] = False
    with pytest.raises(ValueError, match=r"param_groups\[1\].*decoupled_weight_decay"):
        opt.step()
    q = torch.nn.Parameter(ps[0].detach().clone())
    adam = torch.optim.Adam([q], weight_decay=0.1)
    q.grad = torch.ones(5)
    adam.step()
    other = xt.AdamW([torch.nn.Parameter(q.detach().clone())])
    other.load_state_dict(copy.deepcopy(adam.state_dict()))
    assert other.param_groups[0]["decoupled_weight_decay"] is True
