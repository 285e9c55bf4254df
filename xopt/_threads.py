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
import queue
import sys
import threading
import traceback

__all__ = ["set_num_threads", "get_num_threads", "limit", "pool", "Pool"]


def _from_environment():
    """``XOPT_NUM_THREADS``, read when xopt is imported: a number, None where it is unset or empty, or the
    ValueError naming it that the default raises (at the first step that asks, before it writes anything;
    :func:`set_num_threads` with a number overrides it)."""
    env = os.environ.get("XOPT_NUM_THREADS", "").strip()
    if not env:
        return None
    try:
        n = int(env)
    except ValueError:
        n = 0
    if n < 1:
        return ValueError(f"XOPT_NUM_THREADS={env!r}: the number of threads xopt's CPU steps use must be a "
                          "positive int (unset it for all the cores, or call xopt.set_num_threads(n))")
    return n


_ENVIRONMENT = _from_environment()


def _default_threads() -> int:
    if isinstance(_ENVIRONMENT, ValueError):
        raise _ENVIRONMENT
    if _ENVIRONMENT is not None:
        return _ENVIRONMENT
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _checked_threads(n, what="n"):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{what} must be a positive int, got {n!r}")
    return n


_threads = {"n": None, "pool": None}
_threads_lock = threading.Lock()
_caps = threading.local()  # .n: limit()'s cap on the calling thread
_capped = [0]  # how many limit() blocks are open, in any thread: none, and no step reads _caps (a local's first
# attribute read in a step costs microseconds in a training loop, where it runs cold)


def set_num_threads(n=None):
    """Use at most ``n`` threads (the caller's included) for a CPU step; None: the default.

    The default is the environment's ``XOPT_NUM_THREADS``, else the cores this process may
    run on.  Steps below ``xopt.engines.fused_cpu.PARALLEL_MIN`` elements always run on the calling thread.
    Returns the number in force before, so ``set_num_threads(set_num_threads(1))`` restores it (None where
    none was: an ``XOPT_NUM_THREADS`` that is not a positive int, which a number given here overrides).
    A step under way on another thread finishes with the workers it started with.
    """
    try:
        before = _process_threads()  # not a cap of limit() on this thread: the number this call replaces
    except ValueError:
        before = None
    n = _default_threads() if n is None else _checked_threads(n)
    with _threads_lock:
        if n != _threads["n"] and _threads["pool"] is not None:
            _threads["pool"].close()
            _threads["pool"] = None
        _threads["n"] = n
    return before


def get_num_threads() -> int:
    """The most threads a CPU step uses (see :func:`set_num_threads`)."""
    n = _threads["n"]
    if n is None:
        n = _process_threads()
    if not _capped[0]:
        return n
    cap = getattr(_caps, "n", None)
    return n if cap is None else min(n, cap)


def _process_threads() -> int:
    """The process's number (:func:`set_num_threads`'s), without this thread's cap."""
    n = _threads["n"]
    if n is None:
        n = _threads["n"] = _default_threads()
    return n


@contextlib.contextmanager
def limit(n):
    """At most ``n`` threads for the CPU steps this thread runs inside the block, whatever the
    process's number (a Dask task: its worker runs other tasks on its other threads)."""
    n = _checked_threads(n)
    before = getattr(_caps, "n", None)
    with _threads_lock:
        _capped[0] += 1
    try:
        _caps.n = n
        yield
    finally:
        _caps.n = before
        with _threads_lock:
            _capped[0] -= 1


class Pool:
    """Workers that sleep on a queue and run each task put there, started as steps first need them.  ``put``
    is ``SimpleQueue.put``, a C function: a step hands out its work inside the one C-level call that writes
    it (see ``xopt._atomic``).  A task left in the queue of a closed pool never runs; one that runs after its
    step ended finds no work."""

    def __init__(self):
        self._tasks = queue.SimpleQueue()
        self.put = self._tasks.put
        self.size = 0

    def grow(self, workers):
        """At least ``workers`` workers."""
        while self.size < workers:
            threading.Thread(target=_work, args=(self._tasks,), name=f"xopt_{self.size}", daemon=True).start()
            self.size += 1

    def close(self):
        for _ in range(self.size):
            self.put(None)


def _work(tasks):
    while True:
        task = tasks.get()
        if task is None:
            return
        try:
            task()
        except BaseException:  # a kernel does not raise: a bug, reported, and the worker lives on
            traceback.print_exc(file=sys.stderr)
        del task


def pool(n) -> Pool:
    """The pool, with at least n - 1 workers (the caller is the n-th)."""
    with _threads_lock:
        found = _threads["pool"]
        if found is None:
            found = _threads["pool"] = Pool()
        found.grow(n - 1)
        return found


def _after_fork():
    """A forked child has none of its parent's workers (nor, maybe, an unlocked lock): it starts afresh."""
    global _threads_lock
    _threads_lock = threading.Lock()
    _threads["pool"] = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
