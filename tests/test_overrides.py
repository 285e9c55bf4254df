"""Per-param hyperparameters (``overrides=``) against torch.optim's param groups, float64, fused and reference."""

import numpy as np
import pytest

import xopt
from torch_cases import CASES, inputs

try:
    import torch
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

SHAPES = {"W": (3, 4), "b1": (5,), "embed": (2, 3), "b2": (4,)}
STEPS = 6

# xopt's name -> torch's, for the hyperparameters the overrides below change
_TORCH_NAME = {"lr": "lr", "weight_decay": "weight_decay", "momentum": "momentum", "decay_rate": "alpha",
               "eps": "eps", "lr_decay": "lr_decay"}


def _overrides(case):
    """Two patterns: biases get other values of what the case's optimizer has, embed a smaller lr."""
    name, kwargs = CASES[case][0], CASES[case][1]
    cls = getattr(xopt, name)
    biases = {"lr": kwargs["lr"] * 0.5}
    if hasattr(cls, "weight_decay") and name != "Momentum":
        biases["weight_decay"] = 0.0 if kwargs.get("weight_decay") else 0.03
    if name in ("Adam", "AdamW"):
        biases["beta1"] = 0.6
    if name == "RMSprop":
        biases["decay_rate"] = 0.8
    embed = {"lr": kwargs["lr"] * 0.1}
    if name == "SGD" and kwargs.get("momentum"):
        embed["momentum"] = 0.5
    return {"b*": biases, "embed": embed}


def _torch_group(case, values):
    _, kwargs, _, torch_kwargs, _ = CASES[case]
    out = {}
    for k, v in values.items():
        if k == "beta1":
            out["betas"] = (v, torch_kwargs.get("betas", (0.9, 0.999))[1])
        else:
            out[_TORCH_NAME[k]] = v
    return out


def _draws(seed):
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(STEPS)]
    return params, grads


@needs_torch
@pytest.mark.usefixtures("torch_float64")
@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_overrides_match_torch_param_groups(case, impl):
    name, kwargs, torch_name, torch_kwargs, _ = CASES[case]
    overrides = _overrides(case)
    params, grads = _draws(abs(hash(case)) % 2**32)
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in params.items()}
    groups = [{"params": [tensors["W"]]},
              {"params": [tensors["b1"], tensors["b2"]], **_torch_group(case, overrides["b*"])},
              {"params": [tensors["embed"]], **_torch_group(case, overrides["embed"])}]
    ref = getattr(torch.optim, torch_name)(groups, **torch_kwargs)
    opt = getattr(xopt, name)(**kwargs, overrides=overrides, impl=impl)
    ours = {k: v.copy() for k, v in params.items()}
    for step, g in enumerate(grads, start=1):
        for k, t in tensors.items():
            t.grad = torch.tensor(g[k], dtype=torch.float64)
        ref.step()
        opt.update(ours, {k: v.copy() for k, v in g.items()})
        for k, t in tensors.items():
            np.testing.assert_allclose(ours[k], t.detach().numpy(), rtol=1e-12, atol=1e-14,
                                       err_msg=f"{case} {impl}: param {k} after step {step}")


def test_first_matching_pattern_wins_and_unmatched_params_keep_the_optimizers_values(rng):
    params = {"bias": np.ones(3), "b": np.ones(3), "W": np.ones(3)}
    opt = xopt.SGD(lr=1.0, overrides={"bias": {"lr": 0.1}, "b*": {"lr": 0.5}})
    opt.update(params, {k: np.ones(3) for k in params})
    np.testing.assert_array_equal(params["bias"], np.full(3, 0.9))
    np.testing.assert_array_equal(params["b"], np.full(3, 0.5))
    np.testing.assert_array_equal(params["W"], np.zeros(3))
    assert [opt.current_lr(k) for k in params] == [0.1, 0.5, 1.0]


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_an_int_pattern_matches_that_list_index(impl):
    params = [np.ones(2), np.ones(2), np.ones(2)]
    opt = xopt.SGD(lr=1.0, overrides={1: {"lr": 0.25}}, impl=impl)
    for _ in range(3):  # the third step runs the plan
        opt.update(params, [np.ones(2)] * 3)
    np.testing.assert_array_equal(params[1], np.full(2, 0.25))
    np.testing.assert_array_equal(params[0], np.full(2, -2.0))


def test_a_pattern_matching_no_param_raises_at_the_first_update_and_writes_nothing():
    params = {"W": np.ones(3), "b": np.ones(3)}
    opt = xopt.Adam(overrides={"emb*": {"lr": 0.1}, "b": {"lr": 0.2}})
    with pytest.raises(ValueError, match=r"'emb\*' matches no param"):
        opt.update(params, {"W": np.ones(3), "b": np.ones(3)})
    np.testing.assert_array_equal(params["W"], np.ones(3))
    assert opt.state == {} and opt.iter == 0


@pytest.mark.parametrize("overrides, error, match", [
    ({"b": {"lr": -1.0}}, ValueError, r"overrides\['b'\]\.lr must be >= 0"),
    ({"b": {"beta1": 1.0}}, ValueError, r"overrides\['b'\]\.beta1 must be in \[0, 1\)"),
    ({"b": {"momentum": 0.9}}, TypeError, "has no hyperparameter 'momentum'"),
    ({"b": {"skip_nonfinite": True}}, ValueError, "whole step"),
    ({"b": {"clip_grad_norm": 1.0}}, ValueError, "whole step"),
    ({"b": 0.1}, TypeError, "must be a dict"),
    ({1.5: {"lr": 0.1}}, TypeError, "a pattern is a str"),
    ([("b", {"lr": 0.1})], TypeError, "overrides must be a dict"),
])
def test_override_values_are_checked_like_constructor_arguments(overrides, error, match):
    with pytest.raises(error, match=match):
        xopt.Adam(overrides=overrides)


def test_override_sets_are_checked_together():
    with pytest.raises(ValueError, match=r"overrides\['b'\]: nesterov=True requires momentum > 0"):
        xopt.SGD(momentum=0.9, nesterov=True, overrides={"b": {"momentum": 0.0}})


@pytest.mark.parametrize("impl", ["reference", "fused", "auto"])
def test_one_call_per_hyperparameter_set(impl, monkeypatch):
    from xopt.engines import cpu_arrays, fused_cpu, reference

    calls = []
    if impl == "reference":
        real = reference.apply_reference
        monkeypatch.setattr("xopt._dispatch.apply_reference", lambda opt, es: calls.append(len(es)) or real(opt, es))
    else:
        real = fused_cpu.call_block  # the lane's call into C for a step of several parts; head[6]: tensors

        def call_block(function, head, scal, step):  # its checks, then its kernel
            return real(function, head, scal, lambda address: calls.append(int(head[6])) or step(address))
        monkeypatch.setattr(fused_cpu, "call_block", call_block)
        monkeypatch.setattr("xopt._dispatch._CPU_LANE", {})

        class Arrays(cpu_arrays.Arrays):  # the checked path's: its arrays checked, then run by writes()
            def __init__(self, rule, head, scal):
                calls.append(int(head[6]))
                super().__init__(rule, head, scal)
        monkeypatch.setattr(cpu_arrays, "Arrays", Arrays)
    params = {f"W{i}": np.ones(4) for i in range(4)} | {f"b{i}": np.ones(2) for i in range(3)}
    opt = xopt.Adam(overrides={"b*": {"lr": 0.5}}, impl=impl)
    for step in range(4):
        calls.clear()
        opt.update(params, {k: np.ones_like(v) for k, v in params.items()})
        if impl == "reference":
            assert sorted(calls) == [3, 4], f"step {step}"  # the checked path: one call per set
        else:
            assert calls == [7], f"step {step}"  # the lane (the first step too): one call, each param with its set
    assert opt.current_lr("b0") == 0.5 and opt.current_lr("W0") == 0.001


def test_overrides_in_repr_state_dict_and_files(tmp_path, rng):
    overrides = {"b*": {"weight_decay": 0.0}, "embed*": {"lr": 1e-4}}
    opt = xopt.AdamW(lr=1e-3, weight_decay=0.01, overrides=overrides)
    assert "overrides={'b*': {'weight_decay': 0.0}, 'embed*': {'lr': 0.0001}}" in repr(opt)
    params = {"W": rng.standard_normal(4), "b": rng.standard_normal(4), "embed": rng.standard_normal(4)}
    grads = [{k: rng.standard_normal(4) for k in params} for _ in range(4)]
    for g in grads[:2]:
        opt.update(params, g)
    assert opt.state_dict()["overrides"] == overrides
    opt.save(tmp_path / "s.npz")
    resumed = xopt.AdamW(lr=1e-3, weight_decay=0.01)  # no overrides: they come from the file
    resumed.load(tmp_path / "s.npz")
    assert resumed.overrides == overrides
    twin = {k: v.copy() for k, v in params.items()}
    for g in grads[2:]:
        opt.update(params, g)
        resumed.update(twin, g)
    for k in params:
        np.testing.assert_array_equal(twin[k], params[k])


def test_int_patterns_save_and_a_state_without_overrides_keeps_the_optimizers(tmp_path):
    params = [np.ones(2), np.ones(3)]
    opt = xopt.SGD(lr=1.0, momentum=0.5, overrides={1: {"lr": 0.5}})
    opt.update(params, [np.ones(2), np.ones(3)])
    opt.save(tmp_path / "s.npz")
    loaded = xopt.SGD(lr=1.0, momentum=0.5)
    loaded.load(tmp_path / "s.npz", params)
    assert loaded.overrides == {1: {"lr": 0.5}}
    old_style = opt.state_dict()
    del old_style["overrides"]  # a state_dict from before overrides existed
    kept = xopt.SGD(lr=1.0, momentum=0.5, overrides={0: {"lr": 0.1}})
    kept.load_state_dict(old_style)
    assert kept.overrides == {0: {"lr": 0.1}}


@needs_torch
@pytest.mark.usefixtures("torch_float64")
@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("name, base, override, torch_override", [
    ("SGD", dict(lr=0.1), {"momentum": 0.9, "nesterov": True}, {"momentum": 0.9, "nesterov": True}),
    ("AdamW", dict(lr=0.01), {"amsgrad": True, "beta2": 0.9}, {"amsgrad": True, "betas": (0.9, 0.9)}),
    ("RMSprop", dict(lr=0.01, eps=1e-8), {"centered": True, "momentum": 0.5}, {"centered": True, "momentum": 0.5}),
])
def test_an_override_that_keeps_other_buffers(name, base, override, torch_override, impl, rng):
    """Some params keep buffers the others do not (momentum, v_max, g_avg): state and steps as torch's."""
    params, grads = _draws(7)
    torch_base = dict(base, **({"alpha": 0.99} if name == "RMSprop" else {}))
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    ref = getattr(torch.optim, name)([{"params": [tensors[k] for k in ("W", "embed")]},
                                      {"params": [tensors["b1"], tensors["b2"]], **torch_override}], **torch_base)
    opt = getattr(xopt, name)(**base, overrides={"b?": override}, impl=impl)
    for g in grads:
        for k, t in tensors.items():
            t.grad = torch.tensor(g[k])
        ref.step()
        opt.update(params, {k: v.copy() for k, v in g.items()})
    for k, t in tensors.items():
        np.testing.assert_allclose(params[k], t.numpy(), rtol=1e-12, atol=1e-14, err_msg=k)
    assert set(opt.state["b1"]) > set(opt.state["W"])


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_a_refused_first_step_leaves_the_patterns_unchecked(impl):
    """The patterns are checked until a step is taken: a first call refused after the check (a grad that is its
    param) proves nothing about the next call's params."""
    opt = xopt.Adam(impl=impl, overrides={"a": {"lr": 0.1}})
    a = np.ones(3)
    with pytest.raises(ValueError, match="share memory|overlap"):
        opt.update({"a": a, "b": np.ones(2)}, {"a": a, "b": np.ones(2)})
    with pytest.raises(ValueError, match="overrides pattern 'a' matches no param"):
        opt.update({"b": np.ones(2)}, {"b": np.ones(2)})
    opt.update({"a": np.ones(3)}, {"a": np.ones(3)})  # taken: checked, and not again
    opt.update({"b": np.ones(2)}, {"b": np.ones(2)})
    assert opt.state["b"]["step"] == 1


def test_a_user_subclass_attribute_set_mid_run_reaches_every_override():
    """A user's subclass reading an attribute of its own in scalars(): its overrides' sets held copies of it, so a
    change reached the params without an override only."""

    class ScaledSGD(xopt.SGD):
        def __init__(self, scale=1.0, **kw):
            self.scale = scale
            super().__init__(**kw)

        def scalars(self, step):
            s = super().scalars(step)
            s["lr"] = s["lr"] * self.scale
            return s

    opt = ScaledSGD(lr=0.1, overrides={"b": {"weight_decay": 0.0}})
    params = {"W": np.zeros(1), "b": np.zeros(1)}
    opt.update(params, {"W": np.ones(1), "b": np.ones(1)})
    opt.scale = 0.0
    opt.update(params, {"W": np.ones(1), "b": np.ones(1)})
    assert params["W"][0] == params["b"][0] == -0.1


@pytest.mark.parametrize("own", [True, False])
def test_a_schedule_going_negative_is_named_where_it_was_set(own):
    schedule = lambda count: 0.1 - 0.05 * count  # noqa: E731
    overrides = {"b": {"lr": schedule}} if own else {"b": {"beta1": 0.5}}
    opt = xopt.Adam(lr=schedule if not own else 0.1, overrides=overrides)
    params = {"b": np.ones(2)}
    where = r"overrides\['b'\]\.lr" if own else "lr"
    with pytest.raises(ValueError, match=rf"^{where} at count 3"):
        for _ in range(4):
            opt.update(params, {"b": np.ones(2)})
