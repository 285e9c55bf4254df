"""Sums of squares in 16 float64 lanes held in registers over a whole run (Adafactor's passes).

The order is :mod:`xopt._norms`'s: lane k of a run adds x[k]², x[k + 16]², ... in order, each square taken in
float64.  A loop that adds into a lanes array in memory leaves the compiler unsure that the array is not
the run itself: it stores the lanes back every 16 elements.  These intrinsics build the loop in LLVM IR with
the lanes as loop-carried vectors (two 512-bit registers per 16 lanes), loaded once and stored once; the
operations are the scalar ones lane by lane, never reassociated: the same bits.  (A float32's square is
exact in float64, so its square and sum are one fused multiply-add: the same bits, one operation; a
float64's square is rounded, then added.)  They take the full groups of 16 of a run; the callers add the
elements before and after them in plain code, each lane in order.

* :func:`add_row_squares4`, :func:`add_row_squares1`: four rows (or one) of a matrix, times a scale: each
  row's squares into its lanes, and down each column into a float64 sum, the rows in order;
* :func:`add_factored_squares`: Adafactor's p² and u² over a run of one row of a matrix, u computed in the
  loop from the grads and the row's and columns' inverse roots; :func:`write_factored`, its p;
* :func:`add_vector_squares_low`, :func:`add_vector_squares_high`: p² and u² over a run of a vector, u from
  g and v (β̂₂ below 1/2, or not: ``adafactor.lerp``'s two forms).

Each loop asks for its streams' lines some way ahead (``AHEAD``), one hint per line.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .._norms import LANES

__all__ = ["add_row_squares4", "add_row_squares1", "add_factored_squares", "write_factored", "add_vector_squares_low",
           "add_vector_squares_high"]

_I64 = ir.IntType(64)
_I32 = ir.IntType(32)
_WIDE = ir.VectorType(ir.DoubleType(), LANES)
# Bytes ahead of each stream whose line a loop asks for: the hardware's prefetchers alone left the loops
# waiting on memory about as long as they computed.  On a Zen 5 core over 2^25 float32, 4 KiB ahead of p and
# g did best in the norms' pass (8 KiB and more helped less), 2 KiB ahead of each of four rows in the
# factors' pass (4 KiB, less; 1 KiB and below, less again).
AHEAD, ROWS_AHEAD = 4096, 2048


def _fits(elements, lanes):
    """Whether the intrinsics' loads fit the numba array types: C-contiguous runs of one float dtype, and
    float64 lanes (else no signature: numba reports a typing error, nothing runs)."""
    arrays = elements + lanes
    return (all(isinstance(t, types.Array) and t.layout == "C" for t in arrays)
            and len({t.dtype for t in elements}) == 1 and elements[0].dtype in (types.float32, types.float64)
            and all(t.dtype == types.float64 for t in lanes))


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


def _row_squares(rows):
    """An intrinsic over ``rows`` rows: (g, at, columns, groups, scale, lanes, out): rows at ``at``, ``at +
    columns``, ... of the flat ``g``, ``groups`` groups of 16 columns each; x = g * scale in g's dtype; each
    row's float64(x)² into its row of ``lanes`` (rows x 16 float64), and out[j] ← (out[j] + x_0j²) + x_1j² ...
    (``out``: float64, a sum per column, the rows added in order)."""

    @intrinsic
    def add_row_squares(typingctx, g, at, columns, groups, scale, lanes, out):
        if not _fits([g], [lanes, out]):
            return None
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
                    _prefetch(builder, start, offset, ROWS_AHEAD)
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


def _prefetch(builder, address, offset, ahead=AHEAD):
    """A hint (no fault, no effect on the results) to bring the line ``ahead`` bytes past ``address`` +
    ``offset`` into the caches; one per 16 float32 elements: one per line."""
    hint = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32]),
        "llvm.prefetch.p0")
    at = builder.inttoptr(builder.add(builder.add(address, offset), ir.Constant(_I64, ahead)),
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
    if not _fits([p, g, roots], [lp, lu]):
        return None
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
    if not _fits([p, g, roots], []):
        return None
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


def _vector_squares(low):
    """An intrinsic (p, g, v, scale, w, one_minus_w, floor, lp, lu): Adafactor's norms over the full groups
    of 16 of a run of a vector (starting at a multiple of 16 from its chunk's start), as the scalar code of
    ``cpu_factored._v1``: x = g · scale, v' = lerp(v, x², w) (``low``: v + w (x² − v), else
    x² − (x² − v)(1 − w)), u = x / √max(v', floor) (NaN kept); ``lp`` plus float64(p)², ``lu`` plus
    float64(u)²."""

    @intrinsic
    def add_vector_squares(typingctx, p, g, v, scale, w, one_minus_w, floor, lp, lu):
        if not _fits([p, g, v], [lp, lu]):
            return None
        sig = types.void(p, g, v, p.dtype, p.dtype, p.dtype, p.dtype, lp, lu)

        def codegen(context, builder, signature, args):
            dtype = signature.args[0].dtype
            element, width = context.get_value_type(dtype), dtype.bitwidth // 8
            vector = ir.VectorType(element, LANES)
            sqrt = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector]),
                                                  f"llvm.sqrt.v{LANES}f{dtype.bitwidth}")
            ps, gs, vs = (_address(context, builder, t, a) for t, a in zip(signature.args[:3], args[:3]))
            scale, w, one_minus_w, floor = (_splat(builder, a, element) for a in args[3:7])
            count = context.make_array(signature.args[0])(context, builder, args[0]).shape
            groups = builder.sdiv(builder.extract_value(count, 0), ir.Constant(_I64, LANES))
            pointers = [_vector_at(builder, _address(context, builder, t, a), ir.DoubleType())
                        for t, a in zip(signature.args[7:], args[7:])]
            initial = [builder.load(at, align=8) for at in pointers]

            def body(i, lanes):
                offset = builder.mul(i, ir.Constant(_I64, LANES * width))
                for at in (ps, gs, vs):
                    _prefetch(builder, at, offset)
                pv, gv, vv = (builder.load(_vector_at(builder, at, element, offset), align=width) for at in (ps, gs, vs))
                x = builder.fmul(gv, scale)
                x2 = builder.fmul(x, x)
                if low:
                    vv = builder.fadd(vv, builder.fmul(w, builder.fsub(x2, vv)))
                else:
                    vv = builder.fsub(x2, builder.fmul(builder.fsub(x2, vv), one_minus_w))
                vv = builder.select(builder.fcmp_ordered("<", vv, floor), floor, vv)
                u = builder.fdiv(x, builder.call(sqrt, [vv]))
                return [_plus_squares(builder, lanes[0], pv, dtype), _plus_squares(builder, lanes[1], u, dtype)]

            for at, value in zip(pointers, _loop(builder, groups, initial, body)):
                builder.store(value, at, align=8)
            return context.get_dummy_value()

        return sig, codegen

    return add_vector_squares


add_vector_squares_low = _vector_squares(True)
add_vector_squares_high = _vector_squares(False)
