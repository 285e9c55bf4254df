"""torch CPU tensors on the exact-type lane: the CPU kernel, in place, through the tensors' data addresses."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest

import xopt

torch = pytest.importorskip("torch")


def _net(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5)).to(dtype)


def _steps(net, opt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 20, generator=g, dtype=next(net.parameters()).dtype)
    for _ in range(n):
        net.zero_grad()
        net(x).pow(2).mean().backward()
        opt.update(dict(net.named_parameters()), {k: p.grad for k, p in net.named_parameters()})


@pytest.mark.parametrize("make", [lambda impl: xopt.Adam(lr=1e-2, impl=impl),
                                  lambda impl: xopt.AdamW(lr=1e-2, weight_decay=0.1, amsgrad=True, impl=impl),
                                  lambda impl: xopt.SGD(lr=1e-2, momentum=0.9, nesterov=True, impl=impl)],
                         ids=["Adam", "AdamW-amsgrad", "SGD-nesterov"])
def test_the_lane_takes_torch_steps_and_equals_the_reference(make, lane):
    ours, ref = _net(), _net()
    _steps(ours, make("auto"), 6)
    _steps(ref, make("reference"), 6)
    assert lane[:1] == [False] and all(lane[1:6]), lane  # a first step makes torch state: the checked path's
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-13, atol=1e-15, err_msg=name)


def test_state_stays_torch_and_autograd_sees_the_write(lane):
    net = _net()
    opt = xopt.Adam(lr=1e-2)
    _steps(net, opt, 2)
    assert lane == [False, True]
    assert all(isinstance(st["m"], torch.Tensor) and st["step"] == 2 for st in opt.state.values())
    w = net[0].weight
    saved = (w * w).sum()  # autograd keeps w for the backward pass
    before = w._version
    _steps(net, opt, 1)
    assert lane[-1] is True and w._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


def test_what_numpy_cannot_view_goes_to_the_checked_path(lane):
    """bfloat16 tensors and non-contiguous ones: declined whole, stepped by the checked path, same numbers."""
    for make in (lambda: torch.ones(6, dtype=torch.bfloat16), lambda: torch.ones(4, 6, dtype=torch.float64).t()):
        ps, ref = {"w": make(), "b": torch.ones(3, dtype=torch.float64)}, None
        ref = copy.deepcopy(ps)
        ours, theirs = xopt.Adam(lr=0.1), xopt.Adam(lr=0.1, impl="reference")
        for _ in range(3):
            grads = {k: torch.full_like(v, 0.5) for k, v in ps.items()}
            ours.update(ps, grads)
            theirs.update(ref, {k: g.clone() for k, g in grads.items()})
        assert ours.state["w"]["step"] == 3
        for k in ps:
            torch.testing.assert_close(ps[k], ref[k], rtol=0, atol=0)
    assert not any(lane)


def test_torch_lane_writes_are_one_call_into_c():
    from test_atomic import _watch

    net = _net()
    opt = xopt.Adam(lr=1e-2)
    _steps(net, opt, 2)
    params = dict(net.named_parameters())
    grads = {k: p.grad for k, p in params.items()}
    inside, calls = _watch(lambda: opt.update(params, grads))
    assert calls >= 1 and not inside, inside


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("odd", ["neg_view", "misaligned", "subclass", "strided_state"])
def test_tensors_the_lane_does_not_take_go_to_the_checked_path(odd, lane):
    """The lane reads tensors through torch's accessors: one it may not write through its data address (a lazily
    negated view, an address not aligned to its item size, a subclass, a state buffer replaced by a strided one)
    is declined whole; the checked path steps it, same numbers."""
    def make():
        return {"w": torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4),
                "b": torch.linspace(0, 1, 3, dtype=torch.float64)}

    ps, ref = make(), make()
    ours, theirs = xopt.Adam(lr=0.1, amsgrad=True), xopt.Adam(lr=0.1, amsgrad=True, impl="reference")
    for step in range(3):
        grads = {k: torch.full_like(v, 0.5 + step) for k, v in ps.items()}
        ref_grads = {k: g.clone() for k, g in grads.items()}
        if step == 2:
            if odd == "neg_view":
                grads["w"] = torch._neg_view(-grads["w"])
            elif odd == "misaligned":
                grads["w"] = torch.frombuffer(bytearray(8 * 12 + 4), dtype=torch.float64, offset=4, count=12).reshape(3, 4)
                grads["w"].copy_(ref_grads["w"])
            elif odd == "subclass":
                grads["w"] = grads["w"].as_subclass(_Sub)
            elif odd == "strided_state":
                for opt in (ours, theirs):
                    v = opt.state["w"]["v"]
                    opt.state["w"]["v"] = torch.empty(4, 3, dtype=torch.float64).t().copy_(v)
        theirs.update(ref, ref_grads)
        del lane[-1:]  # the reference's steps: never the lane's
        ours.update(ps, grads)
    assert lane == [False, True, False], lane
    assert ours.state["w"]["step"] == 3
    for k in ps:
        torch.testing.assert_close(ps[k], ref[k], rtol=1e-14, atol=1e-15)


def test_a_grad_sharing_its_params_memory_is_declined_then_refused(lane):
    """Addresses checked in the compiled call: a grad that is a view of its param is declined (nothing
    written) and the checked path names it."""
    w = torch.linspace(-1, 1, 12, dtype=torch.float64)
    opt = xopt.Adam(lr=0.1)
    for _ in range(2):
        opt.update({"w": w}, {"w": torch.ones_like(w)})
    before = w.clone()
    with pytest.raises(ValueError, match="share memory"):
        opt.update({"w": w}, {"w": w[:]})
    assert lane == [False, True, False] and opt.state["w"]["step"] == 2
    torch.testing.assert_close(w, before, rtol=0, atol=0)


def test_parts_that_keep_different_buffers_step_on_the_lane(lane):
    """Overrides whose hyperparameter sets keep different buffers (amsgrad's v_max in some): one lane step."""
    def make():
        torch.manual_seed(1)
        return {"w": torch.randn(5, 4, dtype=torch.float64), "b": torch.randn(5, dtype=torch.float64),
                "u": torch.randn(3, dtype=torch.float64)}

    ps, ref = make(), make()
    over = {"b": {"amsgrad": True, "lr": 0.05}}
    ours, theirs = xopt.Adam(lr=0.1, overrides=over), xopt.Adam(lr=0.1, overrides=over, impl="reference")
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        grads = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in ps.items()}
        theirs.update(ref, {k: t.clone() for k, t in grads.items()})
        del lane[-1:]
        ours.update(ps, grads)
    assert lane == [False, True, True, True], lane
    for k in ps:
        torch.testing.assert_close(ps[k], ref[k], rtol=1e-13, atol=1e-15)


def test_large_state_buffers_are_plain_tensors_with_the_same_numbers(lane):
    """A state buffer of 4 MiB or more is made in memory advised for huge pages (Linux): a plain contiguous
    CPU tensor all the same, stepped on the lane like any other."""
    p, q = torch.linspace(-1, 1, 1 << 20), torch.linspace(-1, 1, 1 << 20)
    ours, theirs = xopt.Adam(lr=0.01), xopt.Adam(lr=0.01, impl="reference")
    for step in range(3):
        g = torch.full_like(p, 0.25 * (step + 1))
        theirs.update({"p": q}, {"p": g.clone()})
        del lane[-1:]
        ours.update({"p": p}, {"p": g})
    st = ours.state["p"]
    assert type(st["m"]) is torch.Tensor and st["m"].is_contiguous() and st["m"].shape == p.shape
    if sys.platform.startswith("linux"):  # over xopt._pages' arrays: a quarter of a huge page apart per slot
        quarter = (1 << 21) // 4
        assert [(st[k].data_ptr() - p.data_ptr()) % (1 << 21) for k in ("m", "v")] == [quarter, 2 * quarter]
    assert lane == [False, True, True]
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(st["v"], theirs.state["p"]["v"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", [5, 300_000])  # the small step's one call; the checked-again large one
def test_the_clip_norm_is_a_float64_tensor_on_every_step(n, lane):
    """``last_grad_norm`` of torch grads: a 0-d float64 tensor after the checked path's first step and after the
    lane's steps alike (the lane left a Python float), the reference's value."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params = {"a": torch.tensor(rng.standard_normal(n)), "b": torch.tensor(rng.standard_normal(3))}
    twin = {k: v.clone() for k, v in params.items()}
    ours, ref = xopt.Adam(clip_grad_norm=0.5), xopt.Adam(clip_grad_norm=0.5, impl="reference")
    for step in range(3):
        g = {k: torch.tensor(rng.standard_normal(v.shape) * 3) for k, v in params.items()}
        ref.update(twin, g)
        ours.update(params, g)
        norm = ours.last_grad_norm
        assert isinstance(norm, torch.Tensor) and norm.dtype == torch.float64 and norm.shape == ()
        torch.testing.assert_close(norm, ref.last_grad_norm, rtol=1e-12, atol=0)
    assert lane[-1] is True
