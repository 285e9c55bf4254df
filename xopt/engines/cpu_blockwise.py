"""The fused CPU kernel of 8-bit state (numba): Adam and AdamW over blockwise 8-bit m and v in one pass.

Per block of ``block_size`` elements, each step a short loop over scratch arrays of one block (in L1):

1. dequantize: each buffer's codes looked up in its map of 256 float32 values, 16 at a time by a gather
   (:func:`_gather`), then times the block's absmax;
2. Adam's element rule (:func:`xopt.engines.cpu_rules._adam_element`, the one the float kernels run) over the
   block: the param written, the new m and v (rounded to float32) kept in the scratch arrays;
3. each buffer's new absmax (an integer maximum of the bits), the values times its inverse, and their codes:
   a gather from a table over the top 16 bits of an order-preserving integer key of the float, whose entry
   holds the code at the bottom of that range and the low 16 bits of the one threshold inside it, if any
   (:func:`key_table`); one integer comparison then gives the code.

Every loop but the gathers is one LLVM vectorizes (no calls, no branches per element); the gathers are
``llvm.masked.gather`` (vgatherdps on AVX2 and AVX-512; element loads on CPUs without gathers).  The numbers are
those of the reference (:mod:`xopt.engines.blockwise`) bit for bit: ``tests/test_state_8bit.py`` holds the
kernel to it, and checks the key table against ``count(mid < y)`` at every end and threshold of every range.

A param of at least ``fused_cpu.PARALLEL_MIN`` elements is split into runs of whole blocks over
``get_num_threads()`` threads (the caller and xopt's pool of workers, :mod:`xopt._threads`).
"""

from __future__ import annotations

import functools
import operator

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import make_array

from .. import _backend
from .._threads import get_num_threads, pool
from .blockwise import SIGNED, SUFFIX, UNSIGNED, map_of, midpoints, n_blocks
from .cpu_memory import fetch_add
from .cpu_drivers import CHUNK, wait_done
from .cpu_rules import _adam_element
from .fused_cpu import PARALLEL_MIN
from .kernels import lookup

__all__ = ["supports", "apply", "key_table", "table_code"]

LANES = 16  # elements per gather


def _keys(bits):
    """uint32 keys of float32 ``bits`` that order as the floats do (-0.0 just below +0.0; NaNs at both ends)."""
    bits = np.asarray(bits, dtype=np.uint32)
    return bits ^ np.where(bits >> 31 != 0, np.uint32(0xFFFFFFFF), np.uint32(0x80000000)).astype(np.uint32)


def key_table(mid: np.ndarray) -> np.ndarray:
    """uint32[65536], one entry per value ``t`` of a key's top 16 bits (:func:`_keys`): ``code << 16 | low``, where
    ``code`` is ``count(mid < y)`` for the smallest non-NaN y in the range and ``low`` the low 16 bits of the key of
    the one threshold ``mid[code]`` inside the range, or 0xFFFF if none is (checked here: no range holds two).
    A y in the range then has the code ``code + (key(y) & 0xFFFF > low)`` (:func:`table_code`).  A range of
    NaNs has the code 255; the two ranges that hold an infinity and signaling NaNs have the infinity's code (the
    kernel's values are products, whose NaNs are quiet)."""
    t = np.arange(1 << 16, dtype=np.uint32) << 16
    keys = np.stack([t, t | 0xFFFF])  # each range's smallest and largest key
    ends = (keys ^ np.where(keys >> 31 != 0, np.uint32(0x80000000), np.uint32(0xFFFFFFFF))).view(np.float32)
    # Two ranges hold an infinity and NaNs: -inf is the largest key of its range, +inf the smallest of its.
    ends = np.where(np.isnan(ends), ends[::-1], ends)
    first = np.searchsorted(mid[:255], ends[0], side="left")
    last = np.searchsorted(mid[:255], ends[1], side="left")
    nan = np.isnan(ends[0])
    assert np.all((last - first <= 1) | nan), "a range holds two thresholds"
    inside = (last == first + 1) & ~nan
    low = np.full(1 << 16, 0xFFFF, np.uint32)
    low[inside] = _keys(mid[first[inside]].view(np.uint32)) & 0xFFFF
    code = np.where(nan, 255, first).astype(np.uint32)
    return (code << 16) | low


def table_code(table, y):
    """The codes of float32 ``y`` by ``table`` (:func:`key_table`), as the kernel computes them (NumPy)."""
    key = _keys(np.asarray(y, np.float32).view(np.uint32))
    entry = table[key >> 16]
    return ((entry >> 16) + ((key & 0xFFFF) > (entry & 0xFFFF))).astype(np.uint8)


_TABLES = {id(m): (m, key_table(midpoints(m))) for m in (SIGNED, UNSIGNED)}
_NO_CODES, _NO_ABSMAX = np.zeros(0, np.uint8), np.zeros(0, np.float32)


def supports(opt) -> bool:
    """Adam and AdamW (the Adam element rule)."""
    found = lookup(opt)
    return found is not None and found.name == "adam"


@intrinsic
def _gather16(typingctx, table, index, start, out, j):
    """``out[j:j + 16] = table[index[start:start + 16]]``: 32-bit ``table`` and ``out``, unsigned ``index``, one
    ``llvm.masked.gather``.  The caller keeps every index in bounds."""
    if table.dtype.bitwidth != 32 or out.dtype != table.dtype or not isinstance(index.dtype, types.Integer):
        return None
    sig = types.void(table, index, start, out, j)

    def codegen(context, builder, signature, args):
        at, ai, _, ao, _ = signature.args
        tab = make_array(at)(context, builder, args[0])
        idx = make_array(ai)(context, builder, args[1])
        dst = make_array(ao)(context, builder, args[3])
        i32, i64 = ir.IntType(32), ir.IntType(64)
        elt = context.get_value_type(at.dtype)
        vec = ir.VectorType(elt, LANES)
        wide = ir.VectorType(i64, LANES)
        codes = builder.load(builder.bitcast(builder.gep(idx.data, [args[2]]),
                                             ir.VectorType(ir.IntType(ai.dtype.bitwidth), LANES).as_pointer()), align=1)
        base = builder.insert_element(ir.Constant(wide, ir.Undefined), builder.ptrtoint(tab.data, i64),
                                      ir.Constant(i32, 0))
        base = builder.shuffle_vector(base, base, ir.Constant(ir.VectorType(i32, LANES), [0] * LANES))
        offsets = builder.shl(builder.zext(codes, wide), ir.Constant(wide, [2] * LANES))
        ptrs = builder.inttoptr(builder.add(base, offsets), ir.VectorType(elt.as_pointer(), LANES))
        kind = "f32" if isinstance(elt, ir.FloatType) else "i32"
        mask = ir.VectorType(ir.IntType(1), LANES)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [ptrs.type, i32, mask, vec]),
            f"llvm.masked.gather.v{LANES}{kind}.v{LANES}p0")
        got = builder.call(fn, [ptrs, ir.Constant(i32, 4), ir.Constant(mask, [1] * LANES), ir.Constant(vec, ir.Undefined)])
        builder.store(got, builder.bitcast(builder.gep(dst.data, [args[4]]), vec.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _gather(table, index, start, out, k):
    """``out[:k] = table[index[start:start + k]]``."""
    j = 0
    while j + LANES <= k:
        _gather16(table, index, start + j, out, j)
        j += LANES
    for t in range(j, k):
        out[t] = table[index[start + t]]


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _load(codes, lo, k, table, absmax, x):
    """``x[:k]``: the values of block codes ``codes[lo:lo + k]`` (float32, ``map[code] * absmax``)."""
    _gather(table, codes, lo, x, k)
    a = absmax
    for j in range(k):
        x[j] = x[j] * a


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _store(x, k, codes, lo, absmax, b, table, key, entry):
    """Block b's new values ``x[:k]`` (float32) as its absmax and codes (see blockwise.quantize); ``x`` is
    overwritten (by the values over absmax), ``key`` and ``entry`` are uint32 scratch."""
    # The largest |x| as the largest of the bits with the sign cleared: for floats >= 0 the integers order
    # alike, and any NaN's bits are above inf's, so a NaN wins as it does in xp.max (one NaN kept: the quiet
    # one arithmetic makes).  An integer maximum vectorizes; a float one with NaN kept does not.
    xbits = x.view(np.uint32)
    top_bits = np.uint32(0)
    for j in range(k):
        top_bits = max(top_bits, xbits[j] & np.uint32(0x7FFFFFFF))
    if top_bits > np.uint32(0x7F800000):
        top_bits = np.uint32(0x7FC00000)
    key[0] = top_bits
    top = key.view(np.float32)[0]
    absmax[b] = top
    inverse = np.float32(1.0) / (top if top != 0.0 else np.float32(1.0))
    # y = x / absmax (as the reference: times the inverse), then its key's top bits.  A NaN y is a product's, so
    # quiet: its key's range holds only NaNs, whose table code is 255 (no test for NaN here).
    for j in range(k):
        y = x[j] * inverse
        x[j] = y
        u = xbits[j]
        flip = np.uint32(np.int32(u) >> np.int32(31)) | np.uint32(0x80000000)
        key[j] = (u ^ flip) >> np.uint32(16)
    _gather(table, key, 0, entry, k)
    out = codes[lo:lo + k]
    for j in range(k):
        u = xbits[j]
        flip = np.uint32(np.int32(u) >> np.int32(31)) | np.uint32(0x80000000)
        e = entry[j]
        up = np.uint32(((u ^ flip) & np.uint32(0xFFFF)) > (e & np.uint32(0xFFFF)))
        out[j] = np.uint8((e >> np.uint32(16)) + up)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _adam_blocks(p, g, m, m_max, v, v_max, x, x_max, s, clip, b0, b1, block, tables, amsgrad, divide):
    sm, tm, su, tu = tables
    n = p.shape[0]
    new_m = np.empty(block, np.float32)
    new_v = np.empty(block, np.float32)
    new_x = np.empty(block if amsgrad else 0, np.float32)
    key = np.empty(block, np.uint32)
    entry = np.empty(block, np.uint32)
    # The scalars as a tuple, not an array: no loads in the loop for LLVM to check against its stores (with them
    # it does not vectorize the loop).
    sc = (s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8])
    for b in range(b0, b1):
        lo = b * block
        k = min(block, n - lo)
        _load(m, lo, k, sm, m_max[b], new_m)
        _load(v, lo, k, su, v_max[b], new_v)
        if amsgrad:
            _load(x, lo, k, su, x_max[b], new_x)
        pb, gb = p[lo:lo + k], g[lo:lo + k]
        for j in range(k):
            pb[j], mi, vi, xi = _adam_element(pb[j], gb[j] * clip, new_m[j], new_v[j],
                                              new_x[j] if amsgrad else sc[8], sc, amsgrad, divide)
            new_m[j], new_v[j] = np.float32(mi), np.float32(vi)
            if amsgrad:
                new_x[j] = np.float32(xi)
        _store(new_m, k, m, lo, m_max, b, tm, key, entry)
        _store(new_v, k, v, lo, v_max, b, tu, key, entry)
        if amsgrad:
            _store(new_x, k, x, lo, x_max, b, tu, key, entry)


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
        names = view.buffers()
        arrays = []
        for name in ("m", "v", "v_max"):
            if name in names:
                arrays += [st[name].reshape(-1), st[name + SUFFIX]]
            else:
                arrays += [_NO_CODES, _NO_ABSMAX]
        s = np.array(lookup(view).order(e.scalars), dtype=work)
        clip = work.type(1.0 if e.clip is None else e.clip)
        sm, tm = _TABLES[id(map_of(view, "m"))]
        su, tu = _TABLES[id(map_of(view, "v"))]
        tables = (sm, tm, su, tu)
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
