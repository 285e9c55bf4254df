"""torch CPU tensors on the exact-type lane: the CPU kernel through NumPy views of the same memory."""

from __future__ import annotations

import copy

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
