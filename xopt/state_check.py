"""Checking a state_dict for an optimizer: whole, before anything of the optimizer changes.

What a state may hold: the buffers of *any* configuration of its optimizer, not
only of the current hyperparameters.  Turning ``amsgrad`` (or SGD's momentum,
RMSprop's ``centered`` or momentum) off keeps the buffer that option made, as
torch.optim does, and turning an option on mid-run leaves the new buffer to be
made at the next step; both states save and load.  A buffer that no
configuration of the optimizer keeps is refused.  Files: :mod:`xopt.state_io`.
"""

from __future__ import annotations

import itertools
import numbers
import threading
import types
from collections.abc import Mapping

import array_api_compat
import numpy as np

from . import _backend, _pages, state_8bit
from ._hyper import Hyper
from ._inputs import describe
from .schedules import Schedule

__all__ = ["checked_state", "SavedCustomSchedule"]

_INT64_MAX = 2**63 - 1
_STORAGE = ("state_dtype", "block_size", "min_8bit_size")  # how the state is stored, not what the rule computes


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({len(text)} characters)"


def _count(what, value) -> int:
    """A step count: a Python (or NumPy) integer, not a bool, in [0, 2**63)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be a non-negative integer, got {_short(value)} ({type(value).__name__})")
    value = int(value)
    if not 0 <= value <= _INT64_MAX:
        raise ValueError(f"{what} must be a non-negative integer below 2**63, got {_short(value)}")
    return value


def _param_arrays(params):
    if isinstance(params, Mapping):
        return dict(params.items())
    if isinstance(params, (list, tuple)):
        return dict(enumerate(params))
    raise TypeError(f"params must be a dict, a list or a tuple, got {type(params).__name__}")


# -- which buffers an optimizer can hold ------------------------------------------------
_BUFFER_SETS = {}  # (optimizer class, the values that are not varied) -> (always, possible), the newest last
_BUFFER_SETS_MAX = 64  # entries kept: the oldest goes first; a miss costs one scratch optimizer per combination
_BUFFER_SETS_LOCK = threading.Lock()
_SCHEDULE = object()  # what a schedule (a callable lr) is in a key: any schedule keeps the buffers any other does


def _buffer_sets(opt):
    """(always, possible): the buffers every configuration of type(opt) keeps, and those some configuration keeps.

    Found by asking ``buffers()`` of a scratch optimizer for every combination of
    its flags and of zero / non-zero for its numeric hyperparameters (``buffers()``
    depends on which options are on).  Other hyperparameters keep ``opt``'s value.
    Remembered for the last :data:`_BUFFER_SETS_MAX` classes and fixed values, a schedule
    counting as any schedule, so the memory stays bounded however many optimizers are seen.
    """
    cls = type(opt)
    choices = {}
    for name, value in opt.hyperparameters().items():
        if isinstance(value, bool):
            choices[name] = (False, True)
        elif isinstance(value, float):
            check = getattr(cls, name).check if isinstance(getattr(cls, name, None), Hyper) else None
            nonzero = next((x for x in (0.5, 0.9, 1e-3, 1.0, 2.0) if _valid(check, name, x)), None)
            choices[name] = (0.0,) if nonzero is None else (0.0, nonzero)
        else:
            choices[name] = (value,)
    key = (cls, tuple((n, _SCHEDULE if callable(c[0]) else c[0]) for n, c in choices.items() if len(c) == 1))
    try:
        with _BUFFER_SETS_LOCK:
            found = _BUFFER_SETS.pop(key, None)
            if found is not None:
                _BUFFER_SETS[key] = found  # the newest again
                return found
    except TypeError:  # a hyperparameter value that cannot be hashed: found afresh, not remembered
        key = None
    sets = [frozenset(opt.buffers())]
    names = list(choices)
    for combo in itertools.product(*(choices[n] for n in names)):
        try:
            scratch = cls.fresh(impl="reference", **dict(zip(names, combo)))
        except (TypeError, ValueError):  # a combination the optimizer refuses (nesterov without momentum)
            continue
        sets.append(frozenset(scratch.buffers()))
    found = (frozenset.intersection(*sets), frozenset.union(*sets))
    if key is not None:
        with _BUFFER_SETS_LOCK:
            _BUFFER_SETS[key] = found
            while len(_BUFFER_SETS) > _BUFFER_SETS_MAX:
                del _BUFFER_SETS[next(iter(_BUFFER_SETS))]
    return found


def _valid(check, name, value) -> bool:
    if check is None:
        return True
    try:
        check(name, value)
    except (TypeError, ValueError):
        return False
    return True


# -- checking a state_dict ---------------------------------------------------------------
def _names_taken(cls):
    """The optimizer names whose states ``cls`` loads: its own, and for a user's subclass, that of the xopt
    optimizer it derives from (its rule and buffers; ``class MyAdam(xopt.Adam)`` loads an Adam's state).
    Two of xopt's own optimizers never load each other's (AdamW derives from Adam but is another rule)."""
    builtin = next((c for c in cls.__mro__ if c.__module__.startswith("xopt.optimizers.")), cls)
    return {cls.__name__, builtin.__name__}


def _native(buf):
    """``buf`` in native byte order (a kernel reads raw bytes), a fresh copy."""
    dtype = buf.dtype
    if isinstance(buf, np.ndarray):
        return _pages.copy(buf)
    if isinstance(dtype, np.dtype) and not dtype.isnative:  # Dask arrays carry NumPy dtypes too
        return buf.astype(dtype.newbyteorder("="))
    return _backend.namespace(buf).asarray(buf, copy=True)


def checked_state(opt, state_dict, params=None, *, copy=True):
    """Validate ``state_dict`` for ``opt`` as a whole; return (hyperparameters, overrides, state, (iter, skipped)).

    Nothing of ``opt`` is touched here, so a misfit leaves it as it was.  The state's buffers are copies
    (C order, native byte order), unless ``copy`` is False: then the caller vouches that every NumPy buffer
    is memory of its own, C-contiguous and writeable (what :func:`~xopt.state_io.load_state` makes and
    nothing else holds), and a NumPy buffer in native byte order is taken as it is.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    missing = {"optimizer", "hyperparameters", "iter", "skipped_steps", "state"} - set(state_dict)
    if missing:
        raise KeyError(f"state_dict lacks {', '.join(sorted(missing))}")
    kind = type(opt).__name__
    if state_dict["optimizer"] not in _names_taken(type(opt)):
        raise ValueError(f"state_dict is for {state_dict['optimizer']}, not {kind}")
    if not isinstance(state_dict["hyperparameters"], Mapping):
        raise TypeError(f"state_dict['hyperparameters'] must be a dict, got "
                        f"{type(state_dict['hyperparameters']).__name__}")
    hyper = dict(state_dict["hyperparameters"])
    hyper.setdefault("clip_grad_norm", opt.clip_grad_norm)  # saved before it existed: the optimizer's own
    if "state_dtype" in opt._hyper:  # saved before the optimizer had a state_dtype: its state is in float
        hyper.setdefault("state_dtype", None)
    for name in _STORAGE[1:]:  # saved before 8-bit state existed (its state is not 8-bit): the optimizer's own
        if name in opt._hyper:
            hyper.setdefault(name, opt._hyper[name])
    saved_block = hyper.get("block_size")
    if "8bit" in (hyper.get("state_dtype"), opt._hyper.get("state_dtype")):
        # 8-bit state on either side: the optimizer keeps its own storage and the state converts to it
        hyper.update({name: opt._hyper[name] for name in _STORAGE if name in opt._hyper})
    expected = set(opt._hyper)
    if set(hyper) != expected:
        raise ValueError(f"state_dict hyperparameters do not fit {kind}: missing "
                         f"{sorted(expected - set(hyper))}, unknown {sorted(set(hyper) - expected, key=str)}")
    hyper = {k: _own_schedule(v, opt._hyper.get(k), k) for k, v in hyper.items()}
    overrides = state_dict.get("overrides")
    if overrides is None:  # a state made before overrides existed: the optimizer keeps its own
        overrides = opt.overrides
    if not isinstance(overrides, Mapping):
        raise TypeError(f"state_dict['overrides'] must be a dict, got {type(overrides).__name__}")
    overrides = {pattern: {k: _own_schedule(v, opt._overrides.get(pattern, {}).get(k),
                                            f"overrides[{pattern!r}].{k}") for k, v in values.items()}
                 if isinstance(values, Mapping) else values for pattern, values in overrides.items()}
    trial = type(opt).fresh(impl=opt.impl, overrides=overrides, **hyper)  # the constructor's checks
    always, possible = _buffer_sets(trial)
    arrays = None if params is None else _param_arrays(params)

    if not isinstance(state_dict["state"], Mapping):
        raise TypeError("state_dict['state'] must be a dict: param name -> its state")
    checks = _EntryChecks(kind, trial, always, possible, arrays, copy)
    quick, slow = checks.quick, checks.slow
    state = {}
    saved = state_8bit.convert(trial, _bfloat16_as_float32(trial, state_dict["state"], arrays), arrays, saved_block)
    for key, st in saved.items():
        if isinstance(st, Mapping) and state_8bit.holds_8bit(st):
            if arrays is not None and key not in arrays:
                raise KeyError(f"state_dict has state for param {describe(key)}, which is not among the params")
            step = _count(f"the step of param {describe(key)}", st.get("step"))
            state[key] = state_8bit.checked_entry(kind, key, st, step, always, possible,
                                                  None if arrays is None else arrays[key])
            continue
        entry = quick(key, st)
        state[key] = slow(key, st) if entry is None else entry
    counters = (_count("state_dict['iter']", state_dict["iter"]),
                _count("state_dict['skipped_steps']", state_dict["skipped_steps"]))
    return trial._hyper, trial._overrides, state, counters


def _bfloat16_as_float32(trial, saved, arrays=None):
    """``saved`` (a state_dict's "state") with its bfloat16 buffers in float32 (exact), or in the compute dtype of
    the param in ``arrays`` where given, where ``trial`` does not keep bfloat16 state.  Before bfloat16 params
    computed in float32, their state was bfloat16: such a state loads as the float32 state those params keep now.
    Entries without a bfloat16 buffer are kept as they are."""
    if trial._hyper.get("state_dtype") == "bfloat16" or not isinstance(saved, Mapping):
        return saved
    out = None
    for key, st in saved.items():
        if not isinstance(st, Mapping):
            continue
        low = [name for name, buf in st.items() if name != "step" and array_api_compat.is_array_api_obj(buf)
               and _backend.dtype_name(buf.dtype) == "bfloat16"]
        if low:
            out = dict(saved) if out is None else out
            converted = dict(st)
            full = state_8bit.full_dtype(None if arrays is None else arrays.get(key)) or "float32"
            for name in low:
                xp = _backend.namespace(st[name])
                converted[name] = xp.astype(st[name], getattr(xp, full))
            out[key] = converted
    return saved if out is None else out


class _EntryChecks:
    """The checks of one param's state: ``slow`` makes each check and raises the message of the first that
    fails; ``quick`` takes the common case (NumPy buffers of a real floating dtype, an int step) in fewer
    steps and returns the same entry, or None when anything is not that case (then ``slow`` decides).

    ``quick`` asks the questions whose answers depend only on a type and a dtype (the array library's
    namespace, whether the dtype is real floating, its name, the dtype ``trial`` keeps a param's state in)
    once per dtype, and those that depend only on a state's buffer names once per set of names.
    """

    def __init__(self, kind, trial, always, possible, arrays, copy=True):
        self.kind, self.trial, self.always, self.possible, self.arrays = kind, trial, always, possible, arrays
        self.copy = copy
        self.buffer_dtypes = {}  # buffer dtype -> its name, or False: not a native real floating dtype
        self.layouts = {}  # param dtype -> the name of the dtype its state is kept in
        self.name_sets = {}  # the keys of a state dict, in order -> its buffer names sorted, or None
        # The dtype the state is kept in depends on the param's dtype alone unless a subclass says otherwise.
        # (the base class's own buffer_dtype, found by name: this module does not import the optimizer's)
        self.layout_by_dtype = type(trial).buffer_dtype.__qualname__ == "Optimizer.buffer_dtype"

    def quick(self, key, st):
        if type(st) is not dict:
            return None
        step = st.get("step")
        if type(step) is not int or not 0 <= step <= _INT64_MAX:
            return None
        names = self.name_sets.get(tuple(st), False)
        if names is False:
            names = self.name_sets[tuple(st)] = self._names(tuple(st))
        if names is None or step > 0 and not names[1]:
            return None
        arrays = self.arrays
        if arrays is not None:
            p = arrays.get(key)
            if type(p) is not np.ndarray:
                return None
            expect_dtype = self.layouts.get(p.dtype) or self._layout(key, p)
            if expect_dtype is None:
                return None
            expect_shape = p.shape
        else:
            expect_dtype = expect_shape = None
        entry = {"step": step}
        buffer_dtypes, copy = self.buffer_dtypes, self.copy
        near = p if arrays is not None else None  # a copy placed by its param where the params are given
        for slot, buf_name in enumerate(names[0]):
            buf = st[buf_name]
            if type(buf) is not np.ndarray:
                return None
            name = buffer_dtypes.get(buf.dtype)
            if name is None:
                name = buffer_dtypes[buf.dtype] = _native_real_floating(buf)
            if not name:
                return None
            if expect_shape is None:  # the first buffer: the others have its shape and dtype
                expect_shape, expect_dtype = buf.shape, name
            elif buf.shape != expect_shape or name != expect_dtype:
                return None
            entry[buf_name] = _pages.copy(buf, near, slot) if copy else buf  # C order, native: as _native's
        return entry

    def _names(self, signature):
        """(buffer names sorted, whether they hold every buffer always kept), or None if some is unknown."""
        names = set(signature) - {"step"}
        if "step" not in signature or names - self.possible:
            return None
        return tuple(sorted(names)), self.always <= names

    def _layout(self, key, p):
        if not self.layout_by_dtype:
            return None
        try:
            dtype, _ = _expected_layout(self.trial, key, p)
        except (TypeError, ValueError):  # slow raises it, after the checks that come first
            return None
        self.layouts[p.dtype] = dtype
        return dtype

    def slow(self, key, st):
        kind, trial, always, possible, arrays = self.kind, self.trial, self.always, self.possible, self.arrays
        name = describe(key)
        if arrays is not None and key not in arrays:
            raise KeyError(f"state_dict has state for param {name}, which is not among the params")
        if not isinstance(st, Mapping) or "step" not in st:
            raise ValueError(f"state of param {name} must be a dict with a 'step'")
        step = _count(f"the step of param {name}", st["step"])
        names = set(st) - {"step"}
        unknown = names - possible
        if unknown:
            raise ValueError(f"state of param {name} holds {sorted(unknown, key=str)}, which no {kind} keeps "
                             f"(a {kind} keeps at most {sorted(possible)})")
        if step > 0 and not always <= names:
            raise ValueError(f"state of param {name} lacks {sorted(always - names)}, which every {kind} keeps "
                             f"from a param's first step (its step is {step})")
        expect_dtype = expect_shape = None
        if arrays is not None:
            expect_dtype, expect_shape = _expected_layout(trial, key, arrays[key])
        entry, first = {"step": step}, None
        for buf_name in sorted(names):
            buf = st[buf_name]
            if not array_api_compat.is_array_api_obj(buf):
                raise TypeError(f"state {buf_name!r} of param {name} is not an array ({type(buf).__name__})")
            xp = _backend.namespace(buf)
            if not _backend.is_real_floating(xp, buf.dtype):
                raise TypeError(f"state {buf_name!r} of param {name} has dtype {buf.dtype}")
            shape, dtype = tuple(buf.shape), _backend.dtype_name(buf.dtype)
            if expect_shape is not None and shape != expect_shape:
                raise ValueError(f"state {buf_name!r} of param {name} has shape {shape} but the param has "
                                 f"shape {expect_shape}")
            widen = (dtype, expect_dtype) == ("float32", "float64")
            if widen:
                buf, dtype = widened_on_load(buf), "float64"
            elif expect_dtype is not None and dtype != expect_dtype:
                raise TypeError(f"state {buf_name!r} of param {name} is {dtype} but {trial!r} keeps the state "
                                f"of that param in {expect_dtype}")
            if first is not None and first[1] != shape:
                raise ValueError(f"state buffers of param {name} differ in shape: {first[0]!r} has {first[1]} "
                                 f"and {buf_name!r} has {shape}")
            if first is not None and first[2] != dtype:
                raise TypeError(f"state buffers of param {name} differ in dtype: {first[0]!r} is {first[2]} "
                                f"and {buf_name!r} is {dtype}")
            first = first or (buf_name, shape, dtype)
            entry[buf_name] = _native(buf) if (self.copy and not widen) or not _taken_as_it_is(buf) else buf
        return entry


def widened_on_load(buf):
    """A float64 param's float32 state buffer loaded with ``params=``: a new float64 array, exactly, as the step
    widens it (:func:`xopt._checked.widen_float32`) and as torch.optim's ``load_state_dict`` casts it."""
    xp = _backend.namespace(buf)
    return xp.astype(buf, xp.float64)


def _taken_as_it_is(buf) -> bool:
    return (type(buf) is np.ndarray and buf.dtype.isnative and buf.flags.c_contiguous and buf.flags.writeable
            and buf.flags.aligned)


def _native_real_floating(buf):
    """The dtype name of NumPy array ``buf`` if it is a real floating dtype in native byte order, else False."""
    dtype = buf.dtype
    if not dtype.isnative:
        return False
    try:
        if not _backend.is_real_floating(_backend.namespace(buf), dtype):
            return False
    except (TypeError, ValueError):
        return False
    return _backend.dtype_name(dtype)


class SavedCustomSchedule:
    """In a loaded state: a schedule that was a function of the user's, which a file cannot hold."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return f"<custom schedule {self.text}, not saved>"


def _own_schedule(saved, current, where):
    """A saved custom schedule is the one the optimizer loaded into was given (it must have one)."""
    if not isinstance(saved, SavedCustomSchedule):
        return saved
    if callable(current) and not isinstance(current, Schedule):
        return current
    raise ValueError(f"the saved {where} was a custom schedule, {saved.text}, and a state file holds no code: "
                     f"make the optimizer with that schedule again ({where}=your_function) and load into it; "
                     "xopt.schedules' schedules are saved by name and arguments")


def _expected_layout(opt, key, p):
    """(dtype name, shape) that ``opt`` keeps the state of param ``p`` in."""
    if isinstance(p, (float, np.floating)):  # a number param is updated as a 0-d array of its dtype
        p = np.asarray(p)
    if not array_api_compat.is_array_api_obj(p):
        raise TypeError(f"param {describe(key)} is not an array (got {type(p).__name__})")
    xp = _backend.namespace(p)
    if not _backend.is_real_floating(xp, p.dtype):
        raise TypeError(f"param {describe(key)} has dtype {p.dtype}; xopt updates real floating-point arrays only")
    dtype = opt.buffer_dtype(types.SimpleNamespace(key=key, p=p, xp=xp))  # raises for an unsupported state_dtype
    return _backend.dtype_name(dtype), tuple(p.shape)
