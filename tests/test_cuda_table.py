"""The compiled launch table of torch CUDA tensors' steps (xopt.engines.cuda_table) against NumPy's readable one
(xopt.engines.cuda_reader.table_of): the same answer (0, 1 for a NULL or misaligned address, n + 1 for shared
bytes) and, where 0, the same bytes, over random steps built to hit every answer."""

from __future__ import annotations

import numpy as np
import pytest

from xopt import _numba
from xopt.engines import cuda_reader

if not _numba.usable():
    pytest.skip("numba's code cannot run here", allow_module_level=True)

from xopt.engines import cuda_table  # noqa: E402

BASE = 1 << 40


def _step(rng):
    """(ptrs, sizes, rows, part, p_size, s_size): a step of 1-12 tensors laid out one after another (some with
    gaps, some sizes 0), parts of 1-3 kept-slot patterns, then one fault or none."""
    n = int(rng.integers(1, 13))
    p_size, s_size = (int(x) for x in rng.choice([2, 4, 8], size=2))
    sizes = rng.choice([0, 1, 3, 16, 100, 5000], size=n).astype(np.int64)
    n_parts = int(rng.integers(1, 4))
    keeps = rng.integers(0, 2, size=(n_parts, 3)).astype(bool)
    part = rng.integers(0, n_parts, size=n).astype(np.int64)
    present = rng.integers(0, 2, size=3).astype(bool)  # a slot no part keeps: no list at all
    rows = [np.flatnonzero(keeps[part, j]) if present[j] else np.zeros(0, dtype=np.int64) for j in range(3)]
    ptrs = np.zeros((5, n), dtype=np.int64)
    at = BASE + 16 * int(rng.integers(0, 4))
    for k in range(5):
        for t in range(n):
            if k >= 2 and t not in rows[k - 2]:
                continue
            item = p_size if k < 2 else s_size
            at += int(rng.choice([0, 0, 16, item]))  # gaps: some arrays not on a 16-byte boundary
            ptrs[k, t] = at
            at += int(sizes[t]) * item
    fault = rng.integers(0, 7)
    live = np.flatnonzero(sizes > 0)
    if fault == 1 and len(live):  # a NULL param or grad
        ptrs[int(rng.integers(0, 2)), int(rng.choice(live))] = 0
    elif fault == 2 and len(live):  # a misaligned address
        k = int(rng.integers(0, 2))
        ptrs[k, int(rng.choice(live))] += 1
    elif fault == 3 and len(live) >= 2:  # a param over another one's bytes
        a, b = rng.choice(live, size=2, replace=False)
        ptrs[0, a] = ptrs[0, b] + p_size * int(rng.integers(0, sizes[b]))
    elif fault == 4 and len(live):  # a grad over a param's bytes (or a kept buffer's)
        t, u = int(rng.choice(live)), int(rng.choice(live))
        ptrs[1, t] = ptrs[0, u] + p_size * int(rng.integers(0, sizes[u]))
    elif fault == 5 and len(live) >= 2:  # two grads over the same bytes: allowed (grads are only read)
        a, b = rng.choice(live, size=2, replace=False)
        ptrs[1, a] = ptrs[1, b]
    elif fault == 6:  # a kept buffer over a param's bytes, or NULL
        kept = [(j, int(t)) for j in range(3) for t in rows[j] if sizes[t] > 0]
        if kept:
            j, t = kept[int(rng.integers(0, len(kept)))]
            ptrs[2 + j, t] = 0 if rng.integers(0, 2) else ptrs[0, t]
    return ptrs, sizes, rows, part, p_size, s_size


def test_the_compiled_table_is_numpys_on_random_steps():
    rng = np.random.default_rng(7)
    answers = set()
    for _ in range(3000):
        args = _step(rng)
        n = len(args[1])
        scalar_bytes = 8 * int(rng.integers(1, 5))
        want = cuda_reader.table_of(*args, scalar_bytes)
        got = cuda_table.table_of(*args, scalar_bytes)
        assert got[0] == want[0] and got[1] == want[1], (got[:2], want[:2], args)
        if want[0] == 0:
            assert got[2].dtype == np.uint8 and got[2].tobytes() == want[2].tobytes()
        answers.add("ok" if want[0] == 0 else "null or misaligned" if want[0] == 1 else "shared")
        assert want[0] in (0, 1, n + 1)
    assert answers == {"ok", "null or misaligned", "shared"}


def test_an_address_above_2_to_the_63_reads_as_numpys_does():
    """A uint64 address past 2**63 (an int64 below 0 once in the table) is aligned or not as NumPy's % says."""
    sizes = np.array([4, 4], dtype=np.int64)
    rows = [np.arange(2), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)]
    for first in (-(2**62), -(2**62) + 4, -(2**62) + 16):
        ptrs = np.array([[first, first + 64], [first + 128, first + 192], [first + 256, first + 320], [0, 0], [0, 0]],
                        dtype=np.int64)
        want = cuda_reader.table_of(ptrs, sizes, rows, np.zeros(2, dtype=np.int64), 4, 4, 16)
        got = cuda_table.table_of(ptrs, sizes, rows, np.zeros(2, dtype=np.int64), 4, 4, 16)
        assert got[:2] == want[:2] and got[2].tobytes() == want[2].tobytes()


def test_hundreds_of_tensors_in_any_order_and_addresses_past_2_to_the_62():
    """Hundreds of spans in shuffled order (the compiled sort's radix passes), with and without a shared byte, and
    addresses a GPU never has (past 2**62, or read as negative int64): NumPy's answers."""
    rng = np.random.default_rng(11)
    empty = np.zeros(0, dtype=np.int64)
    for case in range(40):
        n = int(rng.integers(256, 700))
        sizes = rng.integers(1, 50, size=n).astype(np.int64)
        rows = [np.arange(n), empty, empty]
        slots = rng.permutation(4 * n)[:2 * n]  # the params' and buffers' places among 4n slots of 256 bytes
        ptrs = np.zeros((5, n), dtype=np.int64)
        ptrs[0], ptrs[2] = BASE + 256 * slots[:n], BASE + 256 * slots[n:]
        ptrs[1] = (BASE << 2) + 256 * np.arange(n)
        if case % 3 == 1:  # a buffer over a param
            t = int(rng.integers(0, n))
            ptrs[2, t] = ptrs[0, (t + 1) % n]
        if case % 4 == 2:  # params past 2**62 and below 0 as int64s (uint64s past 2**63), every other one
            ptrs[0, ::2] += np.int64(2**62 - BASE)
            ptrs[0, 1::2] += np.int64(-(2**62) - BASE)
        args = (ptrs, sizes, rows, np.zeros(n, dtype=np.int64), 4, 4, 16)
        want, got = cuda_reader.table_of(*args), cuda_table.table_of(*args)
        assert got[:2] == want[:2], (case, got[:2], want[:2])
        if want[0] == 0:
            assert got[2].tobytes() == want[2].tobytes()
