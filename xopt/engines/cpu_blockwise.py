"""The fused CPU kernel of 8-bit state (numba): an optimizer's element rule over its blockwise 8-bit buffers.

Per block of ``block_size`` elements, two short loops:

1. one pass over the block's elements: each kept buffer's code turned into its map value times the block's
   absmax (:func:`xopt.engines.cpu_codes.value`), widened to float64 for float64 params; the optimizer's element
   function (:data:`xopt.engines.cpu_rules.ELEMENTS`, the one its :class:`~xopt.engines.kernels.Kernel` names,
   which the float kernels' loops run too) on them, as the reference rule runs on the dequantized buffers; the
   param written, each new buffer value rounded to float32 into a scratch array of one block (in L1) and the
   largest magnitude kept (:func:`~xopt.engines.cpu_codes.magnitude_bits`);
2. each buffer's new absmax and the codes of its values (:func:`~xopt.engines.cpu_codes.set_absmax`,
   :func:`~xopt.engines.cpu_codes.store_block`).

An earlier form ran the float kernels' loops over whole blocks of dequantized scratch (dequantize, the rule,
the absmax, the codes: seven short loops a block for Adam); one pass for the first three took 0.62 ns an element
of 8-bit Adam against 1.12 (2^16 float32, one thread, in cache).

Which map a buffer takes (signed or unsigned: :func:`xopt.engines.blockwise.map_of`, from the optimizer's
``nonnegative_buffers``), which slots are kept, the rule's flags and whether the grads are scaled are constants
of the compiled code: one function per such key, made when a step of it first runs.  The numbers are those of
the reference (:mod:`xopt.engines.blockwise`) bit for bit: ``tests/test_state_8bit.py`` holds every optimizer's
kernel to it.

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
from .cpu_codes import larger, magnitude_bits, set_absmax, store_block, value
from .cpu_drivers import CHUNK, wait_done
from .cpu_memory import fetch_add
from .cpu_rules import ELEMENTS
from .cpu_step import PARALLEL_MIN
from .kernels import lookup

__all__ = ["supports", "apply"]

_NO_CODES, _NO_ABSMAX = np.zeros(0, np.uint8), np.zeros(0, np.float32)


def supports(opt) -> bool:
    """An optimizer with a fused element rule that runs one element at a time (:data:`~xopt.engines.cpu_rules.ELEMENTS`)."""
    kernel = lookup(opt)
    return kernel is not None and kernel.rule in ELEMENTS


# -- the kernel of one rule ------------------------------------------------------------------------------
def _widen(x, p):
    """float32 ``x`` in p's dtype (exact; compiled code only)."""
    raise TypeError("xopt.engines.cpu_blockwise._widen runs in compiled code only")


@overload(_widen, inline="always")
def _widen_overload(x, p):
    if p.dtype == types.float32:
        return lambda x, p: x
    return lambda x, p: np.float64(x)


def _element(number, pi, gi, x0, x1, x2, s, flag0, flag1):
    """The element function of rule ``number`` (:data:`xopt.engines.cpu_rules.ELEMENTS`), compiled inline where it
    is called (compiled code only; ``number`` a compile-time constant)."""
    raise TypeError("xopt.engines.cpu_blockwise._element runs in compiled code only")


@overload(_element, prefer_literal=True, inline="always")
def _element_overload(number, pi, gi, x0, x1, x2, s, flag0, flag1):
    if not isinstance(number, types.IntegerLiteral):
        raise errors.TypingError("xopt: the 8-bit kernel's rule must be a compile-time constant")
    f = ELEMENTS[number.literal_value][0]

    def apply(number, pi, gi, x0, x1, x2, s, flag0, flag1):
        return f(pi, gi, x0, x1, x2, s, flag0, flag1)
    return apply


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def blocks(rule, signed0, signed1, signed2, keep0, keep1, keep2, flag0, flag1, scaled, b_lo, b_hi, p, g, c0, a0, c1,
           a1, c2, a2, s, clip, block, x0, x1, x2):
    """Blocks ``b_lo:b_hi`` of one param stepped: element rule number ``rule`` over its codes, slots on the signed
    map or not, kept or not (a slot not kept is never read or written), the rule's two flags and whether the grads
    are scaled by ``clip``: constants of the caller's compiled code (see :func:`_make_claim`), inlined into it.
    ``x0``, ``x1``, ``x2``: room for a block's new values of each kept slot (float32, at least
    ``min(block, p.shape[0])``)."""
    n = p.shape[0]
    zero = _widen(np.float32(0.0), p)
    for b in range(b_lo, b_hi):
        lo = b * block
        k = min(block, n - lo)
        scale0 = a0[b] if keep0 else np.float32(0.0)
        scale1 = a1[b] if keep1 else np.float32(0.0)
        scale2 = a2[b] if keep2 else np.float32(0.0)
        top0 = top1 = top2 = np.uint32(0)
        # one pass: the values of the codes, the rule, the new values (float32) and their absmax (over
        # slices, indexed from 0: an index LLVM cannot prove >= 0 would be wrapped, and not vectorized)
        pb, gb, cb0, cb1, cb2 = p[lo:lo + k], g[lo:lo + k], c0[lo:lo + k], c1[lo:lo + k], c2[lo:lo + k]
        for j in range(k):
            gi = gb[j] * clip if scaled else gb[j]  # the caller's grads are only read
            y0 = _widen(value(cb0[j], signed0) * scale0, p) if keep0 else zero
            y1 = _widen(value(cb1[j], signed1) * scale1, p) if keep1 else zero
            y2 = _widen(value(cb2[j], signed2) * scale2, p) if keep2 else zero
            pb[j], y0, y1, y2 = _element(rule, pb[j], gi, y0, y1, y2, s, flag0, flag1)
            if keep0:
                z0 = np.float32(y0)
                x0[j] = z0
                top0 = larger(top0, magnitude_bits(z0))
            if keep1:
                z1 = np.float32(y1)
                x1[j] = z1
                top1 = larger(top1, magnitude_bits(z1))
            if keep2:
                z2 = np.float32(y2)
                x2[j] = z2
                top2 = larger(top2, magnitude_bits(z2))
        # then their codes, on the new absmax
        if keep0:
            store_block(x0, k, c0, lo, set_absmax(top0, a0, b), signed0)
        if keep1:
            store_block(x1, k, c1, lo, set_absmax(top1, a1, b), signed1)
        if keep2:
            store_block(x2, k, c2, lo, set_absmax(top2, a2, b), signed2)


_CLAIMS = {}  # (rule, the slots' maps, the slots kept, the rule's flags, scaled) -> its compiled claim function


def _claim_of(key):
    found = _CLAIMS.get(key)
    if found is None:
        found = _CLAIMS[key] = _make_claim(*key)
    return found


def _make_claim(rule, signed, keep, flags, scaled):
    """The claim function of element rule number ``rule`` with the three slots on the signed map or not
    (``signed``), kept or not (``keep``: a slot not kept is never read or written), the rule's two ``flags`` and
    whether the grads are ``scaled`` by the clip factor: all constants of the compiled code, plain values, so
    numba compiles it once per closure's constants (and caches it on disk keyed by them)."""
    (signed0, signed1, signed2), (keep0, keep1, keep2), (flag0, flag1) = signed, keep, flags

    @njit(cache=True, nogil=True, error_model="numpy")
    def claim(counters, per, nb, p, g, c0, a0, c1, a1, c2, a2, s, clip, block):
        """Take runs of ``per`` blocks (``counters[0]``: the next) until none is left; ``counters[1]`` counts
        those done."""
        base = counters.ctypes.data
        units = -(-nb // per)
        width = min(block, p.shape[0])  # a block's new values at most (a block_size above the size: the param's)
        x0 = np.empty(width if keep0 else 0, np.float32)
        x1 = np.empty(width if keep1 else 0, np.float32)
        x2 = np.empty(width if keep2 else 0, np.float32)
        u = fetch_add(base, 1)
        while u < units:
            blocks(rule, signed0, signed1, signed2, keep0, keep1, keep2, flag0, flag1, scaled, u * per,
                   min(nb, (u + 1) * per), p, g, c0, a0, c1, a1, c2, a2, s, clip, block, x0, x1, x2)
            fetch_add(base + 8, 1)
            u = fetch_add(base, 1)

    return claim


_NONE_DONE = np.zeros(2, dtype=np.int64)  # counters of no work, for wait_done's typing call


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
    made = {}  # (hyperparameter set, its scalars, compute dtype, clip) -> what its entries share (this call's)
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
        flat_g, _ = _flat(g, work)  # read-only grads too (only read: their own compiled signature, no copy)
        at = (id(view), id(e.scalars), work, e.clip)
        shared = made.get(at)
        if shared is None:
            shared = made[at] = _shared(view, e.scalars, work, e.clip)
        slots, keep, s, clip, claim_blocks, typed = shared
        st = e.state
        arrays = []
        for name, kept in zip(slots, keep):
            if kept:
                arrays += [st[name].reshape(-1), st[name + SUFFIX]]
            else:
                arrays += [_NO_CODES, _NO_ABSMAX]
        # a block_size above the size is one block of the size (the kernel's int64, whatever the block_size)
        run = min(block, flat_p.shape[0])
        nb = n_blocks(flat_p.shape[0], run)
        threads = min(get_num_threads(), nb) if flat_p.shape[0] >= PARALLEL_MIN else 1
        per = max(1, CHUNK // run) if threads > 1 else nb
        units = -(-nb // per)
        args = (per, nb, flat_p, flat_g, *arrays, s, clip, run)
        # the absmax arrays' alignment (the others are aligned) and whether the grad is writable: the types
        aligned = (*(a.flags.aligned for a in arrays[1::2]), flat_g.flags.writeable)
        if aligned not in typed:  # typed (and loaded) here, not among the writes: calls that run no block
            claim_blocks(np.array([units, 0], dtype=np.int64), *args)
            wait_done(_NONE_DONE, 0)  # in the writes after a first param's blocks: typed before them too
            typed.add(aligned)
        counters = np.zeros(2, dtype=np.int64)
        claim = functools.partial(claim_blocks, counters, *args)
        if threads > 1:
            writes += [functools.partial(pool(threads).put, claim)] * (threads - 1)
        writes += [claim, functools.partial(wait_done, counters, units)]
        if copied:
            writes.append(functools.partial(operator.setitem, p, Ellipsis, flat_p.reshape(p.shape)))
    return writes


def _shared(view, scalars, work, clip):
    """What the entries of one hyperparameter set, step and compute dtype share: (the kernel's slots padded to
    three, which of them the set keeps, its scalars as a tuple of ``work`` numbers, the clip factor, the claim
    function, the types (absmax arrays' alignments, the grad's writability) it was already called with)."""
    kernel, names = lookup(view), view.buffers()
    slots = kernel.slots + ("",) * (3 - len(kernel.slots))
    keep = tuple(name in names for name in slots)
    signed = tuple(map_of(view, name) is SIGNED for name in kernel.slots) + (True,) * (3 - len(kernel.slots))
    # the scalars as a tuple, not an array: no loads in the rule's loop for LLVM to check against its stores
    # (with them it does not vectorize the loop)
    s = tuple(work.type(x) for x in kernel.order(scalars))
    flags = tuple(bool(f) for f in ELEMENTS[kernel.rule][1].py_func(s))
    clip = work.type(1.0 if clip is None else clip)
    return slots, keep, s, clip, _claim_of((kernel.rule, signed, keep, flags, bool(clip != 1.0))), set()
