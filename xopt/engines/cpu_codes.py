"""The 8-bit state's codes and values in the fused CPU kernel (numba): a block's codes turned into values, its
absmax, and its values turned into codes, on the maps of :mod:`xopt.engines.blockwise`.

The maps are small float formats (:func:`xopt.engines.blockwise.float_map`), so a code and a value are arithmetic
on the float bits: LLVM instructions on vectors of 16 32-bit lanes (:func:`_code_ir`, :func:`_value_ir`; numba's
own integer arithmetic is 64-bit), with no branches and no table.  A block's absmax is an integer maximum of the
bits.  The numbers are those of the reference (searchsorted on the midpoints, a take from the map) bit for bit:
``tests/test_state_8bit.py`` checks the codes at every threshold, its neighbours and powers of two (and, once,
all 2^32 float32 against searchsorted, both maps).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic
from numba.np.arrayobj import make_array

from .blockwise import SIGNED_FORMAT, UNSIGNED_FORMAT

__all__ = ["LANES", "value", "magnitude_bits", "larger", "set_absmax", "load_block", "store_block", "codes_of", "values_of"]


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
def value(code, signed):
    """``map[code]`` (float32) of a uint8 code on the signed map or the unsigned one."""
    return _signed_value(code) if signed else _unsigned_value(code)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _code(y, signed):
    return _signed_code(y) if signed else _unsigned_code(y)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def load_block(codes, lo, k, absmax, x, signed):
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
        x[t] = value(block[t], signed) * absmax


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def magnitude_bits(x):
    """The bits of float32 ``x`` with the sign cleared (uint32), and :func:`larger` of two: the largest of them
    is the bits of a block's absmax (see :func:`set_absmax`)."""
    return _magnitude(x)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def larger(a, b):
    """The larger of uint32 ``a`` and ``b``."""
    return _max32(a, b)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def set_absmax(top_bits, absmax, b):
    """Block b's absmax from the largest of its values' :func:`magnitude_bits`; returns what the values are
    multiplied by, its inverse (1 for 0)."""
    # For floats >= 0 the integers order alike, and any NaN's bits are above inf's, so a NaN wins as it does in
    # xp.max (one NaN kept: the quiet one arithmetic makes).  An integer maximum vectorizes; a float one with NaN
    # kept does not.
    if top_bits > np.uint32(0x7F800000):
        top_bits = np.uint32(0x7FC00000)
    top = _float(top_bits)
    absmax[b] = top
    return np.float32(1.0) / (top if top != 0.0 else np.float32(1.0))


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def store_block(x, k, codes, lo, inverse, signed):
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
    store_block(y, y.shape[0], out, 0, np.float32(1.0), signed)  # y * 1 is y, bit for bit (a NaN stays a NaN)


@njit(cache=True, nogil=True, error_model="numpy")
def _values_of(codes, out, signed):
    load_block(codes, 0, codes.shape[0], np.float32(1.0), out, signed)


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
