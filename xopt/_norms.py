"""Sums of squares in one fixed order, which the fused CPU kernels repeat bit for bit.

A rule that scales a param by a ratio of norms (LAMB's trust ratio, Adafactor's step size) or keeps the
row and column sums of g² (Adafactor's factors) must have the same sums in every path, or a fused step
would not be its reference's bit for bit.  NumPy's ``sum`` adds in an order of its own (pairwise, by
blocks), and a kernel split over threads adds in another.  So the sums of host arrays (NumPy,
array-api-strict, CPU torch tensors) are defined here, in float64, as the CPU kernels compute them whatever
their thread count.  The sum of a run of numbers (a whole param, or one row)::

    chunks of CHUNK elements (the last one shorter), in order;
    in a chunk, LANES partial sums: lane k adds x[i] for i = k, k + LANES, k + 2 LANES, ... in order, from 0;
    a chunk's sum: the lanes added pairwise, (s0 + s1), (s2 + s3), ..., then those pairwise, to one;
    the sum: the chunks' sums added in order, from 0.

:func:`squared_norm` is that sum of x² over the whole array, :func:`row_squares` over each row (the last
axis), :func:`row_sums` of x itself over each row.  :func:`column_squares` sums x² down each column (the axis
before the last) in blocks of ``ROW_BLOCK`` rows: in a block from its first row, in order; then the blocks'
sums in order, from 0.  x² is taken in float64 (exact for float32 x).  Other arrays (CuPy, Dask, JAX) are
summed by their own library, in their dtype: no kernel of theirs has to match it.
"""

from __future__ import annotations

import numpy as np

from . import _backend

__all__ = ["CHUNK", "LANES", "ROW_BLOCK", "is_host", "squared_norm", "row_squares", "row_sums", "column_squares",
           "in_order"]

CHUNK = 1 << 15  # elements: the CPU engine's unit of work (xopt.engines.cpu_drivers.CHUNK)
LANES = 16
ROW_BLOCK = 64  # rows per block of the column sums
_AT_ONCE = CHUNK * 32  # elements squared at a time: a 8 MiB temporary at most


def is_host(x) -> bool:
    """Whether ``x`` is summed in this module's order: NumPy, array-api-strict, a CPU torch tensor."""
    if isinstance(x, (np.ndarray, np.generic)):  # a NumPy scalar: what arithmetic on 0-d arrays gives
        return True
    library = _backend.library_name(x)
    return library == "array_api_strict" or (library == "torch" and x.device.type == "cpu")


def _numpy(x):
    return np.ascontiguousarray(x if isinstance(x, np.ndarray) else _backend.to_numpy(x))


def squared_norm(xp, x) -> float:
    """The sum of the squares of ``x``'s elements, in float64 (see the module for the order on the host)."""
    if is_host(x):
        return float(_rows(_numpy(x).reshape(1, -1), True)[0])
    return float(xp.sum(x * x))


def row_squares(x) -> np.ndarray:
    """Each row's sum of squares (over the last axis) of a host array, float64, of shape ``x.shape[:-1]``."""
    x = _numpy(x)
    return _rows(x.reshape(-1, x.shape[-1]), True).reshape(x.shape[:-1])


def row_sums(x) -> np.ndarray:
    """Each row's sum (over the last axis) of a host array, float64, of shape ``x.shape[:-1]``."""
    x = _numpy(x)
    return _rows(x.reshape(-1, x.shape[-1]), False).reshape(x.shape[:-1])


def column_squares(x) -> np.ndarray:
    """Each column's sum of squares (over the axis before the last) of a host array of two or more
    dimensions, float64, of shape ``x.shape[:-2] + x.shape[-1:]``: by blocks of ``ROW_BLOCK`` rows."""
    x = _numpy(x)
    lead, (rows, columns) = x.shape[:-2], x.shape[-2:]
    x = x.reshape(-1, rows, columns)
    blocks = -(-rows // ROW_BLOCK)
    sums = np.zeros((x.shape[0], blocks, columns))
    step = max(1, _AT_ONCE // max(1, ROW_BLOCK * columns * x.shape[0])) * ROW_BLOCK  # rows at a time
    for at in range(0, rows, step):
        squares = np.zeros((x.shape[0], -(-min(step, rows - at) // ROW_BLOCK) * ROW_BLOCK, columns))
        squares[:, :min(step, rows - at)] = x[:, at:at + step]  # rows of 0 fill the last block
        squares *= squares
        squares = squares.reshape(x.shape[0], -1, ROW_BLOCK, columns)
        sums[:, at // ROW_BLOCK:at // ROW_BLOCK + squares.shape[1]] = in_order(squares, 2)
    return in_order(sums, 1).reshape(lead + (columns,))


def in_order(a, axis) -> np.ndarray:
    """The sums of ``a`` along ``axis``, each added from its first element in order (a running sum: NumPy's
    ``sum`` adds pairwise, or in an order of its own where the other axes have length 1)."""
    if axis:
        a = np.moveaxis(a, axis, 0)
    if a.shape[0] and a[0].size < 256:  # many short rows: one call (cumsum is slow, but per call, not per row)
        return np.cumsum(a, axis=0)[-1]
    total = np.zeros(a.shape[1:])
    for row in a:
        total += row
    return total


def _rows(x, square) -> np.ndarray:
    """Each row's sum (of squares where ``square``) of the 2-D array ``x``, float64, in the module's order."""
    m, k = x.shape
    out = np.zeros(m)
    at_once = max(1, _AT_ONCE // max(k, 1))
    for r in range(0, m, at_once):
        rows = x[r:r + at_once]
        for c in range(0, k, CHUNK):
            values = rows[:, c:c + CHUNK].astype(np.float64)
            if square:
                values *= values
            width = -(-values.shape[1] // LANES) * LANES
            padded = np.zeros((values.shape[0], width))  # 0 added to a lane leaves it as it was
            padded[:, :values.shape[1]] = values
            lanes = np.add.reduce(padded.reshape(values.shape[0], width // LANES, LANES), axis=1)  # in order
            while lanes.shape[1] > 1:
                lanes = lanes[:, 0::2] + lanes[:, 1::2]
            out[r:r + at_once] += lanes[:, 0]
    return out
