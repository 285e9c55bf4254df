"""The fused CPU kernel of 8-bit state (numba): Adam and AdamW over blockwise 8-bit m and v in one pass.

Per block of ``block_size`` elements, each step a short loop over scratch arrays of one block (in L1):

1. dequantize: each buffer's codes turned into their map values by arithmetic on the bits (the maps are small
   float formats, :func:`xopt.engines.blockwise.float_map`), 16 at a time, times the block's absmax;
2. Adam's element rule (:func:`xopt.engines.cpu_rules._adam_element`, the one the float kernels run) over the
   block: the param written, the new m and v (rounded to float32) kept in the scratch arrays;
3. each buffer's new absmax (an integer maximum of the bits), and the codes of the values times its inverse,
   16 at a time: the float bits rounded to the format's fraction bits by an integer add and shift, the
   subnormals by a truncation, with the reference's tie rule (a tie to the smaller value).

The codes and values are LLVM instructions on vectors of 16 32-bit lanes (:func:`_code_ir`, :func:`_value_ir`;
numba's own integer arithmetic is 64-bit), with no branches and no table.  The numbers are those of the reference
(:mod:`xopt.engines.blockwise`: searchsorted on the midpoints, a take from the map) bit for bit:
``tests/test_state_8bit.py`` holds the kernel to it, and checks the codes at every threshold, its neighbours
and powers of two (and, once, all 2^32 float32 against searchsorted, both maps).

A param of at least ``fused_cpu.PARALLEL_MIN`` elements is split into runs of whole blocks over
``get_num_threads()`` threads (the caller and xopt's pool of workers, :mod:`xopt._threads`).
"""

from __future__ import annotations

import functools
import operator

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic
from numba.np.arrayobj import make_array

from .. import _backend
from .._threads import get_num_threads, pool
from .blockwise import SIGNED, SIGNED_FORMAT, SUFFIX, UNSIGNED, UNSIGNED_FORMAT, map_of, n_blocks
from .cpu_memory import fetch_add
from .cpu_drivers import CHUNK, wait_done
from .cpu_rules import _adam_element
from .fused_cpu import PARALLEL_MIN
from .kernels import lookup

__all__ = ["supports", "apply", "codes_of", "values_of"]

_NO_CODES, _NO_ABSMAX = np.zeros(0, np.uint8), np.zeros(0, np.float32)


def supports(opt) -> bool:
    """Adam and AdamW (the Adam element rule) on the maps the kernel computes: m on ``SIGNED``, v (and v_max) on
    ``UNSIGNED``."""
    found = lookup(opt)
    return (found is not None and found.name == "adam" and map_of(opt, "m") is SIGNED
            and map_of(opt, "v") is UNSIGNED)


@intrinsic
def _float(typingctx, u):
    """The float32 of bits ``u`` (an integer: its low 32 bits)."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if u.bitwidth != 32:
            value = builder.trunc(value, ir.IntType(32)) if u.bitwidth > 32 else builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(u), codegen


@intrinsic
def _magnitude(typingctx, x):
    """The bits of float32 ``x`` with the sign cleared (uint32): they order as the magnitudes do, and a NaN's are
    above inf's."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.and_(builder.bitcast(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 0x7FFFFFFF))

    return types.uint32(x), codegen


@intrinsic
def _max32(typingctx, a, b):
    """The larger of uint32 ``a`` and ``b``, in 32 bits (numba's own max widens to 64)."""
    if a != types.uint32 or b != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.select(builder.icmp_unsigned(">", args[0], args[1]), args[0], args[1])

    return types.uint32(a, b), codegen


# The two functions of a map, written as LLVM instructions on 32-bit lanes (numba's own integer arithmetic is
# 64-bit, which halves the lanes of a vector): no branches, so a loop of them vectorizes.
_I32, _F32 = ir.IntType(32), ir.FloatType()
LANES = 16  # elements per vector of a map's codes16 and values16


def _i32(value):
    return ir.Constant(_I32, value)


def _splat(kind, value, lanes):
    return ir.Constant(kind, value) if lanes == 1 else ir.Constant(ir.VectorType(kind, lanes), [value] * lanes)


def _code_ir(builder, y, signed, mantissa, emin, lanes=1):
    """``count(mid < y)`` on ``float_map(signed, mantissa, emin)`` (NaN 255), as an i32: the nearest value, a tie
    to the smaller (toward zero for y > 0, away from it for y < 0).  ``lanes`` > 1: vectors of that many."""
    i32, f32 = (_I32, _F32) if lanes == 1 else (ir.VectorType(_I32, lanes), ir.VectorType(_F32, lanes))

    def _i32(value):
        return _splat(_I32, value, lanes)

    def _f32(value):
        return _splat(_F32, value, lanes)

    u = builder.bitcast(y, i32)
    a = builder.and_(u, _i32(0x7FFFFFFF))
    sign = builder.lshr(u, _i32(31))
    neg = builder.icmp_unsigned("!=", sign, _i32(0))
    # |y| >= 2**emin: the float32 bits rounded to ``mantissa`` fraction bits (a carry runs into the exponent):
    # add just under half the dropped unit (a tie goes down), or the half if y < 0 (a tie goes up), and shift;
    # less the code offset of the exponent.
    bias = builder.add(_i32((1 << (22 - mantissa)) - 1), sign)
    normal = builder.sub(builder.lshr(builder.add(a, bias), _i32(23 - mantissa)),
                         _i32((127 + emin - 1) << mantissa))
    # |y| < 2**emin: the code is |y| * 2**(mantissa - emin) rounded, a number below 2**mantissa.  Times 2**24 more
    # it is exact and an integer wherever it is at least 0.5 (where a tie or a step can be), so truncated to an
    # int nothing that matters is lost; then the same rounding by an add and a shift.
    small = builder.icmp_unsigned("<", a, _i32((127 + emin) << 23))
    t = builder.fmul(builder.bitcast(builder.select(small, a, _i32(0)), f32), _f32(2.0 ** (mantissa - emin + 24)))
    sub = builder.lshr(builder.add(builder.fptosi(t, i32), builder.add(_i32((1 << 23) - 1), sign)), _i32(24))
    c = builder.select(small, sub, normal)
    if signed:  # 127 + c, or 127 - c if y < 0, within the map's ends -v(127) (code 0) and v(128) (code 255)
        minus = builder.sub(_i32(0), sign)  # all ones if y < 0
        code = builder.add(builder.sub(builder.xor(c, minus), minus), _i32(127))
        code = builder.select(builder.icmp_signed("<", code, _i32(255)), code, _i32(255))
        code = builder.select(builder.icmp_signed(">", code, _i32(0)), code, _i32(0))
    else:
        c = builder.select(builder.icmp_signed("<", c, _i32(255)), c, _i32(255))
        code = builder.select(neg, _i32(0), c)
    nan = builder.icmp_unsigned(">", a, _i32(0x7F800000))
    return builder.select(nan, _i32(255), code)


def _value_ir(builder, code, signed, mantissa, emin, lanes=1):
    """``map[code]`` of ``float_map(signed, mantissa, emin)`` for an i32 ``code`` in 0..255, as a float."""
    i32, f32 = (_I32, _F32) if lanes == 1 else (ir.VectorType(_I32, lanes), ir.VectorType(_F32, lanes))

    def _i32(value):
        return _splat(_I32, value, lanes)

    def _f32(value):
        return _splat(_F32, value, lanes)

    if signed:
        c = builder.sub(code, _i32(127))
        neg = builder.icmp_signed("<", c, _i32(0))
        mag = builder.select(neg, builder.sub(_i32(0), c), c)
    else:
        mag = code
    # field >= 1: the magnitude code shifted into the float32 bits, plus the exponent's offset; field 0 (the
    # subnormals): a small int times 2**(emin - mantissa), exact
    normal = builder.bitcast(builder.add(builder.shl(mag, _i32(23 - mantissa)), _i32((127 + emin - 1) << 23)), f32)
    sub = builder.fmul(builder.sitofp(mag, f32), _f32(2.0 ** (emin - mantissa)))
    x = builder.select(builder.icmp_signed("<", mag, _i32(1 << mantissa)), sub, normal)
    if signed:
        bits = builder.or_(builder.bitcast(x, i32), builder.shl(builder.zext(neg, i32), _i32(31)))
        x = builder.bitcast(bits, f32)
    return x


def _codec(signed, mantissa, emin):
    """The intrinsics (code of a float32, value of a uint8 code) of ``float_map(signed, mantissa, emin)``."""
    @intrinsic
    def code_of(typingctx, y):
        if y != types.float32:
            return None

        def codegen(context, builder, signature, args):
            return builder.trunc(_code_ir(builder, args[0], signed, mantissa, emin), ir.IntType(8))

        return types.uint8(y), codegen

    @intrinsic
    def value_of(typingctx, code):
        if code != types.uint8:
            return None

        def codegen(context, builder, signature, args):
            return _value_ir(builder, builder.zext(args[0], _I32), signed, mantissa, emin)

        return types.float32(code), codegen

    @intrinsic
    def codes16(typingctx, x, inverse, out, j):
        """``out[j:j + 16] = code(x[j:j + 16] * inverse)``: float32 ``x``, uint8 ``out``, as one vector of 16."""
        if x.dtype != types.float32 or out.dtype != types.uint8 or inverse != types.float32:
            return None

        def codegen(context, builder, signature, args):
            src = make_array(signature.args[0])(context, builder, args[0])
            dst = make_array(signature.args[2])(context, builder, args[2])
            vec = ir.VectorType(_F32, LANES)
            y = builder.load(builder.bitcast(builder.gep(src.data, [args[3]]), vec.as_pointer()), align=4)
            scale = builder.insert_element(ir.Constant(vec, ir.Undefined), args[1], _i32(0))
            scale = builder.shuffle_vector(scale, scale, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))
            code = _code_ir(builder, builder.fmul(y, scale), signed, mantissa, emin, LANES)
            wide = ir.VectorType(ir.IntType(8), LANES)
            builder.store(builder.trunc(code, wide), builder.bitcast(builder.gep(dst.data, [args[3]]), wide.as_pointer()),
                          align=1)
            return context.get_dummy_value()

        return types.void(x, inverse, out, j), codegen

    @intrinsic
    def values16(typingctx, codes, absmax, x, j):
        """``x[j:j + 16] = value(codes[j:j + 16]) * absmax``: uint8 ``codes``, float32 ``x``, as one vector of 16."""
        if x.dtype != types.float32 or codes.dtype != types.uint8 or absmax != types.float32:
            return None

        def codegen(context, builder, signature, args):
            src = make_array(signature.args[0])(context, builder, args[0])
            dst = make_array(signature.args[2])(context, builder, args[2])
            wide = ir.VectorType(ir.IntType(8), LANES)
            code = builder.load(builder.bitcast(builder.gep(src.data, [args[3]]), wide.as_pointer()), align=1)
            value = _value_ir(builder, builder.zext(code, ir.VectorType(_I32, LANES)), signed, mantissa, emin, LANES)
            vec = ir.VectorType(_F32, LANES)
            scale = builder.insert_element(ir.Constant(vec, ir.Undefined), args[1], _i32(0))
            scale = builder.shuffle_vector(scale, scale, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))
            builder.store(builder.fmul(value, scale), builder.bitcast(builder.gep(dst.data, [args[3]]), vec.as_pointer()),
                          align=4)
            return context.get_dummy_value()

        return types.void(codes, absmax, x, j), codegen

    return code_of, value_of, codes16, values16


_signed_code, _signed_value, _signed_codes16, _signed_values16 = _codec(True, *SIGNED_FORMAT)
_unsigned_code, _unsigned_value, _unsigned_codes16, _unsigned_values16 = _codec(False, *UNSIGNED_FORMAT)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _code(y, signed):
    return _signed_code(y) if signed else _unsigned_code(y)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _value(code, signed):
    return _signed_value(code) if signed else _unsigned_value(code)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _load(codes, lo, k, absmax, x, signed):
    """``x[:k]``: the values of block codes ``codes[lo:lo + k]`` (float32, ``map[code] * absmax``)."""
    block = codes[lo:lo + k]
    j = 0
    while j + LANES <= k:
        if signed:
            _signed_values16(block, absmax, x, j)
        else:
            _unsigned_values16(block, absmax, x, j)
        j += LANES
    for t in range(j, k):
        x[t] = _value(block[t], signed) * absmax


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _absmax(x, k, absmax, b):
    """Block b's absmax: the largest |x[:k]|; returns what the values are multiplied by, its inverse (1 for 0)."""
    # The largest of the bits with the sign cleared: for floats >= 0 the integers order alike, and any NaN's bits
    # are above inf's, so a NaN wins as it does in xp.max (one NaN kept: the quiet one arithmetic makes).  An
    # integer maximum vectorizes; a float one with NaN kept does not.
    top_bits = np.uint32(0)
    for j in range(k):
        top_bits = _max32(top_bits, _magnitude(x[j]))
    if top_bits > np.uint32(0x7F800000):
        top_bits = np.uint32(0x7FC00000)
    top = _float(top_bits)
    absmax[b] = top
    return np.float32(1.0) / (top if top != 0.0 else np.float32(1.0))


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _store(x, k, codes, lo, inverse, signed):
    """``codes[lo:lo + k]``: the codes of block values ``x[:k]`` (float32) times ``inverse`` (see blockwise.quantize)."""
    out = codes[lo:lo + k]
    j = 0
    while j + LANES <= k:
        if signed:
            _signed_codes16(x, inverse, out, j)
        else:
            _unsigned_codes16(x, inverse, out, j)
        j += LANES
    for t in range(j, k):
        out[t] = _code(x[t] * inverse, signed)


@njit(cache=True, nogil=True, error_model="numpy")
def _codes_of(y, out, signed):
    _store(y, y.shape[0], out, 0, np.float32(1.0), signed)  # y * 1 is y, bit for bit (a NaN stays a NaN)


@njit(cache=True, nogil=True, error_model="numpy")
def _values_of(codes, out, signed):
    _load(codes, 0, codes.shape[0], np.float32(1.0), out, signed)


def codes_of(y, signed: bool) -> np.ndarray:
    """The kernel's codes of float32 ``y`` on the signed or the unsigned map, as a block's are found (16 at a time,
    the last ones one by one; for the tests)."""
    y = np.ascontiguousarray(y, dtype=np.float32).reshape(-1)
    out = np.empty(y.shape, np.uint8)
    _codes_of(y, out, signed)
    return out


def values_of(codes, signed: bool) -> np.ndarray:
    """The kernel's values (``map[code]``) of uint8 ``codes`` on the signed or the unsigned map (for the tests)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    out = np.empty(codes.shape, np.float32)
    _values_of(codes, out, signed)
    return out


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _adam_blocks(p, g, m, m_max, v, v_max, x, x_max, s, clip, b0, b1, block, amsgrad, divide):
    n = p.shape[0]
    new_m = np.empty(block, np.float32)
    new_v = np.empty(block, np.float32)
    new_x = np.empty(block if amsgrad else 0, np.float32)
    # The scalars as a tuple, not an array: no loads in the loop for LLVM to check against its stores (with them
    # it does not vectorize the loop).
    sc = (s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8])
    for b in range(b0, b1):
        lo = b * block
        k = min(block, n - lo)
        # The codes' values (float32, map[code] * absmax) into the scratch arrays; one loop of Adam's element rule
        # over them, the new values (rounded to float32) kept there; then each buffer's absmax and codes.
        _load(m, lo, k, m_max[b], new_m, True)
        _load(v, lo, k, v_max[b], new_v, False)
        if amsgrad:
            _load(x, lo, k, x_max[b], new_x, False)
        pb, gb = p[lo:lo + k], g[lo:lo + k]
        for j in range(k):
            pb[j], mi, vi, xi = _adam_element(pb[j], gb[j] * clip, new_m[j], new_v[j],
                                              new_x[j] if amsgrad else sc[8], sc, amsgrad, divide)
            new_m[j], new_v[j] = np.float32(mi), np.float32(vi)
            if amsgrad:
                new_x[j] = np.float32(xi)
        _store(new_m, k, m, lo, _absmax(new_m, k, m_max, b), True)
        _store(new_v, k, v, lo, _absmax(new_v, k, v_max, b), False)
        if amsgrad:
            _store(new_x, k, x, lo, _absmax(new_x, k, x_max, b), False)


@njit(cache=True, nogil=True, error_model="numpy")
def _claim(counters, per, nb, p, g, m, m_max, v, v_max, x, x_max, s, clip, block):
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
            _adam_blocks(p, g, m, m_max, v, v_max, x, x_max, s, clip, b0, b1, block, True, True)
        elif amsgrad:
            _adam_blocks(p, g, m, m_max, v, v_max, x, x_max, s, clip, b0, b1, block, True, False)
        elif divide:
            _adam_blocks(p, g, m, m_max, v, v_max, x, x_max, s, clip, b0, b1, block, False, True)
        else:
            _adam_blocks(p, g, m, m_max, v, v_max, x, x_max, s, clip, b0, b1, block, False, False)
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
        nb = n_blocks(flat_p.shape[0], block)
        threads = min(get_num_threads(), nb) if flat_p.shape[0] >= PARALLEL_MIN else 1
        per = max(1, CHUNK // block) if threads > 1 else nb
        units = -(-nb // per)
        args = (per, nb, flat_p, flat_g, *arrays, s, clip, block)
        _claim(np.array([units, 0], dtype=np.int64), *args)  # typed (and loaded) here, not among the writes
        counters = np.zeros(2, dtype=np.int64)
        claim = functools.partial(_claim, counters, *args)
        if threads > 1:
            writes += [functools.partial(pool(threads).put, claim)] * (threads - 1)
        writes += [claim, functools.partial(wait_done, counters, units)]
        if copied:
            writes.append(functools.partial(operator.setitem, p, Ellipsis, flat_p.reshape(p.shape)))
    return writes
