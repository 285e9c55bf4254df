"""Blockwise 8-bit state (``state_dtype="8bit"``): the format, and the reference rule over it.

A state buffer of a param of at least ``min_8bit_size`` elements is kept as two arrays:

- ``name``: uint8 codes, the param's shape: an index into a sorted map of 256 float32 values (those of [-1, 1]
  are the ones a block's values get, see :func:`float_map`);
- ``name + "_absmax"``: float32, one per block of ``block_size`` consecutive elements (C order; the last
  block may be shorter): the largest magnitude in the block.

An element's value is ``map[code] * absmax`` of its block.  Smaller params keep their state in float32 (the
compute dtype), as bitsandbytes does: their state is a small part of the memory and they are often the
biases and norms that 8-bit state hurts most.

The maps are small float formats relative to the block's absmax (:func:`float_map`), of the kind of FP8
(e4m3, e5m3) with 3 fraction bits: signed (Adam's and Lion's m, the momentum buffers) the values 0, +-2^-17 ..
+-1 (subnormals below 2^-14, 14 binades above: a relative step of 1/8 to 1/16), unsigned (the buffers the
optimizer declares never negative in ``nonnegative_buffers``: Adam's v and v_max, the h of RMSprop and AdaGrad)
0 and 2^-33 .. 1 (30 binades).  Their codes and values are arithmetic
on the float bits, which the fused kernel computes 16 at a time; bitsandbytes' dynamic maps
(:func:`dynamic_map`: 1-7 % steps over six decades, finest near the absmax) need table lookups.  Measured
(``benchmarks/state_8bit_accuracy.py``, 3 seeds, 64-512-512-10 MLP): final training loss 1.3 % above float32
state with these maps, 8.7 % with the dynamic ones; a float32 state's round trip
(``benchmarks/state_8bit_roundtrip.py``) has a median relative error of 2.2 % (m and v) against the dynamic
maps' 1.1 % (m) and 0.3 % (v): the dynamic maps are finer near the absmax, these reach further below it.

The rule, per param and step (:func:`apply_reference`): every buffer dequantized to its compute dtype
(float32; float64 for float64 params), the optimizer's own ``rule`` run on it unchanged, each new buffer
rounded to float32 and quantized again (:func:`quantize`): the new absmax of each block, then each
element's code, ``count(mid < x * (1 / absmax))``, ``mid`` the 255 float32 midpoints between neighbouring
map values (round to nearest, a tie to the smaller value; a NaN gets code 255, an all-zero block absmax 0).
A NaN in a block makes its absmax NaN, so the whole block reads NaN afterwards.  The fused CPU kernel
(:mod:`xopt.engines.cpu_blockwise`) computes the same numbers bit for bit (on these maps the nearest value, a tie
to the smaller, is the float bits rounded: for y > 0 a tie toward zero, for y < 0 away from it).
"""

from __future__ import annotations

import math

import numpy as np

from .. import _backend
from .reference import _as, _grad, _write

__all__ = ["BLOCK_SIZE", "MIN_8BIT_SIZE", "dynamic_map", "float_map", "SIGNED_FORMAT", "UNSIGNED_FORMAT", "SIGNED", "UNSIGNED", "midpoints", "quantize",
           "dequantize", "map_of", "is_8bit", "n_blocks", "apply_reference", "SUFFIX", "LIBRARIES"]

BLOCK_SIZE = 256  # bitsandbytes' blockwise default
MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size: smaller params keep float32 state
SUFFIX = "_absmax"  # buffer name + SUFFIX: its per-block scales
LIBRARIES = ("numpy", "cupy")  # the array libraries whose params keep 8-bit state (the CPU kernel's, the CUDA one's)
REFERENCE_CHUNK = 1 << 15  # elements the reference quantizes at a time (rounded down to whole blocks)


def dynamic_map(signed: bool) -> np.ndarray:
    """bitsandbytes' ``create_dynamic_map(signed)`` (7 exponent bits, 8 bits in all): 256 sorted float32 values,
    computed in float64 and rounded once.  Not the state's map (see the module); kept to measure against."""
    values = [0.0, 1.0]
    for i in range(7):
        n = 2**i if signed else 2 ** (i + 1)
        bounds = np.linspace(0.1, 1.0, n + 1)
        means = (bounds[:-1] + bounds[1:]) / 2.0 * 10.0 ** (i - 6)
        values += means.tolist()
        if signed:
            values += (-means).tolist()
    found = np.sort(np.array(values, dtype=np.float64)).astype(np.float32)
    assert found.shape == (256,) and np.all(np.diff(found) > 0)
    return found


def float_map(signed: bool, mantissa: int, emin: int) -> np.ndarray:
    """A small float format relative to the block's absmax: 256 sorted float32 values, exactly those of a
    format with ``mantissa`` fraction bits whose magnitude code ``c`` (0 up) has the exponent field ``c >> mantissa``
    and the fraction ``c & (2**mantissa - 1)``: field 0 the subnormals ``f * 2**(emin - mantissa)``, field ``e >= 1``
    the values ``(1 + f / 2**mantissa) * 2**(emin + e - 1)``.  1.0 is the code ``(1 - emin) << mantissa``; the codes
    above it (values up to 2) are a block's only if its absmax's inverse is not exact enough for ``x / absmax <= 1``.

    Signed (m): the codes 0..126 are the negatives of magnitudes 127..1, 127 is 0 and 128..255 the magnitudes
    1..128, so the codes stay in the values' order.  Unsigned (v, v_max): the code is the magnitude code."""
    def value(c):
        field, f = c >> mantissa, c & ((1 << mantissa) - 1)
        if field == 0:
            return f * 2.0 ** (emin - mantissa)
        return (2**mantissa + f) * 2.0 ** (emin + field - 1 - mantissa)

    if signed:
        values = [-value(c) for c in range(127, 0, -1)] + [value(c) for c in range(129)]
    else:
        values = [value(c) for c in range(256)]
    found = np.array(values, dtype=np.float64).astype(np.float32)
    assert found.shape == (256,) and np.all(np.diff(found) > 0) and np.array_equal(found, values)
    assert 1.0 in found and found[-1] <= 2.0
    return found


SIGNED_FORMAT = (3, -14)  # (fraction bits, emin): values 2**-17 .. 1 of the absmax, 3 bits of fraction
UNSIGNED_FORMAT = (3, -30)  # 2**-33 .. 1, 3 bits of fraction
SIGNED = float_map(True, *SIGNED_FORMAT)
UNSIGNED = float_map(False, *UNSIGNED_FORMAT)


def midpoints(code: np.ndarray) -> np.ndarray:
    """The 255 float32 thresholds between neighbouring map values, then +inf (so code 255 compares false)."""
    wide = code.astype(np.float64)
    return np.append(((wide[:-1] + wide[1:]) / 2.0).astype(np.float32), np.float32(np.inf))


def map_of(opt, name) -> np.ndarray:
    """The map of buffer ``name`` of ``opt``: unsigned for the buffers its class declares never negative."""
    return UNSIGNED if name in getattr(type(opt), "nonnegative_buffers", ()) else SIGNED


_MIDS = {id(SIGNED): midpoints(SIGNED), id(UNSIGNED): midpoints(UNSIGNED)}


def is_8bit(opt, size) -> bool:
    """Whether ``opt`` keeps the state of a param of ``size`` elements as 8-bit codes."""
    return opt._hyper.get("state_dtype") == "8bit" and size >= opt._hyper["min_8bit_size"]


def n_blocks(size, block) -> int:
    return -(-size // block)


def quantize(xp, x, code, block):
    """(uint8 codes, float32 absmax per block) of 1-D ``x`` (float32) on map ``code`` (see the module)."""
    n = x.shape[0]
    nb = n_blocks(n, block)
    known = _MIDS.get(id(code))
    mid = xp.asarray((midpoints(code) if known is None else known)[:255], device=_backend.device(x))
    # whole blocks, then a shorter last one, not padded (a block_size far above the size would cost that many zeros)
    full = n // block
    head = xp.reshape(x[:full * block], (full, block)) if full else None
    absmax = [xp.max(xp.abs(head), axis=1)] if full else []  # NaN propagates: a NaN makes its block's absmax NaN
    if full < nb:
        absmax.append(xp.reshape(xp.max(xp.abs(x[full * block:])), (1,)))
    absmax = _joined(xp, absmax, x[:0])
    inverse = 1.0 / xp.where(absmax == 0.0, xp.ones_like(absmax), absmax)
    y = [xp.reshape(head * inverse[:full, None], (-1,))] if full else []
    if full < nb:
        y.append(x[full * block:] * inverse[full])
    y = _joined(xp, y, x)
    codes = xp.searchsorted(mid, y, side="left")
    codes = xp.where(xp.isnan(y), xp.full_like(codes, 255), codes)
    return xp.astype(codes, xp.uint8), absmax


def dequantize(xp, codes, absmax, code, block, dtype):
    """The values of 1-D ``codes`` with their blocks' ``absmax``, in ``dtype``: ``map[code] * absmax`` (float32)."""
    n = codes.shape[0]
    nb = absmax.shape[0]
    table = xp.asarray(code, device=_backend.device(codes))
    values = xp.take(table, xp.astype(codes, xp.int64))
    full = min(n // block, nb)  # whole blocks, then the shorter last one (not padded, as quantize)
    pieces = [xp.reshape(xp.reshape(values[:full * block], (full, block)) * absmax[:full, None], (-1,))] if full \
        else []
    if full * block < n:
        pieces.append(values[full * block:] * absmax[full])
    values = _joined(xp, pieces, values)
    return _as(xp, values, dtype)


def _joined(xp, pieces, empty):
    """The 1-D arrays ``pieces`` end to end (``empty``, an empty array of their dtype, where there are none)."""
    if len(pieces) == 1:
        return pieces[0]
    return xp.concat(pieces) if pieces else empty


def apply_reference(opt, entries) -> list:
    """The writes of the rule over 8-bit state (see the module) for ``entries`` (NumPy params of at least
    ``min_8bit_size`` elements), whole blocks at a time into new arrays; nothing is written before the writes
    run."""
    writes = []
    for e in entries:
        view = e.opt if e.opt is not None else opt
        xp, p, st = e.xp, e.p, e.state
        dtype = _backend.compute_dtype(xp, p.dtype)
        block = opt._hyper["block_size"]
        names = view.buffers()
        maps = [map_of(view, name) for name in names]
        n = math.prod(p.shape)
        flat_p, flat_g = xp.reshape(p, (-1,)), xp.reshape(xp.asarray(e.g), (-1,))
        if flat_g.shape[0] != n:  # a number grad of a 0-d param never gets here (params this small are float)
            flat_g = xp.broadcast_to(flat_g, (n,))
        codes = [xp.reshape(st[name], (-1,)) for name in names]
        scales = [st[name + SUFFIX] for name in names]
        out_p = xp.empty_like(flat_p)
        out_codes = [xp.empty_like(c) for c in codes]
        out_scales = [xp.empty_like(s) for s in scales]
        chunk = max(1, REFERENCE_CHUNK // block) * block
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            b0, b1 = lo // block, n_blocks(hi, block)
            state = {name: dequantize(xp, c[lo:hi], s[b0:b1], m, block, dtype)
                     for name, c, s, m in zip(names, codes, scales, maps)}
            p_new, new = view.rule(xp, _as(xp, flat_p[lo:hi], dtype), _grad(xp, flat_g[lo:hi], dtype, e.clip),
                                   state, e.scalars)
            out_p[lo:hi] = _as(xp, p_new, p.dtype)
            for name, m, oc, os_ in zip(names, maps, out_codes, out_scales):
                oc[lo:hi], os_[b0:b1] = quantize(xp, _as(xp, new[name], xp.float32), m, block)
        for name, oc, os_ in zip(names, out_codes, out_scales):
            writes += [_write(xp, st[name], xp.reshape(oc, st[name].shape), False),
                       _write(xp, st[name + SUFFIX], os_, False)]
        writes.append(_write(xp, p, xp.reshape(out_p, p.shape), False))
    return writes
