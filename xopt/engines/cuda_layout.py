"""Where a CUDA step's objects keep what :mod:`xopt.engines.cuda_memory` reads: offsets found on probes.

For each array type (``cupy.ndarray``; ``numpy.ndarray`` for the CPU build of the kernel in the tests)
:func:`layout` finds, once, where an object keeps its type, where a list keeps its size and items, and
where an array keeps its size, shape, contiguity, dtype and data (for CuPy, through its ``MemoryPointer``),
each checked on probes whose values are known.  Where any disagrees the layout is None and the engine
gathers a step's table through Python's attribute lookups instead.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np

__all__ = ["layout"]


def _read(address, ctype=ctypes.c_int64):
    return ctype.from_address(int(address)).value


def _find(probes, value_of, width=8, ctype=ctypes.c_int64):
    """The one offset inside the probes' struct at which each probe holds ``value_of(probe)``; None if not exactly
    one.  Only the struct's own bytes are read (its type's ``__basicsize__``)."""
    stop = type(probes[0]).__basicsize__ - width + 1
    found = [at for at in range(8, stop, width) if all(_read(id(p) + at, ctype) == value_of(p) for p in probes)]
    return found[0] if len(found) == 1 else None


def _object_layout():
    """(where an object keeps its type, where a list keeps its size, where its item pointer), checked on probes."""
    probes = [np.empty(3), 1.5, "x", [], {}, 7, None]
    ob_type = next((at for at in range(8, 33, 8) if all(_read(id(a) + at) == id(type(a)) for a in probes)), None)
    if ob_type is None:
        return None
    lists = [[np.empty(2), 1.5, "x"], [None] * 9, [], list(range(40))]
    size_at, items_at = ob_type + 8, ob_type + 16
    for lst in lists:
        if _read(id(lst) + size_at) != len(lst):
            return None
        items = _read(id(lst) + items_at)
        if [_read(items + 8 * i) for i in range(len(lst))] != list(map(id, lst)):
            return None
    return ob_type, size_at, items_at


# What the compiled code reads, by index into a layout's offsets (-1: the array type has no such field).
(OB_TYPE, LIST_SIZE, LIST_ITEMS, INT, TYPE, SIZE, SHAPE, ND, DIMS, CONTIG, CONTIG_WRITE, CONTIG_READ, DESCR,
 DATA, MEMPTR, MP_TYPE, MP_PTR, MP_DEVICE, N_OFFSETS) = range(19)


def _cupy_layout(base):
    """The offsets of ``cupy.ndarray`` and its ``MemoryPointer``, or None where a probe disagrees."""
    cupy = sys.modules.get("cupy")
    if cupy is None:
        return None
    from cupy.cuda import memory

    owners, probes = [], []
    for shape, dtype, device, order in [((3, 5), np.float32, 0, "C"), ((7,), np.float64, 3, "C"),
                                        ((), np.float16, 1, "C"), ((2, 3, 4), np.float32, 2, "F"),
                                        ((5, 1), np.float64, 0, "F")]:
        host = np.zeros(int(np.prod(shape)) + 1, dtype=dtype)
        owners.append(host)
        mem = memory.UnownedMemory(host.ctypes.data, host.nbytes, host, device_id=device)
        probes.append(cupy.ndarray(shape, dtype, memory.MemoryPointer(mem, host.itemsize), order=order))
    probes.append(probes[0][:, ::2])  # neither C- nor F-contiguous
    probes.append(probes[1][1:])  # a view: another pointer, one memory
    off = np.full(N_OFFSETS, -1, dtype=np.int64)
    off[:INT] = base
    off[INT], off[TYPE] = id(int), id(cupy.ndarray)
    off[SIZE] = _find(probes, lambda a: a.size) or -1
    off[CONTIG] = _find(probes, lambda a: int(a._c_contiguous), width=4, ctype=ctypes.c_int32) or -1
    off[DESCR] = _find(probes, lambda a: id(a.dtype)) or -1
    off[MEMPTR] = _find(probes, lambda a: id(a.data)) or -1
    pointers = [a.data for a in probes]
    off[MP_TYPE] = id(memory.MemoryPointer)
    off[MP_PTR] = _find(pointers, lambda m: m.ptr) or -1
    off[MP_DEVICE] = _find(pointers, lambda m: m.device_id, width=4, ctype=ctypes.c_int32) or -1
    off[SHAPE] = _find_vector(probes, "shape")
    off[CONTIG_WRITE] = off[CONTIG_READ] = 1  # the bint is 1: C-contiguous (CuPy arrays are always writeable)
    if min(off[SIZE], off[CONTIG], off[DESCR], off[MEMPTR], off[MP_PTR], off[MP_DEVICE], off[SHAPE]) < 0:
        return None
    return off


def _find_vector(probes, name):
    """Where the probes keep attribute ``name`` (a tuple of ints) as a C++ vector of int64 (begin, end pointers), or
    -1.  Only pairs whose span is the tuple's length in every probe are read through (the shape and the strides)."""
    stop = type(probes[0]).__basicsize__ - 15
    spans = [at for at in range(8, stop, 8)
             if all(_read(id(a) + at + 8) - _read(id(a) + at) == 8 * len(getattr(a, name))
                    and (_read(id(a) + at) != 0 or not getattr(a, name)) for a in probes)]
    found = [at for at in spans
             if all([_read(_read(id(a) + at) + 8 * i) for i in range(len(getattr(a, name)))] == list(getattr(a, name))
                    for a in probes)]
    return found[0] if len(found) == 1 else -1


def _numpy_layout(base):
    """The offsets of ``numpy.ndarray`` (the CPU build's arrays), or None where a probe disagrees.

    NumPy's public struct (data, nd, dimensions, strides, base, descr, flags) is found from where the data
    pointer is, then every field is checked on the probes."""
    owner = np.empty(40, dtype=np.float32)
    probes = [np.empty(3), np.empty((2, 5), dtype=np.float32)[:, ::2], np.empty((), dtype=np.float16),
              np.empty((4, 2), dtype=np.float64, order="F"), owner[1:9].reshape(2, 4)]
    probes[0].flags.writeable = False
    data = _find(probes, lambda a: a.__array_interface__["data"][0])
    if data is None:
        return None
    off = np.full(N_OFFSETS, -1, dtype=np.int64)
    off[:INT] = base
    off[INT], off[TYPE] = id(int), id(np.ndarray)
    off[DATA], off[ND], off[DIMS], off[DESCR], off[CONTIG] = data, data + 8, data + 16, data + 40, data + 48
    for a in probes:
        dims = _read(id(a) + off[DIMS])
        if (_read(id(a) + off[ND], ctypes.c_int32) != a.ndim or _read(id(a) + off[DESCR]) != id(a.dtype)
                or _read(id(a) + off[CONTIG], ctypes.c_int32) != a.flags.num
                or [_read(dims + 8 * d) for d in range(a.ndim)] != list(a.shape)):
            return None
    c_contiguous, aligned, writeable = 0x0001, 0x0100, 0x0400
    off[CONTIG_WRITE] = c_contiguous | aligned | writeable
    off[CONTIG_READ] = c_contiguous | aligned
    return off


_LAYOUTS = {}  # array type -> its offsets, or None: read through Python instead


def layout(array_type):
    """The offsets :func:`gather` reads ``array_type``'s arrays with, or None (no such layout, or a probe disagreed)."""
    try:
        return _LAYOUTS[array_type]
    except KeyError:
        pass
    base = _object_layout()
    found = None
    if base is not None:
        try:
            if array_type is np.ndarray:
                found = _numpy_layout(base)
            elif sys.modules.get("cupy") is not None and array_type is sys.modules["cupy"].ndarray:
                found = _cupy_layout(base)
        except Exception:  # noqa: BLE001  (a CuPy that builds its arrays otherwise: read through Python)
            found = None
    _LAYOUTS[array_type] = found
    return found
