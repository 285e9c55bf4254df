"""state_dtype='8bit' in the exact-type lane (xopt.engines.cpu_lane8): the checked path's numbers, bit for bit, in
one compiled call that checks every array first; whatever it refuses it declines having written nothing."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import xopt
from xopt import _checked, _lane
from xopt.engines.fused_cpu import PARALLEL_MIN

from test_state_8bit import CONFIGS

N = 5000 + 77  # above min_8bit_size, a tail shorter than a block
SHAPES = [(N,), (64, 128), (4096,), (3, 1700), (10,), (3, 7)]  # the last two below min_8bit_size: float state


def _params(dtype, seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {f"p{i}": rng.standard_normal(shape).astype(dtype) for i, shape in enumerate(shapes)}


def _grads(params, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}


def _snapshot(opt, params):
    return copy.deepcopy(params), copy.deepcopy(opt.state), opt.iter


def _same(a, b):
    """Two snapshots equal bit for bit (arrays' dtypes, shapes and bytes; step counts, types and values)."""
    (pa, sa, ia), (pb, sb, ib) = a, b
    assert ia == ib and pa.keys() == pb.keys() and sa.keys() == sb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and pa[k].tobytes() == pb[k].tobytes(), k
    for k in sa:
        assert sa[k].keys() == sb[k].keys(), k
        for name, x in sa[k].items():
            y = sb[k][name]
            if name == "step":
                assert type(x) is type(y) and x == y, (k, name)
            else:
                assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), (k, name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block", [256, 100, 2**70])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_the_lane_takes_8bit_steps_with_the_checked_paths_numbers(config, block, dtype):
    cls, kw = CONFIGS[config]
    lane, checked = cls(lr=0.01, state_dtype="8bit", block_size=block, **kw), cls(lr=0.01, state_dtype="8bit",
                                                                                  block_size=block, **kw)
    ps_lane, ps_checked = _params(dtype), _params(dtype)
    for t in range(4):
        grads = _grads(ps_lane, t)
        if t == 0:  # a first step makes the state: the checked path's
            assert not _lane.take(lane, ps_lane, grads)
            _checked.step(lane, ps_lane, grads)
        else:
            assert _lane.take(lane, ps_lane, grads)
        _checked.step(checked, ps_checked, grads)
        _same(_snapshot(lane, ps_lane), _snapshot(checked, ps_checked))
    assert lane.iter == 4 and all(st["step"] == 4 for st in lane.state.values())


def _started(**kw):
    opt = xopt.Adam(lr=0.01, state_dtype="8bit", **kw)
    params = _params(np.float32)
    opt.update(params, _grads(params, 0))
    return opt, params


def _read_only_codes(opt, params, grads):
    opt.state["p1"]["m"].flags.writeable = False


def _int8_codes(opt, params, grads):
    opt.state["p3"]["v"] = opt.state["p3"]["v"].view(np.int8)


def _short_absmax(opt, params, grads):
    opt.state["p2"]["m_absmax"] = opt.state["p2"]["m_absmax"][:-1]


def _float64_absmax(opt, params, grads):
    opt.state["p0"]["v_absmax"] = opt.state["p0"]["v_absmax"].astype(np.float64)


def _swapped_absmax(opt, params, grads):
    absmax = opt.state["p0"]["v_absmax"]
    opt.state["p0"]["v_absmax"] = absmax.astype(absmax.dtype.newbyteorder(">"))


def _strided_grad(opt, params, grads):
    grads["p1"] = np.asfortranarray(grads["p1"])


def _float64_grad(opt, params, grads):
    grads["p0"] = grads["p0"].astype(np.float64)


def _grad_is_a_param(opt, params, grads):
    grads["p3"] = params["p3"]


def _grad_over_codes(opt, params, grads):
    room = np.zeros(4 * N, np.uint8)
    room[:N] = opt.state["p0"]["m"]
    opt.state["p0"]["m"] = room[:N]
    grads["p0"] = room.view(np.float32)  # N float32 whose bytes hold the codes


def _one_array_twice(opt, params, grads):
    opt.state["p9"] = copy.deepcopy(opt.state["p0"])
    params["p9"], grads["p9"] = params["p0"], grads["p0"]


def _small_float64_state(opt, params, grads):  # below min_8bit_size: float state of the param's dtype
    opt.state["p4"]["v"] = opt.state["p4"]["v"].astype(np.float64)


def _small_read_only_state(opt, params, grads):
    opt.state["p5"]["m"].flags.writeable = False


def _small_with_absmax(opt, params, grads):
    opt.state["p4"]["m_absmax"] = np.ones(1, np.float32)


def _small_strided_grad(opt, params, grads):
    grads["p5"] = np.asfortranarray(grads["p5"])


def _codes_of_a_small_param(opt, params, grads):  # a state made for another size
    opt.state["p5"]["m"], opt.state["p5"]["m_absmax"] = np.zeros((3, 7), np.uint8), np.ones(1, np.float32)


def _param_grown_8bit(opt, params, grads):  # a float state under a key whose param is now 8-bit sized
    params["p4"], grads["p4"] = np.ones(N, np.float32), np.ones(N, np.float32)
    opt.state["p4"] = {"step": 1, "m": np.zeros(N, np.float32), "v": np.zeros(N, np.float32)}


def _numpy_step_count(opt, params, grads):
    opt.state["p3"]["step"] = np.int64(1)


def _counts_differ(opt, params, grads):
    opt.state["p3"]["step"] = 5


def _float64_param(opt, params, grads):
    params["p2"], grads["p2"] = params["p2"].astype(np.float64), grads["p2"].astype(np.float64)


def _amsgrad_turned_on(opt, params, grads):  # v_max is made by the checked path's step
    opt.amsgrad = True


@pytest.mark.parametrize("change", [_read_only_codes, _int8_codes, _short_absmax, _float64_absmax, _swapped_absmax,
                                    _strided_grad, _float64_grad, _grad_is_a_param, _grad_over_codes,
                                    _one_array_twice, _small_float64_state, _small_read_only_state,
                                    _small_with_absmax, _small_strided_grad, _codes_of_a_small_param,
                                    _param_grown_8bit, _amsgrad_turned_on, _numpy_step_count, _counts_differ, _float64_param])
def test_what_the_lane_refuses_it_declines_having_written_nothing(change):
    opt, params = _started()
    grads = _grads(params, 1)
    change(opt, params, grads)
    before = _snapshot(opt, params)
    assert not _lane.take(opt, params, grads)
    _same(_snapshot(opt, params), before)
    # and the checked path takes it as it did, or refuses it naming the culprit, having written nothing
    other, ps_other, grads_other = copy.deepcopy((opt, params, grads))
    try:
        opt.update(params, grads)
    except (TypeError, ValueError):
        _same(_snapshot(opt, params), before)
        return
    _checked.step(other, ps_other, grads_other)
    _same(_snapshot(opt, params), _snapshot(other, ps_other))


@pytest.mark.parametrize("kw", [dict(clip_grad_norm=1.0), dict(skip_nonfinite=True), dict(impl="reference")])
def test_clipped_skipping_and_reference_steps_are_the_checked_paths(kw):
    opt, params = _started(**kw)
    assert not _lane.take(opt, params, _grads(params, 1))
    assert opt.iter == 1


def test_a_step_over_threads_is_the_checked_paths():
    old = xopt.get_num_threads()
    xopt.set_num_threads(2)
    try:
        opt = xopt.Adam(state_dtype="8bit")
        params = {"w": np.ones(PARALLEL_MIN, np.float32), "b": np.ones(N, np.float32)}
        opt.update(params, {k: np.ones_like(v) for k, v in params.items()})
        assert not _lane.take(opt, params, {k: np.ones_like(v) for k, v in params.items()})
        xopt.set_num_threads(1)
        assert _lane.take(opt, params, {k: np.ones_like(v) for k, v in params.items()})
    finally:
        xopt.set_num_threads(old)


def test_a_list_of_params_and_a_schedule_take_the_lane():
    lane = xopt.Adam(lr=lambda t: 0.01 / (1 + t), state_dtype="8bit")
    checked = xopt.Adam(lr=lambda t: 0.01 / (1 + t), state_dtype="8bit")
    ps_lane, ps_checked = list(_params(np.float32).values()), list(_params(np.float32).values())
    for t in range(3):
        grads = list(_grads(dict(enumerate(ps_lane)), t).values())
        assert _lane.take(lane, ps_lane, grads) == (t > 0)
        if t == 0:
            _checked.step(lane, ps_lane, grads)
        _checked.step(checked, ps_checked, grads)
    for a, b in zip(ps_lane, ps_checked):
        assert a.tobytes() == b.tobytes()
    assert all(np.array_equal(lane.state[i][n], checked.state[i][n]) for i in lane.state for n in lane.state[i])


@pytest.mark.parametrize("overrides, one_group", [({"p*": {"lr": 0.02}}, True), ({"p1": {"lr": 0.02}}, False)])
def test_overrides_of_one_group_take_the_lane_and_of_two_the_checked_path(overrides, one_group):
    lane = xopt.Adam(lr=0.01, state_dtype="8bit", overrides=overrides)
    checked = xopt.Adam(lr=0.01, state_dtype="8bit", overrides=overrides)
    ps_lane, ps_checked = _params(np.float32), _params(np.float32)
    for t in range(3):
        grads = _grads(ps_lane, t)
        took = _lane.take(lane, ps_lane, grads)
        assert took == (one_group and t > 0)
        if not took:
            _checked.step(lane, ps_lane, grads)
        _checked.step(checked, ps_checked, grads)
        _same(_snapshot(lane, ps_lane), _snapshot(checked, ps_checked))


TEN = [(N,), (64, 128), *[(N,)] * 4, (64, 128), (N,), (10,), (3, 7)]  # the 7th (p6): what each change below spoils


def _strided_codes(opt, params, grads):
    room = np.zeros((64, 256), np.uint8)
    room[:, ::2] = opt.state["p6"]["m"]
    opt.state["p6"]["m"] = room[:, ::2]


def _fortran_codes(opt, params, grads):
    opt.state["p6"]["v"] = np.asfortranarray(opt.state["p6"]["v"])


def _long_absmax(opt, params, grads):  # one block more
    opt.state["p6"]["v_absmax"] = np.append(opt.state["p6"]["v_absmax"], np.float32(1))


def _unaligned_absmax(opt, params, grads):
    absmax = opt.state["p6"]["m_absmax"]
    room = np.zeros(4 * absmax.size + 1, np.uint8)
    moved = room[1:].view(np.float32)
    moved[:] = absmax
    opt.state["p6"]["m_absmax"] = moved


def _absmax_over_its_codes(opt, params, grads):  # the absmax's bytes are the last codes'
    codes, absmax = opt.state["p6"]["m"], opt.state["p6"]["m_absmax"]
    room = np.zeros(codes.size + 4 * absmax.size, np.uint8)
    room[:codes.size] = codes.reshape(-1)
    opt.state["p6"]["m"] = room[:codes.size].reshape(codes.shape)
    opt.state["p6"]["m_absmax"] = room[codes.size - 8:codes.size - 8 + 4 * absmax.size].view(np.float32)


def _codes_of_another_param(opt, params, grads):
    opt.state["p6"]["m"] = opt.state["p1"]["m"]


def _absmax_of_another_param(opt, params, grads):
    opt.state["p6"]["v_absmax"] = opt.state["p1"]["v_absmax"]


def _grad_in_another_param(opt, params, grads):
    grads["p7"] = params["p6"].reshape(-1)[:N]


def _param_over_another_param(opt, params, grads):
    both = np.concatenate([params["p5"], params["p6"].reshape(-1)])
    params["p5"], params["p6"] = both[:N], both[N - 1:N - 1 + 64 * 128].reshape(64, 128)


def _bool_step_counts(opt, params, grads):
    for st in opt.state.values():
        st["step"] = True


@pytest.mark.parametrize("change", [_strided_codes, _fortran_codes, _long_absmax, _unaligned_absmax,
                                    _absmax_over_its_codes, _codes_of_another_param, _absmax_of_another_param,
                                    _grad_in_another_param, _param_over_another_param, _bool_step_counts])
def test_a_refusal_in_the_middle_of_a_list_writes_nothing_and_the_step_is_the_references(change):
    opt = xopt.Adam(lr=0.01, state_dtype="8bit")
    params = _params(np.float32, shapes=TEN)
    for t in range(2):
        opt.update(params, _grads(params, t))
    grads = _grads(params, 2)
    change(opt, params, grads)
    before = _snapshot(opt, params)
    assert not _lane.take(opt, params, grads)
    _same(_snapshot(opt, params), before)
    reference, ps_reference, grads_reference = copy.deepcopy((opt, params, grads))
    reference.impl = "reference"
    try:
        opt.update(params, grads)
    except (TypeError, ValueError):  # the checked path names the culprit, having written nothing
        _same(_snapshot(opt, params), before)
        return
    reference.update(ps_reference, grads_reference)
    _same(_snapshot(opt, params), _snapshot(reference, ps_reference))


def test_a_misaligned_absmax_is_stepped_once_by_the_checked_path_then_by_the_lane():
    # the checked path steps it as an aligned copy, kept: the lane takes the steps after (it declined for good)
    opt = xopt.Adam(lr=0.01, state_dtype="8bit")
    params = _params(np.float32, shapes=TEN)
    for t in range(2):
        opt.update(params, _grads(params, t))
    _unaligned_absmax(opt, params, None)
    assert not _lane.take(opt, params, _grads(params, 2))
    reference, ps_reference = copy.deepcopy((opt, params))
    reference.impl = "reference"
    for t in (2, 3):
        grads = _grads(params, t)
        if t == 3:
            assert opt.state["p6"]["m_absmax"].flags.aligned and _lane.take(opt, params, grads)
        else:
            opt.update(params, grads)
        reference.update(ps_reference, grads)
        _same(_snapshot(opt, params), _snapshot(reference, ps_reference))


def test_two_threads_stepping_one_optimizer_take_turns():
    import threading

    lane, checked = xopt.Adam(lr=0.01, state_dtype="8bit"), xopt.Adam(lr=0.01, state_dtype="8bit")
    ps_lane, ps_checked = _params(np.float32), _params(np.float32)
    grads = _grads(ps_lane, 0)  # the same grads each step: the turns' order does not change the numbers
    lane.update(ps_lane, grads)

    def steps():
        for _ in range(10):
            lane.update(ps_lane, grads)

    threads = [threading.Thread(target=steps) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for _ in range(21):
        _checked.step(checked, ps_checked, grads)
    _same(_snapshot(lane, ps_lane), _snapshot(checked, ps_checked))
    assert lane.iter == 21
