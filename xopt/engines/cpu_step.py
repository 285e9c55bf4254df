"""The CPU engine's compiled step: the whole check and (when small) the run of a step in one call.

:func:`step` reads every array's struct (:func:`xopt.engines.cpu_memory.check_step`) and only then runs the
rule through the addresses it checked (``cpu_drivers.run_serial``).  Larger and clipped steps are checked the
same way from Python and then run by ``cpu_drivers.run_serial`` (the calling thread) or ``cpu_drivers.claim``
(chunks over threads).

These drivers are compiled once for every rule; a rule is a C function of its own
(:func:`xopt.engines.cpu_drivers.elements`) that they call through its address, compiled (or loaded from the
disk cache) for a dtype when a step of that rule first runs: :func:`rule_function`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .cpu_memory import HEAD, N_HEAD, check_step
from .cpu_drivers import all_finite, elements, run_serial
from .kernels import RULES

__all__ = ["step", "rule_function", "NotRun", "LARGE", "NONFINITE", "CHECK_FINITE", "ANSWER"]

# step's answers besides 0 (done) and 1 + a refused row, left in the head's ANSWER slot
LARGE = -1  # checked, not run: the caller runs it on several threads, or computes the clip norm first
NONFINITE = -2  # checked, not run: a grad holds a NaN or an Inf (skip_nonfinite)
# step's mode bit (head[12]; head[13]: from how many elements a step may be split over threads)
CHECK_FINITE = 1
ANSWER = HEAD.index("answer")


class NotRun(Exception):
    """:func:`step` wrote nothing: its answer is in the head's ``ANSWER`` slot."""


@njit(cache=True, error_model="numpy")
def step(function, off, head, scal):
    """Check the step's arrays (``check_step``); then, unless it is large or a grad is not finite, run it here
    by the rule at address ``function`` (:func:`rule_function`).

    ``head``: ``cpu_memory.HEAD``'s numbers, 3 kept-slot flags per part, then each tensor's part where
    there are several; ``scal``: the scalars of each part, the clip scale last.  Returns 0 having run the
    step, or raises :class:`NotRun` having written nothing, its answer in ``head[ANSWER]``: 1 + a refused
    row, ``LARGE`` (checked, not run: at least ``head[13]`` elements, which go to several
    threads) or ``NONFINITE`` (``CHECK_FINITE`` and a grad is not finite).  Raising, not returning, lets a
    step's commit follow this call in one C-level call (``xopt._atomic.together``).  One call for a whole
    small step: in a training loop its code and data are cold, and every call more costs microseconds
    (``benchmarks/cold_call.py``)."""
    n = head[6]
    part = head[N_HEAD + 3 * head[11]:]
    ptrs = np.empty((n, 5), dtype=np.int64)
    sizes = np.empty(n, dtype=np.int64)
    answer = check_step(off, head, part, ptrs, sizes)
    if answer == 0 and sizes.sum() >= head[13]:
        answer = LARGE
    if answer == 0 and head[12] & CHECK_FINITE and not all_finite(ptrs, sizes, scal[0]):
        answer = NONFINITE
    if answer != 0:
        head[ANSWER] = answer
        raise NotRun
    run_serial(function, ptrs, sizes, scal, part)
    return 0


_FUNCTIONS = {}  # (rule, dtype) or (rule, dtype, "norms") -> its compiled C function (numba's CFunc)


def rule_function(rule, dtype, phase=None) -> int:
    """The address of rule number ``rule``'s C function over ``dtype`` params (``cpu_drivers.elements``; LAMB's,
    ``cpu_norms.elements``, or with ``phase="norms"`` its norms' phase), compiled (or loaded from the disk
    cache) the first time a process asks for it."""
    key = (rule, np.dtype(dtype)) if phase is None else (rule, np.dtype(dtype), phase)
    found = _FUNCTIONS.get(key)
    if found is None:
        if rule == RULES["lamb"]:
            from . import cpu_norms

            found = (cpu_norms.elements if phase is None else cpu_norms.norms)(key[1].type)
        else:
            found = elements(rule, key[1].type)
        _FUNCTIONS[key] = found
    return found.address
