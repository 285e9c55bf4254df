"""The memory roofline: the fewest bytes a step must move, and the copy bandwidth of the device."""

from __future__ import annotations

import statistics
import time

import numpy as np

from .. import _pages
from ..engines.blockwise import BLOCK_SIZE

__all__ = ["bytes_per_element", "state_bytes_per_element", "copy_bandwidth_cpu", "copy_bandwidth_gpu", "cache_bytes"]

# State buffers each optimizer reads and writes per element, with default hyperparameters.
STATE_BUFFERS = {"SGD": 0, "Momentum": 1, "Nesterov": 1, "AdaGrad": 1, "RMSprop": 1, "Adam": 2, "AdamW": 2,
                 "AdaDelta": 2, "Adamax": 2, "NAdam": 2, "RAdam": 2, "Lion": 1, "ScheduleFreeAdamW": 2, "LAMB": 2}
# Optimizers whose step reads p, g and its buffers twice: once for each tensor's norms, once to write.
TWO_PASS = {"LAMB"}


def _state_item(dtype: str, state_dtype: str | None) -> float:
    """Bytes of one state element: bfloat16 2; 8-bit a code and its share of its block's float32 absmax;
    otherwise the param's dtype (float32 for float16 params)."""
    item = np.dtype(dtype).itemsize
    if state_dtype == "8bit":
        return 1 + 4 / BLOCK_SIZE
    return 2 if state_dtype == "bfloat16" else 4 if item == 2 else item


def bytes_per_element(optimizer: str, dtype: str, state_dtype: str | None = None) -> float:
    """Read p, g and each buffer once (twice for ``TWO_PASS``); write p and each buffer once (float16 params
    keep float32 state; 8-bit state: the codes and absmax, default block size)."""
    item = np.dtype(dtype).itemsize
    state_item = _state_item(dtype, state_dtype)
    buffers = STATE_BUFFERS[optimizer]
    reads = 2 if optimizer in TWO_PASS else 1
    return reads * (2 * item + buffers * state_item) + item + buffers * state_item


def state_bytes_per_element(optimizer: str, dtype: str, state_dtype: str | None = None) -> float:
    """Bytes of state kept per param element (every buffer; 8-bit: codes and absmax)."""
    return float(STATE_BUFFERS[optimizer] * _state_item(dtype, state_dtype))


def _median_time(fn, repeat):
    fn()  # warm-up: page faults, thread start
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _numba_kernels():
    """Copies over every core: dst[:] = src[:], and src[:] = -src[:] (in place)."""
    from .. import _numba

    if not _numba.usable():  # no numba, or its code cannot run here (interpreted, these would take hours)
        return {}
    from numba import njit, prange

    @njit(parallel=True, cache=True)
    def parallel_copy(dst, src):
        for i in prange(src.shape[0]):
            dst[i] = src[i]

    @njit(parallel=True, cache=True)
    def in_place(dst, src):
        for i in prange(src.shape[0]):
            src[i] = -src[i]

    return {"parallel copy": parallel_copy, "in-place copy": in_place}


def copy_bandwidth_cpu(nbytes=1 << 28, repeat=7) -> dict:
    """GB/s (bytes read + written) of each way to copy: NumPy's, one over every core, one onto itself.

    An optimizer step reads and writes the same arrays.  A copy to a fresh array also makes
    the CPU read each destination line before writing it (write-allocate), traffic that
    bytes read + written does not count; a copy onto itself does not pay it.  The roofline
    is the fastest of the three.
    """
    src = np.random.default_rng(0).random(nbytes // 8) + 1.0
    dst = np.empty_like(src)
    variants = {"numpy copy": lambda d, s: np.copyto(d, s), **_numba_kernels()}
    found = {name: 2 * src.nbytes / _median_time(lambda: fn(dst, src), repeat) / 1e9 for name, fn in variants.items()}
    # the destination placed apart from the source within their huge pages, as xopt places state (xopt._pages):
    # two arrays NumPy allocates one after the other start a few KiB apart there, and their streams contend
    placed = _pages.empty(src.shape, src.dtype, src, 1)
    found["numpy copy, placed"] = 2 * src.nbytes / _median_time(lambda: np.copyto(placed, src), repeat) / 1e9
    if "parallel copy" in variants:
        found["parallel copy, placed"] = 2 * src.nbytes / _median_time(
            lambda: variants["parallel copy"](placed, src), repeat) / 1e9
    return found


def copy_bandwidth_gpu(nbytes=1 << 30, repeat=20) -> dict:
    """GB/s (read + written) of a device-to-device copy, timed with CUDA events."""
    import cupy

    src = cupy.random.random(nbytes // 4, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    dst[...] = src
    times = []
    for _ in range(repeat):
        start.record()
        dst[...] = src
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return {"device copy": 2 * src.nbytes / statistics.median(times) / 1e9}


def cache_bytes() -> int:
    """The largest CPU cache, from sysfs (0 when unknown)."""
    import glob

    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return best
