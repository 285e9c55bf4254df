"""The quick step (``FusedPlan._quick`` and ``fused_cpu.Table.quick``): a repeated small step whose
checks are one compiled comparison of ids, next to its reference twin.

Each test counts the steps the quick path took (it must take the plain repeated ones, or it
proves nothing) and the ones it declined (it must decline every poke, or the poke went
unseen), and asks for the twin's numbers or the twin's error.
"""

from __future__ import annotations

import numpy as np
import pytest

import xopt
from test_safety import copies, grads_like, net, same, steps
from xopt import _plan
from xopt.engines import fused_cpu

# Every optimizer's class, with hyperparameters that make its scalars as step-dependent as they get.
CONFIGS = [
    (xopt.SGD, {}), (xopt.SGD, dict(momentum=0.9, dampening=0.3, weight_decay=0.01)),
    (xopt.SGD, dict(momentum=0.9, nesterov=True)), (xopt.Momentum, {}), (xopt.Nesterov, {}),
    (xopt.AdaGrad, {}), (xopt.AdaGrad, dict(lr_decay=0.1)), (xopt.RMSprop, dict(momentum=0.5, centered=True)),
    (xopt.Adam, {}), (xopt.AdamW, {}), (xopt.Adam, dict(amsgrad=True)), (xopt.AdaDelta, {}), (xopt.Adamax, {}),
    (xopt.NAdam, {}), (xopt.RAdam, {}), (xopt.Lion, dict(weight_decay=0.1)),
]
IDS = [f"{cls.__name__}-{'-'.join(kw) or 'defaults'}" for cls, kw in CONFIGS]


@pytest.mark.parametrize("cls, kw", CONFIGS, ids=IDS)
def test_steady_from_is_where_the_scalars_stop_changing(cls, kw):
    opt = cls(**kw)
    first = opt.steady_from()
    values = [opt.scalars(step) for step in range(1, 400)]
    changes = [step for step in range(2, 400) if values[step - 1] != values[step - 2]]
    if first is None:
        assert changes, f"{cls.__name__}'s scalars never change: it could say steady_from() == 1"
    else:
        assert not [s for s in changes if s > first], f"{cls.__name__} said its scalars settle at step {first}"



class _DecayingMomentum(xopt.Momentum):
    """Keeps Momentum's kernel (names it) with scalars of its own that change every step: Momentum's
    ``steady_from()`` (1) is not this class's answer."""

    kernel = "momentum"

    def scalars(self, step):
        return {"lr": self.lr / step, "momentum": self.momentum}


def test_a_subclass_redefining_scalars_is_not_held_to_its_parents_steady_from(rng, monkeypatch):
    counts = _counting(monkeypatch)
    fast, ref = _DecayingMomentum(lr=0.1), _DecayingMomentum(lr=0.1, impl="reference")
    p_ref = net(rng)
    p_fast = copies(p_ref)
    steps(fast, ref, p_fast, p_ref, rng, n=6)
    same(fast, ref, p_fast, p_ref)
    assert counts == {"quick": 5, "declined": 0}, counts  # the kernel's path, quick: what is tested here

def _counting(monkeypatch):
    counts = {"quick": 0, "declined": 0}
    real = _plan.FusedPlan._quick

    def quick(self, opt, params, grads):
        took = real(self, opt, params, grads)
        counts["quick" if took else "declined"] += 1
        return took

    monkeypatch.setattr(_plan.FusedPlan, "_quick", quick)
    return counts


@pytest.mark.parametrize("cls, kw", CONFIGS, ids=IDS)
def test_repeated_steps_are_quick_and_give_the_reference_numbers(cls, kw, rng, monkeypatch):
    counts = _counting(monkeypatch)
    fast, ref = cls(**kw), cls(impl="reference", **kw)
    p_ref = net(rng)
    p_fast = copies(p_ref)
    steps(fast, ref, p_fast, p_ref, rng, n=5)
    fast.lr = ref.lr = ref.lr * 0.5  # a hyperparameter set between steps: the quick step's kept scalars are dropped
    steps(fast, ref, p_fast, p_ref, rng, n=3)
    same(fast, ref, p_fast, p_ref)
    # step 1 builds the plan, step 6 follows the new lr through the checked plan; the rest are quick
    assert counts == {"quick": 6, "declined": 1}, counts


def _poke_param(opt, params, grads):
    params["p1"] = params["p1"].copy()


def _poke_buffer(opt, params, grads):
    opt.state["p2"]["v"] = opt.state["p2"]["v"] * 1.0


def _poke_state_dict(opt, params, grads):
    opt.state["p0"] = dict(opt.state["p0"])


def _poke_step(opt, params, grads):
    opt.state["p1"]["step"] = 1


def _poke_step_type(opt, params, grads):
    opt.state["p1"]["step"] = float(opt.state["p1"]["step"])


class _Sub(np.ndarray):
    pass


def _poke_grad_type(opt, params, grads):
    grads["p2"] = grads["p2"].view(_Sub)


def _poke_grad_dtype(opt, params, grads):
    grads["p0"] = grads["p0"].astype(np.float32)


def _poke_grad_layout(opt, params, grads):
    grads["p0"] = np.asfortranarray(grads["p0"])


def _poke_read_only(opt, params, grads):
    params["p2"].flags.writeable = False


def _poke_keys(opt, params, grads):
    params["p9"] = params.pop("p0")
    grads["p9"] = grads.pop("p0")


def _poke_grad_missing(opt, params, grads):
    del grads["p1"]


def _poke_lr_schedule(opt, params, grads):
    opt.lr = xopt.schedules.linear_schedule(0.001, 0.0001, 10)


def _poke_impl(opt, params, grads):
    opt.impl = "reference"


def _poke_grad_views_param(opt, params, grads):
    grads["p2"] = params["p2"][::-1]


def _poke_grad_is_param(opt, params, grads):
    grads["p2"] = params["p2"]


def _poke_grad_views_buffer(opt, params, grads):
    grads["p2"] = opt.state["p2"]["v"][:]


def _poke_buffers_swapped(opt, params, grads):
    a, b = opt.state["p2"], opt.state["p0"]
    a["m"], a["v"], b["m"] = b["m"], a["m"], a["v"]  # p2's v goes to p0: refused for its shape


POKES = [_poke_param, _poke_buffer, _poke_state_dict, _poke_step, _poke_step_type, _poke_grad_type, _poke_grad_dtype,
         _poke_grad_layout, _poke_read_only, _poke_keys, _poke_grad_missing, _poke_lr_schedule, _poke_impl,
         _poke_grad_views_param, _poke_grad_is_param, _poke_grad_views_buffer, _poke_buffers_swapped]


@pytest.mark.parametrize("poke", POKES, ids=[p.__name__[6:] for p in POKES])
def test_every_poke_is_declined_and_the_checked_path_decides(poke, rng, monkeypatch):
    counts = _counting(monkeypatch)
    fast, ref = xopt.Adam(), xopt.Adam(impl="reference")
    p_ref = net(rng)
    p_fast = copies(p_ref)
    steps(fast, ref, p_fast, p_ref, rng)
    assert counts == {"quick": 2, "declined": 0}, counts
    g = grads_like(p_ref, rng)
    g_fast = copies(g)
    for opt, params, grads in ((ref, p_ref, g), (fast, p_fast, g_fast)):
        poke(opt, params, grads)
    errors = []
    for opt, params, grads in ((ref, p_ref, g), (fast, p_fast, g_fast)):
        try:
            opt.update(params, grads)
        except Exception as exc:  # the twin's error, word for word
            errors.append(f"{type(exc).__name__}: {exc}".replace("impl='reference'", "").replace("'reference'", ""))
    assert counts == {"quick": 2, "declined": 1}, counts
    assert len(errors) in (0, 2) and len(set(errors)) <= 1, errors
    if not errors:
        same(fast, ref, p_fast, p_ref)


def test_no_quick_step_without_a_type_slot(rng, monkeypatch):
    """Where the object header's type slot was not found, the plan runs on the checked path alone."""
    counts = _counting(monkeypatch)
    monkeypatch.setattr(fused_cpu, "_OB_TYPE", None)
    opt, params = xopt.Adam(), net(rng)
    for _ in range(4):
        opt.update(params, grads_like(params, rng))
    assert opt._plan is not None and not opt._plan.quick and counts == {"quick": 0, "declined": 0}
