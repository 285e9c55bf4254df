"""Large state buffers in their own mappings: in huge pages, and placed apart from their param in those pages.

A step streams through a param, its grad and its state buffers in lockstep.  Arrays NumPy (or torch) allocates
one after another start a few KiB apart within their 2 MiB huge pages (NumPy advises huge pages from 4 MiB),
and streams at nearly the same offsets of their pages contend (DRAM bank conflicts, most likely: banks are
chosen by address bits within a huge page).  Measured on this project's 2-core VM (Linux, transparent huge
pages on ``madvise``), 2^25 float32, one thread (``benchmarks/state_placement.py``,
``benchmarks/results/state-placement-2026-12-04.json``): xopt's Adam step 0.711 ns an element with its m and v
placed as below, 0.856 with NumPy's own m and v; a plain numba loop of the same arithmetic 0.692 against 0.833.
The params and grads were NumPy's own in every case.

So :func:`full` gives a state buffer of at least :data:`HUGE_MIN` bytes its own anonymous mapping, the huge
pages wholly inside it advised before its first touch (as NumPy advises its own: a partial one at either end
would be backed whole, up to 2 MiB more memory each) (Linux; elsewhere, or where the mapping is refused, a NumPy
array as before), starting ``slot + 1`` quarters of a huge page past the offset of its param's data in its own:
buffers of one param apart from it and from each other.  The array is an ordinary writable NumPy array (its
base the mapping, unmapped when the last view of it goes).  Smaller buffers are NumPy's.
"""

from __future__ import annotations

import math
import mmap
import operator
import sys

import numpy as np

__all__ = ["full", "empty", "copy", "mapped", "HUGE_MIN"]

HUGE_MIN = 1 << 22  # bytes: NumPy's own threshold for advising huge pages
_PAGE = 1 << 21  # a huge page (x86-64, arm64 with 4 KiB base pages)
_ADVICE = getattr(mmap, "MADV_HUGEPAGE", None) if sys.platform.startswith("linux") else None
_turn = [0]  # where the next buffer without a param to place it by starts: a quarter further each time


def empty(shape, dtype, near=None, slot=0):
    """An uninitialized C-ordered array; in its own huge-page mapping where large (see the module), placed by
    ``near`` (its param: a NumPy array, or the address of its data) where given."""
    dtype = np.dtype(dtype)
    if _ADVICE is not None and _large(shape, dtype):
        found = _mapped(_count(shape) * dtype.itemsize, _offset(near, slot))
        if found is not None:
            return found.view(dtype).reshape(shape)
    return np.empty(shape, dtype)


def full(shape, value, dtype, near=None, slot=0):
    """:func:`empty` filled with ``value`` (a new mapping is zeros already: 0 writes nothing)."""
    dtype = np.dtype(dtype)
    if _ADVICE is None or not _large(shape, dtype):  # a param's first step: a small one costs what NumPy's does
        return np.zeros(shape, dtype) if value == 0 else np.full(shape, value, dtype)
    a = empty(shape, dtype, near, slot)
    if value != 0 or a.base is None:  # no base: NumPy's own array (the mapping was refused)
        a.fill(value)
    return a


def _count(shape):
    return math.prod(shape) if isinstance(shape, tuple) else operator.index(shape)


def _large(shape, dtype):
    return _count(shape) * dtype.itemsize >= HUGE_MIN


def copy(a, near=None, slot=0):
    """A copy of the NumPy array ``a`` in C order and native byte order, as :func:`empty` makes and places one."""
    dtype = a.dtype if a.dtype.isnative else a.dtype.newbyteorder("=")
    out = empty(a.shape, dtype, near, slot)
    out[...] = a
    return out


def mapped(a) -> bool:
    """Whether ``a`` lies in a mapping of :func:`empty`'s (zeros until written)."""
    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(getattr(base, "obj", None), mmap.mmap)  # NumPy holds the mapping through a memoryview


def _offset(near, slot):
    if type(near) is int:
        start = near % _PAGE
    elif type(near) is np.ndarray and near.size:
        start = near.__array_interface__["data"][0] % _PAGE
    else:
        start = _turn[0]
        _turn[0] = (start + _PAGE // 4) % _PAGE
    start -= start % 64  # a cache line: aligned for any element, whatever the param's own alignment
    return (start + (slot + 1) * (_PAGE // 4)) % _PAGE


def _mapped(nbytes, offset):
    """``nbytes`` zero bytes (uint8) at ``offset`` bytes into a huge page of a new anonymous mapping; None where
    the system refuses the mapping (the caller makes a NumPy array)."""
    try:
        m = mmap.mmap(-1, nbytes + _PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError, OverflowError):
        return None
    raw = np.frombuffer(m, dtype=np.uint8)
    base = raw.__array_interface__["data"][0]
    start = (offset - base) % _PAGE
    # huge pages for the whole ones inside the buffer alone: a huge page is backed whole once touched, so the
    # partial ones at its ends (up to 2 MiB each) stay in base pages, as NumPy advises its own arrays
    lo = -(-(base + start) // _PAGE) * _PAGE
    hi = (base + start + nbytes) // _PAGE * _PAGE
    if hi > lo:
        try:
            m.madvise(_ADVICE, lo - base, hi - lo)
        except OSError:  # no transparent huge pages here: the mapping still places the buffer
            pass
    return raw[start:start + nbytes]
