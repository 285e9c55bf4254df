"""xopt's numbers against torch.optim's where a run changes course: an option turned on mid-run, a state
loaded, a hyperparameter changed between steps.  The expected numbers come from torch.optim, live (skipped
where torch is not installed), or from xopt's own reference rule."""

import copy
import re

import numpy as np
import pytest

import xopt

# SGD(lr=0.1)'s (momentum, dampening) at each step: momentum turned on at step 4, off, on again
_SGD_VALUES = [(0.0, 0.3)] * 3 + [(0.9, 0.3)] * 3 + [(0.0, 0.3)] * 2 + [(0.8, 0.3)] * 2


def _torch_sgd_switched(cls, p0, grads):
    """Params after each step of ``cls`` (torch.optim.SGD or xopt.torch.SGD) run through ``_SGD_VALUES``."""
    import torch

    w = torch.tensor(p0.copy(), dtype=torch.float64)
    opt = cls([w], lr=0.1)
    out = []
    for (momentum, dampening), g in zip(_SGD_VALUES, grads):
        opt.param_groups[0].update(momentum=momentum, dampening=dampening)
        w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out.append(w.detach().numpy().copy())
    return out


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("container", ["numpy", "torch"])
def test_sgd_momentum_turned_on_mid_run_starts_its_buffer_at_the_grad(impl, container, rng):
    """Before: SGD's momentum buffer started at the grad, undamped (torch's ``buf = grad.clone()``), only on a
    param's first step; where momentum was turned on later, the buffer was made at 0 and that step took
    ``(1 - dampening) * g``: with dampening > 0 the run left torch.optim's numbers from that step on."""
    torch = pytest.importorskip("torch")
    p0, grads = rng.standard_normal((3, 4)), [rng.standard_normal((3, 4)) for _ in _SGD_VALUES]
    theirs = _torch_sgd_switched(torch.optim.SGD, p0, grads)
    asarray = np.array if container == "numpy" else torch.tensor
    params, opt = {"w": asarray(p0.copy())}, xopt.SGD(lr=0.1, impl=impl)
    for step, ((momentum, dampening), g, want) in enumerate(zip(_SGD_VALUES, grads, theirs), start=1):
        opt.dampening, opt.momentum = dampening, momentum
        opt.update(params, {"w": asarray(g)})
        np.testing.assert_allclose(np.asarray(params["w"]), want, rtol=1e-13, atol=1e-15,
                                   err_msg=f"after step {step}")


def test_torch_front_sgd_momentum_turned_on_mid_run_is_torchs(rng):
    """Before: xopt.torch.SGD whose group's momentum went from 0 to 0.9 (dampening 0.3) after the first step
    damped the buffer's first grad, where torch.optim.SGD starts the buffer at the grad itself."""
    torch = pytest.importorskip("torch")
    xt = pytest.importorskip("xopt.torch")
    p0, grads = rng.standard_normal(7), [rng.standard_normal(7) for _ in _SGD_VALUES]
    theirs = _torch_sgd_switched(torch.optim.SGD, p0, grads)
    ours = _torch_sgd_switched(xt.SGD, p0, grads)
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15, err_msg=f"after step {step}")


# -- ScheduleFreeAdamW: a schedule whose values are NumPy scalars ------------------------------------
def _np_cosine(count):
    return 0.02 * (1.0 + np.cos(np.pi * count / 40)) / 2  # a NumPy float64, as np.cos gives


def _np_float32_warmup(count):
    return np.float32(0.02) * np.float32(min(1.0, (count + 1) / 4))  # a NumPy float32


@pytest.mark.parametrize("schedule", [_np_cosine, _np_float32_warmup])
def test_schedule_free_sums_take_a_numpy_schedules_values_as_floats(schedule, rng):
    """Before: ScheduleFreeAdamW's averaging sums (lr_max, the sum of the weights) took a schedule's values as
    it returned them: a NumPy float32 made them float32 (c_t rounded to float32, about 1e-8 off the
    package's), and state_dict() then held NumPy scalars, which load_state_dict and save refused."""
    schedulefree = pytest.importorskip("schedulefree")
    torch = pytest.importorskip("torch")
    p0, grads = rng.standard_normal((3, 4)), [rng.standard_normal((3, 4)) for _ in range(12)]
    w = torch.tensor(p0.copy(), dtype=torch.float64)
    ref = schedulefree.AdamWScheduleFree([w], lr=0.02, warmup_steps=0)
    ref.train()
    opt, params = xopt.ScheduleFreeAdamW(lr=schedule), {"w": p0.copy()}
    for count, g in enumerate(grads):
        ref.param_groups[0]["lr"] = float(schedule(count))
        w.grad = torch.tensor(g, dtype=torch.float64)
        ref.step()
        opt.update(params, {"w": g})
        np.testing.assert_allclose(params["w"], w.detach().numpy(), rtol=1e-12, atol=1e-14,
                                   err_msg=f"after step {count + 1}")


@pytest.mark.parametrize("schedule", [_np_cosine, _np_float32_warmup])
def test_schedule_free_with_a_numpy_schedule_saves_and_resumes_bit_for_bit(schedule, rng, tmp_path):
    """Before: state_dict() of a ScheduleFreeAdamW whose lr schedule returns NumPy scalars held its sums as
    NumPy scalars: ``load_state_dict`` refused them ("must be ... two finite floats") and ``save`` raised
    ("cannot be saved")."""
    p0, grads = rng.standard_normal(5), [rng.standard_normal(5) for _ in range(8)]
    straight, params = xopt.ScheduleFreeAdamW(lr=schedule), {"w": p0.copy()}
    for g in grads:
        straight.update(params, {"w": g})
    for via in ("state_dict", "file"):
        first, resumed = xopt.ScheduleFreeAdamW(lr=schedule), {"w": p0.copy()}
        for g in grads[:4]:
            first.update(resumed, {"w": g})
        second = xopt.ScheduleFreeAdamW(lr=schedule)
        if via == "file":
            first.save(tmp_path / "sf.npz")
            second.load(tmp_path / "sf.npz", params=resumed)
        else:
            second.load_state_dict(first.state_dict())
        for g in grads[4:]:
            second.update(resumed, {"w": g})
        np.testing.assert_array_equal(resumed["w"], params["w"], err_msg=via)


# -- the whole-tensor rules: a step that raises adds no buffer -------------------------------------
def test_muon_step_that_raises_takes_back_the_buffers_it_added():
    """Before: Muon's matrices keep m alone; ``use_muon=False`` set between steps adds v to each state at the
    next step, and a step that raised (an overflow under the user's np.seterr) left v in the states it had
    reached (the elementwise optimizers' step took such buffers back, the whole-tensor rules' did not)."""
    params = {"a": np.ones((3, 4)), "b": np.ones((4, 3))}
    opt = xopt.Muon(lr=0.01)
    opt.update(params, {"a": np.full((3, 4), 0.5), "b": np.full((4, 3), 0.5)})
    opt.use_muon = False
    before = {k: {n: (v.copy() if hasattr(v, "copy") else v) for n, v in st.items()} for k, st in opt.state.items()}
    kept = {k: v.copy() for k, v in params.items()}
    with pytest.raises(FloatingPointError), np.errstate(over="raise"):
        opt.update(params, {"a": np.full((3, 4), 0.5), "b": np.full((4, 3), 1e200)})
    assert {k: sorted(st) for k, st in opt.state.items()} == {k: sorted(st) for k, st in before.items()}
    for k, st in opt.state.items():
        for n, v in st.items():
            np.testing.assert_array_equal(v, before[k][n])
        np.testing.assert_array_equal(params[k], kept[k])
    opt.update(params, {"a": np.full((3, 4), 0.5), "b": np.full((4, 3), 0.5)})  # and the next step makes them
    assert all("v" in st for st in opt.state.values())


# -- NAdam: a resumed run after β₁ changed ----------------------------------------------------------
@pytest.mark.parametrize("via", ["state_dict", "file"])
def test_nadam_resumes_bit_for_bit_after_beta1_changed(via, rng, tmp_path):
    """Before: NAdam's running products of μ (each with the β₁ of its step) were not in the state_dict; a
    loaded state ran them again from step 1 with the β₁ of now, so a run whose β₁ (or momentum_decay)
    changed before the checkpoint resumed about 1e-5 off the run that never stopped (and off torch.optim's,
    which keeps ``mu_product`` in its state)."""
    torch = pytest.importorskip("torch")
    p0 = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(10)]

    def changes(opt, i):
        if i == 2:
            opt.beta1 = 0.8
        if i == 3:
            opt.momentum_decay = 0.1

    def make():
        return xopt.NAdam(lr=0.01, overrides={"b": {"beta1": 0.7}})

    straight, params = make(), {k: v.copy() for k, v in p0.items()}
    for i, g in enumerate(grads):
        changes(straight, i)
        straight.update(params, g)
    first, resumed = make(), {k: v.copy() for k, v in p0.items()}
    for i, g in enumerate(grads[:6]):
        changes(first, i)
        first.update(resumed, g)
    second = make()
    if via == "file":
        first.save(tmp_path / "nadam.npz")
        second.load(tmp_path / "nadam.npz", params=resumed)
    else:
        second.load_state_dict(first.state_dict())
    for g in grads[6:]:
        second.update(resumed, g)
    for k in p0:
        np.testing.assert_array_equal(resumed[k], params[k], err_msg=k)
    # and torch.optim's numbers, where the one param group changes the same way (its mu_product in the default
    # dtype: float64 here, as xopt's)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        w = torch.tensor(p0["w"].copy(), dtype=torch.float64)
        ref = torch.optim.NAdam([w], lr=0.01)
        for i, g in enumerate(grads):
            if i == 2:
                ref.param_groups[0]["betas"] = (0.8, 0.999)
            if i == 3:
                ref.param_groups[0]["momentum_decay"] = 0.1
            w.grad = torch.tensor(g["w"], dtype=torch.float64)
            ref.step()
    finally:
        torch.set_default_dtype(default)
    np.testing.assert_allclose(resumed["w"], w.detach().numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("container", ["numpy", "torch"])
def test_sgd_params_of_one_count_whose_buffers_start_at_different_steps(impl, container, rng):
    """Params p and q at the same step count, p's momentum buffer made at its first step and q's made now
    (momentum turned on while q had no grad): each buffer starts as torch.optim.SGD's, q's at its grad.
    Before: q's buffer took ``(1 - dampening) * g``; and the engines, which group a set's params by step count
    and give them one set of scalars, must not give p step 1's scalars with q (nor q the others')."""
    torch = pytest.importorskip("torch")
    p0 = {"p": rng.standard_normal(6), "q": rng.standard_normal((2, 3))}
    grads = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(5)]
    present = [{"q"}, {"p"}, {"p", "q"}, {"p", "q"}, {"p", "q"}]  # step 1 without momentum, then 0.9
    tensors = {k: torch.tensor(v.copy(), dtype=torch.float64) for k, v in p0.items()}
    ref = torch.optim.SGD(list(tensors.values()), lr=0.1)
    asarray = np.array if container == "numpy" else torch.tensor
    params, opt = {k: asarray(v.copy()) for k, v in p0.items()}, xopt.SGD(lr=0.1, impl=impl)
    for step, (g, keys) in enumerate(zip(grads, present), start=1):
        if step == 2:
            ref.param_groups[0].update(momentum=0.9, dampening=0.3)
            opt.dampening, opt.momentum = 0.3, 0.9
        for k, t in tensors.items():
            t.grad = torch.tensor(g[k], dtype=torch.float64) if k in keys else None
        ref.step()
        opt.update(params, {k: (asarray(g[k]) if k in keys else None) for k in p0})
        for k in p0:
            np.testing.assert_allclose(np.asarray(params[k]), tensors[k].numpy(), rtol=1e-13, atol=1e-15,
                                       err_msg=f"param {k} after step {step}")


# -- xopt.torch.NAdam: a load continues the state's products of μ -----------------------------------
def _nadam_steps(opt, tensor, grads, torch, beta1s=None):
    for i, g in enumerate(grads):
        if beta1s is not None:
            opt.param_groups[0]["betas"] = (beta1s[i], 0.999)
        tensor.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()


@pytest.mark.parametrize("loader", ["fresh", "stepped before"])
def test_torch_front_nadam_load_continues_the_states_mu_product(loader, rng):
    """Before: xopt.torch.NAdam's load_state_dict kept the running products of μ of the optimizer's run before
    the load (an optimizer that had stepped with another β₁ continued with them), and did not read the state's
    ``mu_product``: a torch.optim run whose β₁ changed (OneCycleLR cycles it) resumed 1e-5 to 4e-5 off
    torch.optim's own resume."""
    torch = pytest.importorskip("torch")
    xt = pytest.importorskip("xopt.torch")
    p0, grads = rng.standard_normal(6), [rng.standard_normal(6) for _ in range(12)]
    beta1s = [0.95, 0.9, 0.85, 0.8, 0.85, 0.9] + [0.9] * 6
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # torch's mu_product in float64, as xopt's
    try:
        w = torch.tensor(p0.copy())
        saved_from = torch.optim.NAdam([w], lr=0.01)
        _nadam_steps(saved_from, w, grads[:6], torch, beta1s)
        state = saved_from.state_dict()
        theirs_w = w.detach().clone()
        theirs = torch.optim.NAdam([theirs_w], lr=0.01)
        theirs.load_state_dict(copy.deepcopy(state))  # torch's load keeps the tensors, which its steps write
        _nadam_steps(theirs, theirs_w, grads[6:], torch)
        ours_w = torch.tensor(p0.copy())
        ours = xt.NAdam([ours_w], lr=0.01, betas=(0.5, 0.999))
        if loader == "stepped before":
            _nadam_steps(ours, ours_w, grads[:6], torch)
        with torch.no_grad():
            ours_w.copy_(w)
        ours.load_state_dict(copy.deepcopy(state))
        _nadam_steps(ours, ours_w, grads[6:], torch)
    finally:
        torch.set_default_dtype(default)
    np.testing.assert_allclose(ours_w.numpy(), theirs_w.numpy(), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name, head", [("NAdam", "mu_product_step"), ("ScheduleFreeAdamW", "average_step")])
@pytest.mark.parametrize("suffix", [".0", ".01", ".x", "_1", ".1.2", ".\u0661"])
def test_a_sets_field_under_another_name_is_refused_naming_it(name, head, suffix, rng):
    """A state dict's per-set field is ``head`` or ``head.i`` (i >= 1, the override's place): any other name under
    ``head`` is refused, naming the field, and the optimizer is left as it was."""
    opt = getattr(xopt, name)(lr=0.01)
    p = {"w": rng.standard_normal(4)}
    opt.update(p, {"w": rng.standard_normal(4)})
    sd = opt.state_dict()
    sd[head + suffix] = sd[head]
    before = opt.state_dict()
    with pytest.raises(ValueError, match=re.escape(repr(head + suffix))):
        opt.load_state_dict(sd)
    assert opt.state_dict().keys() == before.keys() and opt.iter == before["iter"]


@pytest.mark.parametrize("name, head", [("NAdam", "mu_product_step"), ("ScheduleFreeAdamW", "average_step")])
def test_an_overrides_set_field_is_loaded_under_its_place(name, head, rng):
    """``head.1``: the first override's field, loaded and saved again under the same name."""
    opt = getattr(xopt, name)(lr=0.01, overrides={"b": {"lr": 0.02}})
    p = {"w": rng.standard_normal(4), "b": rng.standard_normal(2)}
    for _ in range(2):
        opt.update(p, {k: rng.standard_normal(v.shape) for k, v in p.items()})
    sd = opt.state_dict()
    assert head + ".1" in sd
    twin = getattr(xopt, name)(lr=0.01, overrides={"b": {"lr": 0.02}})
    twin.load_state_dict(sd)
    assert twin.state_dict()[head + ".1"] == sd[head + ".1"]
