"""A step is all or nothing: one thread at a time, and every write of a step in one C-level call.

CPython runs a Python signal handler (Ctrl-C's ``KeyboardInterrupt``, a SIGTERM or SIGALRM handler
that raises) only between bytecodes of the main thread, never inside a call into C (the ``signal``
module's documentation: "a long-running calculation implemented purely in C ... may run uninterrupted
... regardless of any signals received").  So a step computes everything first, where an exception
leaves nothing written, and then makes all its writes (the kernel or the array copies, the step
counts, ``iter``, the rebinding of new arrays) with :func:`together`: one ``deque(map(...))`` loop
in C over calls into C.  No handler, whichever is installed, can run between the first write and
the last; one that arrives meanwhile runs as soon as the step is whole.  xopt installs no signal
handler.

What remains: a write that fails inside its array library (out of memory in a copy), and a call that
is not C after all (a params container that is a ``dict`` subclass with a Python ``__setitem__``, where
float params are rebound; a profiler set with ``sys.setprofile``), which could let a handler run in the
middle.  A param's state is written with ``dict.__setitem__``, whatever ``dict`` subclass holds it.
"""

from __future__ import annotations

import collections
import functools
import operator
import os
import threading

__all__ = ["StepGuard", "together", "together_unforked", "each", "CALL"]

CALL = getattr(operator, "call", None) or operator.methodcaller("__call__")  # CALL(f) is f(), in C (3.11+: direct)
_FORKS = [0]  # how many forks this process descends from: a guard made before the last one has a new lock
_UNFORKED = [threading.Lock()]  # held by writes that release the GIL (several threads): a fork waits for them


def _after_fork_in_child():
    _FORKS[0] += 1
    _UNFORKED[0] = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=lambda: _UNFORKED[0].acquire(), after_in_parent=lambda: _UNFORKED[0].release(),
                        after_in_child=_after_fork_in_child)


def together(calls):
    """Call each of ``calls`` (callables without arguments, each a call into C: a builtin, a
    ``functools.partial`` of one, a numba function) in order, in one C-level loop: no Python signal
    handler runs before the last returns.  One that raises stops the rest."""
    collections.deque(map(CALL, calls), maxlen=0)


def together_unforked(calls):
    """:func:`together` for writes that release the GIL (a step on several threads): ``os.fork`` from another
    thread waits until they are done, so a child never starts with half a step written."""
    with _UNFORKED[0]:
        together(calls)


def each(f, *iterables):
    """A call for :func:`together` that applies ``f`` (a C function) to each item of ``iterables``, lazily:
    an iterable that reads arrays reads them when the call runs."""
    return functools.partial(collections.deque, map(f, *iterables), 0)


class StepGuard:
    """One step at a time per optimizer: ``with guard.entered(): ...`` (or ``guard.run(f, *args)``) runs a step.

    A second thread waits for the first's step to end; a call from inside a step of the same optimizer (a
    schedule that steps its own optimizer) raises.  The lock is a ``threading.RLock`` for its owner check alone
    (``_is_owned``, in C, what ``threading.Condition`` asks too): it is never entered twice, since a call from
    its own thread raises first.  A forked child starts with a new lock: the parent's may have been held by a
    thread the child does not have."""

    __slots__ = ("lock", "forks")

    def __init__(self):
        self.lock = threading.RLock()
        self.forks = _FORKS[0]

    def entered(self):
        """The lock, to enter with ``with``; raises where this thread is inside a step of it already."""
        if self.forks != _FORKS[0]:
            self.lock, self.forks = threading.RLock(), _FORKS[0]
        if self.lock._is_owned():
            raise RuntimeError("update() called from inside an update() of the same optimizer")
        return self.lock

    def run(self, f, *args):
        with self.entered():
            return f(*args)

    def mine(self) -> bool:
        """Whether this thread is inside a step (the lock held by it)."""
        return self.forks == _FORKS[0] and self.lock._is_owned()

    def held(self) -> bool:
        """Whether some thread is inside a step now (this one included)."""
        lock = self.lock
        if lock._is_owned():
            return True
        if lock.acquire(blocking=False):
            lock.release()
            return False
        return True
