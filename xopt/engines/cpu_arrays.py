"""A checked CPU step run from Python: its arrays' addresses, the clip norm, the kernel on one thread or several.

A small step runs whole inside its one call into C (:func:`xopt.engines.cpu_step.step_function`); a large step
(``PARALLEL_MIN`` elements or more), a clipped one, or one with ``skip_nonfinite`` whose grads are not all
finite is checked the same way and then run from here (:func:`run`): the clip norm first where asked, then
the kernel on the calling thread or split into chunks of ``CHUNK`` elements over ``get_num_threads()``
threads, then the commit, in one C-level call.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .._clip import is_finite, scale
from .._atomic import together, together_unforked
from .._threads import get_num_threads, pool as _pool
from .cpu_memory import N_HEAD, OFFSETS, check_step
from .cpu_step import PARALLEL_MIN, give_back, split_at, taken
from .cpu_drivers import CHUNK, all_finite, chunk_rows, claim, claim_squares, run_serial, squares, wait_done

__all__ = ["Arrays", "run", "chunk_table", "split_at", "taken", "give_back", "PARALLEL_MIN", "CHUNK"]

_NO_CHUNK_LEFT = np.array([2**62, 0], dtype=np.int64)  # counters past any step's chunks: a claim that runs nothing
_SUM = np.add.reduce  # ndarray.sum without its Python wrapper: the same sum


def chunk_table(sizes) -> np.ndarray:
    """(tensor, lo, hi) rows covering every element, no row longer than CHUNK."""
    return chunk_rows(np.asarray(sizes, dtype=np.int64), CHUNK)

class Arrays:
    """One step's arrays, checked again by :func:`check_step` for a run from Python (several threads, or
    after the clip norm): the kernel's addresses and sizes."""

    def __init__(self, function, head, scal, norms=0):
        n = int(head[6])
        self.function, self.scal, self.part = function, scal, head[N_HEAD + 3 * int(head[11]):]
        self.norms = norms  # the rule's norms' phase (cpu_norms), 0: none
        self.ptrs = np.empty((n, 5), dtype=np.int64)
        self.sizes = np.empty(n, dtype=np.int64)
        self.chunks = None
        self.threads = 1  # how many threads writes() hands the kernel to
        self.good = check_step(OFFSETS, head, self.part, self.ptrs, self.sizes) == 0
        self.total = None  # the element count, once asked

    @classmethod
    def of_table(cls, function, ptrs, sizes, scal, part, total, norms=0):
        """The arrays of a step whose addresses ``cpu_table.check_table`` has checked (torch tensors);
        ``total``: their element count."""
        self = cls.__new__(cls)
        self.function, self.scal, self.part, self.ptrs, self.sizes = function, scal, part, ptrs, sizes
        self.norms = norms
        self.chunks, self.threads, self.good, self.total = None, 1, True, total
        return self

    def _chunks(self):
        if self.chunks is None:
            self.chunks = chunk_table(self.sizes)
        return self.chunks

    def _threads(self) -> int:
        if self.total is None:
            self.total = int(_SUM(self.sizes))
        return min(get_num_threads(), len(self._chunks())) if self.total >= PARALLEL_MIN else 1

    def all_finite(self) -> bool:
        return bool(all_finite(self.ptrs, self.sizes, self.scal[0]))

    def sum_squares(self) -> float:
        """The sum of the squares of the grads, in float64, chunk by chunk as :func:`sum_squares` sums."""
        chunks = self._chunks()
        sums = np.empty(len(chunks), dtype=np.float64)
        threads = self._threads()
        if threads <= 1:
            squares(self.ptrs, chunks, 0, len(chunks), self.scal[0], sums)
        else:
            counters = np.zeros(2, dtype=np.int64)
            claim_squares(self.ptrs, chunks, _NO_CHUNK_LEFT, self.scal[0], sums)  # see _parallel
            together(self._parallel(threads, counters,
                                    functools.partial(claim_squares, self.ptrs, chunks, counters, self.scal[0], sums)))
        return float(_SUM(sums))

    def writes(self, clip=None) -> list:
        """The calls (into C, for ``xopt._atomic.together``) that run the kernel over every tensor; ``clip``:
        the scale of the grads (None: 1)."""
        if clip is not None:
            self.scal[:, -1] = clip
        threads = self.threads = self._threads()
        if threads <= 1:
            run_serial(self.function, self.ptrs, self.sizes[:0], self.scal, self.part)  # see _parallel
            return [functools.partial(run_serial, self.function, self.ptrs, self.sizes, self.scal, self.part)]
        if self.norms:  # the tensors' norms first, every chunk's on every thread; then a row of scalars per tensor
            self._ratios(threads)
        counters = np.zeros(2, dtype=np.int64)
        claim(self.function, self.ptrs, self._chunks(), self.part, _NO_CHUNK_LEFT, self.scal)  # see _parallel
        return self._parallel(threads, counters, functools.partial(claim, self.function, self.ptrs, self._chunks(),
                                                                   self.part, counters, self.scal))

    def _ratios(self, threads):
        """The norms' phase of a rule that reads its tensors' norms (``cpu_norms``) on ``threads`` threads, chunk
        by chunk: then ``scal`` holds a row per tensor with its ratio, ``part`` each tensor's row.  (On one
        thread the rule's function, given each tensor whole, runs the phase itself: the same sums.)"""
        from . import cpu_norms

        chunks = self._chunks()
        sums = np.empty((len(chunks), 2), dtype=np.float64)
        counters = np.zeros(2, dtype=np.int64)
        cpu_norms.claim_norms(self.norms, self.ptrs, chunks, self.part, _NO_CHUNK_LEFT, self.scal, sums)  # see _parallel
        together(self._parallel(threads, counters, functools.partial(cpu_norms.claim_norms, self.norms, self.ptrs,
                                                                     chunks, self.part, counters, self.scal, sums)))
        self.scal, self.part = cpu_norms.per_tensor(self.scal, self.part, cpu_norms.ratios(chunks, sums, len(self.sizes)))

    def _parallel(self, threads, counters, claimer) -> list:
        """The calls that run ``claimer`` (its counters fresh: a worker that starts only after its step is over
        finds no chunk left and touches nothing) on ``threads - 1`` workers and the caller, then wait for the
        chunks still under way on workers.  Each compiled function of the calls has run once already, on
        nothing, with these argument types: numba's dispatcher, which types the arguments of a call in Python
        (and loads or compiles the kernel) the first time, does it here, not among a step's writes."""
        wait_done(counters, 0)
        put = _pool(threads).put
        return [functools.partial(put, claimer)] * (threads - 1) + [
            claimer, functools.partial(wait_done, counters, len(self._chunks()))]

def run(opt, arrays, clip, commit, after=()):
    """A checked step of ``arrays``, from Python: the clip norm or the finite check first where asked, then the
    kernel (on one thread or several), the calls ``after`` and the commit, together.  Returns True."""
    norm = scale_by = None
    if clip is not None:
        norm = math.sqrt(arrays.sum_squares())
        if opt.skip_nonfinite and not is_finite(norm):
            together(commit(norm, True))
            return True
        scale_by = scale(norm, clip)
    elif opt.skip_nonfinite and not arrays.all_finite():
        together(commit(None, True))
        return True
    writes = arrays.writes(scale_by)
    together_unforked([*writes, *after, *commit(norm, False)])  # the kernel releases the GIL on one thread too
    return True
