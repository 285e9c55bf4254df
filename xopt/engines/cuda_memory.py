"""A CUDA step's arrays read from their own structs in one compiled call: the checks and the launch table.

The CUDA engine's lane (:func:`xopt.engines.fused_cuda.step`) hands :func:`gather` the ids of a
few Python lists it has just built (params, grads, state buffers, step counts).  One compiled
call reads each list's items (a ``PyListObject``), each item's type (``ob_type``) and each
array's own struct: for ``cupy.ndarray`` the Cython struct of ``cupy._core.core._ndarray_base``
(``size``, the ``_shape`` vector, ``_c_contiguous``, ``dtype``, ``data``) and its
``MemoryPointer`` (``ptr``, ``device_id``); for ``numpy.ndarray`` (the CPU build of the kernel,
in the tests) NumPy's (``data``, ``nd``, ``dimensions``, ``flags``, ``descr``).  It checks what
the checked path checks and, where all is well, writes the launch table the kernel reads.

Every offset is found and checked on probes whose values are known, once per array type on
first use (:func:`layout`); where any disagrees the layout is None and the engine gathers the
same table with Python's attribute lookups instead (slower, the same result).  Nothing here
keeps an address from one call to the next: the caller holds every list and every object in
them for the length of the call (and the optimizer's lock).
"""

from __future__ import annotations


import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .cpu_memory import count_below
from .cuda_layout import (CONTIG, CONTIG_READ, CONTIG_WRITE, DATA, DESCR, DIMS, INT, LIST_ITEMS, LIST_SIZE, MEMPTR,
                          MP_DEVICE, MP_PTR, MP_TYPE, ND, OB_TYPE, SHAPE, SIZE, TYPE, layout)

__all__ = ["layout", "gather", "N_HEAD", "TABLE_BYTES_PER_TENSOR", "BLOCK_BYTES"]

TABLE_BYTES_PER_TENSOR = 48  # five addresses and a size
BLOCK_BYTES = 16  # tensor, chunk, aligned, part: four int32


def _loader(bits):
    """An intrinsic: the ``bits``-bit integer stored at an address, widened (signed) to int64."""

    @intrinsic
    def load(typingctx, addr):
        sig = types.int64(types.int64)

        def codegen(context, builder, signature, args):
            value = builder.load(builder.inttoptr(args[0], ir.PointerType(ir.IntType(bits))))
            return value if bits == 64 else builder.sext(value, ir.IntType(64))

        return sig, codegen

    return load


_load64, _load32 = _loader(64), _loader(32)


@intrinsic
def _prefetch(typingctx, addr):
    """Ask for the cache line at ``addr`` (a hint: never faults, whatever the address)."""
    sig = types.void(types.int64)

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=ir.FunctionType(
            ir.VoidType(), [i8p, ir.IntType(32), ir.IntType(32), ir.IntType(32)]))
        builder.call(fn, [builder.inttoptr(args[0], i8p), ir.Constant(ir.IntType(32), 0),
                          ir.Constant(ir.IntType(32), 3), ir.Constant(ir.IntType(32), 1)])
        return context.get_dummy_value()

    return sig, codegen

# The int64 head of a step (see gather), then three "keeps" flags per part.
HEAD = ("params", "grads", "slot0", "slot1", "slot2", "steps", "n", "param_dtype", "state_dtype", "param_size",
        "state_size", "n_parts", "scalar_bytes", "chunk")
N_HEAD = len(HEAD)


@njit(cache=True, inline="always")
def _item(off, lst, t):
    return _load64(_load64(lst + off[LIST_ITEMS]) + 8 * t)


@njit(cache=True, inline="always")
def _array(off, obj, dtype, write, info):
    """Whether ``obj`` is an exact array of the layout's type, of ``dtype`` (a dtype object's id), C-contiguous (and,
    for NumPy, aligned, and writeable where ``write``); ``info``: its data pointer, device (-1: none), number of
    dimensions and the address of its dimensions."""
    if _load64(obj + off[OB_TYPE]) != off[TYPE] or _load64(obj + off[DESCR]) != dtype:
        return False
    mask = off[CONTIG_WRITE] if write else off[CONTIG_READ]
    if _load32(obj + off[CONTIG]) & mask != mask:
        return False
    if off[MEMPTR] >= 0:
        mp = _load64(obj + off[MEMPTR])
        if _load64(mp + off[OB_TYPE]) != off[MP_TYPE]:
            return False
        info[0] = _load64(mp + off[MP_PTR])
        info[1] = _load32(mp + off[MP_DEVICE])
    else:
        info[0] = _load64(obj + off[DATA])
        info[1] = -1
    if off[SHAPE] >= 0:
        begin = _load64(obj + off[SHAPE])
        info[2] = (_load64(obj + off[SHAPE] + 8) - begin) >> 3
        info[3] = begin
        info[4] = _load64(obj + off[SIZE])
    else:
        info[2] = _load32(obj + off[ND])
        info[3] = _load64(obj + off[DIMS])
        info[4] = -1
    return True


@njit(cache=True, inline="always")
def _same_shape(info, nd, dims, size):
    """Whether the array ``info`` describes has the shape (nd dims at ``dims``, ``size`` elements); up to one
    dimension, from the sizes where the layout keeps them (the dims are another cache line away)."""
    if info[2] != nd:
        return False
    if nd <= 1 and info[4] >= 0:
        return info[4] == size
    for d in range(nd):
        if _load64(info[3] + 8 * d) != _load64(dims + 8 * d):
            return False
    return True


@njit(cache=True, inline="always")
def _ahead(off, head, t, n):
    """Prefetch what rows t + 8 (the arrays' structs) and t + 4 (what those point to) will read: the loop over the
    rows is bound by these dependent loads, each a cache miss in a training loop."""
    far, near = t + 8, t + 4
    for k in range(5):
        if head[k] == 0:
            continue
        if far < n:
            obj = _item(off, head[k], far)
            _prefetch(obj)
            _prefetch(obj + 64)
        if near < n:
            obj = _item(off, head[k], near)
            if off[MEMPTR] >= 0:
                _prefetch(_load64(obj + off[MEMPTR]))
            if off[SHAPE] >= 0:
                _prefetch(_load64(obj + off[SHAPE]))
            else:
                _prefetch(_load64(obj + off[DIMS]))


@njit(cache=True)
def _radix_sort(a):
    """``a`` (int64 >= 0) sorted: least significant 11 bits first, over the bits its range spans (numba's np.sort is
    a quicksort several times slower on the tens of thousands of addresses of a large step)."""
    out = a.copy()
    if out.shape[0] < 2:
        return out
    low = out.min()
    span = out.max() - low
    scratch = np.empty_like(out)
    counts = np.empty(2049, dtype=np.int64)
    shift = 0
    while (span >> shift) > 0:
        counts[:] = 0
        for i in range(out.shape[0]):
            counts[((out[i] - low) >> shift & 2047) + 1] += 1
        for d in range(2048):
            counts[d + 1] += counts[d]
        for i in range(out.shape[0]):
            d = (out[i] - low) >> shift & 2047
            scratch[counts[d]] = out[i]
            counts[d] += 1
        out, scratch = scratch, out
        shift += 11
    return out


@njit(cache=True)
def _insertion_sort(a):
    """``a`` sorted (a short run: numba's np.sort compiles a quicksort for seconds)."""
    out = a.copy()
    for i in range(1, out.shape[0]):
        x = out[i]
        j = i - 1
        while j >= 0 and out[j] > x:
            out[j + 1] = out[j]
            j -= 1
        out[j + 1] = x
    return out


@njit(cache=True)
def _sorted(rows, lengths):
    """The first ``lengths[r]`` items of every row of ``rows``, sorted: each row sorted where it is not already
    (a memory pool hands out rising addresses: it mostly is), then the rows merged."""
    out = np.empty(lengths.sum(), dtype=np.int64)
    scratch = np.empty_like(out)
    m = 0
    for r in range(rows.shape[0]):
        run = rows[r, :lengths[r]]
        for i in range(1, run.shape[0]):
            if run[i] < run[i - 1]:
                run = _insertion_sort(run) if run.shape[0] < 256 else _radix_sort(run)
                break
        if m == 0:
            for i in range(run.shape[0]):  # element by element: a slice assignment brings numba's shape-error formatting
                out[i] = run[i]
        else:  # merge out[:m] and run into scratch, then back
            i = j = k = 0
            while i < m and j < run.shape[0]:
                if out[i] <= run[j]:
                    scratch[k] = out[i]
                    i += 1
                else:
                    scratch[k] = run[j]
                    j += 1
                k += 1
            while i < m:
                scratch[k] = out[i]
                i += 1
                k += 1
            while j < run.shape[0]:
                scratch[k] = run[j]
                j += 1
                k += 1
            for i in range(k):
                out[i] = scratch[i]
        m += run.shape[0]
    return out


@njit(cache=True)
def gather(off, head, part):
    """(answer, device, blocks, table): the step's arrays checked and, where all is well (answer 0), its launch table.

    ``head`` (see HEAD): the ids of six lists of n items built by the caller (params, grads, the state buffers of
    the kernel's three slots, 0 for none, and the step counts), n, the ids of the param and state dtype objects,
    their item sizes, the number of parts of the step, the bytes of the scalars' rows and the elements per chunk;
    then three flags per part: whether its hyperparameter set keeps each slot.  ``part[t]``: tensor t's part (empty:
    all part 0).

    Row t is good when its param is an exact array of the layout's type, of the param dtype, C-contiguous (NumPy:
    aligned and writeable too), on the device of the others; its grad the same but for writeable, and of the param's
    shape; each buffer its part keeps the same as the param but of the state dtype (a buffer it does not keep is
    not read, not written); every address a multiple of its item size; its step count an exact ``int``.  Then
    memory: no two params or kept buffers share a byte, and no grad shares one with any of them.  ``answer``: 0,
    1 + the first row that is not good, n + 1 (shared memory) or n + 2 (arrays on two devices).  ``device``: theirs
    (-1 where the layout has none).  The table (zeroed, then filled but for the scalars' rows): the address of
    every slot (param, grad, three buffers; 0 for a buffer not kept) by slot, the sizes, the block table (tensor,
    chunk, 16-byte aligned, part), the scalars' rows (left for the caller), the norm pass's count of done blocks.
    """
    n = head[6]
    p_dtype, s_dtype, p_size, s_size, n_parts, chunk = head[7], head[8], head[9], head[10], head[11], head[13]
    for k in range(6):
        if head[k] != 0 and _load64(head[k] + off[LIST_SIZE]) != n:
            return n + 1, -1, 0, np.empty(0, dtype=np.uint8)
    ptrs = np.zeros((5, n), dtype=np.int64)
    sizes = np.empty(n, dtype=np.int64)
    aligned = np.ones(n, dtype=np.int32)
    spans_lo = np.empty((4, n), dtype=np.int64)  # by slot (params, then each buffer): runs the pool often sorted
    spans_hi = np.empty((4, n), dtype=np.int64)
    runs = np.zeros(4, dtype=np.int64)
    info = np.empty(5, dtype=np.int64)
    device = -2
    n_blocks = 0
    for t in range(n):
        _ahead(off, head, t, n)
        row = part[t] if part.shape[0] else 0
        if row < 0 or row >= n_parts:
            return t + 1, -1, 0, np.empty(0, dtype=np.uint8)
        if not _array(off, _item(off, head[0], t), p_dtype, True, info):
            return t + 1, -1, 0, np.empty(0, dtype=np.uint8)
        nd, dims, size = info[2], info[3], info[4]
        if size < 0:
            size = 1
            for d in range(nd):
                size *= _load64(dims + 8 * d)
        if device == -2:
            device = info[1]
        elif info[1] != device:
            return n + 2, -1, 0, np.empty(0, dtype=np.uint8)
        sizes[t] = size
        ptrs[0, t] = info[0]
        if size:
            spans_lo[0, runs[0]], spans_hi[0, runs[0]] = info[0], info[0] + size * p_size
            runs[0] += 1
            if info[0] % p_size:
                return t + 1, -1, 0, np.empty(0, dtype=np.uint8)
            aligned[t] = info[0] % 16 == 0
        if not _array(off, _item(off, head[1], t), p_dtype, False, info) or not _same_shape(info, nd, dims, size):
            return t + 1, -1, 0, np.empty(0, dtype=np.uint8)
        if info[1] != device:
            return n + 2, -1, 0, np.empty(0, dtype=np.uint8)
        ptrs[1, t] = info[0]
        if size:
            if info[0] % p_size:
                return t + 1, -1, 0, np.empty(0, dtype=np.uint8)
            aligned[t] &= info[0] % 16 == 0
        for j in range(3):
            if head[2 + j] == 0 or head[N_HEAD + 3 * row + j] == 0:
                continue
            buf = _item(off, head[2 + j], t)
            if not _array(off, buf, s_dtype, True, info) or not _same_shape(info, nd, dims, size):
                return t + 1, -1, 0, np.empty(0, dtype=np.uint8)
            if info[1] != device:
                return n + 2, -1, 0, np.empty(0, dtype=np.uint8)
            ptrs[2 + j, t] = info[0]
            if size:
                spans_lo[1 + j, runs[1 + j]], spans_hi[1 + j, runs[1 + j]] = info[0], info[0] + size * s_size
                runs[1 + j] += 1
                if info[0] % s_size:
                    return t + 1, -1, 0, np.empty(0, dtype=np.uint8)
                aligned[t] &= info[0] % 16 == 0
        if head[5] != 0 and _load64(_item(off, head[5], t) + off[OB_TYPE]) != off[INT]:
            return t + 1, -1, 0, np.empty(0, dtype=np.uint8)
        n_blocks += (size + chunk - 1) // chunk
    # memory: the spans' starts and ends, each sorted on its own, each start at or after the end before it (this
    # holds exactly when no two spans share a byte); a grad meets a span if the last span starting below the grad's
    # end reaches past its start
    lo, hi = _sorted(spans_lo, runs), _sorted(spans_hi, runs)
    for i in range(1, lo.shape[0]):
        if lo[i] < hi[i - 1]:
            return n + 1, -1, 0, np.empty(0, dtype=np.uint8)
    for t in range(n):
        if sizes[t] == 0:
            continue
        g_lo = ptrs[1, t]
        j = count_below(lo, g_lo + sizes[t] * p_size)
        if j > 0 and hi[j - 1] > g_lo:
            return n + 1, -1, 0, np.empty(0, dtype=np.uint8)
    table = np.zeros(48 * n + 16 * n_blocks + head[12] + 8, dtype=np.uint8)
    words = table[:48 * n].view(np.int64)
    for k in range(5):  # ptrs row by row, then the sizes (element by element, as in _sorted)
        for t in range(n):
            words[k * n + t] = ptrs[k, t]
    for t in range(n):
        words[5 * n + t] = sizes[t]
    blocks = table[48 * n:48 * n + 16 * n_blocks].view(np.int32)
    b = 0
    for t in range(n):
        row = part[t] if part.shape[0] else 0
        for c in range((sizes[t] + chunk - 1) // chunk):
            blocks[4 * b] = t
            blocks[4 * b + 1] = c
            blocks[4 * b + 2] = aligned[t]
            blocks[4 * b + 3] = row
            b += 1
    return 0, device, n_blocks, table
