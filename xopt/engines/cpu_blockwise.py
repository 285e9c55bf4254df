"""The fused CPU kernel of 8-bit state (numba): an optimizer's element rule over its blockwise 8-bit buffers in one
pass.

Per block of ``block_size`` elements, each step a short loop over scratch arrays of one block (in L1):

1. dequantize: each kept buffer's codes turned into their map values times the block's absmax
   (:func:`xopt.engines.cpu_codes.load_block`), widened to float64 for float64 params;
2. the optimizer's element rule of the float kernels (:data:`xopt.engines.cpu_rules.RULES`, the one its
   :class:`~xopt.engines.kernels.Kernel` names) over the block: the param written, the new buffers in the
   scratch arrays, as the reference rule runs on the dequantized buffers;
3. each buffer rounded to float32, its new absmax and the codes of its values
   (:func:`~xopt.engines.cpu_codes.block_absmax`, :func:`~xopt.engines.cpu_codes.store_block`).

Which map a buffer takes (signed or unsigned: :func:`xopt.engines.blockwise.map_of`, from the optimizer's
``nonnegative_buffers``) is a constant of the compiled code: one function per (rule, the three slots' maps), made
when a step of it first runs.  The numbers are those of the reference (:mod:`xopt.engines.blockwise`) bit for bit:
``tests/test_state_8bit.py`` holds every optimizer's kernel to it.

A param of at least ``fused_cpu.PARALLEL_MIN`` elements is split into runs of whole blocks over
``get_num_threads()`` threads (the caller and xopt's pool of workers, :mod:`xopt._threads`).
"""

from __future__ import annotations

import functools
import operator

import numpy as np
from numba import njit, types
from numba.core import errors
from numba.extending import overload

from .. import _backend
from .._threads import get_num_threads, pool
from .blockwise import SIGNED, SUFFIX, map_of, n_blocks
from .cpu_codes import block_absmax, load_block, store_block
from .cpu_drivers import CHUNK, wait_done
from .cpu_memory import fetch_add
from .cpu_rules import RULES
from .fused_cpu import PARALLEL_MIN
from .kernels import lookup

__all__ = ["supports", "apply"]

_NO_CODES, _NO_ABSMAX = np.zeros(0, np.uint8), np.zeros(0, np.float32)


def supports(opt) -> bool:
    """An optimizer with a fused element rule (every buffer's map is one the kernel computes)."""
    return lookup(opt) is not None


# -- float32 values and the rule's dtype -----------------------------------------------------------------
def _work(x, p):
    """The scratch the rule reads for float32 scratch ``x``: ``x`` itself for float32 params, one of p's dtype
    (float64) of the same size otherwise (compiled code only)."""
    raise TypeError("xopt.engines.cpu_blockwise._work runs in compiled code only")


@overload(_work, inline="always")
def _work_overload(x, p):
    if x.dtype == p.dtype:
        return lambda x, p: x
    return lambda x, p: np.empty(x.shape[0], p.dtype)


def _copy(src, dst, k):
    """``dst[:k] = src[:k]`` in dst's dtype (float32 -> float64 exact, float64 -> float32 rounded); nothing
    where they are one array (compiled code only)."""
    raise TypeError("xopt.engines.cpu_blockwise._copy runs in compiled code only")


@overload(_copy, inline="always")
def _copy_overload(src, dst, k):
    if src.dtype == dst.dtype:
        return lambda src, dst, k: None

    def copy(src, dst, k):
        for j in range(k):
            dst[j] = src[j]
    return copy


# -- the kernel of one rule ------------------------------------------------------------------------------
def _rule(number, p, g, x0, x1, x2, s):
    """The float kernels' element rule ``number`` (:data:`xopt.engines.cpu_rules.RULES`) over ``p``, ``g`` and the
    three slots, compiled inline where it is called (compiled code only; ``number`` a compile-time constant)."""
    raise TypeError("xopt.engines.cpu_blockwise._rule runs in compiled code only")


_INLINE = {}  # rule number -> the rule compiled to be inlined


@overload(_rule, prefer_literal=True, inline="always")
def _rule_overload(number, p, g, x0, x1, x2, s):
    if not isinstance(number, types.IntegerLiteral):
        raise errors.TypingError("xopt: the 8-bit kernel's rule must be a compile-time constant")
    n = number.literal_value
    if n not in _INLINE:
        # inline into the block loop: called instead, a step of 8-bit Adam on 2^24 float32 elements took 1.4-1.9x
        # the time of the Adam-only kernel this one replaced, in the same runs
        _INLINE[n] = njit(inline="always", cache=True, nogil=True, error_model="numpy")(RULES[n].py_func)
    f = _INLINE[n]

    def apply(number, p, g, x0, x1, x2, s):
        f(p, g, x0, x1, x2, s)
    return apply


_CLAIMS = {}  # (rule number, the three slots' maps: signed or not) -> its compiled claim function


def _claim_of(rule, signed):
    found = _CLAIMS.get((rule, signed))
    if found is None:
        found = _CLAIMS[(rule, signed)] = _make_claim(rule, *signed)
    return found


def _make_claim(rule, signed0, signed1, signed2):
    """The claim function of element rule number ``rule`` with slots on the signed map or not (``signed0..2``):
    numba compiles it once per closure's constants, plain numbers (and caches it on disk keyed by them)."""

    @njit(cache=True, nogil=True, error_model="numpy")
    def claim(counters, per, nb, p, g, c0, a0, c1, a1, c2, a2, s, clip, block):
        """Take runs of ``per`` blocks (``counters[0]``: the next) until none is left; ``counters[1]`` counts
        those done.  A slot whose absmax is empty is not kept: the rule never reads it."""
        base = counters.ctypes.data
        units = -(-nb // per)
        n = p.shape[0]
        keep0, keep1, keep2, scaled = a0.shape[0] > 0, a1.shape[0] > 0, a2.shape[0] > 0, clip != 1.0
        x0 = np.empty(block if keep0 else 0, np.float32)
        x1 = np.empty(block if keep1 else 0, np.float32)
        x2 = np.empty(block if keep2 else 0, np.float32)
        w0, w1, w2 = _work(x0, p), _work(x1, p), _work(x2, p)
        gs = np.empty(block if scaled else 0, p.dtype)
        while True:
            u = fetch_add(base, 1)
            if u >= units:
                return
            for b in range(u * per, min(nb, (u + 1) * per)):
                lo = b * block
                k = min(block, n - lo)
                if keep0:
                    load_block(c0, lo, k, a0[b], x0, signed0)
                    _copy(x0, w0, k)
                if keep1:
                    load_block(c1, lo, k, a1[b], x1, signed1)
                    _copy(x1, w1, k)
                if keep2:
                    load_block(c2, lo, k, a2[b], x2, signed2)
                    _copy(x2, w2, k)
                gb = g[lo:lo + k]
                if scaled:  # the grads times the clip scale, a block at a time: the caller's are only read
                    for j in range(k):
                        gs[j] = gb[j] * clip
                    gb = gs[:k]
                _rule(rule, p[lo:lo + k], gb, w0[:k], w1[:k], w2[:k], s)
                if keep0:
                    _copy(w0, x0, k)
                    store_block(x0, k, c0, lo, block_absmax(x0, k, a0, b), signed0)
                if keep1:
                    _copy(w1, x1, k)
                    store_block(x1, k, c1, lo, block_absmax(x1, k, a1, b), signed1)
                if keep2:
                    _copy(w2, x2, k)
                    store_block(x2, k, c2, lo, block_absmax(x2, k, a2, b), signed2)
            fetch_add(base + 8, 1)

    return claim


def _flat(a, dtype):
    """A 1-D C-contiguous array of ``dtype`` holding ``a``: a view where it can be, else a copy (None then
    the second item: the copy needs writing back)."""
    if type(a) is np.ndarray and a.dtype == dtype and a.flags.c_contiguous and a.flags.aligned:
        return a.reshape(-1), False
    return np.array(a, dtype=dtype, order="C").reshape(-1), True


def apply(opt, entries) -> list:
    """The checked path's call: the writes (calls into C) that run the kernel over each entry (NumPy params of
    at least ``min_8bit_size`` elements, their state made by :func:`xopt.state_8bit.state_for`)."""
    writes = []
    block = opt._hyper["block_size"]
    for e in entries:
        view = e.opt if e.opt is not None else opt
        p = e.p
        if p.size == 0:  # nothing to update (and no block to split)
            continue
        work = np.dtype(_backend.compute_dtype(np, p.dtype))
        flat_p, copied = _flat(p, work)
        g = np.asarray(e.g)
        if g.shape != p.shape:
            g = np.broadcast_to(g, p.shape)
        flat_g, _ = _flat(g, work)
        if flat_g.flags.writeable is False:
            flat_g = flat_g.copy()
        st = e.state
        kernel, names = lookup(view), view.buffers()
        arrays = []
        for name in kernel.slots + ("",) * (3 - len(kernel.slots)):
            if name in names:
                arrays += [st[name].reshape(-1), st[name + SUFFIX]]
            else:
                arrays += [_NO_CODES, _NO_ABSMAX]
        signed = tuple(map_of(view, name) is SIGNED for name in kernel.slots) + (True,) * (3 - len(kernel.slots))
        claim_blocks = _claim_of(kernel.rule, signed)
        # the scalars as a tuple, not an array: no loads in the rule's loop for LLVM to check against its stores
        # (with them it does not vectorize the loop)
        s = tuple(work.type(x) for x in kernel.order(e.scalars))
        clip = work.type(1.0 if e.clip is None else e.clip)
        nb = n_blocks(flat_p.shape[0], block)
        threads = min(get_num_threads(), nb) if flat_p.shape[0] >= PARALLEL_MIN else 1
        per = max(1, CHUNK // block) if threads > 1 else nb
        units = -(-nb // per)
        args = (per, nb, flat_p, flat_g, *arrays, s, clip, block)
        claim_blocks(np.array([units, 0], dtype=np.int64), *args)  # typed (and loaded) here, not among the writes
        counters = np.zeros(2, dtype=np.int64)
        claim = functools.partial(claim_blocks, counters, *args)
        if threads > 1:
            writes += [functools.partial(pool(threads).put, claim)] * (threads - 1)
        writes += [claim, functools.partial(wait_done, counters, units)]
        if copied:
            writes.append(functools.partial(operator.setitem, p, Ellipsis, flat_p.reshape(p.shape)))
    return writes
