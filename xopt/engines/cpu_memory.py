"""Reading CPython's and NumPy's object structs from compiled code: what lets one numba call check a step.

A CPU step hands its compiled call the ids of a few Python lists it has just built (params,
grads, state buffers, step counts).  The call reads each list's items (a ``PyListObject``: its
size, then a pointer to its item array), each item's type (the object header's ``ob_type``)
and each NumPy array's struct (data pointer, dims, flags, dtype), at the offsets
:mod:`xopt.engines.cpu_structs` found and checked at import.

Nothing here keeps an address from one call to the next.  The caller holds every list and
every object in them for the length of the call (and holds the optimizer's lock), so every id
read names a live object of the type its header says.
"""

from __future__ import annotations

import operator
import sys

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .cpu_structs import (BYTEORDER, DATA, DESCR, DIMS, FLAGS, FOREIGN, HEAD, LIST_ITEMS, LIST_SIZE, N_HEAD, ND, NDARRAY,
                          NONE, OB_TYPE, OFFSETS, INT, READ_FLAGS, STRIDES, TYPE_NUM, WRITE_FLAGS)

__all__ = ["OFFSETS", "byte_bounds", "compiled_only", "check_step", "check_rows", "disjoint", "load_i64", "view", "typed_pointer", "count_below", "fetch_add", "yield_cpu",
           "HEAD", "N_HEAD"]


def _loader(bits, signed):
    """An intrinsic: the ``bits``-bit integer stored at an address, widened to int64."""

    @intrinsic
    def load(typingctx, addr):
        sig = types.int64(types.int64)

        def codegen(context, builder, signature, args):
            value = builder.load(builder.inttoptr(args[0], ir.PointerType(ir.IntType(bits))))
            if bits == 64:
                return value
            return (builder.sext if signed else builder.zext)(value, ir.IntType(64))

        return sig, codegen

    return load


load_i64, load_i32, load_i8 = _loader(64, True), _loader(32, True), _loader(8, False)


@intrinsic
def typed_pointer(typingctx, addr, like):
    """``addr`` as a pointer to the element type of ``like``: an array, or a NumPy scalar type (a constant)."""
    sig = types.CPointer(like.dtype)(addr, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@intrinsic
def fetch_add(typingctx, addr, value):
    """Atomically add ``value`` to the int64 at ``addr``; returns what was there."""
    sig = types.int64(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.PointerType(ir.IntType(64)))
        return builder.atomic_rmw("add", ptr, args[1], "seq_cst")

    return sig, codegen


_YIELD = "SwitchToThread" if sys.platform == "win32" else "sched_yield"


@intrinsic
def yield_cpu(typingctx):
    """``sched_yield()``: let another thread run on this core (a symbol, not an address: the cache keeps)."""
    sig = types.int32()

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), _YIELD)
        return builder.call(fn, [])

    return sig, codegen


def compiled_only(**options):
    """``njit(cache=True)`` for a function that only compiled code calls: numba builds it no entry from Python
    (``no_cpython_wrapper``) or from C (``no_cfunc_wrapper``), which a cold first update would compile for
    nothing.  Called from Python, such a function crashes the process."""
    return njit(cache=True, no_cpython_wrapper=True, no_cfunc_wrapper=True, **options)


@compiled_only()
def view(addr, proto, lo, hi):
    """Elements lo:hi of the contiguous array at the (checked) address ``addr``, typed as ``proto``'s."""
    return carray(typed_pointer(addr, proto), (hi,))[lo:hi]


# -- a step's arrays, checked --------------------------------------------------------------


@compiled_only()
def _list_item(off, lst, t):
    return load_i64(load_i64(lst + off[LIST_ITEMS]) + 8 * t)


@njit(cache=True, inline="always")
def _is_array(off, obj, flags, type_num, nd, dims_of):
    """Whether ``obj`` is an exact ndarray with ``flags``, of native ``type_num``, shaped as the array
    whose dims pointer is ``dims_of`` (nd dims); or, with ``nd`` -1, any shape.  (A 0-d array's dims
    pointer may be NULL: it says nothing of the shape, its nd does.)"""
    if load_i64(obj + off[OB_TYPE]) != off[NDARRAY]:
        return False
    if load_i32(obj + off[FLAGS]) & flags != flags:
        return False
    descr = load_i64(obj + off[DESCR])
    if load_i32(descr + off[TYPE_NUM]) != type_num or load_i8(descr + off[BYTEORDER]) == off[FOREIGN]:
        return False
    if nd < 0:
        return True
    if load_i32(obj + off[ND]) != nd:
        return False
    dims = load_i64(obj + off[DIMS])
    for d in range(nd):
        if load_i64(dims + 8 * d) != load_i64(dims_of + 8 * d):
            return False
    return True


@compiled_only()
def _sort_spans(lo, hi, temps):
    """Sort the byte ranges [lo[i], hi[i]) by start, in place: a bottom-up merge sort (a few lines that numba
    compiles in a fraction of a second, where ``np.argsort`` costs seconds of a first step's compilation);
    ranges already in order (arrays allocated one after another) cost one pass.  ``temps``: four rows of
    room for them (int64, at least ``lo.shape[0]`` wide)."""
    m = lo.shape[0]
    ordered = True
    for i in range(1, m):
        if lo[i] < lo[i - 1]:
            ordered = False
            break
    if ordered:
        return
    a_lo, a_hi, b_lo, b_hi = temps[0, :m], temps[1, :m], temps[2, :m], temps[3, :m]
    for i in range(m):
        a_lo[i], a_hi[i] = lo[i], hi[i]
    width = 1
    while width < m:
        for left in range(0, m, 2 * width):
            mid, right = min(left + width, m), min(left + 2 * width, m)
            i, j = left, mid
            for k in range(left, right):
                if i < mid and (j >= right or a_lo[i] <= a_lo[j]):
                    b_lo[k], b_hi[k] = a_lo[i], a_hi[i]
                    i += 1
                else:
                    b_lo[k], b_hi[k] = a_lo[j], a_hi[j]
                    j += 1
        a_lo, b_lo, a_hi, b_hi = b_lo, a_lo, b_hi, a_hi
        width *= 2
    for i in range(m):  # element by element: a slice assignment brings numba's shape-error formatting (seconds)
        lo[i], hi[i] = a_lo[i], a_hi[i]


@compiled_only()
def count_below(starts, x):
    """How many of the sorted ``starts`` are below ``x`` (``np.searchsorted(starts, x)``)."""
    lo, hi = 0, starts.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if starts[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True)
def check_step(off, head, part, ptrs, sizes):
    """:func:`check_rows` with room of its own for the byte ranges."""
    return check_rows(off, head, part, ptrs, sizes, np.empty((6, 4 * max(head[6], 0)), dtype=np.int64))


@compiled_only()
def check_rows(off, head, part, ptrs, sizes, spans):
    """0 if the arrays of a step are what a kernel may read and write, else 1 + the first row that is not
    (n + 1: the memory check).  Nothing is written but ``ptrs`` and ``sizes``.

    ``head`` (see HEAD): the ids of six lists of n items each, built by the caller: params, grads,
    the state buffers of the kernel's three slots and the step counts (``id(None)``: no list),
    then n, the dtype numbers of params and state buffers and their item sizes, the number of
    parts (hyperparameter set and step count pairs) and two numbers for the caller's use, followed
    by 3 flags per part: whether its configuration keeps each slot.  ``part[t]`` is row t's part (empty: all part 0).

    Row t is good when its param is an exact ``numpy.ndarray``, C-contiguous, aligned, writeable,
    of the param dtype in native byte order, and not empty; its grad the same but for writeable,
    and of the param's shape; each buffer its part keeps the same as the param but of the state
    dtype (a buffer the part does not keep is not part of the step: not read, not written); its
    step count an exact ``int`` (the caller compares the values).  Then memory: no two params or
    kept buffers share a byte, and no grad shares one with any of them (grads may share with each
    other: they are only read).  ``ptrs[t]``: the addresses of param, grad and the three slots (an
    unkept slot gets the param's, never read); ``sizes[t]``: the param's element count.  ``spans``: room
    (int64, 6 rows of at least 4n) for the byte ranges and their sort.
    """
    n = head[6]
    param_type, state_type, param_size, state_size = head[7], head[8], head[9], head[10]
    for k in range(6):
        if head[k] != off[NONE] and load_i64(head[k] + off[LIST_SIZE]) != n:
            return n + 1
    spans_lo, spans_hi = spans[0], spans[1]
    m = 0
    for t in range(n):
        p = _list_item(off, head[0], t)
        if not _is_array(off, p, WRITE_FLAGS, param_type, -1, 0):
            return t + 1
        nd = load_i32(p + off[ND])
        dims = load_i64(p + off[DIMS])
        size = 1
        for d in range(nd):
            size *= load_i64(dims + 8 * d)
        if size == 0:  # an empty param: the checked path's (two keys may name one empty array)
            return t + 1
        sizes[t] = size
        ptrs[t, 0] = load_i64(p + off[DATA])
        spans_lo[m], spans_hi[m] = ptrs[t, 0], ptrs[t, 0] + size * param_size
        m += 1
        g = _list_item(off, head[1], t)
        if not _is_array(off, g, READ_FLAGS, param_type, nd, dims):
            return t + 1
        ptrs[t, 1] = load_i64(g + off[DATA])
        row = part[t] if part.shape[0] else 0
        for j in range(3):
            ptrs[t, 2 + j] = ptrs[t, 0]
            if head[2 + j] == off[NONE] or head[N_HEAD + 3 * row + j] == 0:
                continue
            b = _list_item(off, head[2 + j], t)
            if not _is_array(off, b, WRITE_FLAGS, state_type, nd, dims):
                return t + 1
            ptrs[t, 2 + j] = load_i64(b + off[DATA])
            spans_lo[m], spans_hi[m] = ptrs[t, 2 + j], ptrs[t, 2 + j] + size * state_size
            m += 1
        if head[5] != off[NONE] and load_i64(_list_item(off, head[5], t) + off[OB_TYPE]) != off[INT]:
            return t + 1
    return 0 if disjoint(spans_lo[:m], spans_hi[:m], ptrs, sizes, param_size, spans[2:]) else n + 1


@njit(cache=True, inline="always")
def disjoint(starts, ends, ptrs, sizes, param_size, temps):
    """Whether the written byte ranges [starts[i], ends[i]) share no byte (sorted here, in place, with room
    ``temps``: see :func:`_sort_spans`), and no grad (``ptrs[t, 1]``, ``sizes[t]`` elements of
    ``param_size`` bytes) shares one with any of them."""
    _sort_spans(starts, ends, temps)
    for i in range(1, starts.shape[0]):
        if starts[i] < ends[i - 1]:
            return False
    for t in range(sizes.shape[0]):  # a grad meets a param or a buffer if the last range starting below its end reaches it
        lo, hi = ptrs[t, 1], ptrs[t, 1] + sizes[t] * param_size
        j = count_below(starts, hi)
        if j > 0 and ends[j - 1] > lo:
            return False
    return True


# -- byte ranges of arbitrary NumPy arrays ----------------------------------------------------
@njit(cache=True, nogil=True)
def _bounds(off, ids, itemsizes, lo, hi):
    """The byte range [lo, hi) each array in ``ids`` (live NumPy arrays) can reach; lo == hi if empty."""
    for i in range(ids.shape[0]):
        obj = ids[i]
        first = last = load_i64(obj + off[DATA])
        dims, strides = load_i64(obj + off[DIMS]), load_i64(obj + off[STRIDES])
        empty = False
        for d in range(load_i32(obj + off[ND])):
            n, stride = load_i64(dims + 8 * d), load_i64(strides + 8 * d)
            if n == 0:
                empty = True
            elif stride > 0:
                last += (n - 1) * stride
            else:
                first += (n - 1) * stride
        lo[i] = first
        hi[i] = first if empty else last + itemsizes[i]


def _is_ndarray(a) -> bool:
    return isinstance(a, np.ndarray)


def byte_bounds(arrays):
    """(lo, hi) int64 arrays: the byte range each NumPy array in ``arrays`` can reach (one compiled pass)."""
    if not all(map(_is_ndarray, arrays)):  # the pass reads each object as an array struct
        raise TypeError("byte_bounds takes NumPy arrays only")
    ids = np.fromiter(map(id, arrays), dtype=np.int64, count=len(arrays))
    itemsizes = np.fromiter(map(operator.attrgetter("itemsize"), arrays), dtype=np.int64, count=len(arrays))
    lo, hi = np.empty_like(ids), np.empty_like(ids)
    _bounds(OFFSETS, ids, itemsizes, lo, hi)
    return lo, hi
