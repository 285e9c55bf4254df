"""A param's squared L2 norm in one fixed order, which the fused CPU kernel repeats bit for bit.

A rule that scales a param by a ratio of norms (LAMB's trust ratio) must have the same norm in every path,
or a fused step would not be its reference's bit for bit.  NumPy's ``sum`` adds in an order of its own
(pairwise, by blocks), and a kernel split over threads adds in another.  So the norm of host arrays (NumPy,
array-api-strict, CPU torch tensors) is defined here, in float64, as the CPU kernel computes it whatever
its thread count::

    chunks of CHUNK elements (the last one shorter), in order;
    in a chunk, LANES partial sums: lane k adds x[i]² for i = k, k + LANES, k + 2 LANES, ... in order, from 0;
    a chunk's sum: the lanes added pairwise, (s0 + s1), (s2 + s3), ..., then those pairwise, to one;
    the norm²: the chunks' sums added in order, from 0.

x² is taken in float64 (exact for float32 x).  Other arrays (CuPy, Dask, JAX) are summed by their own
library, in their dtype: no kernel of theirs has to match it.
"""

from __future__ import annotations

import numpy as np

from . import _backend

__all__ = ["CHUNK", "LANES", "squared_norm"]

CHUNK = 1 << 15  # elements: the CPU engine's unit of work (xopt.engines.cpu_drivers.CHUNK)
LANES = 16
_CHUNKS_AT_ONCE = 32  # chunks squared at a time: a 8 MiB temporary at most


def squared_norm(xp, x) -> float:
    """The sum of the squares of ``x``'s elements, in float64 (see the module for the order on the host)."""
    if isinstance(x, np.ndarray) or _backend.library_name(x) == "array_api_strict" or (
            _backend.library_name(x) == "torch" and x.device.type == "cpu"):
        return _host(np.ascontiguousarray(_backend.to_numpy(x) if not isinstance(x, np.ndarray) else x).reshape(-1))
    return float(xp.sum(x * x))


def _host(x) -> float:
    total = 0.0
    for at in range(0, x.size, CHUNK * _CHUNKS_AT_ONCE):
        block = x[at:at + CHUNK * _CHUNKS_AT_ONCE]
        squares = block.astype(np.float64)
        squares *= squares
        chunks = -(-block.size // CHUNK)
        padded = np.zeros(chunks * CHUNK, dtype=np.float64)  # 0 added to a lane leaves it as it was
        padded[:block.size] = squares
        lanes = np.add.reduce(padded.reshape(chunks, CHUNK // LANES, LANES), axis=1)  # row after row, in order
        while lanes.shape[1] > 1:
            lanes = lanes[:, 0::2] + lanes[:, 1::2]
        for chunk_sum in lanes[:, 0].tolist():
            total += chunk_sum
    return total
