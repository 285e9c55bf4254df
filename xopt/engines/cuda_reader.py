"""A CUDA step's table by Python's attribute lookups: what :func:`xopt.engines.cuda_memory.gather` reads from the
arrays' structs, where its compiled reader is not available (an array type whose layout it could not probe) and
for the checked path's launches.  The same checks (exact type, dtype, shape, C order, alignment, one device, no
shared memory) and the same table (:func:`xopt.engines.cuda_device._table`).
"""

from __future__ import annotations

import operator

import numpy as np

from .cuda_device import ALIGN, N_SLOTS, _table

__all__ = ["gather", "rows_kept", "addresses", "table_of"]

_size = operator.attrgetter("size")
_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")


def _flags_ok(arrays, array_type, write) -> bool:
    if not all(a.flags.c_contiguous for a in arrays):
        return False
    if array_type is np.ndarray:  # the CPU build's arrays: aligned, and writeable where written
        return all(a.flags.aligned and (a.flags.writeable or not write) for a in arrays)
    return True


def gather(device, array_type, lists, keeps, part, dtype, state_dtype, scalar_bytes):
    """What :func:`xopt.engines.cuda_memory.gather` answers, by Python's attribute lookups and ``device``'s
    ``device_of`` and ``address``: (answer, device id, blocks, table), answer 0 where every check passed (any
    other number: refused)."""
    ps, gs, slots, steps = lists[0], lists[1], lists[2:5], lists[5]
    n = len(ps)
    if len(gs) != n or any(lst is not None and len(lst) != n for lst in slots) or (steps is not None
                                                                                    and len(steps) != n):
        return 1, -1, 0, None
    found = rows_kept(n, slots, keeps, part)
    if found is None:
        return 1, -1, 0, None
    part, rows = found
    bufs = [[slots[j][i] for i in rows[j]] for j in range(3)]
    flat = [b for slot in bufs for b in slot]
    if {*map(type, ps), *map(type, gs), *map(type, flat)} != {array_type}:
        return 1, -1, 0, None
    if {*map(_dtype, ps), *map(_dtype, gs)} != {dtype} or (flat and set(map(_dtype, flat)) != {state_dtype}):
        return 1, -1, 0, None
    shapes = list(map(_shape, ps))
    if list(map(_shape, gs)) != shapes:
        return 1, -1, 0, None
    for j in range(3):
        if [b.shape for b in bufs[j]] != [shapes[i] for i in rows[j]]:
            return 1, -1, 0, None
    if not (_flags_ok(ps, array_type, True) and _flags_ok(gs, array_type, False)
            and _flags_ok(flat, array_type, True)):
        return 1, -1, 0, None
    if steps is not None and not all(type(s) is int for s in steps):
        return 1, -1, 0, None
    devices = {*map(device.device_of, ps), *map(device.device_of, gs), *map(device.device_of, flat)}
    if len(devices) > 1:
        return n + 2, -1, 0, None
    sizes = np.fromiter(map(_size, ps), dtype=np.int64, count=n)
    ptrs = addresses(n, rows, map(device.address, ps), map(device.address, gs),
                     [map(device.address, bufs[j]) for j in range(3)])
    answer, n_blocks, table = table_of(ptrs, sizes, rows, part, dtype.itemsize, state_dtype.itemsize, scalar_bytes)
    return answer, (devices.pop() if devices and not answer else -1), n_blocks, table


def rows_kept(n, slots, keeps, part):
    """(each tensor's part as an int64 array, and for each of the three slots the rows whose part keeps it), or
    None where ``part`` names a part that ``keeps`` (three flags a part) has not."""
    part = np.zeros(n, dtype=np.int64) if part is None or not len(part) else np.asarray(part, dtype=np.int64)
    if n and (part.min() < 0 or part.max() >= len(keeps)):
        return None
    kept = np.asarray(keeps, dtype=bool).reshape(-1, 3)[part]  # (n, 3): which slots each tensor's part keeps
    return part, [np.flatnonzero(kept[:, j]) if slots[j] is not None else np.zeros(0, dtype=np.int64)
                  for j in range(3)]


def addresses(n, rows, ps, gs, bufs):
    """The table's addresses (5 x n, int64): the params', the grads', and each slot's buffers' in its ``rows``
    (iterables of addresses; 0 where a row keeps no buffer)."""
    ptrs = np.zeros((N_SLOTS, n), dtype=np.int64)
    ptrs[0] = np.fromiter(ps, dtype=np.uint64, count=n).astype(np.int64)
    ptrs[1] = np.fromiter(gs, dtype=np.uint64, count=n).astype(np.int64)
    for j in range(3):
        ptrs[2 + j, rows[j]] = np.fromiter(bufs[j], dtype=np.uint64, count=len(rows[j])).astype(np.int64)
    return ptrs


def table_of(ptrs, sizes, rows, part, p_size, s_size, scalar_bytes):
    """(answer, blocks, table) from the addresses ``ptrs`` (see :func:`addresses`) and element counts of a step's
    tensors: answer 1 where an address is NULL (a torch ZeroTensor has elements and no memory; the kernel reads a
    NULL slot as one not kept) or not a multiple of its item size, n + 1 where two params or buffers share a byte
    or a grad shares one with any of them, else 0 and the launch table."""
    n = len(sizes)
    live = sizes > 0
    null = np.any(ptrs[:2] == 0, axis=0)
    for j in range(3):
        null[rows[j]] |= ptrs[2 + j, rows[j]] == 0
    if np.any(live & null):
        return 1, 0, None
    item = np.array([p_size, p_size, s_size, s_size, s_size], dtype=np.int64)[:, None]
    present = (ptrs != 0) | (np.arange(N_SLOTS) < 2)[:, None]
    if np.any(live & np.any(present & (ptrs % item != 0), axis=0)):
        return 1, 0, None
    aligned = ~np.any(present & (ptrs % ALIGN != 0), axis=0)
    spans_lo, spans_hi = [ptrs[0, live]], [ptrs[0, live] + sizes[live] * p_size]
    for j in range(3):
        where = rows[j][live[rows[j]]]
        spans_lo.append(ptrs[2 + j, where])
        spans_hi.append(ptrs[2 + j, where] + sizes[where] * s_size)
    lo, hi = np.concatenate(spans_lo), np.concatenate(spans_hi)
    order = np.argsort(lo, kind="stable")
    lo, hi = lo[order], hi[order]
    if np.any(lo[1:] < hi[:-1]):
        return n + 1, 0, None
    g_lo = ptrs[1, live]
    j = np.searchsorted(lo, g_lo + sizes[live] * p_size)
    if np.any((j > 0) & (hi[np.maximum(j - 1, 0)] > g_lo)):
        return n + 1, 0, None
    n_blocks, table = _table(ptrs, sizes, aligned, part, scalar_bytes)
    return 0, n_blocks, table
