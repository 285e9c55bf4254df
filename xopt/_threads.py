"""How many threads xopt's CPU kernels use, and the pool of workers they run on.

    >>> import xopt
    >>> xopt.set_num_threads(1)   # every CPU step on the calling thread   # doctest: +SKIP
    >>> xopt.get_num_threads()

The workers are plain threads that sleep on a queue between steps (they never spin), so they
leave the cores to BLAS's threads between the steps of a training loop.  The number can also
be set before start-up with the environment variable ``XOPT_NUM_THREADS``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["set_num_threads", "get_num_threads", "limit", "pool"]


def _default_threads() -> int:
    env = os.environ.get("XOPT_NUM_THREADS")
    if env:
        return _checked_threads(int(env), "XOPT_NUM_THREADS")
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _checked_threads(n, what="n"):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{what} must be a positive int, got {n!r}")
    return n


_threads = {"n": None, "pool": None, "pid": None}
_threads_lock = threading.Lock()
_caps = threading.local()  # .n: limit()'s cap on the calling thread


def set_num_threads(n=None):
    """Use at most ``n`` threads (the caller's included) for a CPU step; None: the default.

    The default is the environment's ``XOPT_NUM_THREADS``, else the cores this process may
    run on.  Steps below ``xopt.engines.fused_cpu.PARALLEL_MIN`` elements always run on the calling thread.
    Returns the number in force before, so ``set_num_threads(set_num_threads(1))`` restores it.
    """
    before = get_num_threads()
    n = _default_threads() if n is None else _checked_threads(n)
    with _threads_lock:
        if n != _threads["n"] and _threads["pool"] is not None:
            _threads["pool"].shutdown(wait=False)
            _threads["pool"] = None
        _threads["n"] = n
    return before


def get_num_threads() -> int:
    """The most threads a CPU step uses (see :func:`set_num_threads`)."""
    n = _threads["n"]
    if n is None:
        n = _threads["n"] = _default_threads()
    cap = getattr(_caps, "n", None)
    return n if cap is None else min(n, cap)


@contextlib.contextmanager
def limit(n):
    """At most ``n`` threads for the CPU steps this thread runs inside the block, whatever the
    process's number (a Dask task: its worker runs other tasks on its other threads)."""
    before = getattr(_caps, "n", None)
    _caps.n = _checked_threads(n)
    try:
        yield
    finally:
        _caps.n = before


def pool(n):
    """n - 1 workers (the caller is the n-th); made again in a forked child, whose workers are gone."""
    with _threads_lock:
        if _threads["pool"] is None or _threads["pid"] != os.getpid():
            # Sized for the process's number, not a limit()'s lower one: a pool first made under a cap stays
            # big enough for the uncapped steps after it (its threads start only as work is submitted).
            _threads["pool"] = ThreadPoolExecutor(max_workers=max(n, _threads["n"] or n) - 1, thread_name_prefix="xopt")
            _threads["pid"] = os.getpid()
        return _threads["pool"]
