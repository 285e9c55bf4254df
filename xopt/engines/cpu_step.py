"""The CPU engine's small step: the whole check and the run of a step in one call into C, and each rule's C function.

:func:`step_function` is a C function (:func:`xopt.engines.cpu_native.step_function`) that reads every
array's struct (:func:`xopt.engines.cpu_memory.check_rows`) and only then runs the rule through the
addresses it checked.  Larger and clipped steps are checked the same way from Python and then run by
``cpu_drivers.run_serial`` (the calling thread) or ``cpu_drivers.claim`` (chunks over threads).

Both are machine code from xopt's own cache (:mod:`xopt.engines.cpu_objects`): a process whose cache is warm
loads them without starting numba.  This module imports no numba.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from threading import get_ident

import numpy as np

from .._threads import get_num_threads
from . import cpu_objects
from .cpu_structs import ANSWER, CHECK_FINITE, LARGE, NONFINITE, N_HEAD, OFFSETS, WORK_PER_ROW

__all__ = ["step_function", "rule_function", "cached", "Call", "taken", "give_back", "SCRATCH", "call_block", "give_back_call", "split_at", "NotRun", "LARGE", "NONFINITE",
           "CHECK_FINITE", "ANSWER", "PARALLEL_MIN"]

# Below this many elements a step runs on the calling thread alone.  Measured on this project's 2-core
# machine (benchmarks/thread_threshold.py, results/thread-threshold-2026-11-25.json, Adam float32): alone, a
# second thread lost 4-32 % up to 2^20 elements (waking it costs more than it takes) and won from 2^21 on
# (0.53-0.63x the one-thread time); in a loop with a matmul before each step it neither won nor lost (1.01-1.09x
# from 2^19 on: OpenBLAS's threads spin on the other core for a while after a matmul, so a worker gets
# few chunks; see cpu_drivers.claim).
PARALLEL_MIN = 1 << 21
_NEVER = 2**62
_OFFSETS_AT = OFFSETS.ctypes.data


class NotRun(Exception):
    """The step's call wrote nothing: its answer is in the head's ``ANSWER`` slot."""


def split_at():
    """From how many elements a step is split over threads."""
    return PARALLEL_MIN if get_num_threads() > 1 else _NEVER


_STEPS = {}  # param dtype -> the step's C function (ctypes)
# ctypes' Python-API prototype: the GIL held during the call, and the exception the call sets raised on return.
_PROTOTYPE = ctypes.PYFUNCTYPE(ctypes.c_int64, ctypes.c_int64)


def step_function(dtype):
    """The small step over ``dtype`` params: ``f(call_block_address)``, returning 0 having run the step, or
    raising :class:`NotRun` having written nothing, its answer in the head's ``ANSWER`` slot: 1 + a refused
    row, ``LARGE`` (checked, not run: at least ``head[13]`` elements, which go to several threads) or
    ``NONFINITE`` (``CHECK_FINITE`` and a grad is not finite).  Raising, not returning, lets a step's commit
    follow this call in one C-level call (``xopt._atomic.together``).  One call for a whole small step: in a
    training loop its code and data are cold, and every call more costs microseconds
    (``benchmarks/cold_call.py``)."""
    dtype = np.dtype(dtype)
    found = _STEPS.get(dtype)
    if found is None:
        found = _STEPS[dtype] = _PROTOTYPE(cpu_objects.address(f"step-{dtype.name}", functools.partial(_build_step, dtype)))
    return found


def cached() -> bool:
    """Whether the small step's code is in xopt's cache for this machine (for float32 or float64 params)."""
    return any(cpu_objects.cached(f"step-{dtype}") for dtype in ("float32", "float64"))


def rule_function(rule, dtype, phase=None) -> int:
    """The address of rule number ``rule``'s C function over ``dtype`` params (``cpu_drivers.elements``; LAMB's,
    ``cpu_norms.elements``, or with ``phase="norms"`` its norms' phase), compiled (or loaded from the cache)
    the first time a process asks for it."""
    dtype = np.dtype(dtype)
    name = f"rule{rule}-{dtype.name}" if phase is None else f"rule{rule}-{phase}-{dtype.name}"
    return cpu_objects.address(name, functools.partial(_build_rule, rule, dtype, phase))


def _build_step(dtype):
    from . import cpu_native

    return _object_or_function(cpu_native, cpu_native.step_function(dtype.type))


def _build_rule(rule, dtype, phase):
    from . import cpu_native

    return _object_or_function(cpu_native, cpu_native.rule_function(rule, dtype.type, phase))


def _object_or_function(cpu_native, function):
    """(symbol, object code) of a compiled ``cfunc``, or the cfunc itself where no object code can be made of
    it (it needs numba's runtime; or numba's internals it is read from changed: then it runs from numba's
    compile, as it did before xopt kept objects)."""
    try:
        return cpu_native.object_code(function) or function
    except Exception:
        return function


def _address(a) -> int:
    """Where array ``a``'s data starts (``a.ctypes.data`` without the Python object NumPy builds for it)."""
    return a.__array_interface__["data"][0]


class Call:
    """A step's call block (``cpu_structs.CALL``) and the room for its work, which grows with the tensor count."""

    __slots__ = ("block", "run", "rows", "work")

    def __init__(self, function, head, scal, step):
        self.block = np.array([function, _OFFSETS_AT, _address(head), head.shape[0], _address(scal), scal.shape[0],
                               scal.shape[1], 0, 0, id(NotRun)], dtype=np.int64)
        self.run = functools.partial(step, _address(self.block))  # the step: a call into C, for together
        self.rows = -1
        self.work = None

    def point(self, head, scal):
        """The block pointed at another step's ``head`` and ``scal``."""
        block = self.block
        block[2], block[3], block[4], block[5], block[6] = (_address(head), head.shape[0], _address(scal),
                                                            scal.shape[0], scal.shape[1])

    def fit(self, n):
        """Room for a step of ``n`` tensors."""
        if n > self.rows:
            rows = max(n, 2 * self.rows, 16)
            self.work = np.empty(WORK_PER_ROW * rows, dtype=np.int64)
            self.block[7], self.block[8], self.rows = _address(self.work), self.work.shape[0], rows


def call_block(function, head, scal, step):
    """(key, :class:`Call`): this thread's Call of ``step`` (:func:`step_function`) for rule ``function``,
    pointed at one step's ``head`` and ``scal`` (the caller holds them until the call has run), with room for its
    tensors.  Out of the thread's pool for the length of the step, as :func:`taken`'s buffers: a step nested in it
    (a signal handler's, between the pointing and the call) makes its own instead of re-pointing this one.
    :func:`give_back_call` returns it."""
    calls = _CALLS.__dict__.setdefault("calls", {})  # (rule function, id of the step it holds) -> Call
    key = (function, id(step))  # the Call holds ``step``: its id stays its own while the Call is kept
    call = calls.pop(key, None)
    if call is None:
        call = Call(function, head, scal, step)
    else:
        call.point(head, scal)
    call.fit(int(head[6]))
    return key, call


def give_back_call(key, call):
    _CALLS.__dict__.setdefault("calls", {})[key] = call


def taken(kind):
    """(key, (head, scalars, :class:`Call`)): this thread's buffers for a one-part step of ``kind`` (one allocation
    and conversion less per call: in a training loop they run cold), out of the pool for the length of the step:
    a step nested in it on the same thread (a signal handler's, between the packing and the call) makes its own
    instead of overwriting them.  :func:`give_back` returns them."""
    key = (get_ident(), kind)
    found = SCRATCH.pop(key, None)
    if found is None:
        if len(SCRATCH) >= _MOST_SCRATCH:
            _prune()
        head, scal = np.empty(N_HEAD + 3, dtype=np.int64), np.empty((1, kind.size + 1), dtype=kind.dtype)
        found = (head, scal, Call(kind.function, head, scal, kind.small_step))
    return key, found


def give_back(key, found):
    SCRATCH[key] = found


def _prune():
    """Forget the buffers of threads that have ended (their idents may come back with new threads)."""
    alive = {t.ident for t in threading.enumerate()}
    for key in list(SCRATCH):  # a copy of the keys in one call into C: other threads take and give back meanwhile
        if key[0] not in alive:
            SCRATCH.pop(key, None)


# (thread ident, kind) -> that thread's buffers for the head and scalars of a one-part step, while no step holds
# them.  A dict, not a threading.local: in a training loop, the first attribute of a local a step reads cost
# about 3 us (its lookup of the thread's dict runs cold), a dict lookup a tenth of that.  Live threads have
# distinct idents; a dead one's ident may come back with a new thread, which then reuses its buffers (they hold
# nothing between steps); past _MOST_SCRATCH entries, those of ended threads are dropped.
SCRATCH = {}
_MOST_SCRATCH = 256
_CALLS = threading.local()  # each thread's Calls of steps of several parts
