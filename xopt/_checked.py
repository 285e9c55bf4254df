"""The checked path: a step of anything ``update`` is given, every param converted where it can be and
explained where it cannot.

:mod:`xopt._lane` takes the steps whose arrays a fused engine reads itself; the others come here: other
containers and array libraries, float16 and strided arrays, ``None`` grads, number params in a tuple,
a first step with overrides, and every call that is wrong (its error names the culprit).  Everything is
checked before anything is written; the groups of a step run reference first (see ``_dispatch.select``).
"""

from __future__ import annotations

import contextlib
import numbers
import operator
import sys
from functools import partial
from itertools import repeat

import array_api_compat
import numpy as np

from . import _backend, _clip, _dispatch, _pages
from ._atomic import CALL, each, together, together_unforked
from ._inputs import check_overlaps, collect, describe
from .engines.blockwise import SUFFIX as _ABSMAX

__all__ = ["step", "state_for", "lazy_norm"]


def step(opt, params, grads):
    """The checked step of optimizer ``opt``: see the module's docstring."""
    entries = collect(params, grads)
    opt._check_patterns(params)
    views = {}  # (group, count) -> the view its params step with
    firsts = set()  # ids of the views whose params make a buffer of first_step_buffers: step 1's scalars
    for e in entries:
        count = _check_step(opt, e)
        group = opt._group_of(e.key)
        view = views.get((group, count))
        if view is None:
            view = views[group, count] = opt._at(group, count)
        if count and any(n in view.buffers() and n not in opt.state[e.key] for n in view.first_step_buffers):
            # a set of its own: an engine takes one set's scalars for all its params of one count
            first = views.get((group, count, "first"))
            if first is None:
                first = views[group, count, "first"] = view._view(dict(view._hyper))
                firsts.add(id(first))
            view = first
        e.opt = view
        _check_state(opt, e)
    check_overlaps(_named_arrays(opt, entries))
    skipped, norm, scale = clip_or_skip(opt, entries)
    if skipped:
        return
    paths = _dispatch.select(opt, entries)  # raises before any write if impl can't be honoured
    if scale is not None:
        _dispatch.hand_over(paths, scale)
    norm = lazy_norm(entries, norm)
    created = [e.key for e in entries if e.key not in opt.state]
    had = {e.key: list(opt.state[e.key]) for e in entries if e.key in opt.state}  # its buffers, to take back new ones
    try:
        scalars = {}  # (view, step) -> its scalars
        for e in entries:
            e.state = state_for(opt, e)
            step = 1 if id(e.opt) in firsts else int(e.state["step"]) + 1  # a NumPy count (np.int8(127)) would wrap
            key = (id(e.opt), step)
            if key not in scalars:
                scalars[key] = e.opt.scalars(step)
            e.scalars = scalars[key]
        writes = []
        for apply, group in paths:  # each computes its group's new values and returns their writes
            writes += apply(group[0].opt, group)
        writes += _commit(opt, params, entries, norm)
    except BaseException:
        for key in created:  # nothing written: take back the state this call made (unless a handler
            st = opt.state.get(key)  # that raised came after the step was whole: then its count is 1)
            if st is not None and st.get("step") == 0:
                del opt.state[key]
        for key, names in had.items():  # and the buffers it added to a state (a hyperparameter turned on)
            st = opt.state.get(key)
            if type(st) is dict:
                for name in [n for n in st if n not in names]:
                    del st[name]
        raise
    # A user's np.seterr(all="raise") must not stop the writes halfway: a float16 param's cast from its float32
    # result may underflow, and FloatingPointError would leave the state written and the param not.
    with _plain_torch(entries), np.errstate(all="ignore"):  # a torch function mode would run Python in torch's writes
        together_unforked(writes)  # every write of the step, and its counts, in one call into C (see xopt._atomic)


def clip_or_skip(opt, entries):
    """(skipped, norm, scale): the clip norm of the grads and the scale it gives (None without
    ``clip_grad_norm``); or, where ``skip_nonfinite`` skips the step, the skip committed and ``skipped`` True."""
    scale = norm = None
    own = opt.__dict__.__setitem__
    skip = [partial(own, "skipped_steps", opt.skipped_steps + 1), partial(own, "_patterns_checked", True)]
    if opt.clip_grad_norm is not None:
        norm = _clip.global_norm([e.g for e in entries])
        if opt.skip_nonfinite and not _clip.is_finite(norm):
            together([partial(own, "last_grad_norm", lazy_norm(entries, norm)), *skip])  # (a Dask norm: its number)
            return True, norm, None
        scale = _clip.scale(norm, opt.clip_grad_norm)
    elif opt.skip_nonfinite and not _all_finite(entries):
        together(skip)
        return True, None, None
    return False, norm, scale


def lazy_norm(entries, norm):
    """The clip norm to keep in ``opt.last_grad_norm`` without the graph of the grads (which would keep last step's
    arrays on the workers): a Dask norm that ``skip_nonfinite`` computed as its number, any other Dask norm handed
    to the entries (``Entry.norm``), which the Dask engine persists with the steps (read back by :func:`_commit`)."""
    if not _backend.is_dask(norm):
        return norm
    value = _clip.computed(norm)
    if value is not None:
        return _backend.from_numpy(np.asarray(value), norm)
    for e in entries:
        e.norm = norm
    return norm


def _commit(opt, params, entries, norm) -> list:
    """The calls that count the step: each param's step count, the params rebound (new arrays of libraries
    that cannot write in place; float params read back from their boxes once written), ``iter``, the norm."""
    own = opt.__dict__.__setitem__
    calls = [partial(dict.__setitem__, e.state, "step", int(e.state["step"]) + 1) for e in entries]
    unboxed = [e for e in entries if e.unbox is not None]
    if unboxed:
        calls.append(each(operator.setitem, repeat(params), [e.key for e in unboxed],
                          map(CALL, map(partial, [e.unbox for e in unboxed], [e.p for e in unboxed]))))
    calls += [partial(operator.setitem, params, e.key, e.p) for e in entries if e.rebind and e.unbox is None]
    calls.append(partial(own, "iter", opt.iter + 1))
    if not opt._patterns_checked:  # checked by this step: not again (a step not taken leaves it to the next)
        calls.append(partial(own, "_patterns_checked", True))
    if norm is not None:  # set with the step: a call that raises leaves the last one's
        calls.append(partial(own, "last_grad_norm", entries[0].norm if entries and entries[0].norm is not None
                             else norm))  # a lazy norm as the Dask engine persisted it
    return calls


def _plain_torch(entries):
    """A context without torch function modes where a step writes torch tensors, else one that does nothing."""
    torch = sys.modules.get("torch")
    if torch is not None and any(isinstance(e.p, torch.Tensor) for e in entries):
        return torch._C.DisableTorchFunction()
    return contextlib.nullcontext()


def _named_arrays(opt, entries):
    """Every array a step writes or reads, named for messages: (array, (what, param key), is a grad).
    A buffer the param's hyperparameters do not keep (left by an option turned off) is not one of them."""
    named = []
    for e in entries:
        named.append((e.p, ("param", e.key), False))
        named.append((e.g, ("grad", e.key), True))
        st = opt.state.get(e.key, {})
        for name in e.opt.buffers():
            if name in st:
                named.append((st[name], (name, e.key), False))
            absmax = st.get(name + _ABSMAX)  # an 8-bit buffer's scales, written with its codes
            if absmax is not None:
                named.append((absmax, (name + _ABSMAX, e.key), False))
    return named


def not_a_state(key, st) -> TypeError:
    """The error for a param's state that is not a dict (``st``), naming the param."""
    what = "None" if st is None else f"a {type(st).__name__}"
    return TypeError(f"param {describe(key)}: its optimizer state is {what}; a param's state is a dict of its "
                     "step count and buffers (del opt.state[key] starts it afresh)")


def _check_step(opt, e) -> int:
    """The updates already applied to e's param (its schedule's count), checked."""
    st = opt.state.get(e.key)
    if st is None and e.key not in opt.state:
        return 0
    if not isinstance(st, dict):  # the step's commit sets its count: a read-only mapping would refuse it, mid-step
        raise not_a_state(e.key, st)
    step = st.get("step")
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 0 <= step < 2**63:
        raise ValueError(f"param {describe(e.key)}: its optimizer state has step {step!r}; a step count "
                         "is an int >= 0")
    if step == 2**63 - 1:  # its next count would not fit in int64: a state no file, no load and no step takes
        raise ValueError(f"param {describe(e.key)}: its optimizer state has step {step}, the largest an int64 "
                         "holds; no further step can be counted")
    return int(step)

def _check_state(opt, e):
    dtype = opt.buffer_dtype(e)  # raises for an unsupported state_dtype, before any write
    st = opt.state.get(e.key)
    if st is None:
        return
    if dtype is _CODES:  # 8-bit state: the codes are checked below as any buffer, their absmax here
        _state_8bit().check_state(opt, e, st)
    for name in (e.opt or opt).buffers():
        buf = st.get(name)
        if buf is None:
            continue
        if type(buf) is not np.ndarray and not array_api_compat.is_array_api_obj(buf):
            raise TypeError(f"param {describe(e.key)}: its optimizer state {name!r} is not an array (got "
                            f"{type(buf).__name__})")
        if isinstance(buf, np.ma.MaskedArray):  # as a masked param or grad: the kernels would read masked values
            raise TypeError(f"param {describe(e.key)}: its optimizer state {name!r} is a NumPy masked array; xopt "
                            "does not apply masks: put np.ma.getdata(buffer) in the state")
        if tuple(buf.shape) != tuple(e.p.shape):
            raise ValueError(f"param {describe(e.key)} has shape {tuple(e.p.shape)} but its optimizer "
                             f"state {name!r} was made for shape {tuple(buf.shape)}")
        # Compared by name: a state loaded from a file is NumPy until its first use.
        if _backend.dtype_name(buf.dtype) != _backend.dtype_name(dtype):
            have, want = _backend.dtype_name(buf.dtype), _backend.dtype_name(dtype)
            if (have, want) == WIDENED:
                continue  # widened by state_for, exactly
            if want == _backend.dtype_name(_backend.compute_dtype(e.xp, e.p.dtype)):
                raise TypeError(f"param {describe(e.key)} is {_backend.dtype_name(e.p.dtype)} but its "
                                f"optimizer state {name!r} is {have}")
            raise TypeError(f"param {describe(e.key)} keeps its state in {want} (state_dtype) but its "
                            f"optimizer state {name!r} is {have}")

def state_for(opt, e):
    xp, dtype, view = e.xp, opt.buffer_dtype(e), e.opt or opt
    if dtype is _CODES:
        return _state_8bit().state_for(opt, e)
    st = opt.state.setdefault(e.key, {"step": 0})
    widen_float32(st, dtype, e.p, view.buffers())
    for slot, name in enumerate(view.buffers()):
        buf = st.get(name)
        if buf is None and type(e.p) is np.ndarray:  # C order, whatever the param's: what the kernels take
            st[name] = _pages.full(e.p.shape, view.initial_value(name), dtype, e.p, slot)
        elif buf is None:
            # full_like: a Dask param's state is chunked like the param; the start is the override's, if any
            buf = _placed_cpu_tensor(e.p, view.initial_value(name), dtype, slot)
            if buf is None:
                buf = xp.full_like(e.p, view.initial_value(name), dtype=dtype, device=_backend.device(e.p))
            st[name] = buf
        elif _backend.library_name(buf) != _backend.library_name(e.p):
            st[name] = _backend.from_numpy(_backend.to_numpy(buf), e.p)
        elif not (_backend.can_rebind_only(buf) or _backend.is_writable(buf)):
            st[name] = _copy(buf)  # a read-only buffer (a user's, a file's): the step writes a copy
    return st


WIDENED = ("float32", "float64")  # (a buffer's dtype, the dtype its param keeps state in) that a step widens


def widen_float32(st, dtype, p, names):
    """In state ``st`` of param ``p``, whose state is kept in ``dtype``: where that is float64, each float32 buffer
    the step uses (``names``) replaced by a new float64 one, exactly, in the param's library.  8-bit or bfloat16
    state converted without the params (``load_state_dict`` without ``params=``, setting ``state_dtype``) comes
    back float32; torch.optim's ``load_state_dict`` casts a state to its param's dtype too.  A buffer the step
    does not use (amsgrad's v_max turned off) is left as it is, as the lane leaves it: a step that uses it again
    widens it."""
    if _backend.dtype_name(dtype) != "float64":
        return
    for name in names:
        buf = st.get(name)
        if _backend.dtype_name(getattr(buf, "dtype", None)) == "float32":
            st[name] = _widened(buf, dtype, p)


def _widened(buf, dtype, p):
    if _backend.library_name(buf) != _backend.library_name(p):
        buf = _backend.from_numpy(_backend.to_numpy(buf), p)
    if type(buf) is np.ndarray:
        return np.array(buf, dtype=dtype, order="C")  # C order, as a new buffer (a 0-d one stays 0-d)
    return array_api_compat.array_namespace(buf).astype(buf, dtype)


def _placed_cpu_tensor(p, value, dtype, slot):
    """A state buffer like ``p`` (a contiguous CPU torch tensor of at least ``_pages.HUGE_MIN`` bytes) filled with
    ``value``, over a NumPy array of :mod:`xopt._pages` (its own huge-page mapping, placed apart from ``p``): torch's
    allocator places buffers made one after another a few KiB apart within their huge pages, where streams
    stepped in lockstep contend.  None where ``p`` is not such a tensor (the caller makes it with ``full_like``)."""
    torch = sys.modules.get("torch")
    if torch is None or type(p) not in (torch.Tensor, torch.nn.Parameter) or not p.is_cpu or not p.is_contiguous():
        return None
    holds = _TORCH_HOLDS.get(str(dtype))
    if holds is None or p.numel() * holds.itemsize < _pages.HUGE_MIN:
        return None
    a = _pages.empty(tuple(p.shape), holds, p.data_ptr(), slot)
    buf = torch.from_numpy(a) if holds != np.uint16 else torch.from_numpy(a).view(torch.bfloat16)
    if value != 0 or not _pages.mapped(a):
        buf.fill_(value)
    return buf


# torch dtype -> the NumPy dtype of its buffer's bytes (bfloat16's: uint16, viewed back as bfloat16)
_TORCH_HOLDS = {"torch.float32": np.dtype(np.float32), "torch.float64": np.dtype(np.float64),
                "torch.float16": np.dtype(np.float16), "torch.bfloat16": np.dtype(np.uint16)}

_CODES = np.dtype(np.uint8)  # what buffer_dtype gives for 8-bit state (compared by identity: any library's dtype)


def _state_8bit():
    """:mod:`xopt.state_8bit` (imported when an 8-bit optimizer first needs it)."""
    module = sys.modules.get("xopt.state_8bit")
    if module is None:
        from . import state_8bit as module
    return module


def _copy(x):
    """A copy of a buffer, in its own library."""
    if type(x) is np.ndarray:
        return _pages.copy(x)
    xp = _backend.namespace(x)
    return xp.asarray(x, copy=True)


_FINITE_CHUNK = 1 << 16  # elements a NumPy grad's finiteness is checked at a time


def _chunks(a):
    """A contiguous NumPy array's elements in memory order, in flat chunks of _FINITE_CHUNK (views)."""
    flat = a.ravel(order="K")
    return (flat[i:i + _FINITE_CHUNK] for i in range(0, flat.shape[0], _FINITE_CHUNK))


def _all_finite(entries) -> bool:
    """Whether every grad is finite.  Dask grads are checked in one computation: one per grad would compute again,
    for each, whatever the grads share (a backward pass), and wait for the cluster once per grad."""
    lazy = []
    for e in entries:
        g = e.g
        if type(g) is np.ndarray and g.size > _FINITE_CHUNK and (g.flags.c_contiguous or g.flags.f_contiguous):
            if not all(np.isfinite(chunk).all() for chunk in _chunks(g)):  # no bool array of its size
                return False
            continue
        finite = e.xp.all(e.xp.isfinite(e.g))
        if _backend.is_dask(finite):
            lazy.append(finite)
        elif not bool(finite):
            return False
    if lazy:
        from dask import compute

        return all(map(bool, compute(*lazy)))
    return True
