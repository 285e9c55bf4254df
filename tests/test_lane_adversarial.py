"""Adversarial inputs to the default ``update`` path on NumPy arrays and numbers, each next to a twin.

Each test gives the default path (the exact-type lane, the fused CPU kernel, the checked path it falls
back to) and a twin with ``impl="reference"`` the same calls on copies of the same values, and asks for
the twin's numbers bit for bit, or the twin's error with nothing written.
"""

from __future__ import annotations

import copy
import os
import tempfile
import types

import numpy as np
import pytest

import xopt

_SIDES = ("auto", "reference")


def _values(params):
    """What a step changed, comparable: each param's type and value."""
    items = params.items() if isinstance(params, dict) else enumerate(params)
    return {k: (type(v).__name__, np.asarray(v).dtype.str, np.asarray(v).tobytes()) for k, v in items}


def _state(opt):
    return {k: {n: (b if n == "step" else (np.asarray(b).dtype.str, np.asarray(b).tobytes())) for n, b in st.items()}
            for k, st in opt.state.items() if isinstance(st, dict)}


def _snapshot(opt, params):
    return _values(params), _state(opt), opt.iter, opt.skipped_steps, opt.last_grad_norm


def _twins(cls, kw, params, grad_steps):
    """Both sides stepped through ``grad_steps`` (each a function of the side's params giving its grads)
    on copies of ``params``; their snapshots, asked to be equal."""
    shots = {}
    for side in _SIDES:
        opt, p = cls(impl=side, **kw), copy.deepcopy(params)
        for grads_of in grad_steps:
            opt.update(p, grads_of(p))
        shots[side] = _snapshot(opt, p)
    assert shots["auto"] == shots["reference"]
    return shots["auto"]


# -- found: a number grad for a float param that follows an array param ------------------------------
@pytest.mark.parametrize("container", ["dict", "list"])
@pytest.mark.parametrize("grad", [np.float32(0.25), 3, 0.5], ids=["f32-scalar", "int", "float"])
def test_float_params_after_an_array_param_take_number_grads(container, grad, rng):
    """A Python float param after an array one, and a number grad: the lane's conversion of number grads
    read ``p.ndim`` of the float (AttributeError) where the checked path boxes the float and steps it."""
    values = [rng.standard_normal(4), 0.75, np.float64(-1.5), np.array(2.0)]
    params = values if container == "list" else dict(zip("abcd", values))
    g = [rng.standard_normal(4), grad, grad, grad]
    grads = g if container == "list" else dict(zip("abcd", g))
    for cls, kw in ((xopt.Adam, {}), (xopt.SGD, dict(momentum=0.9)), (xopt.AdaGrad, dict(lr_decay=0.01))):
        got = _twins(cls, kw, params, [lambda p: grads] * 3)
        assert got[2] == 3 and all(st["step"] == 3 for st in got[1].values())
        assert got[0][1 if container == "list" else "b"][0] == "float"


# -- found: a state that is not a dict -------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda st: None, lambda st: [st["step"]], types.MappingProxyType],
                         ids=["None", "list", "read-only-mapping"])
def test_a_state_that_is_not_a_dict_is_refused_naming_its_param(make, rng):
    """A param's state replaced by something other than a dict.  A read-only mapping (a mappingproxy) passed
    every check: the kernel (or the reference's writes) ran, then the commit could not set its step count,
    leaving params and buffers stepped, the count and ``iter`` not; None and a list raised AttributeError or
    'argument of type NoneType is not iterable', naming no param."""
    params = {"a": rng.standard_normal(5), "b": rng.standard_normal(3)}
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    for side in _SIDES:
        opt, p = xopt.Adam(impl=side), copy.deepcopy(params)
        opt.update(p, grads)
        opt.state["a"] = make(opt.state["a"])
        before = _values(p), _state(opt), opt.iter
        with pytest.raises(TypeError, match=r"param 'a': its optimizer state is .*a dict"):
            opt.update(p, grads)
        assert (_values(p), _state(opt), opt.iter) == before, side
        # state_dict() and save() name it too (they raised AttributeError or TypeError from deep in a copy)
        with pytest.raises(TypeError, match=r"param 'a': its optimizer state is .*a dict"):
            opt.state_dict()
        with tempfile.TemporaryDirectory() as tmp:
            with pytest.raises(TypeError, match=r"param 'a': its optimizer state is .*a dict"):
                opt.save(os.path.join(tmp, "s.npz"))
            assert os.listdir(tmp) == []


# -- found: a NumPy step count at its type's maximum -----------------------------------------------------
@pytest.mark.parametrize("count", [np.int8(127), np.uint8(255), np.int16(32767), np.int32(2**31 - 1)],
                         ids=["int8", "uint8", "int16", "int32"])
@pytest.mark.parametrize("cls, kw", [(xopt.Adam, {}), (xopt.AdaGrad, dict(lr_decay=0.01)), (xopt.RAdam, {})],
                         ids=["Adam", "AdaGrad-lr_decay", "RAdam"])
def test_a_numpy_step_count_at_its_maximum_steps_as_the_int_count(count, cls, kw, rng):
    """The checked path took a step's scalars at ``state["step"] + 1`` in the count's own type: np.int8(127)
    wrapped to -128 (Adam: 'math domain error'; AdaGrad: a silently wrong lr), np.uint8(255) to 0.  The
    step is the count + 1 whatever int type holds it: the numbers of a Python int count, counted to it + 1."""
    params = {"a": rng.standard_normal(6), "b": np.array(rng.standard_normal())}
    grads = [{k: rng.standard_normal(np.shape(v)) for k, v in params.items()} for _ in range(2)]
    shots = {}
    for side, make in (("auto", type(count)), ("reference", type(count)), ("int", int)):
        opt, p = cls(impl="reference" if side == "reference" else "auto", **kw), copy.deepcopy(params)
        opt.update(p, grads[0])
        for st in opt.state.values():
            st["step"] = make(count)
        opt.update(p, grads[1])
        shots[side] = _snapshot(opt, p)
    assert shots["auto"] == shots["int"] and shots["reference"] == shots["int"]
    assert all(st["step"] == int(count) + 1 for st in shots["int"][1].values())


# -- found: overrides checked before the containers --------------------------------------------------------
@pytest.mark.parametrize("params", [5, None, np.ones(3), "ab", {"a", "b"}], ids=["int", "None", "array", "str", "set"])
@pytest.mark.parametrize("side", _SIDES)
def test_a_call_that_is_not_a_dict_or_list_gets_the_container_error_under_overrides(params, side):
    """With overrides, the patterns were checked before the containers: an array passed as params got 'overrides
    pattern 'w*' matches no param (the params are [0], [1], [2])', an int 'object of type 'int' has no len()'.
    The error is the one without overrides: params must be a dict, a list or a tuple."""
    with pytest.raises(TypeError) as plain:
        xopt.Adam(impl=side).update(params, params)
    assert "params must be a dict" in str(plain.value)
    opt = xopt.Adam(impl=side, overrides={"w*": {"lr": 0.1}})
    with pytest.raises(TypeError) as got:
        opt.update(params, params)
    assert str(got.value) == str(plain.value)
    assert (opt.iter, opt.state, opt._patterns_checked) == (0, {}, False)


# -- found: a NumPy scalar param that is not a float, with a number grad ----------------------------------
@pytest.mark.parametrize("param", [np.int64(3), np.complex128(1 + 1j), np.bool_(True), np.int8(1)],
                         ids=["int64", "complex128", "bool", "int8"])
@pytest.mark.parametrize("grad", [1.0, 2], ids=["float", "int"])
@pytest.mark.parametrize("side", _SIDES)
def test_a_numpy_scalar_param_that_is_no_float_is_named_as_the_culprit(param, grad, side, rng):
    """np.int64(3) as a param with the grad 1.0 was refused as 'grad of param 'b' is not an array (got float)':
    the NumPy scalar passed as an array and the grad was blamed.  A Python int param gets 'param ... is not an
    array'; so does a NumPy scalar that is not a float (the float ones are stepped as numbers)."""
    params = {"a": rng.standard_normal(3), "b": param}
    opt, before = xopt.Adam(impl=side), params["a"].copy()
    with pytest.raises(TypeError, match=rf"^param 'b' is not an array \(got {type(param).__name__}\)"):
        opt.update(params, {"a": rng.standard_normal(3), "b": grad})
    assert params["b"] is param and np.array_equal(params["a"], before) and (opt.state, opt.iter) == ({}, 0)


# -- found: state buffers of ndarray subclasses --------------------------------------------------------------
@pytest.mark.parametrize("side", _SIDES)
def test_a_masked_state_buffer_is_refused_as_a_masked_param_is(side, rng):
    """A masked array put in the state: the fused path stepped its data, masked values too (a copy), the
    reference the masked array (its masked elements left as they were): two different params from one call.
    Masked params and grads are refused on every path; so is a masked buffer, before any write."""
    params = {"W": rng.standard_normal(4)}
    grads = {"W": rng.standard_normal(4)}
    opt = xopt.Adam(impl=side)
    opt.update(params, grads)
    opt.state["W"]["m"] = np.ma.masked_array(opt.state["W"]["m"], mask=[0, 1, 0, 0])
    before = params["W"].copy(), opt.state["W"]["v"].copy(), opt.state["W"]["step"], opt.iter
    with pytest.raises(TypeError, match=r"param 'W': its optimizer state 'm' is a NumPy masked array"):
        opt.update(params, grads)
    assert np.array_equal(params["W"], before[0]) and np.array_equal(opt.state["W"]["v"], before[1])
    assert (opt.state["W"]["step"], opt.iter) == before[2:]


def test_a_memmap_state_buffer_is_written_in_place_with_the_reference_numbers(tmp_path, rng):
    """A state buffer kept in a np.memmap (C order, native, writable): the reference writes it in place; the
    fused path replaced it by an in-memory copy at its first step, so the file (and any other reference to the
    map) stopped following the state.  The docs replace only read-only, byte-swapped or strided buffers."""
    params = {"W": rng.standard_normal((5, 3)), "b": rng.standard_normal(3)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(4)]
    shots, maps = {}, {}
    for side in _SIDES:
        opt, p = xopt.Adam(impl=side, amsgrad=True), copy.deepcopy(params)
        opt.update(p, grads[0])
        maps[side] = np.memmap(tmp_path / f"{side}.dat", dtype=np.float64, mode="w+", shape=(5, 3))
        maps[side][...] = opt.state["W"]["v"]
        opt.state["W"]["v"] = maps[side]
        for g in grads[1:]:
            opt.update(p, g)
        assert opt.state["W"]["v"] is maps[side], side
        shots[side] = _snapshot(opt, p)
    assert shots["auto"] == shots["reference"]
    assert np.array_equal(maps["auto"], maps["reference"]) and shots["auto"][1]["W"]["step"] == 4



@pytest.mark.parametrize("cls", [xopt.Adam, xopt.LAMB], ids=["Adam", "LAMB"])
def test_impl_fused_names_a_memmap_param_as_the_reason_it_refuses(cls, tmp_path, rng):
    """impl='fused' refused a float64 np.memmap param as 'no fused kernel takes param 'W', a numpy array of
    float64 ...; the CPU kernels take NumPy ... float64 arrays': the reason given was no reason.  It names the
    subclass; np.asarray of the map steps in the kernel, in place, with the reference numbers."""
    start, grad = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    mapped = np.memmap(tmp_path / "W.dat", dtype=np.float64, mode="w+", shape=(4, 3))
    mapped[...] = start
    opt = cls(impl="fused")
    with pytest.raises(TypeError, match=r"param 'W' is a numpy\.memmap, a subclass of numpy\.ndarray"):
        opt.update({"W": mapped}, {"W": grad})
    assert np.array_equal(mapped, start) and (opt.state, opt.iter) == ({}, 0)
    opt.update({"W": np.asarray(mapped)}, {"W": grad})
    twin = {"W": start.copy()}
    cls(impl="reference").update(twin, {"W": grad})
    assert np.asarray(mapped).tobytes() == twin["W"].tobytes()



# -- found: a growing exponential schedule past the largest float --------------------------------------------
@pytest.mark.parametrize("side", _SIDES)
def test_a_growing_exponential_schedule_stays_at_its_ceiling_at_any_count(side):
    """exponential_decay(1e-4, 10, 2.0, end_value=0.1): the lr doubles every 10 steps up to the ceiling 0.1.
    From count 10240 on, 2.0 ** 1024 overflowed Python's float and the step raised OverflowError '(34, Numerical
    result out of range)', naming nothing, where optax's is the ceiling.  Without a ceiling, the infinite lr is
    refused as any non-finite lr is, naming the count, before any write."""
    capped = xopt.schedules.exponential_decay(1e-4, 10, 2.0, end_value=0.1)
    assert [capped(c) for c in (0, 10, 100, 10240, 20000, 2**62)] == [1e-4, 2e-4, 0.1, 0.1, 0.1, 0.1]
    opt, params = xopt.SGD(lr=capped, impl=side), {"a": np.ones(3)}
    opt.update(params, {"a": np.ones(3)})
    opt.state["a"]["step"] = 20000
    opt.update(params, {"a": np.full(3, 0.5)})
    assert params["a"].tolist() == [1.0 - 1e-4 - 0.1 * 0.5] * 3 and opt.state["a"]["step"] == 20001
    opt.lr = xopt.schedules.exponential_decay(1e-4, 10, 2.0)
    with pytest.raises(ValueError, match=r"lr at count 20001 .* must be finite, got inf"):
        opt.update(params, {"a": np.ones(3)})
    assert params["a"].tolist() == [1.0 - 1e-4 - 0.05] * 3 and opt.state["a"]["step"] == 20001



# -- found: the reference's norms of 0-d float32 params ------------------------------------------------------
def test_the_squared_norm_of_a_numpy_scalar_is_taken_in_float64():
    """Arithmetic on 0-d arrays gives NumPy scalars: LAMB's update u of a 0-d param is one.  The norms are
    defined in float64 (x² exact for float32 x), but a scalar was not taken for a host array and was squared in
    its own float32."""
    from xopt import _norms

    x = np.float32(3.3333333) / np.float32(1.1)
    assert _norms.squared_norm(np, x) == float(np.float64(x)) ** 2 != float(x * x)


@pytest.mark.parametrize("cls, kw", [(xopt.LAMB, dict(lr=0.04, weight_decay=0.1)), (xopt.Adafactor, dict(lr=0.04))],
                         ids=["LAMB", "Adafactor"])
@pytest.mark.parametrize("make", [np.float32, lambda x: np.array(x, np.float32), lambda x: np.array(x, np.float16)],
                         ids=["f32-scalar", "f32-0d", "f16-0d"])
def test_0d_float32_params_of_a_norm_rule_give_the_reference_numbers(cls, kw, make, rng):
    """A thousand 0-d params in one call, 3 steps: the reference's trust ratio (LAMB) read the update's norm
    squared in float32, the fused kernel's in float64: about 1 param in 300 a float32 ulp apart."""
    params = {f"p{i}": make(x) for i, x in enumerate(rng.standard_normal(1000))}
    grads = [{k: np.float32(x) for k, x in zip(params, rng.standard_normal(1000))} for _ in range(3)]
    _twins(cls, kw, params, [lambda p, g=g: g for g in grads])


# -- held: number params with every training feature ---------------------------------------------------------
_ORDERS = {"numbers-first": ["f", "s32", "s64", "w", "z"], "array-first": ["w", "f", "z", "s64", "s32"],
           "numbers-only": ["f", "s64", "g"]}  # the last all float64 numbers: the lane's boxes take the step


@pytest.mark.parametrize("cls, kw", [
    (xopt.Adam, dict(amsgrad=True, weight_decay=0.01, clip_grad_norm=0.5, skip_nonfinite=True)),
    (xopt.SGD, dict(lr=xopt.schedules.linear_schedule(0.1, 0.0, 5), momentum=0.9, nesterov=True, skip_nonfinite=True)),
    (xopt.RMSprop, dict(centered=True, momentum=0.5, clip_grad_norm=1e-3, overrides={"s64": {"lr": 0.1}})),
    (xopt.LAMB, dict(clip_grad_norm=1.0, overrides={"f": {"weight_decay": 0.0}})),
], ids=["Adam-amsgrad-clip-skip", "SGD-schedule-nesterov-skip", "RMSprop-centered-overrides", "LAMB-overrides"])
@pytest.mark.parametrize("order", list(_ORDERS))
@pytest.mark.parametrize("container", ["dict", "list"])
def test_number_and_array_params_at_different_counts_give_the_reference_numbers(cls, kw, order, container, rng):
    """Python floats, NumPy float scalars, 0-d and n-d arrays in one call (or numbers alone), their counts
    apart (a None grad leaves one behind, a reset sends one back), a step with a NaN grad, number grads of every
    kind: the reference twin's params (rebound as the same types), state, counts, iter, skips and clip norm,
    bit for bit."""
    names = _ORDERS[order]
    if container == "list" and "overrides" in kw:
        kw = dict(kw, overrides={names.index(next(iter(kw["overrides"]))): dict(*kw["overrides"].values())})
    start = {"f": 0.75, "g": -2.5, "s32": np.float32(-0.5), "s64": np.float64(1.25), "w": rng.standard_normal((3, 2)),
             "z": np.array(0.3)}
    grads = {"f": [0.5, -1.0, np.nan, 0.25, 1.0], "g": [1.0, None, 0.5, 2, np.float64(0.5)],
             "s32": [np.float32(0.25), 0.5, 1.0, None, 2.0], "s64": [2, np.float32(1.5), 1.0, -0.75, -3.0],
             "w": [None, *(rng.standard_normal((3, 2)) for _ in range(4))], "z": [np.float64(-1.0), 3, 1.0, np.float32(0.5), 0.125]}
    params = [start[k] for k in names] if container == "list" else {k: start[k] for k in names}
    reset = names.index("s64") if container == "list" else "s64"
    shots = {}
    for side in _SIDES:
        opt, p = cls(impl=side, **kw), copy.deepcopy(params)
        for i in range(5):
            if i == 3:
                opt.state[reset]["step"] = 0
            row = [grads[k][i] for k in names]
            opt.update(p, row if container == "list" else dict(zip(names, row)))
        shots[side] = _snapshot(opt, p)
    assert shots["auto"] == shots["reference"]
    assert [v[0] for v in shots["auto"][0].values()] == [type(start[k]).__name__ for k in names]
    assert len({st["step"] for st in shots["auto"][1].values()}) > 1  # the counts did drift apart


# -- found: a Python int grad too large for a float ------------------------------------------------------
@pytest.mark.parametrize("b", [lambda: np.array(2.0), lambda: 2.0, lambda: np.ones(2)], ids=["0-d", "float", "array"])
def test_an_int_grad_too_large_for_a_float_is_refused_naming_its_param(b, rng):
    """``10**400`` as a grad raised a bare OverflowError ('int too large to convert to float') from the
    conversion to a 0-d array, naming no param."""
    for side in _SIDES:
        opt, p = xopt.Adam(impl=side), {"a": np.array(1.0), "b": b()}
        opt.update(p, {"a": 0.5, "b": np.full(np.shape(p["b"]), 0.5)})
        before = _values(p), _state(opt), opt.iter
        with pytest.raises(ValueError, match=r"grad of param 'b' is an int too large for float64 \(1329 bits\)"):
            opt.update(p, {"a": 0.5, "b": 10**400})
        assert (_values(p), _state(opt), opt.iter) == before, side


# -- found: a state dict whose own __setitem__ is Python -------------------------------------------------
class _Refusing(dict):
    def __setitem__(self, key, value):
        raise RuntimeError("a write through the subclass")


@pytest.mark.parametrize("cls, kw", [(xopt.Adam, {}), (xopt.SGD, dict(momentum=0.9))], ids=["Adam", "SGD-momentum"])
def test_a_state_in_a_dict_subclass_is_written_as_a_dict(cls, kw, rng):
    """A param's state in a dict subclass whose ``__setitem__`` raises: the commit's write of the step count went
    through it after the kernel had written the param and buffers (a half-done step), and a Python
    ``__setitem__`` is a point where a signal handler can run.  The state is written with ``dict.__setitem__``:
    the step is whole, and its numbers are a plain dict's."""
    params = {"a": rng.standard_normal(5), "b": rng.standard_normal((2, 3)).astype(np.float32)}
    grads = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}
    for side in ("auto", "reference", "fused"):
        shots = []
        for wrap in (dict, _Refusing):
            opt, p = cls(impl=side, **kw), copy.deepcopy(params)
            opt.update(p, grads)
            for k in list(opt.state):
                opt.state[k] = wrap(opt.state[k])
            opt.update(p, grads)
            shots.append((_values(p), _state(opt), opt.iter))
        assert shots[0] == shots[1], side
        assert all(st["step"] == 2 for st in shots[1][1].values())


# -- found: an array whose elements share memory ---------------------------------------------------------
@pytest.mark.parametrize("where", ["param", "state"])
@pytest.mark.parametrize("side", ("auto", "reference", "fused"))
def test_an_array_that_overlaps_itself_is_refused_and_nothing_is_written(where, side):
    """A param or state buffer made with ``as_strided`` whose elements share memory (a zero stride) was stepped:
    each path wrote the shared element several times, the last write winning, and the paths disagreed (the
    fused path stepped a copy of a state buffer and replaced it, the reference wrote through it)."""
    from numpy.lib.stride_tricks import as_strided

    base, p = np.zeros(3), np.ones(4)
    opt = xopt.Adam(impl=side)
    opt.update({"w": p}, {"w": np.ones(4)})
    shared = as_strided(base, shape=(4,), strides=(0,), writeable=True)
    if where == "param":
        p = shared
    else:
        opt.state["w"]["m"] = shared
    before = base.tobytes(), p.tobytes(), _state(opt), opt.iter
    label = "param 'w'" if where == "param" else "optimizer state 'm' of param 'w'"
    with pytest.raises(ValueError, match=f"{label} overlaps itself"):
        opt.update({"w": p}, {"w": np.arange(4.0)})
    assert (base.tobytes(), p.tobytes(), _state(opt), opt.iter) == before


def test_strided_layouts_whose_elements_do_not_meet_are_stepped_as_copies(rng):
    """The refusal above is exact: interleaved strides (offsets i*16 + j*24: no two elements meet, though the
    dims' spans cross), a transpose and a slice step as their contiguous copies do."""
    from numpy.lib.stride_tricks import as_strided

    views = [lambda b: as_strided(b, shape=(3, 2), strides=(16, 24), writeable=True),
             lambda b: b[:16].reshape(4, 4).T, lambda b: b[::3]]
    for view in views:
        base = rng.standard_normal(64)
        p, g = view(base), rng.standard_normal(view(base).shape)
        twin = p.copy()
        opt, ref = xopt.Adam(), xopt.Adam()
        for _ in range(2):
            opt.update({"w": p}, {"w": g})
            ref.update({"w": twin}, {"w": g})
        np.testing.assert_array_equal(p, twin)


def test_a_torch_param_that_overlaps_itself_is_refused():
    torch = pytest.importorskip("torch")
    p = torch.zeros(1, dtype=torch.float64).expand(4)
    with pytest.raises(ValueError, match="param 'w' overlaps itself"):
        xopt.SGD(lr=0.1).update({"w": p}, {"w": torch.arange(4.0, dtype=torch.float64)})
    assert float(p[0]) == 0.0
