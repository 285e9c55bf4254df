"""Schedules: optax's formulas (golden values from tools/make_schedule_golden.py), torch's lr_scheduler
sequences, and a scheduled step against torch.optim + LambdaLR, float64, fused and reference."""

import json
import math
import pathlib

import numpy as np
import pytest

import xopt
from xopt import schedules

try:
    import torch
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

GOLDEN = json.loads((pathlib.Path(__file__).parent / "golden" / "schedules.json").read_text())


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["schedule"])
def test_schedules_give_optaxs_numbers(case):
    s = schedules.from_spec(case)
    got = [s(int(c)) for c in GOLDEN["counts"]]
    np.testing.assert_allclose(got, case["values"], rtol=1e-14, atol=0)
    assert all(type(v) is float for v in got)


def test_schedules_take_optaxs_arguments_by_name():
    s = schedules.exponential_decay(init_value=1.0, transition_steps=2, decay_rate=0.5, transition_begin=1,
                                    staircase=True, end_value=0.2)
    assert [s(c) for c in range(6)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25]
    assert repr(s).startswith("exponential_decay(init_value=1.0, transition_steps=2")
    with pytest.raises(ValueError, match="positive decay_steps"):
        schedules.cosine_decay_schedule(0.1, 0)
    for make in (lambda: schedules.cosine_decay_schedule(0.1, 10, exponent=-1.0),  # 0 ** -1 at the end
                 lambda: schedules.warmup_cosine_decay_schedule(0.0, 0.1, 2, 10, exponent=-0.5)):
        with pytest.raises(ValueError, match="exponent >= 0, got exponent=-"):
            make()
    with pytest.raises(TypeError, match="transition_steps must be an int"):
        schedules.linear_schedule(0.1, 0.0, 2.5)


def _torch_lrs(make_scheduler, base, n):
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([p], lr=base)
    sched = make_scheduler(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@needs_torch
@pytest.mark.usefixtures("torch_float64")
@pytest.mark.parametrize("name", ["linear", "cosine", "exponential", "warmup_cosine"])
def test_schedules_match_torch_lr_schedulers(name):
    S = torch.optim.lr_scheduler
    base = 0.1
    cases = {  # (xopt schedule, torch scheduler, counts compared)
        "linear": (schedules.linear_schedule(base * 0.2, base * 0.9, 30),
                   lambda o: S.LinearLR(o, start_factor=0.2, end_factor=0.9, total_iters=30), 50),
        "cosine": (schedules.cosine_decay_schedule(base, 40, alpha=0.05),
                   lambda o: S.CosineAnnealingLR(o, T_max=40, eta_min=base * 0.05), 41),
        "exponential": (schedules.exponential_decay(base, 1, 0.93), lambda o: S.ExponentialLR(o, gamma=0.93), 50),
        "warmup_cosine": (schedules.warmup_cosine_decay_schedule(base * 0.01, base, 10, 60, end_value=1e-3),
                          lambda o: S.SequentialLR(o, [S.LinearLR(o, start_factor=0.01, total_iters=10),
                                                       S.CosineAnnealingLR(o, T_max=50, eta_min=1e-3)],
                                                   milestones=[10]), 61),
    }
    ours, make, n = cases[name]
    np.testing.assert_allclose([ours(c) for c in range(n)], _torch_lrs(make, base, n), rtol=1e-12, atol=1e-16)


SCHEDULED = {  # xopt class and arguments, torch class and arguments
    "SGD": ("SGD", dict(momentum=0.9, weight_decay=0.01), "SGD", dict(momentum=0.9, weight_decay=0.01)),
    "Adam": ("Adam", dict(eps=1e-8, eps_hat=False), "Adam", dict(eps=1e-8)),
    "AdamW": ("AdamW", dict(weight_decay=0.1), "AdamW", dict(weight_decay=0.1)),
    "RMSprop": ("RMSprop", dict(decay_rate=0.9, eps=1e-8, momentum=0.5), "RMSprop",
                dict(alpha=0.9, eps=1e-8, momentum=0.5)),
    "AdaGrad": ("AdaGrad", dict(eps=1e-10), "Adagrad", dict(eps=1e-10)),
}


@needs_torch
@pytest.mark.usefixtures("torch_float64")
@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("name", sorted(SCHEDULED))
def test_a_scheduled_step_matches_torch_with_lambdalr(name, impl, rng):
    xname, xkw, tname, tkw = SCHEDULED[name]
    warm = schedules.warmup_cosine_decay_schedule(0.0, 0.05, 3, 10)
    slow = schedules.exponential_decay(0.02, 2, 0.5)
    params = {"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    ref = getattr(torch.optim, tname)([{"params": [tensors["W"]]}, {"params": [tensors["b"]]}], lr=1.0, **tkw)
    lambdas = [warm, slow]  # LambdaLR: lr = 1.0 * f(number of scheduler steps so far), from 0
    lr_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambdas)
    opt = getattr(xopt, xname)(lr=warm, overrides={"b": {"lr": slow}}, impl=impl, **xkw)
    assert opt.lr is warm
    for step in range(10):
        assert opt.current_lr("W") == warm(step) and opt.current_lr("b") == slow(step)
        g = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        for k, t in tensors.items():
            t.grad = torch.tensor(g[k])
        ref.step()
        lr_sched.step()
        opt.update(params, g)
        for k, t in tensors.items():
            np.testing.assert_allclose(params[k], t.numpy(), rtol=1e-12, atol=1e-14,
                                       err_msg=f"{name} {impl}: {k} after step {step + 1}")


def test_the_count_is_per_param(rng):
    """A param that got no grad on a step has had one update fewer: its schedule is one count behind."""
    s = schedules.linear_schedule(1.0, 0.0, 10)
    opt = xopt.SGD(lr=s)
    params = {"a": np.zeros(2), "b": np.zeros(2)}
    opt.update(params, {"a": np.ones(2), "b": np.ones(2)})
    opt.update(params, {"a": np.ones(2), "b": None})
    assert opt.current_lr("a") == s(2) and opt.current_lr("b") == s(1) and opt.current_lr("new") == s(0)
    opt.update(params, {"a": np.ones(2), "b": np.ones(2)})
    np.testing.assert_array_equal(params["a"], -np.full(2, s(0) + s(1) + s(2)))
    np.testing.assert_array_equal(params["b"], -np.full(2, s(0) + s(1)))


@pytest.mark.parametrize("cls", [xopt.Momentum, xopt.Nesterov])
def test_the_seeds_velocity_forms_take_the_scheduled_lr_into_v(cls, rng):
    """Momentum/Nesterov keep v = momentum * v - lr * g: a schedule is the seed's loop setting opt.lr each step."""
    s = schedules.cosine_decay_schedule(0.1, 8)
    scheduled, by_hand = cls(lr=s), cls(lr=s(0))
    p1 = {"W": rng.standard_normal(5)}
    p2 = {"W": p1["W"].copy()}
    for step in range(8):
        g = {"W": rng.standard_normal(5)}
        by_hand.lr = s(step)
        scheduled.update(p1, g)
        by_hand.update(p2, g)
    np.testing.assert_array_equal(p1["W"], p2["W"])


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_a_built_in_schedule_saves_and_resumes_bit_exactly(tmp_path, impl, rng):
    def make(lr=None):
        return xopt.AdamW(lr=lr or schedules.warmup_cosine_decay_schedule(0.0, 0.01, 3, 12), impl=impl,
                          overrides={"b": {"lr": schedules.join_schedules(
                              [schedules.constant_schedule(0.001), schedules.linear_schedule(0.001, 0.0, 5)], [4])}})
    params = {"W": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()} for _ in range(10)]
    straight, resumed = make(), None
    twin = {k: v.copy() for k, v in params.items()}
    for g in grads[:5]:
        straight.update(params, g)
    straight.save(tmp_path / "opt.npz")
    resumed = make(lr=0.5)  # a different lr: the file's schedule replaces it
    resumed.load(tmp_path / "opt.npz")
    assert resumed.lr == straight.lr and resumed.overrides == straight.overrides
    twin = {k: v.copy() for k, v in params.items()}
    for g in grads[5:]:
        straight.update(params, g)
        resumed.update(twin, g)
    for k in params:
        np.testing.assert_array_equal(twin[k], params[k])


def test_a_custom_schedule_must_be_passed_again_to_load(tmp_path):
    def halving(count):
        return 0.1 * 0.5**count

    opt = xopt.SGD(lr=halving)
    params = {"W": np.ones(3)}
    opt.update(params, {"W": np.ones(3)})
    opt.save(tmp_path / "s.npz")
    with pytest.raises(ValueError, match=r"saved lr was a custom schedule, <function .*halving.*make the optimizer "
                                         r"with that schedule again \(lr=your_function\)"):
        xopt.SGD(lr=0.1).load(tmp_path / "s.npz")
    again = xopt.SGD(lr=halving)
    again.load(tmp_path / "s.npz")
    assert again.lr is halving and again.current_lr("W") == 0.05


def test_a_schedules_bad_value_is_refused_before_any_write():
    opt = xopt.Adam(lr=lambda count: 0.1 if count < 2 else -1.0)
    params = {"W": np.ones(3)}
    for _ in range(2):
        opt.update(params, {"W": np.ones(3)})
    before = params["W"].copy()
    with pytest.raises(ValueError, match=r"lr at count 2 .* must be >= 0, got -1.0"):
        opt.update(params, {"W": np.ones(3)})
    np.testing.assert_array_equal(params["W"], before)
    assert opt.state["W"]["step"] == 2


def test_a_schedule_that_cannot_give_a_first_value_fails_in_the_constructor():
    with pytest.raises(TypeError, match=r"lr\(0\) must be a real number"):
        xopt.Adam(lr=lambda count: "fast")
    with pytest.raises(ValueError, match=r"overrides\['b'\].lr\(0\) must be finite"):
        xopt.Adam(overrides={"b": {"lr": lambda count: math.inf}})
