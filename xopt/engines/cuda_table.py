"""A CUDA step's launch table from its tensors' addresses and sizes, in one compiled call.

:func:`xopt.engines.cuda_reader.table_of` is the readable definition (NumPy: about 30 array operations, some
170 us a step on 148 tensors); :func:`table_of` here gives the same answer and the same bytes in one numba
call (tested against it: ``tests/test_cuda_table.py``), for the lane's steps on torch CUDA tensors
(:mod:`xopt.engines.cuda_tensors`), whose host time is the step's on small GPT-like models.  Its memory check
is :func:`xopt.engines.cuda_memory.gather`'s: the spans' starts and ends sorted each on its own.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .cpu_memory import count_below
from .cuda_device import ALIGN, CHUNK, N_SLOTS, _sections
from .cuda_memory import _sorted

__all__ = ["table_of"]

_MOST = 2**31  # tensors and blocks a launch table holds (int32)
_HIGH = 2**62


def table_of(ptrs, sizes, rows, part, p_size, s_size, scalar_bytes):
    """:func:`xopt.engines.cuda_reader.table_of`'s (answer, blocks, table), from the same arguments."""
    n = len(sizes)
    keep = np.zeros((3, n), dtype=np.int8)
    for j in range(3):
        keep[j, rows[j]] = 1
    if n >= _MOST or (n and (-(-int(sizes.max()) // CHUNK) >= _MOST or ptrs.min() < 0 or ptrs.max() >= _HIGH)):
        # what the compiled call does not take: more than a launch holds (NumPy's raises) or addresses past 2^62
        # (no GPU's; the compiled sort of the spans takes values in 0 .. 2^63 - 1)
        from .cuda_reader import table_of as reference

        return reference(ptrs, sizes, rows, part, p_size, s_size, scalar_bytes)
    return _table_of(ptrs, sizes, keep, part, p_size, s_size, _sections(n, 0, scalar_bytes)[-1] - 48 * n, CHUNK)


@njit(cache=True)
def _table_of(ptrs, sizes, keep, part, p_size, s_size, tail_bytes, chunk):
    """(answer, blocks, table): answer 1 where a live tensor's param, grad or kept buffer is NULL or not a multiple of
    its item size, n + 1 where spans share a byte (params and kept buffers, or a grad with any of them), else 0
    and the table (addresses by slot, sizes, blocks of (tensor, chunk, aligned, part), then ``tail_bytes`` zeros:
    the scalars' rows and the norm pass's count)."""
    n = sizes.shape[0]
    spans_lo = np.empty((4, n), dtype=np.int64)
    spans_hi = np.empty((4, n), dtype=np.int64)
    runs = np.zeros(4, dtype=np.int64)
    aligned = np.ones(n, dtype=np.int32)
    n_blocks = 0
    for t in range(n):
        size = sizes[t]
        for k in range(N_SLOTS):
            ptr = ptrs[k, t]
            item = p_size if k < 2 else s_size
            present = k < 2 or ptr != 0
            if size > 0:
                if k >= 2 and keep[k - 2, t] and ptr == 0:
                    return 1, 0, np.empty(0, dtype=np.uint8)
                if k < 2 and ptr == 0:
                    return 1, 0, np.empty(0, dtype=np.uint8)
                if present and ptr % item != 0:
                    return 1, 0, np.empty(0, dtype=np.uint8)
            if present and ptr % ALIGN != 0:
                aligned[t] = 0
            if size > 0 and k != 1 and (k == 0 or keep[k - 2, t]):
                r = 0 if k == 0 else k - 1
                spans_lo[r, runs[r]], spans_hi[r, runs[r]] = ptr, ptr + size * item
                runs[r] += 1
        n_blocks += (size + chunk - 1) // chunk
    lo, hi = _sorted(spans_lo, runs), _sorted(spans_hi, runs)
    for i in range(1, lo.shape[0]):
        if lo[i] < hi[i - 1]:
            return n + 1, 0, np.empty(0, dtype=np.uint8)
    for t in range(n):
        if sizes[t] <= 0:
            continue
        g_lo = ptrs[1, t]
        j = count_below(lo, g_lo + sizes[t] * p_size)
        if j > 0 and hi[j - 1] > g_lo:
            return n + 1, 0, np.empty(0, dtype=np.uint8)
    table = np.zeros(48 * n + 16 * n_blocks + tail_bytes, dtype=np.uint8)
    words = table[:48 * n].view(np.int64)
    for k in range(N_SLOTS):
        for t in range(n):
            words[k * n + t] = ptrs[k, t]
    for t in range(n):
        words[N_SLOTS * n + t] = sizes[t]
    blocks = table[48 * n:48 * n + 16 * n_blocks].view(np.int32)
    b = 0
    for t in range(n):
        for c in range((sizes[t] + chunk - 1) // chunk):
            blocks[4 * b] = t
            blocks[4 * b + 1] = c
            blocks[4 * b + 2] = aligned[t]
            blocks[4 * b + 3] = part[t]
            b += 1
    return 0, n_blocks, table
