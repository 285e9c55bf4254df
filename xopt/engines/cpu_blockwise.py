"""The fused CPU kernel of 8-bit state (numba): Adam and AdamW over blockwise 8-bit m and v in one pass.

Per block of ``block_size`` elements: read the codes and the block's absmax, dequantize, run Adam's
element rule (:func:`xopt.engines.cpu_rules._adam_element`, the one the float kernels run), write the
param, keep the new m and v of the block (float32) in a scratch array that stays in L1, then their new
absmax and codes.  The numbers are those of the reference (:mod:`xopt.engines.blockwise`) bit for bit;
the code of a value comes from a table over its float32 top 16 bits and one comparison
(:func:`~xopt.engines.blockwise.bucket_table`) instead of a binary search over the 255 thresholds.

A param of at least ``fused_cpu.PARALLEL_MIN`` elements is split into runs of whole blocks over
``get_num_threads()`` threads (the caller and xopt's pool of workers, :mod:`xopt._threads`).
"""

from __future__ import annotations

import functools
import operator

import numpy as np
from numba import njit

from .. import _backend
from .._threads import get_num_threads, pool
from .blockwise import SIGNED, SUFFIX, UNSIGNED, bucket_table, map_of, midpoints, n_blocks
from .cpu_memory import fetch_add
from .cpu_rules import CHUNK, _adam_element, wait_done
from .fused_cpu import PARALLEL_MIN
from .kernels import lookup

__all__ = ["supports", "apply"]

_TABLES = {id(m): (m, bucket_table(midpoints(m)), midpoints(m)) for m in (SIGNED, UNSIGNED)}
_NO_CODES, _NO_ABSMAX = np.zeros(0, np.uint8), np.zeros(0, np.float32)


def supports(opt) -> bool:
    """Adam and AdamW (the Adam element rule)."""
    found = lookup(opt)
    return found is not None and found.name == "adam"


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _store(x, k, codes, lo, absmax, b, table, mid, y):
    """Block b's new values ``x[:k]`` (float32) as its absmax and codes (see blockwise.quantize)."""
    # The largest |x| as the largest of the bits with the sign cleared: for floats >= 0 the integers order
    # alike, and any NaN's bits are above inf's, so a NaN wins as it does in xp.max (one NaN kept: the quiet
    # one arithmetic makes).  An integer maximum vectorizes; a float one with NaN kept does not.
    xbits = x.view(np.uint32)
    top_bits = np.uint32(0)
    for j in range(k):
        top_bits = max(top_bits, xbits[j] & np.uint32(0x7FFFFFFF))
    if top_bits > np.uint32(0x7F800000):
        top_bits = np.uint32(0x7FC00000)
    ybits = y.view(np.uint32)
    ybits[0] = top_bits
    top = y[0]
    absmax[b] = top
    inverse = np.float32(1.0) / (top if top != 0.0 else np.float32(1.0))
    for j in range(k):
        y[j] = x[j] * inverse
    bits = ybits
    for j in range(k):
        c = table[bits[j] >> 16]
        if mid[c] < y[j]:
            c += 1
        codes[lo + j] = c


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _adam_blocks(p, g, m, m_max, v, v_max, x, x_max, s, clip, b0, b1, block, tables, amsgrad, divide):
    sm, tm, mm, su, tu, mu = tables
    n = p.shape[0]
    new_m = np.empty(block, np.float32)
    new_v = np.empty(block, np.float32)
    new_x = np.empty(block if amsgrad else 0, np.float32)
    y = np.empty(block, np.float32)
    for b in range(b0, b1):
        lo = b * block
        k = min(block, n - lo)
        am, av = m_max[b], v_max[b]
        ax = x_max[b] if amsgrad else np.float32(0.0)
        for j in range(k):
            i = lo + j
            xi = su[x[i]] * ax if amsgrad else s[8]
            p[i], mi, vi, xi = _adam_element(p[i], g[i] * clip, sm[m[i]] * am, su[v[i]] * av, xi, s, amsgrad,
                                             divide)
            new_m[j], new_v[j] = np.float32(mi), np.float32(vi)
            if amsgrad:
                new_x[j] = np.float32(xi)
        _store(new_m, k, m, lo, m_max, b, tm, mm, y)
        _store(new_v, k, v, lo, v_max, b, tu, mu, y)
        if amsgrad:
            _store(new_x, k, x, lo, x_max, b, tu, mu, y)


@njit(cache=True, nogil=True, error_model="numpy")
def _claim(counters, per, nb, p, g, m, m_max, v, v_max, x, x_max, s, clip, block, tables):
    """Take runs of ``per`` blocks (``counters[0]``: the next) until none is left; ``counters[1]`` counts those
    done.  One loop per (amsgrad, divide), as the float kernels: each compiled without the tests."""
    base = counters.ctypes.data
    units = -(-nb // per)
    amsgrad, divide = s[8] != 0.0, s[5] != 1.0
    while True:
        u = fetch_add(base, 1)
        if u >= units:
            return
        b0, b1 = u * per, min(nb, (u + 1) * per)
        if amsgrad and divide:
            _adam_blocks(p, g, m, m_max, v, v_max, x, x_max, s, clip, b0, b1, block, tables, True, True)
        elif amsgrad:
            _adam_blocks(p, g, m, m_max, v, v_max, x, x_max, s, clip, b0, b1, block, tables, True, False)
        elif divide:
            _adam_blocks(p, g, m, m_max, v, v_max, x, x_max, s, clip, b0, b1, block, tables, False, True)
        else:
            _adam_blocks(p, g, m, m_max, v, v_max, x, x_max, s, clip, b0, b1, block, tables, False, False)
        fetch_add(base + 8, 1)


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
        work = np.dtype(_backend.compute_dtype(np, p.dtype))
        flat_p, copied = _flat(p, work)
        g = np.asarray(e.g)
        if g.shape != p.shape:
            g = np.broadcast_to(g, p.shape)
        flat_g, _ = _flat(g, work)
        if flat_g.flags.writeable is False:
            flat_g = flat_g.copy()
        st = e.state
        names = view.buffers()
        arrays = []
        for name in ("m", "v", "v_max"):
            if name in names:
                arrays += [st[name].reshape(-1), st[name + SUFFIX]]
            else:
                arrays += [_NO_CODES, _NO_ABSMAX]
        s = np.array(lookup(view).order(e.scalars), dtype=work)
        clip = work.type(1.0 if e.clip is None else e.clip)
        sm, tm, mm = _TABLES[id(map_of(view, "m"))]
        su, tu, mu = _TABLES[id(map_of(view, "v"))]
        tables = (sm, tm, mm, su, tu, mu)
        nb = n_blocks(flat_p.shape[0], block)
        threads = min(get_num_threads(), nb) if flat_p.shape[0] >= PARALLEL_MIN else 1
        per = max(1, CHUNK // block) if threads > 1 else nb
        units = -(-nb // per)
        args = (per, nb, flat_p, flat_g, *arrays, s, clip, block, tables)
        _claim(np.array([units, 0], dtype=np.int64), *args)  # typed (and loaded) here, not among the writes
        counters = np.zeros(2, dtype=np.int64)
        claim = functools.partial(_claim, counters, *args)
        if threads > 1:
            writes += [functools.partial(pool(threads).put, claim)] * (threads - 1)
        writes += [claim, functools.partial(wait_done, counters, units)]
        if copied:
            writes.append(functools.partial(operator.setitem, p, Ellipsis, flat_p.reshape(p.shape)))
    return writes
