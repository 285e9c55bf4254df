"""The memory roofline: the fewest bytes a step must move, and the copy bandwidth of the device."""

from __future__ import annotations

import statistics
import time

import numpy as np

__all__ = ["bytes_per_element", "copy_bandwidth_cpu", "copy_bandwidth_gpu", "cache_bytes"]

# State buffers each optimizer reads and writes per element, with default hyperparameters.
STATE_BUFFERS = {"SGD": 0, "Momentum": 1, "Nesterov": 1, "AdaGrad": 1, "RMSprop": 1, "Adam": 2, "AdamW": 2}


def bytes_per_element(optimizer: str, dtype: str) -> int:
    """Read p, g and each buffer once; write p and each buffer once (float16 params keep float32 state)."""
    item = np.dtype(dtype).itemsize
    state_item = 4 if item == 2 else item
    buffers = STATE_BUFFERS[optimizer]
    return 3 * item + 2 * buffers * state_item


def _median_time(fn, repeat):
    fn()  # warm-up: page faults, thread start
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth_cpu(nbytes=1 << 28, repeat=7) -> float:
    """GB/s (read + written) of the faster of NumPy's copy and a copy spread over every core."""
    src = np.random.default_rng(0).random(nbytes // 8)
    dst = np.empty_like(src)
    best = _median_time(lambda: np.copyto(dst, src), repeat)
    try:
        from ..fused_cpu import parallel_copy
    except ImportError:
        pass
    else:
        best = min(best, _median_time(lambda: parallel_copy(dst, src), repeat))
    return 2 * src.nbytes / best / 1e9


def copy_bandwidth_gpu(nbytes=1 << 30, repeat=20) -> float:
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
    return 2 * src.nbytes / statistics.median(times) / 1e9


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
