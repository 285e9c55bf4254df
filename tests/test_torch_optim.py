"""xopt.torch: torch.optim's optimizers stepped by xopt, against torch.optim itself in float64."""

from __future__ import annotations

import copy

import pytest

RTOL, ATOL = 1e-12, 1e-14

# (name, arguments): both torch.optim.<name> and xopt.torch.<name> take them
CASES = [
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    ("AdamW", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.2, amsgrad=True)),
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.8, dampening=0.3)),
    ("RMSprop", dict(lr=1e-2)),
    ("RMSprop", dict(lr=1e-2, alpha=0.9, centered=True, momentum=0.5, weight_decay=0.01)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01)),
    ("Adadelta", dict(lr=1.0, rho=0.8, weight_decay=0.01)),
    ("Adamax", dict(lr=1e-2, betas=(0.8, 0.9), weight_decay=0.01)),
    ("NAdam", dict(lr=1e-2, weight_decay=0.01)),
    ("NAdam", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RAdam", dict(lr=1e-2, weight_decay=0.01)),
    ("RAdam", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    ("Adafactor", dict(lr=1e-2, weight_decay=0.01)),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]


@pytest.fixture
def torch():
    torch = pytest.importorskip("torch")
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # torch keeps NAdam's mu_product in the default dtype
    yield torch
    torch.set_default_dtype(before)


def _net(torch, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def _data(torch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)


def _train(torch, net, opt, steps, scheduler=None, data_seed=1):
    x, y = _data(torch, data_seed)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _same(torch, a, b, what=""):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} {name}: {m}")


def _same_state(torch, ours, theirs):
    """Both state_dicts in torch's shape, every buffer equal (torch.optim's own float state)."""
    assert ours.keys() == theirs.keys()
    for n in theirs:
        assert set(ours[n]) == set(theirs[n]), n
        for k in theirs[n]:
            want = theirs[n][k]
            torch.testing.assert_close(ours[n][k].to(want.dtype), want, rtol=RTOL, atol=ATOL)


def _pair(torch, name, kwargs, params=None):
    import xopt.torch

    ours, theirs = _net(torch), _net(torch)
    extra = {"foreach": False} if name != "Adafactor" else {}
    return (ours, getattr(xopt.torch, name)(params(ours) if params else ours.parameters(), **kwargs),
            theirs, getattr(torch.optim, name)(params(theirs) if params else theirs.parameters(), **kwargs, **extra))


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_equals_torch_optim_over_25_steps(torch, name, kwargs):
    ours, opt, theirs, ref = _pair(torch, name, kwargs)
    _train(torch, ours, opt, 25)
    _train(torch, theirs, ref, 25)
    _same(torch, ours, theirs, name)
    _same_state(torch, opt.state_dict()["state"], ref.state_dict()["state"])


def test_param_groups_with_their_own_lr_and_weight_decay(torch):
    def groups(net):
        return [{"params": net[0].parameters()}, {"params": net[2].parameters(), "lr": 0.05, "weight_decay": 0.0}]

    ours, opt, theirs, ref = _pair(torch, "AdamW", dict(lr=1e-2, weight_decay=0.1), groups)
    _train(torch, ours, opt, 20)
    _train(torch, theirs, ref, 20)
    _same(torch, ours, theirs)
    opt.param_groups[1]["lr"] = ref.param_groups[1]["lr"] = 0.2  # a change between steps is read at the next
    _train(torch, ours, opt, 3)
    _train(torch, theirs, ref, 3)
    _same(torch, ours, theirs)


@pytest.mark.parametrize("make", [
    lambda torch, opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
    lambda torch, opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20),
    lambda torch, opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=25),  # cycles beta1 too
], ids=["StepLR", "CosineAnnealingLR", "OneCycleLR"])
def test_lr_schedulers(torch, make):
    def groups(net):
        return [{"params": net[0].parameters()}, {"params": net[2].parameters(), "lr": 3e-3}]

    ours, opt, theirs, ref = _pair(torch, "Adam", dict(lr=1e-2), groups)
    _train(torch, ours, opt, 22, make(torch, opt))
    _train(torch, theirs, ref, 22, make(torch, ref))
    _same(torch, ours, theirs)
    assert opt.param_groups[1]["lr"] == ref.param_groups[1]["lr"] != 3e-3


def test_a_tensor_lr_changed_in_place_is_read_at_the_next_step(torch):
    """A tensor lr (as a scheduler or a user keeps it) changed in place between steps: the next step reads the
    new value, as torch.optim does; betas given as tensors too."""
    kwargs = dict(lr=torch.tensor(1e-2), betas=(torch.tensor(0.8), torch.tensor(0.99)))
    ours, opt, theirs, ref = _pair(torch, "Adam", kwargs)
    for lr in (1e-2, 3e-2, 3e-2, 1e-3):
        for o in (opt, ref):
            o.param_groups[0]["lr"].fill_(lr)
            o.param_groups[0]["betas"][0].fill_(0.9 if lr < 1e-2 else 0.8)
        _train(torch, ours, opt, 2)
        _train(torch, theirs, ref, 2)
        _same(torch, ours, theirs, f"lr {lr}")


def test_group_values_given_as_lists_are_pushed_once(torch, monkeypatch):
    """betas given as a list (as a config file gives them) are the values seen before at the next step: the
    optimizer's hyperparameters are set once, not again at every step."""
    import xopt._torch_front as front

    ours, opt, theirs, ref = _pair(torch, "Adam", dict(lr=1e-2, betas=[0.8, 0.99]))
    pushes = []
    push = front._Front._push
    monkeypatch.setattr(front._Front, "_push", lambda self, *a: (pushes.append(1), push(self, *a))[1])
    _train(torch, ours, opt, 5)
    _train(torch, theirs, ref, 5)
    _same(torch, ours, theirs)
    assert len(pushes) == 1


def test_an_lr_of_several_elements_raises_naming_the_group(torch):
    ours, opt, _, _ = _pair(torch, "Adam", dict(lr=1e-2))
    _train(torch, ours, opt, 1)
    before = [p.detach().clone() for p in ours.parameters()]
    opt.param_groups[0]["lr"] = torch.tensor([1e-2, 2e-2])
    with pytest.raises((TypeError, ValueError, RuntimeError), match=r"param_groups\[0\]"):
        _train(torch, ours, opt, 1)
    for p, q in zip(ours.parameters(), before):
        assert torch.equal(p.detach(), q)


def test_nadam_under_one_cycle_lr_keeps_torchs_running_mu_product(torch):
    """OneCycleLR cycles beta1: NAdam's product of the mu's takes each step's own beta1, in both groups; the
    state_dict's mu_product is the one the last step used."""
    def groups(net):
        return [{"params": net[0].parameters()}, {"params": net[2].parameters(), "lr": 3e-3}]

    ours, opt, theirs, ref = _pair(torch, "NAdam", dict(lr=1e-2), groups)
    make = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=25)  # noqa: E731
    _train(torch, ours, opt, 12, make(opt))
    _train(torch, theirs, ref, 12, make(ref))
    _same(torch, ours, theirs)
    for n, st in ref.state_dict()["state"].items():
        assert opt.state_dict()["state"][n]["mu_product"].item() == st["mu_product"].item(), n


def test_nadam_groups_that_miss_steps_keep_their_own_mu_products(torch):
    """Three groups, each with its own beta1 and momentum_decay, some of them without grads at some steps (their
    overrides leave the xopt optimizer and come back): each group's product of the mu's goes on from its own,
    as torch's per-param mu_product does; the state_dict's mu_product too, of a group that missed the last step."""
    import xopt.torch

    def make(module):
        torch.manual_seed(0)
        ps = [torch.randn(4, 3, requires_grad=True) for _ in range(4)]
        groups = [{"params": [ps[0]]}, {"params": [ps[1]], "betas": (0.5, 0.9), "momentum_decay": 0.01},
                  {"params": ps[2:], "betas": (0.7, 0.95), "momentum_decay": 0.02, "lr": 0.03}]
        extra = {"foreach": False} if module is torch.optim else {}
        return ps, module.NAdam(groups, lr=1e-2, **extra)

    (ours, opt), (theirs, ref) = make(xopt.torch), make(torch.optim)
    masks = [(1, 1, 1, 1), (1, 0, 1, 1), (0, 1, 1, 0), (1, 1, 0, 1), (1, 0, 0, 1), (1, 1, 1, 1), (0, 0, 1, 1),
             (1, 0, 1, 0)]
    for step, mask in enumerate(masks * 2):
        for ps, o in ((ours, opt), (theirs, ref)):
            for j, (p, has) in enumerate(zip(ps, mask)):
                p.grad = torch.cos(p.detach() * (step + 2) + j) if has else None
            o.step()
        for j, (p, q) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL, msg=lambda m: f"step {step}, param {j}: {m}")
    states = opt.state_dict()["state"]
    for n, st in ref.state_dict()["state"].items():
        assert states[n]["mu_product"].item() == pytest.approx(st["mu_product"].item(), rel=1e-15), n


def test_closure_runs_with_grad_and_its_loss_comes_back(torch):
    ours, opt, theirs, ref = _pair(torch, "SGD", dict(lr=0.1, momentum=0.9))
    x, y = _data(torch)
    for net, o in ((ours, opt), (theirs, ref)):
        for _ in range(20):
            def closure(net=net, o=o):
                o.zero_grad()
                loss = torch.nn.functional.mse_loss(net(x), y)
                loss.backward()
                return loss

            with torch.no_grad():  # the closure gets grad mode back
                loss = o.step(closure)
            assert isinstance(loss, torch.Tensor) and loss.requires_grad
    _same(torch, ours, theirs)


def test_params_without_grads_are_skipped(torch):
    ours, opt, theirs, ref = _pair(torch, "Adam", dict(lr=1e-2))
    for net, o in ((ours, opt), (theirs, ref)):
        _train(torch, net, o, 3)
        net[2].bias.grad = None  # this one misses a step, keeping its state
        net[0].weight.grad.mul_(0.5)
        o.step()
        _train(torch, net, o, 3)
    _same(torch, ours, theirs)
    assert opt.state_dict()["state"][3]["step"] == ref.state_dict()["state"][3]["step"] == 6


@pytest.mark.parametrize("name, kwargs", [CASES[1], CASES[7], CASES[10], CASES[11], CASES[14]],
                         ids=["Adam", "SGD", "RMSprop", "Adagrad", "NAdam"])
def test_state_dict_loads_both_ways(torch, name, kwargs):
    """torch.optim -> xopt.torch and back, halfway through: both go on as torch.optim would have."""
    ours, opt, theirs, ref = _pair(torch, name, kwargs)
    _train(torch, ours, opt, 10)
    _train(torch, theirs, ref, 10)
    later_ours, later_theirs = copy.deepcopy(ours), copy.deepcopy(theirs)
    import xopt.torch

    into_ours = getattr(xopt.torch, name)(later_theirs.parameters(), **kwargs)
    into_ours.load_state_dict(ref.state_dict())
    into_theirs = getattr(torch.optim, name)(later_ours.parameters(), **kwargs)
    into_theirs.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch.optim keeps the tensors it is given
    for net, o in ((ours, opt), (theirs, ref), (later_theirs, into_ours), (later_ours, into_theirs)):
        _train(torch, net, o, 10, data_seed=2)
    _same(torch, later_theirs, theirs, "torch.optim state in xopt.torch")
    _same(torch, later_ours, theirs, "xopt.torch state in torch.optim")
    _same(torch, ours, theirs)


def test_a_state_dict_that_does_not_fit_changes_nothing(torch):
    import xopt.torch

    ours, opt, theirs, ref = _pair(torch, "Adam", dict(lr=1e-2))
    _train(torch, ours, opt, 2)
    _train(torch, theirs, ref, 2)
    bad = ref.state_dict()
    bad["state"][1]["exp_avg"] = torch.zeros(5)
    before = {n: {k: v.clone() for k, v in st.items()} for n, st in opt.state_dict()["state"].items()}
    with pytest.raises(ValueError, match="'exp_avg' of param 0.1 has shape"):
        opt.load_state_dict(bad)
    _same_state(torch, opt.state_dict()["state"], before)
    wrong = xopt.torch.SGD(_net(torch).parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="param 0.0 has state 'exp_avg'; SGD keeps momentum_buffer"):
        wrong.load_state_dict(ref.state_dict())


def test_add_param_group_and_the_state_view(torch):
    ours, opt, theirs, ref = _pair(torch, "Adam", dict(lr=1e-2), lambda net: net[0].parameters())
    for net, o in ((ours, opt), (theirs, ref)):
        _train(torch, net, o, 3)
        o.add_param_group({"params": net[2].parameters(), "lr": 0.02})
        _train(torch, net, o, 5)
    _same(torch, ours, theirs)
    assert len(opt.state) == len(ref.state) == 4
    p = ours[2].weight
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"} and int(opt.state[p]["step"]) == 5


def test_a_group_appended_to_param_groups_itself_steps_as_torch_optims(torch):
    """A group appended to ``param_groups`` without add_param_group (torch's step takes it as it finds it), whose
    params have no grads at first: the steps go on, and once they have grads it steps with its own values."""
    ours, opt, theirs, ref = _pair(torch, "Adam", dict(lr=1e-2), lambda net: [{"params": net[0].parameters()},
                                                                               {"params": [net[2].weight]}])
    for net, o in ((ours, opt), (theirs, ref)):
        _train(torch, net, o, 2)
        o.param_groups.append({**o.param_groups[1], "params": [net[2].bias], "lr": 0.05})
        net[2].bias.requires_grad_(False)
        _train(torch, net, o, 2)
        net[2].bias.requires_grad_(True)
        _train(torch, net, o, 2)
    _same(torch, ours, theirs)


def test_what_it_refuses(torch):
    import xopt.torch

    net = _net(torch)
    with pytest.raises(ValueError, match="maximize=True is not supported"):
        xopt.torch.Adam(net.parameters(), maximize=True)
    with pytest.raises(ValueError, match=r"Adam param_groups\[0\]: beta2 must be in \[0, 1\)"):
        xopt.torch.Adam(net.parameters(), betas=(0.9, 1.5))
    opt = xopt.torch.SGD([{"params": net[0].parameters()}, {"params": net[2].parameters()}], lr=0.1)
    _train(torch, net, opt, 1)
    opt.param_groups[1]["lr"] = -1.0
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=r"lr must be >= 0"):
        _train(torch, net, opt, 1)
    for p, q in zip(net.parameters(), before):
        assert torch.equal(p, q)
    opt.param_groups[1]["lr"] = 0.1
    _train(torch, net, opt, 1)  # and it goes on once the value is fixed


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_low_precision_params_state_dict_loads_and_training_goes_on(torch, dtype):
    """A bfloat16 or float16 param keeps its state in float32 (its math's dtype): a state_dict of it, this
    class's own or torch.optim's (buffers in the param's dtype), loads into that dtype, and the steps after
    the load are those of the run that was not interrupted."""
    import xopt.torch

    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    start = torch.randn(40, generator=g).to(dtype)
    grads = [torch.randn(40, generator=g).to(dtype) for _ in range(8)]

    def steps(opt, p, which):
        for grad in which:
            p.grad = grad.clone()
            opt.step()

    p = torch.nn.Parameter(start.clone())
    opt = xopt.torch.Adam([p], lr=1e-2)
    steps(opt, p, grads[:4])
    q = torch.nn.Parameter(p.detach().clone())
    resumed = xopt.torch.Adam([q], lr=1e-2)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    steps(opt, p, grads[4:])
    steps(resumed, q, grads[4:])
    assert torch.equal(p, q)
    torch.testing.assert_close(resumed.state[q]["exp_avg_sq"], opt.state[p]["exp_avg_sq"], rtol=0, atol=0)

    r = torch.nn.Parameter(start.clone())
    ref = torch.optim.Adam([r], lr=1e-2, foreach=False)
    steps(ref, r, grads[:4])
    from_torch = xopt.torch.Adam([r], lr=1e-2)
    from_torch.load_state_dict(ref.state_dict())
    steps(from_torch, r, grads[4:])
    assert int(from_torch.state[r]["step"]) == 8


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_goes_on_as_torch_optim(torch, how):
    """copy.deepcopy or pickle of the model and its optimizer together, mid-run (as torch.optim's pickle):
    the copy steps on as torch.optim does, and the original is left as it was."""
    import pickle

    def groups(net):
        return [{"params": net[0].parameters()}, {"params": net[2].parameters(), "lr": 3e-2}]

    ours, opt, theirs, ref = _pair(torch, "Adam", dict(lr=1e-2, amsgrad=True), groups)
    _train(torch, ours, opt, 3)
    _train(torch, theirs, ref, 3)
    if how == "deepcopy":
        copied, copied_opt = copy.deepcopy((ours, opt))
    else:
        copied, copied_opt = pickle.loads(pickle.dumps((ours, opt)))
    _train(torch, copied, copied_opt, 4)
    _train(torch, theirs, ref, 4)
    _same(torch, copied, theirs, how)
    _same_state(torch, copied_opt.state_dict()["state"], ref.state_dict()["state"])
    assert copied_opt.param_groups[1]["lr"] == 3e-2 and int(opt.state_dict()["state"][0]["step"]) == 3


def test_state_dict_hooks_run_as_torch_optims(torch):
    """register_state_dict_pre/post_hook and register_load_state_dict_pre/post_hook: called as torch.optim calls
    them, a post hook's returned state_dict is the one given back, a load pre hook's the one loaded."""
    ours, opt, theirs, ref = _pair(torch, "Adam", dict(lr=1e-2))
    calls = {id(opt): [], id(ref): []}
    for o in (opt, ref):
        o.register_state_dict_pre_hook(lambda o: calls[id(o)].append("pre"))
        o.register_state_dict_post_hook(lambda o, sd: calls[id(o)].append("post") or {**sd, "extra": 1})
        o.register_load_state_dict_pre_hook(
            lambda o, sd: calls[id(o)].append(("load pre", sd.get("extra"))) or {**sd, "param_groups": [
                {**g, "lr": 2e-2} for g in sd["param_groups"]]})
        o.register_load_state_dict_post_hook(lambda o: calls[id(o)].append(("load post", o.param_groups[0]["lr"])))
    for net, o in ((ours, opt), (theirs, ref)):
        _train(torch, net, o, 2)
        sd = o.state_dict()
        assert sd["extra"] == 1
        o.load_state_dict(copy.deepcopy(sd))
        _train(torch, net, o, 2)
    assert calls[id(opt)] == calls[id(ref)] == ["pre", "post", ("load pre", 1), ("load post", 2e-2)]
    _same(torch, ours, theirs)


def test_step_hooks_and_profiler_ranges_as_torch_optims(torch):
    """register_step_pre_hook/post_hook, on the optimizer and global, run around each step as torch.optim's do
    (a pre hook's returned args are the ones stepped with), and a profiler sees each step's range by torch's
    name; a step with none of them registered and no profiler running steps the same numbers."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    ours, opt, theirs, ref = _pair(torch, "Adam", dict(lr=1e-2))
    calls = {id(opt): [], id(ref): []}
    handles = []
    for o in (opt, ref):
        handles.append(o.register_step_pre_hook(lambda o, args, kwargs: calls[id(o)].append("pre")))
        handles.append(o.register_step_post_hook(lambda o, args, kwargs: calls[id(o)].append("post")))
    handles.append(register_optimizer_step_pre_hook(lambda o, args, kwargs: calls[id(o)].append("global pre")))
    handles.append(register_optimizer_step_post_hook(lambda o, args, kwargs: calls[id(o)].append("global post")))
    try:
        for net, o in ((ours, opt), (theirs, ref)):
            _train(torch, net, o, 2)
    finally:
        for handle in handles:
            handle.remove()
    assert calls[id(opt)] == calls[id(ref)] == ["global pre", "pre", "post", "global post"] * 2
    for net, o in ((ours, opt), (theirs, ref)):
        _train(torch, net, o, 2)  # no hook left: the hooks ran no more
    assert len(calls[id(opt)]) == 8
    _same(torch, ours, theirs)
    closure_args = []
    handle = opt.register_step_pre_hook(lambda o, args, kwargs: (args, {"closure": lambda: closure_args.append(1)}))
    try:
        opt.step()
    finally:
        handle.remove()
    assert closure_args == [1]
    for net, o in ((ours, opt), (theirs, ref)):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _train(torch, net, o, 1)
        names = {e.name for e in prof.events()}
        assert f"Optimizer.step#{type(o).__name__}.step" in names, sorted(names)[:20]


@pytest.mark.parametrize("name, kwargs", [CASES[0], CASES[14]], ids=["Adam", "NAdam"])
def test_a_step_under_torch_compile_steps_as_torch_optims(torch, name, kwargs):
    """A training step compiled whole by torch.compile, and step compiled alone: the step runs as it is (dynamo
    does not trace the kernel's writes), with its hooks, and the numbers are torch.optim's."""
    dynamo = pytest.importorskip("torch._dynamo")
    if not dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported here")
    ours, opt, theirs, ref = _pair(torch, name, kwargs)
    x, y = _data(torch)
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(1))

    @torch.compile(backend="eager")
    def train_step():
        opt.zero_grad()
        torch.nn.functional.mse_loss(ours(x), y).backward()
        opt.step()

    try:
        for _ in range(3):
            train_step()
        compiled_step = torch.compile(opt.step, backend="eager")
        opt.zero_grad()
        torch.nn.functional.mse_loss(ours(x), y).backward()
        compiled_step()
    finally:
        dynamo.reset()
    _train(torch, theirs, ref, 4)
    assert len(calls) == 4
    _same(torch, ours, theirs)


@pytest.mark.parametrize("name, kwargs", [CASES[0], CASES[7], CASES[18]], ids=["Adam", "SGD", "Adafactor"])
def test_autograd_sees_every_step_write(torch, name, kwargs):
    """A param saved for a backward pass, then stepped: the backward raises, as after torch.optim's in-place
    step (each param's and state's version counter moves with the write), at the first step and after."""
    ours, opt, theirs, ref = _pair(torch, name, kwargs)
    x, y = _data(torch)
    for net, o in ((ours, opt), (theirs, ref)):
        for _ in range(3):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), y)
            loss.backward(retain_graph=True)
            before = [p._version for p in net.parameters()]
            o.step()
            assert all(p._version > v for p, v in zip(net.parameters(), before)), type(o)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()
    _same(torch, ours, theirs)


@pytest.mark.parametrize("name, kwargs", [CASES[0], CASES[11]], ids=["Adam", "Adagrad"])
def test_the_state_view_answers_as_torch_optims_state(torch, name, kwargs):
    """``opt.state`` as torch.optim's: the params that hold state (Adagrad's all of them from the start), and
    for a param that holds none an empty dict (torch's is a defaultdict), not a KeyError."""
    ours, opt, theirs, ref = _pair(torch, name, kwargs)
    for net, o in ((ours, opt), (theirs, ref)):
        net[2].bias.requires_grad_(False)  # never stepped
    pairs = list(zip(ours.parameters(), theirs.parameters()))
    for steps in (0, 2):
        _train(torch, ours, opt, steps)
        _train(torch, theirs, ref, steps)
        assert len(opt.state) == len(ref.state)
        assert [p in opt.state for p, _ in pairs] == [q in ref.state for _, q in pairs]
        assert [opt.state.get(p) is None for p, _ in pairs] == [ref.state.get(q) is None for _, q in pairs]
        for p, q in pairs:
            ours_state, theirs_state = opt.state[p], ref.state.get(q, {})  # torch's [] would add q
            assert set(ours_state) == set(theirs_state), (steps, set(ours_state), set(theirs_state))
            for k in theirs_state:
                torch.testing.assert_close(torch.as_tensor(ours_state[k]).to(torch.float64),
                                           torch.as_tensor(theirs_state[k]).to(torch.float64), rtol=RTOL, atol=ATOL)



def test_an_inference_tensor_is_stepped_only_in_inference_mode(torch):
    """A param made under torch.inference_mode() has no version counter: torch.optim's step refuses to write it
    outside inference mode, and so does this one, at the first step and on later ones, writing nothing; inside
    inference mode both step it."""
    import xopt.torch

    with torch.inference_mode():
        ours, theirs = torch.linspace(-1, 1, 6), torch.linspace(-1, 1, 6)
    opt, ref = xopt.torch.Adam([ours], lr=0.1), torch.optim.Adam([theirs], lr=0.1, foreach=False)
    for step in range(4):
        for p in (ours, theirs):
            p.grad = torch.full((6,), 0.5 + step)
        if step in (0, 2):
            with torch.inference_mode():
                other = theirs.clone()
            other.grad = theirs.grad
            with pytest.raises(RuntimeError, match="[Ii]nplace update to inference tensor"):
                torch.optim.Adam([other], lr=0.1, foreach=False).step()
            before = {k: v.clone() for k, v in opt.state[ours].items()}
            with pytest.raises(ValueError, match="inference tensor"):
                opt.step()
            assert torch.equal(ours, theirs) and before.keys() == opt.state[ours].keys()
            for k, v in before.items():
                assert torch.equal(opt.state[ours][k], v), k
        with torch.inference_mode():
            ref.step()
            opt.step()
        torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL)


def test_meta_params_step_as_torch_optims_do():
    """Meta tensors have no memory (every one's data_ptr() is 0): they are not taken for tensors that share it
    (the step raised "share memory"); the state is meta too, as torch.optim's."""
    torch = pytest.importorskip("torch")
    import xopt.torch as xt

    p = torch.nn.Parameter(torch.ones(3, device="meta"))
    opt = xt.Adam([p])
    for _ in range(2):
        p.grad = torch.ones(3, device="meta")
        opt.step()
    assert opt.state[p]["exp_avg"].is_meta and float(opt.state[p]["step"]) == 2


@pytest.mark.parametrize("value", [1, 0, "numpy", "tensor"])
def test_a_flag_given_as_a_number_or_a_tensor_is_its_truth_value(value):
    torch = pytest.importorskip("torch")
    import numpy as np

    import xopt.torch as xt

    flag = {"numpy": np.True_, "tensor": torch.tensor(True)}.get(value, value)
    runs = []
    for lib in (torch.optim, xt):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 5, dtype=torch.float64))
        opt = lib.Adam([p], lr=0.1, amsgrad=flag)
        for i in range(3):
            p.grad = torch.cos(p.detach() * (i + 1))
            opt.step()
        runs.append(p.detach().clone())
    torch.testing.assert_close(runs[1], runs[0], rtol=RTOL, atol=ATOL)


def test_a_group_without_momentum_steps_plain_whatever_its_nesterov():
    """torch.optim.SGD checks nesterov against its arguments alone: a group added later without momentum steps
    as plain SGD (xopt refused it); the arguments are checked as torch checks them."""
    torch = pytest.importorskip("torch")
    import xopt.torch as xt

    runs = []
    for lib in (torch.optim, xt):
        with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero dampening"):
            lib.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.0, nesterov=True)
        w = torch.nn.Parameter(torch.linspace(-1, 1, 4, dtype=torch.float64))
        b = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
        opt = lib.SGD([w], lr=0.1, momentum=0.9, nesterov=True)
        opt.add_param_group({"params": [b], "momentum": 0.0})
        for i in range(3):
            w.grad, b.grad = torch.sin(w.detach() + i), torch.full((2,), 0.5 * i, dtype=torch.float64)
            opt.step()
        runs.append((w.detach().clone(), b.detach().clone()))
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)
