"""The compiled step on CPU torch tensors: the addresses the caller read from torch, checked, then the kernel.

:mod:`xopt.engines.cpu_tensors` reads each tensor's facts through torch's accessors into one int64 table;
:func:`table_step` checks it (:func:`check_table`: counts, NULL and alignment, parts, no shared bytes) and
runs the rule there, as :func:`xopt.engines.cpu_step.step_function` does for NumPy arrays.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .cpu_drivers import all_finite, run_serial
from .cpu_memory import disjoint
from .cpu_step import CHECK_FINITE, LARGE, NONFINITE, NotRun

__all__ = ["TABLE_HEAD", "N_TABLE_HEAD", "TABLE_ANSWER", "check_table", "table_sizes", "table_part", "table_step"]

# The int64 table of a step on CPU torch tensors (see check_table): these numbers, then its rows' columns.
TABLE_HEAD = ("n", "n_parts", "param_size", "state_size", "mode", "split_at", "answer")
N_TABLE_HEAD = len(TABLE_HEAD)


@njit(cache=True, inline="always")
def table_sizes(table):
    """The element counts of a table's rows (a view of ``table``)."""
    return table[N_TABLE_HEAD:N_TABLE_HEAD + table[0]]


@njit(cache=True, inline="always")
def table_part(table):
    """Each row's part where the step has several, else an empty array (a view of ``table``)."""
    n, n_parts = table[0], table[1]
    at = N_TABLE_HEAD + 6 * n + 3 * n_parts
    return table[at:at + n] if n_parts > 1 else table[0:0]


@njit(cache=True)
def check_table(table, ptrs):
    """:func:`check_step` for a step whose addresses the caller read from objects whose own checks it made
    (CPU torch tensors: type, dtype, device, contiguity, shape; see ``xopt.engines.cpu_tensors``): the
    element count of the step if its rows may be read and written, else -1 - the first row that may not
    (-1 - n: the memory check).  Nothing is written but ``ptrs`` (n rows of 5).

    ``table`` (int64): the numbers of ``TABLE_HEAD``, then n element counts, then n addresses of each of
    the params, the grads and the three state slots (0 where no part keeps the slot), then 3 flags per part
    of the step (whether it keeps each slot), then, with several parts, each row's part.  Row t is good when
    its count is positive, its part one of the step's, and each address it reads (the slots its part keeps)
    not NULL and aligned to its item size; then memory, as :func:`check_step`.  ``ptrs[t]``: row t's five
    addresses, an unkept slot's the param's (never read)."""
    n, n_parts, param_size, state_size = table[0], table[1], table[2], table[3]
    if n <= 0 or n_parts <= 0 or table.shape[0] != N_TABLE_HEAD + 6 * n + 3 * n_parts + (n if n_parts > 1 else 0):
        return -1 - n
    sizes, part = table_sizes(table), table_part(table)
    col = N_TABLE_HEAD + n  # the params' addresses
    keep = table[N_TABLE_HEAD + 6 * n:N_TABLE_HEAD + 6 * n + 3 * n_parts]
    spans = np.empty((6, 4 * n), dtype=np.int64)  # the byte ranges, then room for their sort
    spans_lo, spans_hi = spans[0], spans[1]
    m = 0
    total = 0
    for t in range(n):
        size = sizes[t]
        p, g = table[col + t], table[col + n + t]
        if size <= 0 or p == 0 or p % param_size != 0 or g == 0 or g % param_size != 0:
            return -1 - t
        total += size
        ptrs[t, 0], ptrs[t, 1] = p, g
        spans_lo[m], spans_hi[m] = p, p + size * param_size
        m += 1
        row = part[t] if n_parts > 1 else 0
        if row < 0 or row >= n_parts:
            return -1 - t
        for j in range(3):
            ptrs[t, 2 + j] = p
            if keep[3 * row + j] == 0:
                continue
            b = table[col + (2 + j) * n + t]
            if b == 0 or b % state_size != 0:
                return -1 - t
            ptrs[t, 2 + j] = b
            spans_lo[m], spans_hi[m] = b, b + size * state_size
            m += 1
    return total if disjoint(spans_lo[:m], spans_hi[:m], ptrs, sizes, param_size, spans[2:]) else -1 - n


TABLE_ANSWER = TABLE_HEAD.index("answer")


@njit(cache=True, error_model="numpy")
def table_step(function, table, scal):
    """:func:`step` for a step on CPU torch tensors, whose addresses the caller gathered in ``table`` (see
    ``cpu_memory.check_table``; its head's ``mode`` and ``split_at`` as ``head[12]`` and ``head[13]`` there):
    checked, then run here unless refused, large or not finite (:class:`NotRun`, the answer in
    ``table[TABLE_ANSWER]``)."""
    n = table[0]
    ptrs = np.empty((max(n, 0), 5), dtype=np.int64)
    total = check_table(table, ptrs)
    answer = -total if total < 0 else 0  # 1 + a refused row (n + 1: the memory check)
    if answer == 0 and total >= table[5]:
        answer = LARGE
    if answer == 0 and table[4] & CHECK_FINITE and not all_finite(ptrs, table_sizes(table), scal[0]):
        answer = NONFINITE
    if answer != 0:
        table[TABLE_ANSWER] = answer
        raise NotRun
    run_serial(function, ptrs, table_sizes(table), scal, table_part(table))
    return 0
