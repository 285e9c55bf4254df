"""Adafactor on the fused CPU engine (numba): the factors' sums, the norms, then the elements.

Adafactor's update of a param reads sums over the whole param: the row and column sums of g² (a matrix's
factors), the param's norm (the step size) and the update's norm (its clipping).  A param of ``n``
elements takes three passes, each split into pieces that any thread may take:

1. the factors (a param of two or more dimensions): read g, add g² in float64 into each row's 16 lanes
   (a chunk of ``CHUNK`` columns at a time) and down each column of a block of ``ROW_BLOCK`` rows, in the
   orders of :mod:`xopt._norms`, four rows at a time, the lanes in registers (:mod:`.cpu_lanes`); then, on
   the host, the reference rule's own code: the means, the new ``v_row`` and ``v_col``
   (:func:`xopt.optimizers.adafactor.lerp`) and their inverse roots (``inverse_roots``: one root and one
   division per row and per column, so that u = g · min(r_i c_j, 1/ε₁) takes two products an element);
2. the norms: read p and g (and v for a vector), compute u, add p² and u² in float64 into 16 lanes per
   chunk of ``CHUNK`` elements, one loop over every stream (a matrix's a row at a time; a vector's takes a
   root and a division an element); then the step size α / max(1, ‖u‖ / (√n d)) on the host;
3. the elements: compute u again (the same operations: the same bits) and write p (and v for a vector).

A float32 matrix moves 24 bytes an element (g; p, g; p, g, p), a vector 32 (p, g, v; p, g, v, p, v).
Nothing is written before the third pass, which is one of the step's writes (:mod:`xopt._atomic`); the
new factors are written with it.  Every sum's order is fixed by its pieces, never by the threads that
take them: the reference rule and this engine give the same bits on any number of threads.
"""

from __future__ import annotations

import functools
import operator
import sys

import numpy as np
from numba import njit

from .. import _backend
from .._atomic import together
from .._norms import CHUNK, LANES, ROW_BLOCK, in_order
from .._threads import get_num_threads, pool
from ..optimizers.adafactor import inverse_floor, inverse_roots, lerp, means, step_size
from .cpu_drivers import wait_done
from .cpu_lanes import (add_factored_squares, add_row_squares1, add_row_squares4, add_vector_squares_high,
                        add_vector_squares_low, write_factored)
from .cpu_memory import fetch_add
from .cpu_norms import _lane_sum
from .cpu_step import PARALLEL_MIN

__all__ = ["apply", "accepts", "factor_sums", "norm_sums", "write"]

CLIP, DECAY, W, ONE_MINUS_W, EPS1_SQUARED, STEP, LOW, CAP = range(8)  # the row of scalars ``s``, in the param's dtype
_NONE_LEFT = np.array([2**62, 0], dtype=np.int64)  # counters past any pass's pieces: a call that runs nothing
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_EMPTY_F64 = np.empty(0)


# -- pass 1: the factors' sums ---------------------------------------------------------------------
@njit(cache=True, nogil=True, error_model="numpy")
def _factor_piece(g, rows, columns, s, piece, row_chunks, column_blocks, lanes):
    """Piece number ``piece``: one block of ``ROW_BLOCK`` rows of one matrix, one chunk of ``CHUNK``
    columns.  Each row's chunk sum goes to ``row_chunks[chunk, row]``, the block's column sums (from its first
    row, in order) to ``column_blocks[matrix, block, columns of the chunk]``.  Four rows at a time across the
    chunk (:func:`cpu_lanes.add_row_squares4`: each row's lanes in registers, the column sums, float64, read
    and written once per four rows); the last columns (fewer than 16) and rows (fewer than 4) in plain code."""
    chunks = (columns + CHUNK - 1) // CHUNK
    blocks = (rows + ROW_BLOCK - 1) // ROW_BLOCK
    c, k, b = piece % chunks, (piece // chunks) % blocks, piece // (chunks * blocks)
    c0, c1 = c * CHUNK, min(c * CHUNK + CHUNK, columns)
    first, last = b * rows + k * ROW_BLOCK, b * rows + min(k * ROW_BLOCK + ROW_BLOCK, rows)
    acc = column_blocks[b, k, c0:c1]
    clip = s[CLIP]
    width = c1 - c0
    full = width - width % LANES
    lanes[:last - first, :] = 0.0
    row = first
    while row < last:
        q = 4 if row + 4 <= last else 1
        at = row * columns + c0
        if q == 4:
            add_row_squares4(g, at, columns, full // LANES, clip, lanes[row - first:row - first + 4], acc)
        else:
            add_row_squares1(g, at, columns, full // LANES, clip, lanes[row - first:row - first + 1], acc)
        for r in range(q):  # the tail's columns, the rows in order
            lane, src = lanes[row - first + r], g[at + r * columns + full:at + r * columns + width]
            for j in range(width - full):
                y = np.float64(src[j] * clip)
                lane[j] += y * y
                acc[full + j] += y * y
        row += q
    for row in range(first, last):
        row_chunks[c, row] = _lane_sum(lanes[row - first])


@njit(cache=True, nogil=True, error_model="numpy")
def factor_sums(g, rows, columns, s, row_chunks, column_blocks, counters):
    """Pass 1: take pieces (``counters[0]``: the next one) until none is left; ``counters[1]`` counts those done."""
    n = column_blocks.shape[0] * column_blocks.shape[1] * row_chunks.shape[0]
    lanes = np.empty((ROW_BLOCK, LANES))
    base = counters.ctypes.data
    while True:
        piece = fetch_add(base, 1)
        if piece >= n:
            return
        _factor_piece(g, rows, columns, s, piece, row_chunks, column_blocks, lanes)
        fetch_add(base + 8, 1)


# -- a matrix's elements: passes 2 and 3 ------------------------------------------------------------
@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _u1(g, root, r, clip, cap):
    """u of one element of a matrix: the reference rule's g · min(1/√v_row · 1/√(v_col / mean), 1/ε₁), the
    roots taken per row (``r``) and per column (``root``: :func:`adafactor.inverse_roots`); no root or division
    an element."""
    t = r * root
    t = cap if t > cap else t  # NaN stays NaN, as xp.clip
    return (g * clip) * t


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _plain_norms(p, g, roots, at, r, clip, cap, lo, start, stop, pp, uu):
    for i in range(start, stop):
        x, y = np.float64(p[i]), np.float64(_u1(g[i], roots[at + i], r, clip, cap))
        pp[(i - lo) % LANES] += x * x
        uu[(i - lo) % LANES] += y * y


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _factored_norms(p, g, row_roots, column_roots, rows, columns, s, lo, hi, pp, uu):
    """The lanes of Σ p² and Σ u² of the flat elements lo:hi (a chunk) of a matrix (or a stack of them), row
    by row: a row's groups of 16 in one loop with every stream (:func:`cpu_lanes.add_factored_squares`), the
    elements before its first group and after its last in plain code."""
    clip, cap = s[CLIP], s[CAP]
    k = lo
    while k < hi:
        row = k // columns
        end = min(hi, (row + 1) * columns)
        r, at = row_roots[row], (row // rows) * columns - row * columns
        head = min(end, k + (lo - k) % LANES)
        full = head + (end - head) // LANES * LANES
        _plain_norms(p, g, column_roots, at, r, clip, cap, lo, k, head, pp, uu)  # each lane in order
        add_factored_squares(p[head:full], g[head:full], column_roots[at + head:at + full], r, clip, cap, pp, uu)
        _plain_norms(p, g, column_roots, at, r, clip, cap, lo, full, end, pp, uu)
        k = end


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _factored_write(p, g, row_roots, column_roots, rows, columns, s, lo, hi):
    """p ← p (1 − ηλ) − (step size) u over the flat elements lo:hi of a matrix, row by row, one loop over
    every stream (:func:`cpu_lanes.write_factored`), the last elements of a row (fewer than 16) in plain code."""
    clip, cap, decay, step = s[CLIP], s[CAP], s[DECAY], s[STEP]
    k = lo
    while k < hi:
        row = k // columns
        end = min(hi, (row + 1) * columns)
        r, at = row_roots[row], (row // rows) * columns - row * columns
        full = k + (end - k) // LANES * LANES
        write_factored(p[k:full], g[k:full], column_roots[at + k:at + full], r, clip, cap, decay, step)
        for i in range(full, end):
            p[i] = p[i] * decay - step * _u1(g[i], column_roots[at + i], r, clip, cap)
        k = end


# -- a vector's elements: passes 2 and 3 -------------------------------------------------------------
@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _v1(g, v, s, low):
    """(the new v, u) of one element of a vector: v ← lerp(v, g², β̂₂) as ``adafactor.lerp`` (``low``:
    β̂₂ < 1/2), u = g / √max(v, ε₁²)."""
    gi = g * s[CLIP]
    g2 = gi * gi
    v = v + s[W] * (g2 - v) if low else g2 - (g2 - v) * s[ONE_MINUS_W]
    floor = s[EPS1_SQUARED]
    return v, gi / np.sqrt(floor if v < floor else v)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _vector_write(p, g, v, s, lo, hi, low):
    """p ← p (1 − ηλ) − (step size) u and the new v over the elements lo:hi of a vector, one loop."""
    decay, step = s[DECAY], s[STEP]
    ps, gs, vs = p[lo:hi], g[lo:hi], v[lo:hi]
    for i in range(hi - lo):
        vs[i], u = _v1(gs[i], vs[i], s, low)
        ps[i] = ps[i] * decay - step * u


# -- pass 2: the norms -------------------------------------------------------------------------------
@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _norm_loop(p, g, v, row_roots, column_roots, rows, columns, s, sums, counters, factored, low):
    n = sums.shape[0]
    pp, uu = np.zeros(LANES), np.zeros(LANES)
    base = counters.ctypes.data
    while True:
        c = fetch_add(base, 1)
        if c >= n:
            return
        pp[:] = 0.0
        uu[:] = 0.0
        lo, hi = c * CHUNK, min(c * CHUNK + CHUNK, p.shape[0])
        if factored:
            _factored_norms(p, g, row_roots, column_roots, rows, columns, s, lo, hi, pp, uu)
        else:
            full = lo + (hi - lo) // LANES * LANES
            if low:
                add_vector_squares_low(p[lo:full], g[lo:full], v[lo:full], s[CLIP], s[W], s[ONE_MINUS_W],
                                       s[EPS1_SQUARED], pp, uu)
            else:
                add_vector_squares_high(p[lo:full], g[lo:full], v[lo:full], s[CLIP], s[W], s[ONE_MINUS_W],
                                        s[EPS1_SQUARED], pp, uu)
            for i in range(full, hi):  # the tail: lanes 0 .. hi - full - 1
                x, y = np.float64(p[i]), np.float64(_v1(g[i], v[i], s, low)[1])
                pp[i - full] += x * x
                uu[i - full] += y * y
        sums[c, 0], sums[c, 1] = _lane_sum(pp), _lane_sum(uu)
        fetch_add(base + 8, 1)


@njit(cache=True, nogil=True, error_model="numpy")
def norm_sums(p, g, v, row_roots, column_roots, rows, columns, s, sums, counters):
    """Pass 2: ``sums[c]`` = (Σ p², Σ u²) of chunk c, in float64; chunks taken as :func:`factor_sums` takes
    pieces.  ``v`` is the vector's state (empty for a matrix), ``row_roots`` and ``column_roots`` the matrix's
    (:func:`adafactor.inverse_roots` of the new factors, flat; empty for a vector)."""
    if v.shape[0] == 0:
        _norm_loop(p, g, v, row_roots, column_roots, rows, columns, s, sums, counters, True, False)
    elif s[LOW] != 0.0:  # the host's test of β̂₂ < 1/2 (β̂₂ in the dtype may round to 1/2)
        _norm_loop(p, g, v, row_roots, column_roots, rows, columns, s, sums, counters, False, True)
    else:
        _norm_loop(p, g, v, row_roots, column_roots, rows, columns, s, sums, counters, False, False)


# -- pass 3: the elements ------------------------------------------------------------------------------
@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _write_loop(p, g, v, row_roots, column_roots, rows, columns, s, counters, factored, low):
    n = (p.shape[0] + CHUNK - 1) // CHUNK
    base = counters.ctypes.data
    while True:
        c = fetch_add(base, 1)
        if c >= n:
            return
        lo, hi = c * CHUNK, min(c * CHUNK + CHUNK, p.shape[0])
        if factored:
            _factored_write(p, g, row_roots, column_roots, rows, columns, s, lo, hi)
        else:
            _vector_write(p, g, v, s, lo, hi, low)
        fetch_add(base + 8, 1)


@njit(cache=True, nogil=True, error_model="numpy")
def write(p, g, v, row_roots, column_roots, rows, columns, s, counters):
    """Pass 3: p ← p (1 − ηλ) − (α / max(1, RMS(u) / d)) u (the step size in ``s[STEP]``), and v for a vector;
    chunks taken as :func:`norm_sums` takes them."""
    if v.shape[0] == 0:
        _write_loop(p, g, v, row_roots, column_roots, rows, columns, s, counters, True, False)
    elif s[LOW] != 0.0:
        _write_loop(p, g, v, row_roots, column_roots, rows, columns, s, counters, False, True)
    else:
        _write_loop(p, g, v, row_roots, column_roots, rows, columns, s, counters, False, False)


# -- the host: one param's three passes ------------------------------------------------------------
def _calls(threads, run, pieces, writes=True):
    """The calls that run ``run(counters)`` (a pass's claim loop) over ``pieces`` on ``threads`` threads: on
    ``threads - 1`` workers and the caller, then wait for the pieces still under way on workers.  The pass has
    run once on nothing first (numba types its arguments, loads or compiles it, here, not among the writes; and
    not on a worker), unless it runs here on one thread and is not one of the step's ``writes``."""
    if writes or threads > 1:
        run(_NONE_LEFT.copy())
    counters = np.zeros(2, dtype=np.int64)
    if threads <= 1:
        return [functools.partial(run, counters)]
    wait_done(counters, 0)  # typed here too: among the writes it comes after a pass has written
    put = pool(threads).put
    return [functools.partial(put, functools.partial(run, counters))] * (threads - 1) + [
        functools.partial(run, counters), functools.partial(wait_done, counters, pieces)]


def _threads(n, pieces) -> int:
    return min(get_num_threads(), pieces) if n >= PARALLEL_MIN else 1


def accepts(opt, e) -> bool:
    """NumPy float16/bfloat16/float32/float64 params whose grads are NumPy arrays (or scalars) too (float16 and
    bfloat16 through float32 copies, rounded back once); CPU torch tensors of float16/32/64, params and grads
    (the passes read and write them through NumPy views of their memory)."""
    if e.rebind:
        return False
    if type(e.p) is np.ndarray:
        return isinstance(e.g, (np.ndarray, np.generic)) and (e.p.dtype in _FLOATS or e.p.dtype.name == "bfloat16")
    return _is_cpu_tensor(e.p) and _is_cpu_tensor(e.g)


def _is_cpu_tensor(x) -> bool:
    torch = sys.modules.get("torch")
    return (torch is not None and type(x) in (torch.Tensor, torch.nn.Parameter) and x.device.type == "cpu"
            and x.dtype in (torch.float16, torch.float32, torch.float64) and x.layout == torch.strided
            and not (x.is_neg() or x.is_conj()))


def _host(x):
    """``x`` itself (a NumPy array or scalar) or a NumPy view of a CPU tensor's memory."""
    return x if isinstance(x, (np.ndarray, np.generic)) else x.detach().numpy()


def _ready(a, dtype):
    """``a`` itself where the kernel can take it (C-contiguous, aligned, native, of ``dtype``), else a copy."""
    if a.dtype == dtype and a.flags.c_contiguous and a.flags.aligned and a.dtype.isnative:
        return a
    return np.array(a, dtype=dtype, order="C")


_EMPTY = {}  # dtype -> an empty array of it: the arrays a pass does not read


def _empty(dtype):
    found = _EMPTY.get(dtype)
    if found is None:
        found = _EMPTY[dtype] = np.empty(0, dtype=dtype)
    return found


def apply(opt, entries) -> list:
    """The writes of one step of ``entries`` (the checked path's call, as ``fused_cpu.apply``): passes 1 and 2
    run here; pass 3, the new factors, and the write-back of copies (float16, strided or read-only params)
    are the writes."""
    writes = []
    for e in entries:
        writes += _step(e)
    return writes


def _step(e) -> list:
    """One param's passes 1 and 2, and its writes (``e.scalars``: its hyperparameter set's scalars)."""
    s, state = e.scalars, e.state
    xp = _backend.namespace(_EMPTY_F64)  # the host's math in NumPy, as the reference rule's on NumPy params
    original = _host(e.p)
    dtype = np.dtype(_backend.compute_dtype(np, original.dtype))  # float16 via float32 copies
    n = original.size
    if n == 0:
        return []  # an empty param is left as it is
    writes = []
    p = original
    if not (p.dtype == dtype and p.flags.c_contiguous and p.flags.aligned and p.flags.writeable):
        p = np.array(original, dtype=dtype, order="C")
        writes.append(functools.partial(operator.setitem, original, Ellipsis, p))  # after pass 3, below
    g = _ready(np.asarray(_host(e.g)), dtype).reshape(p.shape)
    flat_p, flat_g = p.reshape(-1), g.reshape(-1)
    eps1 = xp.finfo(dtype).eps if s["eps1"] is None else s["eps1"]
    scal = np.array([1.0 if e.clip is None else e.clip,
                     1.0 - s["lr"] * s["weight_decay"] if s["weight_decay"] != 0.0 else 1.0,
                     s["beta2"], 1.0 - s["beta2"], eps1 * eps1, 0.0, float(s["beta2"] < 0.5),
                     inverse_floor(eps1, float(np.finfo(dtype).max))], dtype=dtype)
    empty = _empty(dtype)
    factors_new = {}
    if p.ndim >= 2:
        rows, columns = p.shape[-2], p.shape[-1]
        stack = n // (rows * columns)
        row_chunks = np.zeros((-(-columns // CHUNK), stack * rows))
        column_blocks = np.zeros((stack, -(-rows // ROW_BLOCK), columns))
        pieces = row_chunks.shape[0] * column_blocks.shape[1] * stack
        together(_calls(_threads(n, pieces), functools.partial(factor_sums, flat_g, rows, columns, scal, row_chunks,
                                                               column_blocks), pieces, writes=False))
        mean_row, mean_col = means(in_order(row_chunks, 0).reshape(p.shape[:-1]),
                                   in_order(column_blocks, 1).reshape(p.shape[:-2] + (columns,)), p)
        v_row = lerp(_ready(_host(state["v_row"]), dtype), mean_row, s["beta2"])
        v_col = lerp(_ready(_host(state["v_col"]), dtype), mean_col, s["beta2"])
        roots = inverse_roots(xp, v_row, v_col, eps1)  # the reference rule's code
        v, factors = empty, tuple(_ready(r, dtype).reshape(-1) for r in roots)
        factors_new = {"v_row": v_row, "v_col": v_col}
        rows_or_one = rows
    else:
        rows_or_one = columns = 1
        v = held = _host(state["v"])
        if not (v.dtype == dtype and v.flags.c_contiguous and v.flags.aligned and v.flags.writeable):
            v = np.array(held, dtype=dtype, order="C")  # written by pass 3, then copied into the state's buffer
            writes.append(functools.partial(operator.setitem, held, Ellipsis, v))
        v, factors = v.reshape(-1), (empty, empty)
    chunks = -(-n // CHUNK)
    threads = _threads(n, chunks)
    sums = np.empty((chunks, 2))
    together(_calls(threads, functools.partial(norm_sums, flat_p, flat_g, v, *factors, rows_or_one, columns, scal,
                                               sums), chunks, writes=False))
    param_squares, update_squares = in_order(sums, 0)
    scal[STEP] = step_size(s, n, float(param_squares), float(update_squares))
    passes = _calls(threads, functools.partial(write, flat_p, flat_g, v, *factors, rows_or_one, columns, scal), chunks)
    news = [functools.partial(operator.setitem, _host(state[k]), Ellipsis, value) for k, value in factors_new.items()]
    bump = _bump([e.p, *(state[k] for k in factors_new or ("v",))])
    return news + passes + writes + bump + [functools.partial(len, [p, g, v, factors])]  # holds what the kernel reads


def _bump(written) -> list:
    """The write that moves the version counters of the torch tensors in ``written`` (its param and state
    buffers, written through NumPy views of their memory), as torch's own in-place writes move them: autograd
    then refuses a backward pass through a value the step changed.  None for NumPy arrays."""
    tensors = [x for x in written if not isinstance(x, (np.ndarray, np.generic))]
    if not tensors:
        return []
    return [functools.partial(sys.modules["torch"]._C._increment_version, tensors)]
