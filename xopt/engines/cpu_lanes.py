"""Sums of squares in 16 float64 lanes held in registers over a whole run (Adafactor's passes).

The order is :mod:`xopt._norms`'s: lane k of a run adds x[k]², x[k + 16]², ... in order, each square taken in
float64.  A loop that adds into a lanes array in memory leaves the compiler unsure that the array is not
the run itself: it stores the lanes back every 16 elements.  These intrinsics build the loop in LLVM IR with
the lanes as loop-carried vectors (two 512-bit registers per 16 lanes), loaded once and stored once; the
operations are the scalar ones lane by lane, never reassociated: the same bits.  (A float32's square is
exact in float64, so its square and sum are one fused multiply-add: the same bits, one operation; a
float64's square is rounded, then added.)  They take the full groups of 16 of a run; the callers add the
elements before and after them in plain code, each lane in order.

* :func:`add_squares2`: lanes ``lx`` and ``ly`` plus the squares of two runs of the same length (the tail
  included);
* :func:`add_row_squares4`, :func:`add_row_squares1`: four rows (or one) of a matrix, times a scale: each
  row's squares into its lanes, and down each column into a float64 sum, the rows in order;
* :func:`add_factored_squares`: Adafactor's p² and u² over a run of one row of a matrix, u computed in the
  loop from the grads and the row's and columns' inverse roots.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .._norms import LANES

__all__ = ["add_squares2", "add_row_squares4", "add_row_squares1", "add_factored_squares", "write_factored"]

_I64 = ir.IntType(64)
_I32 = ir.IntType(32)
_WIDE = ir.VectorType(ir.DoubleType(), LANES)
AHEAD = 4096  # bytes: each stream's line this far ahead is asked for (the hardware's prefetchers alone left
# the loops waiting on memory as long as they computed; 2 to 4 KiB ahead took a fifth off the norms' pass)


def _address(context, builder, ty, value):
    """The address (an int64) of the first element of the array ``value`` of numba type ``ty``."""
    return builder.ptrtoint(context.make_array(ty)(context, builder, value).data, _I64)


def _vector_at(builder, address, element, offset=None):
    """A pointer to 16 ``element``s at ``address`` + ``offset`` bytes."""
    if offset is not None:
        address = builder.add(address, offset)
    return builder.inttoptr(address, ir.VectorType(element, LANES).as_pointer())


def _loop(builder, count, initial, body):
    """``for i in range(count)`` with loop-carried values: ``body(i, values)`` returns the next values; the
    values after the loop are returned (phi nodes: registers, not memory)."""
    before = builder.block
    head, inside, after = (builder.append_basic_block(f"lanes.{name}") for name in ("head", "body", "after"))
    builder.branch(head)
    builder.position_at_end(head)
    i = builder.phi(_I64)
    i.add_incoming(ir.Constant(_I64, 0), before)
    values = [builder.phi(v.type) for v in initial]
    for phi, v in zip(values, initial):
        phi.add_incoming(v, before)
    builder.cbranch(builder.icmp_signed("<", i, count), inside, after)
    builder.position_at_end(inside)
    new = body(i, values)
    end = builder.block
    i.add_incoming(builder.add(i, ir.Constant(_I64, 1)), end)
    for phi, v in zip(values, new):
        phi.add_incoming(v, end)
    builder.branch(head)
    builder.position_at_end(after)
    return values


def _plus_squares(builder, total, x, dtype):
    """``total`` + float64(x)², lane by lane, of a vector ``x`` of ``dtype``: the square of a float32 is exact
    in float64, so a fused multiply-add gives the bits of the square then the sum, one operation instead of
    two; a float64's square is rounded first."""
    if dtype.bitwidth == 64:
        return builder.fadd(total, builder.fmul(x, x))
    x = builder.fpext(x, _WIDE)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_WIDE, [_WIDE] * 3), "llvm.fma.v16f64")
    return builder.call(fma, [x, x, total])


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def add_squares2(x, y, lx, ly):
    """``lx`` (16 float64) plus float64(x)² lane by lane, ``ly`` plus float64(y)² (``x`` and ``y``: views of
    the same length and dtype, starting at a multiple of 16 elements from their run's start)."""
    _add_squares2(x, y, lx, ly)
    n = x.shape[0]
    full = n - n % LANES
    for k in range(n - full):  # the tail: lanes 0 .. n - full - 1
        a, b = np.float64(x[full + k]), np.float64(y[full + k])
        lx[k] += a * a
        ly[k] += b * b


@intrinsic
def _add_squares2(typingctx, x, y, lx, ly):
    """:func:`add_squares2` over the full groups of 16, in one loop."""
    sig = types.void(x, y, lx, ly)

    def codegen(context, builder, signature, args):
        dtype = signature.args[0].dtype
        element = context.get_value_type(dtype)
        size = ir.Constant(_I64, LANES * (dtype.bitwidth // 8))
        xs, ys, at_lx, at_ly = (_address(context, builder, t, v) for t, v in zip(signature.args, args))
        count = context.make_array(signature.args[0])(context, builder, args[0]).shape
        groups = builder.sdiv(builder.extract_value(count, 0), ir.Constant(_I64, LANES))
        pointers = [_vector_at(builder, at, ir.DoubleType()) for at in (at_lx, at_ly)]
        initial = [builder.load(p, align=8) for p in pointers]

        def body(i, lanes):
            offset = builder.mul(i, size)
            loaded = [builder.load(_vector_at(builder, at, element, offset), align=dtype.bitwidth // 8)
                      for at in (xs, ys)]
            return [_plus_squares(builder, lane, v, dtype) for lane, v in zip(lanes, loaded)]

        for p, v in zip(pointers, _loop(builder, groups, initial, body)):
            builder.store(v, p, align=8)
        return context.get_dummy_value()

    return sig, codegen


def _row_squares(rows):
    """An intrinsic over ``rows`` rows: (g, at, columns, groups, scale, lanes, out): rows at ``at``, ``at +
    columns``, ... of the flat ``g``, ``groups`` groups of 16 columns each; x = g * scale in g's dtype; each
    row's float64(x)² into its row of ``lanes`` (rows x 16 float64), and out[j] ← (out[j] + x_0j²) + x_1j² ...
    (``out``: float64, a sum per column, the rows added in order)."""

    @intrinsic
    def add_row_squares(typingctx, g, at, columns, groups, scale, lanes, out):
        sig = types.void(g, types.int64, types.int64, types.int64, g.dtype, lanes, out)

        def codegen(context, builder, signature, args):
            g_t, lanes_t, out_t = signature.args[0], signature.args[5], signature.args[6]
            dtype = g_t.dtype
            element, width = context.get_value_type(dtype), dtype.bitwidth // 8
            base = _address(context, builder, g_t, args[0])
            stride = builder.mul(args[2], ir.Constant(_I64, width))
            first = builder.add(base, builder.mul(args[1], ir.Constant(_I64, width)))
            starts = [builder.add(first, builder.mul(stride, ir.Constant(_I64, q))) for q in range(rows)]
            scale = _splat(builder, args[4], element)
            at_lanes = _address(context, builder, lanes_t, args[5])
            at_out = _address(context, builder, out_t, args[6])
            wide_size = ir.Constant(_I64, LANES * 8)
            pointers = [_vector_at(builder, at_lanes, ir.DoubleType(), ir.Constant(_I64, q * LANES * 8))
                        for q in range(rows)]
            initial = [builder.load(p, align=8) for p in pointers]

            def body(i, lanes):
                offset = builder.mul(i, ir.Constant(_I64, LANES * width))
                for start in starts:
                    _prefetch(builder, start, offset)
                xs = [builder.fmul(builder.load(_vector_at(builder, start, element, offset), align=width), scale)
                      for start in starts]
                column = _vector_at(builder, at_out, ir.DoubleType(), builder.mul(i, wide_size))
                total = builder.load(column, align=8)
                for x in xs:
                    total = _plus_squares(builder, total, x, dtype)
                builder.store(total, column, align=8)
                return [_plus_squares(builder, lane, x, dtype) for lane, x in zip(lanes, xs)]

            for p, v in zip(pointers, _loop(builder, args[3], initial, body)):
                builder.store(v, p, align=8)
            return context.get_dummy_value()

        return sig, codegen

    return add_row_squares


add_row_squares4 = _row_squares(4)
add_row_squares1 = _row_squares(1)


def _prefetch(builder, address, offset):
    """A hint (no fault, no effect on the results) to bring the line ``AHEAD`` bytes past ``address`` +
    ``offset`` into the caches; one per 16 float32 elements: one per line."""
    hint = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32]),
        "llvm.prefetch.p0")
    at = builder.inttoptr(builder.add(builder.add(address, offset), ir.Constant(_I64, AHEAD)),
                          ir.IntType(8).as_pointer())
    builder.call(hint, [at, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _splat(builder, value, element):
    vector = ir.Constant(ir.VectorType(element, LANES), ir.Undefined)
    for k in range(LANES):
        vector = builder.insert_element(vector, value, ir.Constant(ir.IntType(32), k))
    return vector


@intrinsic
def add_factored_squares(typingctx, p, g, roots, r, scale, cap, lp, lu):
    """Adafactor's norms over a run of one row of a matrix, full groups of 16 (the run starting at a multiple
    of 16 from its chunk's start): u = (g · scale) · min(r · roots, cap) (``r``: the row's inverse root,
    ``roots``: the columns'; NaN stays NaN), ``lp`` plus float64(p)², ``lu`` plus float64(u)², lane by lane."""
    sig = types.void(p, g, roots, p.dtype, p.dtype, p.dtype, lp, lu)

    def codegen(context, builder, signature, args):
        dtype = signature.args[0].dtype
        element, width = context.get_value_type(dtype), dtype.bitwidth // 8
        ps, gs, cs = (_address(context, builder, t, v) for t, v in zip(signature.args[:3], args[:3]))
        r, scale, cap = (_splat(builder, v, element) for v in args[3:6])
        count = context.make_array(signature.args[0])(context, builder, args[0]).shape
        groups = builder.sdiv(builder.extract_value(count, 0), ir.Constant(_I64, LANES))
        pointers = [_vector_at(builder, _address(context, builder, t, v), ir.DoubleType())
                    for t, v in zip(signature.args[6:], args[6:])]
        initial = [builder.load(at, align=8) for at in pointers]

        def body(i, lanes):
            offset = builder.mul(i, ir.Constant(_I64, LANES * width))
            _prefetch(builder, ps, offset)
            _prefetch(builder, gs, offset)
            pv, gv, cv = (builder.load(_vector_at(builder, at, element, offset), align=width) for at in (ps, gs, cs))
            u = _factored_u(builder, gv, cv, r, scale, cap)
            return [_plus_squares(builder, lanes[0], pv, dtype), _plus_squares(builder, lanes[1], u, dtype)]

        for at, v in zip(pointers, _loop(builder, groups, initial, body)):
            builder.store(v, at, align=8)
        return context.get_dummy_value()

    return sig, codegen


def _factored_u(builder, g, roots, r, scale, cap):
    """(g · scale) · min(r · roots, cap), NaN kept, as the scalar code of ``cpu_factored._u1``."""
    t = builder.fmul(r, roots)
    t = builder.select(builder.fcmp_ordered(">", t, cap), cap, t)
    return builder.fmul(builder.fmul(g, scale), t)


@intrinsic
def write_factored(typingctx, p, g, roots, r, scale, cap, decay, step):
    """p ← p · decay − step · u over the full groups of 16 of a run of one row of a matrix, u as in
    :func:`add_factored_squares` (the elements after the last group: the caller's)."""
    sig = types.void(p, g, roots, p.dtype, p.dtype, p.dtype, p.dtype, p.dtype)

    def codegen(context, builder, signature, args):
        dtype = signature.args[0].dtype
        element, width = context.get_value_type(dtype), dtype.bitwidth // 8
        ps, gs, cs = (_address(context, builder, t, v) for t, v in zip(signature.args[:3], args[:3]))
        r, scale, cap, decay, step = (_splat(builder, v, element) for v in args[3:8])
        count = context.make_array(signature.args[0])(context, builder, args[0]).shape
        groups = builder.sdiv(builder.extract_value(count, 0), ir.Constant(_I64, LANES))

        def body(i, values):
            offset = builder.mul(i, ir.Constant(_I64, LANES * width))
            _prefetch(builder, ps, offset)
            _prefetch(builder, gs, offset)
            at = _vector_at(builder, ps, element, offset)
            pv, gv, cv = (builder.load(_vector_at(builder, a, element, offset), align=width) for a in (ps, gs, cs))
            u = _factored_u(builder, gv, cv, r, scale, cap)
            builder.store(builder.fsub(builder.fmul(pv, decay), builder.fmul(step, u)), at, align=width)
            return values

        _loop(builder, groups, [], body)
        return context.get_dummy_value()

    return sig, codegen
