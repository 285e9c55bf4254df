"""The CPU engine's compiled entry points: one small compiled function per rule and entry.

A step's whole check and (when small) its run are one compiled call, :func:`_step`: it reads every
array's struct (:func:`xopt.engines.cpu_memory.check_step`) and only then runs the rule through the
addresses it checked (``cpu_drivers.run_serial``).  Larger and clipped steps are checked the same way
from Python and then run by ``serial`` (the calling thread) or ``claim`` (chunks over threads).

Each entry passes its rule number to that shared code as a compile-time constant (a closure's
constant, which numba caches on disk keyed by its value), so only the rule that runs is typed and
compiled: a process compiles (or loads) a rule's code when a step of it first runs, not every rule
at its first step.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from .cpu_memory import HEAD, N_HEAD, TABLE_HEAD, check_step, check_table, table_part, table_sizes
from .cpu_drivers import all_finite, claim, run_serial

__all__ = ["Compiled", "compiled", "NotRun", "LARGE", "NONFINITE", "CHECK_FINITE", "ANSWER", "TABLE_ANSWER"]

# _step's answers besides 0 (done) and 1 + a refused row, left in the head's ANSWER slot
LARGE = -1  # checked, not run: the caller runs it on several threads, or computes the clip norm first
NONFINITE = -2  # checked, not run: a grad holds a NaN or an Inf (skip_nonfinite)
# _step's mode bit (head[12]; head[13]: from how many elements a step may be split over threads)
CHECK_FINITE = 1
ANSWER = HEAD.index("answer")
TABLE_ANSWER = TABLE_HEAD.index("answer")


class NotRun(Exception):
    """:func:`_step` wrote nothing: its answer is in the head's ``ANSWER`` slot."""


@njit(cache=True, inline="always")
def _step(rule, off, head, scal, bits):
    """Check the step's arrays (``check_step``); then, unless it is large or a grad is not finite, run it here.

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
    run_serial(rule, ptrs, sizes, scal, part, bits)
    return 0



@njit(cache=True, inline="always")
def _table_step(rule, table, scal, bits):
    """:func:`_step` for a step on CPU torch tensors, whose addresses the caller gathered in ``table`` (see
    ``cpu_memory.check_table``; its head's ``mode`` and ``split_at`` as ``head[12]`` and ``head[13]`` here):
    checked, then run here unless refused, large or not finite (:class:`NotRun`, the answer in
    ``table[TABLE_ANSWER]``)."""
    n = table[0]
    ptrs = np.empty((max(n, 0), 5), dtype=np.int64)
    total = check_table(table, ptrs)
    answer = -total if total < 0 else 0  # 1 + a refused row (n + 1: the memory check)
    if answer == 0 and total >= table[5]:
        answer = LARGE
    if answer == 0 and table[4] & CHECK_FINITE and not all_finite(ptrs, table_sizes(table), scal[0]):
        answer = NONFINITE
    if answer != 0:
        table[TABLE_ANSWER] = answer
        raise NotRun
    run_serial(rule, ptrs, table_sizes(table), scal, table_part(table), bits)
    return 0


class Compiled(NamedTuple):
    """One rule's compiled entry points: ``step(off, head, scal, bits)`` (:func:`_step`),
    ``serial(ptrs, sizes, scal, part, bits)`` (``cpu_drivers.run_serial``), ``claim(ptrs, chunks, part,
    counters, scal, bits)`` (``cpu_drivers.claim``) and ``table_step(table, scal, bits)`` (:func:`_table_step`:
    torch tensors)."""

    step: object
    serial: object
    claim: object
    table_step: object


_COMPILED = {}  # rule -> its Compiled


def compiled(rule) -> Compiled:
    """The entry points of rule number ``rule``: each passes its rule to the shared code as a compile-time
    constant (a closure's constant: numba caches it on disk, keyed by its value), so a process compiles (or
    loads) a rule's code when a step of that rule first runs, not every rule at its first step."""
    found = _COMPILED.get(rule)
    if found is None:
        found = _COMPILED[rule] = _entries(rule)
    return found


def _entries(rule) -> Compiled:
    @njit(cache=True, error_model="numpy")
    def step(off, head, scal, bits):
        return _step(rule, off, head, scal, bits)

    @njit(cache=True, nogil=True, error_model="numpy")
    def serial(ptrs, sizes, scal, part, bits):
        run_serial(rule, ptrs, sizes, scal, part, bits)

    @njit(cache=True, nogil=True, error_model="numpy")
    def claimer(ptrs, chunks, part, counters, scal, bits):
        claim(rule, ptrs, chunks, part, counters, scal, bits)

    @njit(cache=True, error_model="numpy")
    def table_step(table, scal, bits):
        return _table_step(rule, table, scal, bits)

    return Compiled(step, serial, claimer, table_step)
