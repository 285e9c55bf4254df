"""LAMB on the fused CPU engine (numba): each tensor's norms, then its elements.

LAMB scales each param's update by its trust ratio ‖W‖ / ‖u‖, so a tensor is written only once both norms
over the whole tensor are known.  Two phases:

1. the norms: read p, g, m and v, compute u (the new m and v are not kept) and add p² and u² in float64,
   in the order of :mod:`xopt._norms` (chunks of ``CHUNK``, 8 lanes in a chunk, the chunks in order), which
   the reference rule's norms follow too: the same bits on one thread or several;
2. the elements: compute m, v and u again (the same operations: the same bits) and write m, v and
   p - lr (u r), r the ratio in the param's dtype.

That reads p, g, m, v twice and writes m, v, p once: 44 bytes an element in float32 (Adam moves 28).
Nothing is written before both norms of the tensor are known, and the step's writes are one C-level call
as any other (:mod:`xopt._atomic`).

Its C function (:func:`elements`, the rule's entry for the drivers of :mod:`xopt.engines.cpu_drivers`)
takes a tensor's ratio from its row of scalars (``RATIO``), or, where that is -1 (not known), is given the
whole tensor and runs both phases itself: the drivers' serial run.  A step split over threads runs the
norms first, chunk by chunk on every thread (:func:`claim_norms`, :func:`norms`), then the ratios
(:func:`ratios`), then the elements with one row of scalars per tensor (:func:`per_tensor`).

Scalars (``LAMB.kernel``): lr, 1 - beta1, beta1, 1 - beta2, beta2, bias_correction1, bias_correction2, eps,
eps_root, weight_decay, then the ratio and the clip scale.
"""

from __future__ import annotations

import numpy as np
from numba import carray, cfunc, njit

from .._norms import CHUNK as NORM_CHUNK, LANES
from .cpu_drivers import CHUNK, ELEMENTS_SIGNATURE, _run
from .cpu_memory import fetch_add, typed_pointer, view as _view

__all__ = ["RATIO", "elements", "norms", "claim_norms", "ratios", "trust_ratio", "per_tensor"]

assert NORM_CHUNK == CHUNK and LANES == 8, "the norms' order is the engine's chunks, 8 lanes"

RATIO = 10  # the ratio's place in a row of scalars; the clip scale follows it


# -- the element math: the reference rule's, in its order ------------------------------------------
@njit(cache=True, error_model="numpy", inline="always")
def _update(pi, gi, mi, vi, s, decayed, clipped):
    """(new m, new v, u) of one element; ``decayed`` and ``clipped`` are constants at each call below."""
    one_minus_beta1, beta1, one_minus_beta2, beta2 = s[1], s[2], s[3], s[4]
    bias_correction1, bias_correction2, eps, eps_root, weight_decay = s[5], s[6], s[7], s[8], s[9]
    if clipped:
        gi = gi * s[RATIO + 1]
    m = one_minus_beta1 * gi + beta1 * mi
    v = one_minus_beta2 * (gi * gi) + beta2 * vi
    u = (m / bias_correction1) / (np.sqrt(v / bias_correction2 + eps_root) + eps)
    if decayed:
        u = u + weight_decay * pi
    return m, v, u


@njit(cache=True, error_model="numpy", inline="always")
def _lane(p, g, m, v, i, s, decayed, clipped, pp, uu):
    """Element i's p² and u² added to one lane's sums."""
    u = _update(p[i], g[i], m[i], v[i], s, decayed, clipped)[2]
    x, y = np.float64(p[i]), np.float64(u)
    return pp + x * x, uu + y * y


@njit(cache=True, error_model="numpy", inline="always")
def _chunk_loop(p, g, m, v, s, decayed, clipped):
    """(Σ p², Σ u²) over one chunk (views starting at a multiple of 8): lane k takes elements k, k + 8, ..."""
    n = p.shape[0]
    full = n - n % 8
    p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = 0.0
    u0 = u1 = u2 = u3 = u4 = u5 = u6 = u7 = 0.0
    for i in range(0, full, 8):
        p0, u0 = _lane(p, g, m, v, i, s, decayed, clipped, p0, u0)
        p1, u1 = _lane(p, g, m, v, i + 1, s, decayed, clipped, p1, u1)
        p2, u2 = _lane(p, g, m, v, i + 2, s, decayed, clipped, p2, u2)
        p3, u3 = _lane(p, g, m, v, i + 3, s, decayed, clipped, p3, u3)
        p4, u4 = _lane(p, g, m, v, i + 4, s, decayed, clipped, p4, u4)
        p5, u5 = _lane(p, g, m, v, i + 5, s, decayed, clipped, p5, u5)
        p6, u6 = _lane(p, g, m, v, i + 6, s, decayed, clipped, p6, u6)
        p7, u7 = _lane(p, g, m, v, i + 7, s, decayed, clipped, p7, u7)
    if full < n:  # the tail: lanes 0 .. n - full - 1
        p0, u0 = _lane(p, g, m, v, full, s, decayed, clipped, p0, u0)
    if full + 1 < n:
        p1, u1 = _lane(p, g, m, v, full + 1, s, decayed, clipped, p1, u1)
    if full + 2 < n:
        p2, u2 = _lane(p, g, m, v, full + 2, s, decayed, clipped, p2, u2)
    if full + 3 < n:
        p3, u3 = _lane(p, g, m, v, full + 3, s, decayed, clipped, p3, u3)
    if full + 4 < n:
        p4, u4 = _lane(p, g, m, v, full + 4, s, decayed, clipped, p4, u4)
    if full + 5 < n:
        p5, u5 = _lane(p, g, m, v, full + 5, s, decayed, clipped, p5, u5)
    if full + 6 < n:
        p6, u6 = _lane(p, g, m, v, full + 6, s, decayed, clipped, p6, u6)
    return (((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)),
            ((u0 + u1) + (u2 + u3)) + ((u4 + u5) + (u6 + u7)))


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
def _write_loop(p, g, m, v, s, ratio, decayed, clipped):
    lr = s[0]
    for i in range(p.shape[0]):
        mi, vi, u = _update(p[i], g[i], m[i], v[i], s, decayed, clipped)
        p[i] = p[i] - lr * (u * ratio)
        m[i], v[i] = mi, vi


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
