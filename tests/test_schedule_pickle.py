"""Schedules pickle by their spec (name and arguments), so an optimizer holding one pickles too."""

import copy
import pickle

import numpy as np
import pytest

import xopt
from xopt import schedules as S

COUNTS = [0, 1, 7, 1000, 10**6]

BUILT_IN = {
    "constant": S.constant_schedule(0.3),
    "linear": S.linear_schedule(0.1, 0.01, 50, transition_begin=5),
    "cosine_decay": S.cosine_decay_schedule(0.1, 100, alpha=0.1, exponent=2.0),
    "exponential_decay": S.exponential_decay(0.1, 10, 0.9, transition_begin=3),
    "exponential_decay_staircase_end": S.exponential_decay(0.1, 10, 0.5, staircase=True, end_value=0.02),
    "warmup_cosine_decay": S.warmup_cosine_decay_schedule(0.0, 0.1, 10, 200, end_value=1e-4),
    "join_schedules": S.join_schedules([S.linear_schedule(0.0, 0.1, 8),
                                        S.exponential_decay(0.1, 4, 0.8, staircase=True)], [8]),
}


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_a_schedule_pickles_and_deep_copies_to_an_equal_one(name):
    s = BUILT_IN[name]
    for dup in [lambda s, p=p: pickle.loads(pickle.dumps(s, protocol=p)) for p in range(pickle.HIGHEST_PROTOCOL + 1)
                ] + [copy.deepcopy]:
        other = dup(s)
        assert type(other) is S.Schedule and other == s
        assert [other(c) for c in COUNTS] == [s(c) for c in COUNTS]


def _params(seed):
    rng = np.random.default_rng(seed)
    return {"W": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}


def _same(a, b, pa, pb):
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])
    assert a.state.keys() == b.state.keys()
    for k, st in a.state.items():
        assert st.keys() == b.state[k].keys()
        for name, v in st.items():
            np.testing.assert_array_equal(v, b.state[k][name])
    assert (a.iter, a.lr, a.overrides) == (b.iter, b.lr, b.overrides)


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("make", [
    lambda impl: xopt.Adam(lr=S.cosine_decay_schedule(1e-2, 6, alpha=0.1), impl=impl),
    lambda impl: xopt.AdamW(lr=S.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 7), weight_decay=0.1, impl=impl,
                            overrides={"b": {"lr": S.join_schedules([S.constant_schedule(1e-3),
                                                                     S.exponential_decay(1e-2, 2, 0.5)], [4])}}),
], ids=["Adam", "AdamW_override"])
def test_an_optimizer_with_schedules_pickled_mid_run_steps_as_the_original(make, impl):
    opt, params = make(impl), _params(0)
    rng = np.random.default_rng(1)
    grads = [{k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()} for _ in range(8)]
    for g in grads[:3]:
        opt.update(params, {k: v.copy() for k, v in g.items()})
    other, other_params = pickle.loads(pickle.dumps((opt, params)))
    _same(opt, other, params, other_params)
    for g in grads[3:]:
        opt.update(params, {k: v.copy() for k, v in g.items()})
        other.update(other_params, {k: v.copy() for k, v in g.items()})
    _same(opt, other, params, other_params)


@pytest.mark.parametrize("where", ["lr", "override"])
def test_an_optimizer_with_a_users_lambda_fails_to_pickle_as_pickle_does(where):
    lr = lambda count: 1e-3  # noqa: E731
    opt = xopt.Adam(lr=lr) if where == "lr" else xopt.Adam(overrides={"b": {"lr": lr}})
    with pytest.raises((pickle.PicklingError, AttributeError), match="Can't (pickle|get local object)"):
        pickle.dumps(opt)
