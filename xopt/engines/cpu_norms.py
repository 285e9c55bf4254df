"""LAMB on the fused CPU engine (numba): each tensor's norms, then its elements.

LAMB scales each param's update by its trust ratio ‖W‖ / ‖u‖, so a tensor is written only once both norms
over the whole tensor are known.  Two phases:

1. the norms: read p, g, m and v, compute u (the new m and v are not kept) and add p² and u² in float64,
   in the order of :mod:`xopt._norms` (chunks of ``CHUNK``, 16 lanes in a chunk, the chunks in order), which
   the reference rule's norms follow too: the same bits on one thread or several;
2. the elements: compute m, v and u again (the same operations: the same bits) and write m, v and
   p - lr (u r), r the ratio in the param's dtype.

That reads p, g, m, v twice and writes m, v, p once: 44 bytes an element in float32 (Adam moves 28).
Nothing is written before both norms of the tensor are known, and the step's writes are one C-level call
as any other (:mod:`xopt._atomic`).

Both phases go 16 elements at a time: u of the 16 is one vector (a loop of constant length, which LLVM
vectorizes whole) and the norms' 16 float64 lanes stay in two registers (:class:`_Lanes`).  u is one
division and one root per element (the bias corrections' inverses are host scalars); the loads are the
hardware prefetcher's: software prefetches of every array 2 KiB ahead made the whole step about 1.3x slower
on one thread (``benchmarks/lamb_step.py --threads 1``: 55 ms against 41 ms, 2^25 float32).

Its C function (:func:`elements`, the rule's entry for the drivers of :mod:`xopt.engines.cpu_drivers`)
takes a tensor's ratio from its row of scalars (``RATIO``), or, where that is -1 (not known), is given the
whole tensor and runs both phases itself: the drivers' serial run.  A step split over threads runs the
norms first, chunk by chunk on every thread (:func:`claim_norms`, :func:`norms`), then the ratios
(:func:`ratios`), then the elements with one row of scalars per tensor (:func:`per_tensor`).

Scalars (``LAMB.kernel``): lr, 1 - beta1, beta1, 1 - beta2, beta2, 1 / bias_correction1, 1 / bias_correction2, eps,
eps_root, weight_decay, then the ratio and the clip scale.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic, models, register_model

from .._norms import CHUNK as NORM_CHUNK, LANES
from .cpu_drivers import CHUNK, ELEMENTS_SIGNATURE, _run
from .cpu_memory import fetch_add, typed_pointer, view as _view

__all__ = ["RATIO", "elements", "norms", "claim_norms", "ratios", "trust_ratio", "per_tensor"]

assert NORM_CHUNK == CHUNK and LANES == 16, "the norms' order: the engine's chunks, 16 lanes"

RATIO = 10  # the ratio's place in a row of scalars; the clip scale follows it
BLOCK = 512  # elements at a time in Adafactor's sums (xopt.engines.cpu_factored; a multiple of LANES)


# -- the element math: the reference rule's, in its order ------------------------------------------
@njit(cache=True, error_model="numpy", inline="always")
def _update(pi, gi, mi, vi, s, decayed, clipped):
    """(new m, new v, u) of one element; ``decayed`` and ``clipped`` are constants at each call below."""
    one_minus_beta1, beta1, one_minus_beta2, beta2 = s[1], s[2], s[3], s[4]
    inverse_bc1, inverse_bc2, eps, eps_root, weight_decay = s[5], s[6], s[7], s[8], s[9]
    if clipped:
        gi = gi * s[RATIO + 1]
    m = one_minus_beta1 * gi + beta1 * mi
    v = one_minus_beta2 * (gi * gi) + beta2 * vi
    u = (m * inverse_bc1) / (np.sqrt(v * inverse_bc2 + eps_root) + eps)
    if decayed:
        u = u + weight_decay * pi
    return m, v, u


_WIDE = ir.VectorType(ir.DoubleType(), LANES)


def _squares(context, builder, x_at, dtype):
    """``float64(x[0:16]) ** 2`` as one LLVM vector, ``x`` of ``dtype`` at address ``x_at``."""
    x = builder.load(builder.inttoptr(x_at, ir.VectorType(context.get_value_type(dtype), LANES).as_pointer()),
                     align=dtype.bitwidth // 8)
    if dtype.bitwidth != 64:
        x = builder.fpext(x, _WIDE)
    return builder.fmul(x, x)


@intrinsic
def _add_squares(typingctx, x_at, lanes_at, like):
    """``lanes[0:16] += float64(x[0:16]) ** 2``, ``x`` of ``like``'s dtype at address ``x_at``, ``lanes`` 16
    float64 at ``lanes_at``: one vector of 16 (LLVM does not vectorize sixteen scalar sums itself; the
    operations are the scalar ones, lane by lane: the same bits)."""
    sig = types.void(types.int64, types.int64, like)

    def codegen(context, builder, signature, args):
        at = builder.inttoptr(args[1], _WIDE.as_pointer())
        squares = _squares(context, builder, args[0], signature.args[2].dtype)
        builder.store(builder.fadd(builder.load(at, align=8), squares), at, align=8)
        return context.get_dummy_value()

    return sig, codegen


class _Lanes(types.Type):
    """16 float64 sums as one LLVM vector: a loop carries them in two registers, where sums in an array
    go through memory at every step once the loop also stores (u's scratch)."""

    def __init__(self):
        super().__init__(name="Lanes16")


_LANES_TYPE = _Lanes()


@register_model(_Lanes)
class _LanesModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _WIDE)


@intrinsic
def _zero_lanes(typingctx):
    """16 sums of 0.0 (as the lanes in an array of zeros)."""
    return _LANES_TYPE(), lambda context, builder, signature, args: ir.Constant(_WIDE, [0.0] * LANES)


@intrinsic
def _with_squares(typingctx, lanes, x_at, like):
    """``lanes + float64(x[0:16]) ** 2``: :func:`_add_squares` on sums in a register."""
    sig = _LANES_TYPE(_LANES_TYPE, types.int64, like)

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], _squares(context, builder, args[1], signature.args[2].dtype))

    return sig, codegen


@intrinsic
def _store_lanes(typingctx, lanes, to_at):
    """The 16 sums to the 16 float64 at address ``to_at``."""
    sig = types.void(_LANES_TYPE, types.int64)

    def codegen(context, builder, signature, args):
        builder.store(args[0], builder.inttoptr(args[1], _WIDE.as_pointer()), align=8)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, error_model="numpy", inline="always")
def _add_lanes(x, lanes):
    """``lanes`` (16 float64 sums) plus the squares of ``x`` (a view starting at a multiple of 16): lane k adds
    elements k, k + 16, k + 32, ... in order."""
    n = x.shape[0]
    full = n - n % LANES
    at, size, to = x.ctypes.data, x.itemsize, lanes.ctypes.data
    for i in range(0, full, LANES):
        _add_squares(at + i * size, to, x)
    for k in range(n - full):  # the tail: lanes 0 .. n - full - 1
        y = np.float64(x[full + k])
        lanes[k] += y * y


@njit(cache=True, error_model="numpy", inline="always")
def _lane_sum(a):
    """The 16 lanes added pairwise: (s0 + s1), (s2 + s3), ..., then those pairwise, to one sum."""
    return ((((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])))
            + (((a[8] + a[9]) + (a[10] + a[11])) + ((a[12] + a[13]) + (a[14] + a[15]))))


@njit(cache=True, error_model="numpy", inline="always")
def _u_loop(p, g, m, v, s, u, at, count, decayed, clipped):
    """u of elements at:at + count into ``u[:count]`` (scratch in L1): one vector where count is LANES."""
    for j in range(count):
        u[j] = _update(p[at + j], g[at + j], m[at + j], v[at + j], s, decayed, clipped)[2]


@njit(cache=True, error_model="numpy", inline="always")
def _chunk_loop(p, g, m, v, s, decayed, clipped):
    """(Σ p², Σ u²) over one chunk (views starting at a multiple of LANES), LANES elements at a time: their u
    into scratch (a loop of constant length: one vector), then both sums' lanes, which stay in registers.  The
    tail (under LANES elements) as :func:`_add_lanes`'."""
    n = p.shape[0]
    full = n - n % LANES
    u = np.empty(LANES, dtype=p.dtype)
    at, u_at, size = p.ctypes.data, u.ctypes.data, p.itemsize
    pp = uu = _zero_lanes()
    for i in range(0, full, LANES):
        _u_loop(p, g, m, v, s, u, i, LANES, decayed, clipped)
        pp = _with_squares(pp, at + i * size, p)
        uu = _with_squares(uu, u_at, u)
    lanes = np.empty((2, LANES))
    _store_lanes(pp, lanes.ctypes.data)
    _store_lanes(uu, lanes.ctypes.data + LANES * 8)
    tail = u[:n - full]
    _u_loop(p, g, m, v, s, tail, full, n - full, decayed, clipped)
    _add_lanes(p[full:], lanes[0])
    _add_lanes(tail, lanes[1])
    return _lane_sum(lanes[0]), _lane_sum(lanes[1])


@njit(cache=True, error_model="numpy")
def _chunk_sums(p, g, m, v, s):
    """:func:`_chunk_loop`, one loop per (decayed, clipped): no test per element (LLVM vectorizes each)."""
    decayed, clipped = s[9] != 0.0, s[RATIO + 1] != 1.0
    if decayed and clipped:
        return _chunk_loop(p, g, m, v, s, True, True)
    if decayed:
        return _chunk_loop(p, g, m, v, s, True, False)
    if clipped:
        return _chunk_loop(p, g, m, v, s, False, True)
    return _chunk_loop(p, g, m, v, s, False, False)


@njit(cache=True, error_model="numpy", inline="always")
def _write_at(p, g, m, v, s, ratio, at, count, decayed, clipped):
    lr = s[0]
    for j in range(count):
        i = at + j
        mi, vi, u = _update(p[i], g[i], m[i], v[i], s, decayed, clipped)
        p[i] = p[i] - lr * (u * ratio)
        m[i], v[i] = mi, vi


@njit(cache=True, error_model="numpy", inline="always")
def _write_loop(p, g, m, v, s, ratio, decayed, clipped):
    """LANES elements at a time (one vector); then the tail."""
    n = p.shape[0]
    full = n - n % LANES
    for i in range(0, full, LANES):
        _write_at(p, g, m, v, s, ratio, i, LANES, decayed, clipped)
    _write_at(p, g, m, v, s, ratio, full, n - full, decayed, clipped)


@njit(cache=True, error_model="numpy")
def _write(p, g, m, v, s, ratio):
    """Phase 2 over views: m, v and p written, u scaled by ``ratio`` (in the param's dtype)."""
    decayed, clipped = s[9] != 0.0, s[RATIO + 1] != 1.0
    if decayed and clipped:
        _write_loop(p, g, m, v, s, ratio, True, True)
    elif decayed:
        _write_loop(p, g, m, v, s, ratio, True, False)
    elif clipped:
        _write_loop(p, g, m, v, s, ratio, False, True)
    else:
        _write_loop(p, g, m, v, s, ratio, False, False)


@njit(cache=True, error_model="numpy")
def trust_ratio(pp, uu):
    """‖W‖ / ‖u‖ from the squared norms, 1 where either norm is 0 (NaN stays NaN), as the reference rule."""
    param_norm, update_norm = np.sqrt(pp), np.sqrt(uu)
    if param_norm == 0.0 or update_norm == 0.0:
        return 1.0
    return param_norm / update_norm


# -- the C functions the drivers call ------------------------------------------------------------
@njit(cache=True, error_model="numpy", inline="always")
def _views(ptrs, t, lo, hi, s):
    return (_view(ptrs[t, 0], s, lo, hi), _view(ptrs[t, 1], s, lo, hi), _view(ptrs[t, 2], s, lo, hi),
            _view(ptrs[t, 3], s, lo, hi))


def elements(dtype):
    """LAMB over elements lo:hi of one tensor of ``dtype`` params, as the C function the drivers call
    (``cpu_drivers.elements``' signature): the ratio from the row of scalars, or, where it is -1, both
    phases over lo:hi, the whole tensor."""

    @cfunc(ELEMENTS_SIGNATURE, cache=True, error_model="numpy")
    def lamb_elements(ptrs_at, t, lo, hi, s_at, n_s, scratch_at):
        ptrs = carray(typed_pointer(ptrs_at, np.int64), (t + 1, 5))
        s = carray(typed_pointer(s_at, dtype), (n_s,))
        ratio = s[RATIO]
        if ratio < 0.0:  # not known: lo:hi is the whole tensor, its norms chunk by chunk first
            pp = uu = 0.0
            for a in range(lo, hi, CHUNK):
                p, g, m, v = _views(ptrs, t, a, min(a + CHUNK, hi), s)
                chunk_pp, chunk_uu = _chunk_sums(p, g, m, v, s)
                pp += chunk_pp
                uu += chunk_uu
            ratio = dtype(trust_ratio(pp, uu))
        p, g, m, v = _views(ptrs, t, lo, hi, s)
        _write(p, g, m, v, s, ratio)

    return lamb_elements


def norms(dtype):
    """The norms' phase over elements lo:hi of one tensor (a chunk): its C function writes (Σ p², Σ u²) at
    the address in its last argument (two float64)."""

    @cfunc(ELEMENTS_SIGNATURE, cache=True, error_model="numpy")
    def lamb_norms(ptrs_at, t, lo, hi, s_at, n_s, out_at):
        ptrs = carray(typed_pointer(ptrs_at, np.int64), (t + 1, 5))
        s = carray(typed_pointer(s_at, dtype), (n_s,))
        out = carray(typed_pointer(out_at, np.float64), (2,))
        p, g, m, v = _views(ptrs, t, lo, hi, s)
        out[0], out[1] = _chunk_sums(p, g, m, v, s)

    return lamb_norms


# -- a step over threads: the norms of every chunk, then each tensor's ratio ----------------------
@njit(cache=True, nogil=True, error_model="numpy")
def claim_norms(function, ptrs, chunks, part, counters, scal, sums):
    """``cpu_drivers.claim`` for the norms' phase: ``sums[c]`` gets chunk c's (Σ p², Σ u²) from the C function
    at address ``function`` (:func:`norms`)."""
    base = counters.ctypes.data
    n = chunks.shape[0]
    while True:
        c = fetch_add(base, 1)
        if c >= n:
            return
        t = chunks[c, 0]
        _run(function, ptrs, t, chunks[c, 1], chunks[c, 2], scal[part[t]] if part.shape[0] else scal[0], sums[c])
        fetch_add(base + 8, 1)


@njit(cache=True, nogil=True)
def ratios(chunks, sums, n):
    """Each of the n tensors' trust ratio, its chunks' sums (rows of ``chunks``, in order) added in order."""
    pp = np.zeros(n)
    uu = np.zeros(n)
    for c in range(chunks.shape[0]):
        t = chunks[c, 0]
        pp[t] += sums[c, 0]
        uu[t] += sums[c, 1]
    out = np.empty(n)
    for t in range(n):
        out[t] = trust_ratio(pp[t], uu[t])
    return out


def per_tensor(scal, part, ratio):
    """(rows of scalars, one per tensor with its ratio; each tensor's row): the step's elements phase."""
    n = len(ratio)
    rows = scal[part] if len(part) else np.repeat(scal[:1], n, axis=0)
    rows[:, RATIO] = ratio
    return rows, np.arange(n, dtype=np.int64)
