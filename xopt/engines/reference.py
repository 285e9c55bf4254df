"""The reference path: each optimizer's array-API ``rule``, for any array library.

``rule`` is pure: it returns a new param and new buffers and leaves its inputs alone.
Run on a whole large param it would hold several param-sized temporaries at once and
stream each of them through memory.  So a param larger than one chunk is cut into
chunks: the rule runs on one chunk at a time and its results go into new arrays the size of
the param and its buffers.  The temporaries are a chunk each and stay in the CPU cache.  A chunk is the same index into views
of the param, its grad and its buffers (one flat view each where all of them are
C-contiguous, else slices of the leading axes), so it picks the same elements of each,
whatever their layouts.  The rule is elementwise: chunking changes no number.

Nothing is written while the rule runs: its results go to new arrays, and the step writes them all
at once when every param's are ready (see :mod:`xopt._atomic`), so a step that fails or is
interrupted before then changes nothing.  A large param costs a copy of itself and its buffers.

A param no larger than a chunk runs whole.
Immutable arrays (JAX) cannot be written in slices either: they run whole and the new
param replaces the old one too.  float16 and bfloat16 params and bfloat16 state compute in
float32 (a chunk at a time), as :func:`xopt._backend.compute_dtype` says.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator

import numpy as _np

from .. import _backend

__all__ = ["apply_reference", "chunk_elements", "chunk_indices"]

HOST_CHUNK_BYTES = 2**17  # NumPy: every operand's chunk and the rule's temporaries fit in L2
TORCH_CPU_CHUNK_BYTES = 2**20  # torch pays microseconds per op and splits large ones over the cores
DEVICE_CHUNK_ELEMENTS = 2**24  # GPUs: chunks only bound the temporaries (each op is a kernel launch)


def apply_reference(opt, entries) -> list:
    """Run the rule on each entry (with its own hyperparameters, ``e.opt``, where set) into new arrays, and
    return the writes that put them in place (calls into C, for ``xopt._atomic.together``); float16 and
    bfloat16 params and bfloat16 state compute in float32; grads scaled by ``e.clip`` (clip_grad_norm) as they are read.
    Immutable arrays (JAX) are rebound instead: ``e.p`` and the state dict get the new ones in the writes."""
    if any(_kind(e)[2] for e in entries):
        import torch

        with torch.no_grad():  # a param may be a leaf that requires grad
            return _apply(opt, entries)
    return _apply(opt, entries)


def _apply(opt, entries):
    writes = []
    for e in entries:
        view = e.opt if e.opt is not None else opt
        dtype, n, torch = _kind(e)
        if e.rebind or math.prod(e.p.shape) <= n:
            writes += _apply_whole(view, e, view.buffers(), dtype, torch)
        else:
            writes += _apply_chunked(view, e, view.buffers(), dtype, torch, n)
    return writes


def _grad(xp, g, dtype, clip):
    """g in the compute dtype, times the clip scale if there is one."""
    g = _as(xp, g, dtype)
    if clip is None:
        return g
    return g * (clip if isinstance(clip, float) else _as(xp, clip, dtype))


def _apply_whole(opt, e, names, dtype, torch):
    xp, state, p = e.xp, e.state, e.p
    g = e.g.detach() if torch else e.g
    p_new, new = opt.rule(xp, _as(xp, p.detach() if torch else p, dtype), _grad(xp, g, dtype, e.clip),
                          {k: _as(xp, state[k], dtype) for k in names}, e.scalars)
    if e.rebind:
        writes = [functools.partial(dict.__setitem__, state, k, _as(xp, v, state[k].dtype)) for k, v in new.items()]
        e.p = _as(xp, p_new, p.dtype)  # rebound into the params by the step's commit
        return writes
    # Into the arrays in place, buffers too: the state keeps its arrays (a reference held to one sees the
    # step, as with the fused engines).
    return [_write(xp, state[k], _as(xp, v, state[k].dtype), torch) for k, v in new.items()] + [
        _write(xp, p, _as(xp, p_new, p.dtype), torch)]


def _write(xp, target, value, torch):
    """The call that writes ``value`` into ``target`` (the same dtype and shape)."""
    if torch:
        return functools.partial(target.detach().copy_, value)  # detached: no autograd record
    # target[...] = value: C for NumPy and CuPy (np.copyto is not: it first runs a Python dispatcher)
    inner = getattr(target, "_array", None)  # array-api-strict: its own __setitem__ is Python; its NumPy array's
    if isinstance(inner, _np.ndarray) and type(target).__module__.startswith("array_api_strict"):
        return functools.partial(operator.setitem, inner, Ellipsis, getattr(value, "_array", value))
    return functools.partial(operator.setitem, target, Ellipsis, value)


def _apply_chunked(opt, e, names, dtype, torch, n):
    """The rule a chunk at a time into new arrays (a chunk's temporaries stay in the CPU cache), then their
    writes."""
    xp = e.xp
    p, g = (e.p.detach(), e.g.detach()) if torch else (e.p, e.g)  # a detached p shares e.p's memory
    bufs = [e.state[k] for k in names]
    flat = [_flat_view(x) for x in (p, g, *bufs)]
    if all(x is not None for x in flat):
        p, g, *bufs = flat
    out_p, outs = xp.empty_like(p), [xp.empty_like(b) for b in bufs]
    rule, s, clip = opt.rule, e.scalars, e.clip
    for i in chunk_indices(tuple(p.shape), n):
        p_new, new = rule(xp, _as(xp, p[i], dtype), _grad(xp, g[i], dtype, clip),
                          {k: _as(xp, b[i], dtype) for k, b in zip(names, bufs)}, s)
        out_p[i] = _as(xp, p_new, p.dtype)
        for k, b, out in zip(names, bufs, outs):
            out[i] = _as(xp, new[k], b.dtype)
    return [_write(xp, b, out, torch) for b, out in zip(bufs, outs)] + [_write(xp, p, out_p, torch)]


_KINDS = {}  # (array type, dtype, torch's is_cpu) -> what _kind returns


def _kind(e):
    """(compute dtype, elements per chunk, is a torch tensor) for e's param; worked out once per kind."""
    p = e.p
    key = (type(p), p.dtype, getattr(p, "is_cpu", None))
    kind = _KINDS.get(key)
    if kind is None:
        kind = _KINDS[key] = (_backend.compute_dtype(e.xp, p.dtype), chunk_elements(e.xp, p),
                              _backend.library_name(p) == "torch")
    return kind


def chunk_elements(xp, x) -> int:
    """How many elements of ``x`` the rule takes at a time."""
    library = _backend.library_name(x)
    if library == "torch":
        chunk_bytes = TORCH_CPU_CHUNK_BYTES if x.device.type == "cpu" else None
    else:
        chunk_bytes = HOST_CHUNK_BYTES if library in ("numpy", "array_api_strict") else None
    if chunk_bytes is None:
        return DEVICE_CHUNK_ELEMENTS
    itemsize = getattr(x, "itemsize", None) or xp.finfo(x.dtype).bits // 8  # array-api-strict has no itemsize
    return max(1, chunk_bytes // itemsize)


def chunk_indices(shape, n):
    """Indices that cut an array of ``shape`` into views of at most ``n`` elements, in C order.

    Each is a tuple: fixed indices into the leading axes, then a slice of the next one (the
    axes after it whole).  The leading axes are as few as ``n`` allows.
    """
    axis, inner = len(shape), 1  # shape[axis:] holds `inner` elements and fits in a chunk
    while axis > 0 and inner * shape[axis - 1] <= n:
        axis -= 1
        inner *= shape[axis]
    if axis == 0:
        return [(...,)]
    run, size = max(1, n // inner), shape[axis - 1]  # along axis - 1
    runs = [slice(j, min(j + run, size)) for j in range(0, size, run)]  # stops in bounds: the standard asks it
    return [(*lead, r) for lead in itertools.product(*map(range, shape[:axis - 1])) for r in runs]


def _flat_view(x):
    """A 1-D view of ``x`` in C order, or None where that would be a copy (or can't be told)."""
    flags = getattr(x, "flags", None)  # NumPy, CuPy
    if flags is not None:
        return x.reshape(-1) if flags.c_contiguous else None
    is_contiguous = getattr(x, "is_contiguous", None)  # torch
    if is_contiguous is not None:
        return x.view(-1) if is_contiguous() else None
    return None


def _as(xp, x, dtype):
    """x in ``dtype``: x itself when it already is (a NumPy scalar, the result of 0-d math, as an array)."""
    if isinstance(x, _np.generic):
        x = _np.asarray(x)
    return x if x.dtype == dtype else xp.astype(x, dtype)
