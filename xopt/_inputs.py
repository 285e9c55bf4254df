"""Checking what ``update(params, grads)`` is given, before anything is written."""

from __future__ import annotations

import operator
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import array_api_compat
import numpy as np

from . import _backend

__all__ = ["Entry", "collect", "describe", "check_overlaps", "param_keys"]


@dataclass
class Entry:
    """One param to update this step: where it lives, its grad, its namespace."""

    key: Any
    p: Any
    g: Any
    xp: Any
    rebind: bool = False  # immutable array: the container entry gets the new array
    state: dict = field(default=None)
    scalars: dict = field(default=None)
    opt: Any = None  # the optimizer as this param's hyperparameters make it (see Optimizer._at)
    unbox: Any = None  # a Python float or NumPy scalar param: p is a 0-d copy, unbox(p) the new value
    clip: Any = None  # clip_grad_norm: the scale the rule applies to g (engines that take it), else None
    norm: Any = None  # clip_grad_norm's norm where it is lazy (Dask): the Dask engine puts the persisted one here


def param_keys(params) -> list:
    """The names of ``params``: dict keys, or list indices."""
    return list(params) if isinstance(params, Mapping) else list(range(len(params)))


def describe(key) -> str:
    """How a param is named in messages: 'W1' for a dict key, [0] for a list index."""
    return repr(key) if isinstance(key, str) else f"[{key}]"


def _items(params, grads):
    if isinstance(params, Mapping):
        if not isinstance(grads, Mapping):
            raise TypeError(f"params is a {type(params).__name__} but grads is a {type(grads).__name__}; "
                            "pass grads as a mapping with the same keys")
        missing = [k for k in params if k not in grads]
        if missing:
            raise KeyError(f"grads has no entry for param(s) {', '.join(map(describe, missing))}")
        extra = [k for k in grads if k not in params]
        if extra:
            raise KeyError(f"grads has entries with no param: {', '.join(map(describe, extra))}")
        return [(k, params[k], grads[k]) for k in params], not isinstance(params, dict)
    if isinstance(params, (list, tuple)):
        if not isinstance(grads, (list, tuple)):
            raise TypeError(f"params is a {type(params).__name__} but grads is a {type(grads).__name__}")
        if len(params) != len(grads):
            raise ValueError(f"params has {len(params)} arrays but grads has {len(grads)}")
        return list(zip(range(len(params)), params, grads)), isinstance(params, tuple)
    raise TypeError(f"params must be a dict (name -> array), a list or a tuple of arrays, "
                    f"got {type(params).__name__}")


def _is_scalar(x) -> bool:
    """A Python float or a NumPy floating scalar: a number the book's scripts keep as a param."""
    return isinstance(x, (float, np.floating)) and not isinstance(x, bool)


def number_grad(key, g, dtype):
    """A number grad as a 0-d array: a Python number in its param's ``dtype``, a NumPy scalar in its own; an int
    too large for the dtype raises, naming the param."""
    try:
        return np.asarray(g, dtype=dtype if isinstance(g, (int, float)) else None)
    except OverflowError:
        raise ValueError(f"grad of param {describe(key)} is an int too large for {np.dtype(dtype).name} "
                         f"({g.bit_length()} bits)") from None


def _boxed(key, p, g):
    """(0-d array copy of the scalar p, g as an array, how to turn the new p back into p's kind)."""
    if isinstance(p, np.floating):
        box, unbox = np.array(p), operator.itemgetter(())  # a NumPy scalar of p's dtype
    else:
        box, unbox = np.array(p, dtype=np.float64), float
    if isinstance(g, (int, float, np.number)) and not isinstance(g, bool):
        g = number_grad(key, g, box.dtype)
    return box, g, unbox


_KINDS = {}  # (param type, grad type, param dtype, grad dtype) -> namespace, for pairs that passed every check


def _check_pair(key, p, g):
    """(namespace, grad) of a param and its grad, checked: arrays of one library, real floating, one shape,
    one device.  What depends on their types and dtypes alone is worked out once per kind of pair."""
    if isinstance(g, (int, float, np.number)) and not isinstance(g, bool) and isinstance(p, np.ndarray):
        g = number_grad(key, g, p.dtype)  # a number for a 0-d param
    kind = (type(p), type(g), getattr(p, "dtype", None), getattr(g, "dtype", None))
    xp = _KINDS.get(kind)
    if xp is None:
        xp = _check_kind(key, p, g)
        _KINDS[kind] = xp
    if type(g).__module__.startswith("torch") or type(p).__module__.startswith("torch"):
        _check_layout(key, p, g)
    if tuple(p.shape) != tuple(g.shape):
        for what, x in ((f"param {describe(key)}", p), (f"grad of param {describe(key)}", g)):
            if any(n is None or n != n for n in x.shape):  # None or NaN: a size unknown until computed
                raise ValueError(f"{what} has shape {tuple(x.shape)}, of sizes not known yet (a Dask array made by "
                                 "boolean indexing, say): give it known sizes first (x.compute_chunk_sizes())")
        raise ValueError(f"grad of param {describe(key)} has shape {tuple(g.shape)} but the param has shape "
                         f"{tuple(p.shape)} (xopt never broadcasts)")
    if _backend.device(p) != _backend.device(g):
        raise ValueError(f"param {describe(key)} is on {_backend.device(p)} but its grad is on {_backend.device(g)}")
    return xp, g


def _check_kind(key, p, g):
    """The namespace of a (param, grad) pair of a kind not seen yet, or the error that names it."""
    name = describe(key)
    jax_core = getattr(sys.modules.get("jax"), "core", None)  # (JAX not imported for this)
    tracer = getattr(jax_core, "Tracer", ())
    for what, x in ((f"param {name}", p), (f"grad of param {name}", g)):
        if isinstance(x, np.ma.MaskedArray):
            raise TypeError(f"{what} is a NumPy masked array; xopt does not apply masks (the fused kernels "
                            "would read the masked values): pass np.ma.getdata(x) or x.filled(value)")
        if isinstance(x, tracer):
            raise TypeError(f"{what} is a traced JAX array (update called inside jax.jit, grad or vmap): an "
                            "optimizer keeps its state in Python and steps eagerly; under jit, use xopt.optax's "
                            "gradient transformations")
    if isinstance(p, np.generic) or not array_api_compat.is_array_api_obj(p):  # a NumPy float scalar is boxed
        raise TypeError(_not_a_param(name, p))  # before this: any other (np.int64(3)) is not a param
    if not array_api_compat.is_array_api_obj(g):
        raise TypeError(f"grad of param {name} is not an array (got {type(g).__name__})")
    try:
        xp = _backend.namespace(p, g)
    except TypeError:
        raise TypeError(f"param {name} is a {_backend.library_name(p)} array but its grad is a "
                        f"{_backend.library_name(g)} array") from None
    if not _backend.is_real_floating(xp, p.dtype):
        raise TypeError(f"param {name} has dtype {p.dtype}; xopt updates real floating-point arrays only")
    if not _backend.is_real_floating(xp, g.dtype):
        raise TypeError(f"grad of param {name} has dtype {g.dtype}; grads must be real floating-point")
    return xp


def _check_layout(key, p, g):
    """torch tensors: dense (strided) ones only; a sparse grad (``nn.Embedding(sparse=True)``) has no memory
    of the param's shape for a kernel to read."""
    for what, x in ((f"param {describe(key)}", p), (f"grad of param {describe(key)}", g)):
        layout = getattr(x, "layout", None)
        if layout is not None and str(layout) != "torch.strided":
            raise TypeError(f"{what} is a {str(layout).removeprefix('torch.')} tensor; xopt takes dense tensors "
                            "only: pass x.to_dense(), or step sparse embeddings with torch.optim.SparseAdam, SGD "
                            "or Adagrad")


def _not_a_param(name, p) -> str:
    return f"param {name} is not an array (got {type(p).__name__}); params are arrays or Python floats"


def collect(params, grads) -> list[Entry]:
    """Validate every (param, grad) pair; return the ones to update (grad not None)."""
    items, fixed_container = _items(params, grads)
    seen = {}
    for key, p, _ in items:
        if _is_scalar(p):  # a number is never written in place: two keys may name one float object
            continue
        if id(p) in seen:  # tied weights: two updates of one array, a race in a parallel kernel
            raise ValueError(f"params {describe(seen[id(p)])} and {describe(key)} are the same array; "
                             "pass each array once")
        seen[id(p)] = key
    entries = []
    for key, p, g in items:
        if g is None:
            if not (array_api_compat.is_array_api_obj(p) or _is_scalar(p)):
                raise TypeError(_not_a_param(describe(key), p))
            continue
        unbox = None
        if _is_scalar(p):  # updated by rebinding, as the seed's `params[key] -= ...` does
            if fixed_container:
                raise TypeError(f"param {describe(key)} is a number in a {type(params).__name__}; pass a dict "
                                "or a list so it can be replaced")
            number = type(p).__name__
            p, g, unbox = _boxed(key, p, g)
            if type(g) is not np.ndarray and array_api_compat.is_array_api_obj(g):  # (a NumPy scalar: boxed)
                raise TypeError(f"param {describe(key)} is a {number}, so its grad is a number or a NumPy array, "
                                f"not a {_backend.library_name(g)} array")
        xp, g = _check_pair(key, p, g)
        rebind = False
        if not _backend.is_writable(p):
            if array_api_compat.is_torch_array(p):
                raise ValueError(f"param {describe(key)} is a torch inference tensor: torch refuses in-place "
                                 "updates to it outside torch.inference_mode() (step inside it, or clone the "
                                 "param outside it)")
            if not _backend.can_rebind_only(p):
                raise ValueError(f"param {describe(key)} is read-only; xopt updates params in place")
            if fixed_container:
                raise TypeError(f"param {describe(key)} is an immutable {_backend.library_name(p)} array "
                                f"in a {type(params).__name__}; pass a dict or a list so it can be replaced")
            rebind = True
        entries.append(Entry(key, p, g, xp, rebind, unbox=unbox))
    return entries


def _label(what, key) -> str:
    """How an array of a step is named in a message: ``what`` is "param", "grad" or a buffer's name."""
    if what == "param":
        return f"param {describe(key)}"
    if what == "grad":
        return f"the grad of param {describe(key)}"
    return f"optimizer state {what!r} of param {describe(key)}"


_NDARRAY = frozenset({np.ndarray})


def _overlaps_itself(a) -> bool:
    """Whether two elements of array ``a`` (NumPy, CuPy or torch: from its shape and strides, no data read) share
    bytes: written in one step, their result would depend on the order of the writes.  Dims taken from the
    smallest stride up, each stride past all the bytes the dims below it reach is no overlap (every layout that
    slicing, transposing and reshaping make); otherwise the elements' byte offsets are compared."""
    strides = getattr(a, "strides", None)
    itemsize = getattr(getattr(a, "dtype", None), "itemsize", None)
    if strides is None and callable(getattr(a, "stride", None)):  # torch: strides in elements
        itemsize = a.element_size()
        strides = tuple(s * itemsize for s in a.stride())
    if strides is None or itemsize is None:
        return False  # an array without strides (Dask, JAX) is never written in place
    dims = sorted((abs(s), n) for s, n in zip(strides, a.shape) if n > 1)
    if any(n == 0 for n in a.shape):
        return False
    reach = itemsize
    for stride, n in dims:
        if stride < reach:
            break
        reach += stride * (n - 1)
    else:
        return False
    offsets = np.zeros((), dtype=np.int64)
    for stride, n in dims:
        offsets = (offsets[..., None] + np.arange(n, dtype=np.int64) * stride).reshape(-1)
    offsets = np.sort(offsets.reshape(-1))
    return bool((np.diff(offsets) < itemsize).any())


def _apart(lo, hi) -> bool:
    """Whether no two of the byte ranges [lo, hi) (int64 arrays; empty ones left out) meet."""
    reach = lo < hi
    lo, hi = lo[reach], hi[reach]
    if lo.shape[0] < 2:
        return True
    order = np.argsort(lo, kind="stable")
    lo, hi = lo[order], hi[order]
    return not bool((np.maximum.accumulate(hi[:-1]) > lo[1:]).any())


def check_overlaps(named):
    """Refuse arrays of one step that share memory: [(array, (what, param key), is_grad)].

    Two params, a param and a state buffer, two state buffers, or a grad and any of those
    would be read after being written (or written twice) in one step: the result would
    depend on the order of the elements' updates, and the parallel kernels race.  Grads may
    share memory with each other (they are only read).
    """
    arrays = [a for a, _, _ in named]
    for a, what, is_grad in named:  # contiguous arrays (the usual ones) cannot overlap themselves
        if not is_grad and not (type(a) is np.ndarray and a.flags.forc) and _overlaps_itself(a):
            raise ValueError(f"{_label(*what)} overlaps itself (elements that share memory: a view made with "
                             "as_strided or a zero stride); xopt writes each element once per step: pass an array "
                             "whose elements have memory of their own (a copy)")
    if len(named) < 2:
        return
    if _NDARRAY.issuperset(map(type, arrays)) and _apart(*_backend.numpy_bounds(arrays)):
        return  # NumPy arrays whose byte ranges do not meet: the usual step, without the sweep below
    spans = _backend.byte_spans(arrays)
    live = [(space, lo, hi, i) for i, s in enumerate(spans) if s is not None for space, lo, hi in [s] if lo < hi]
    live.sort()
    active = []  # ranges that may reach the next one: normally at most one
    for space, lo, hi, b in live:
        active = [r for r in active if r[0] == space and r[2] > lo]
        for *_, a in active:
            if named[a][2] and named[b][2]:
                continue
            if _backend.shares_memory(named[a][0], named[b][0]):
                a, b = sorted((a, b), key=lambda i: (named[i][2], i))  # the param or buffer first
                raise ValueError(f"{_label(*named[a][1])} and {_label(*named[b][1])} share memory; xopt writes each param and "
                                 "state buffer once per step and reads the grads while it writes: pass "
                                 "arrays that do not overlap (a copy of one of them)")
        active.append((space, lo, hi, b))
