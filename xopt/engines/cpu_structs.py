"""Where CPython and NumPy keep what a CPU step's compiled check reads, found at import (no numba).

A CPU step hands its compiled call the ids of a few Python lists it has just built (params,
grads, state buffers, step counts).  The call reads each list's items (a ``PyListObject``: its
size, then a pointer to its item array), each item's type (the object header's ``ob_type``)
and each NumPy array's struct (data pointer, dims, flags, dtype): at the offsets in
:data:`OFFSETS`, each found and checked here on probes whose values are known; if any disagrees,
ImportError: the CPU engine is not used and the reference rule runs.  The compiled code that reads
them is :mod:`xopt.engines.cpu_memory`; this module imports no numba, so a process whose compiled
code comes from xopt's own cache (:mod:`xopt.engines.cpu_objects`) does not start numba.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np

__all__ = ["OFFSETS", "DATA", "ND", "DIMS", "DESCR", "FLAGS", "TYPE_NUM", "BYTEORDER", "FOREIGN", "OB_TYPE", "NDARRAY",
           "LIST_SIZE", "LIST_ITEMS", "INT", "NONE", "STRIDES", "C_CONTIGUOUS", "ALIGNED", "WRITEABLE", "READ_FLAGS",
           "WRITE_FLAGS", "HEAD", "N_HEAD", "ANSWER", "LARGE", "NONFINITE", "CHECK_FINITE", "CALL",
           "WORK_PER_ROW"]


def _read(obj, offset, ctype=ctypes.c_int64):
    return ctype.from_address(id(obj) + offset).value


def _find_struct():
    """Offsets in NumPy's array struct (PyArrayObject_fields) and dtype struct, checked on probes.

    The public layout (data, nd, dimensions, strides, base, descr, flags) is the same in NumPy 1
    and 2; only where it starts depends on the object header, so it is found, then every field
    is checked on arrays whose values are known.
    """
    probes = [np.empty(3), np.empty((2, 5), dtype=np.float32)[:, ::2], np.empty((), dtype=np.float16),
              np.empty(4, dtype=np.dtype(">f8"))]
    probes[0].flags.writeable = False
    for data in range(8, 129, 8):
        if all(_read(a, data) == a.__array_interface__["data"][0] for a in probes):
            break
    else:
        raise ImportError("cannot find the data pointer in NumPy's array struct")
    off = dict(data=data, nd=data + 8, dims=data + 16, strides=data + 24, descr=data + 40, flags=data + 48,
               type_num=28, byteorder=26)
    for a in probes:
        dims, strides = _read(a, off["dims"]), _read(a, off["strides"])
        ok = (_read(a, off["nd"], ctypes.c_int32) == a.ndim
              and [ctypes.c_int64.from_address(dims + 8 * d).value for d in range(a.ndim)] == list(a.shape)
              and [ctypes.c_int64.from_address(strides + 8 * d).value for d in range(a.ndim)] == list(a.strides)
              and _read(a, off["descr"]) == id(a.dtype)
              and _read(a, off["flags"], ctypes.c_int32) == a.flags.num
              and _read(a.dtype, off["type_num"], ctypes.c_int32) == a.dtype.num
              and _read(a.dtype, off["byteorder"], ctypes.c_char) == a.dtype.byteorder.encode())
        if not ok:
            raise ImportError("NumPy's array struct is not laid out as xopt.engines.cpu_memory expects")
    return off


def _find_type_slot():
    """Where an object's header keeps its type (``ob_type``), checked on probes."""
    probes = [np.empty(3), 1.5, "x", [], {}, np.float64(1.0), 7, None]
    for at in range(8, 33, 8):
        if all(_read(a, at) == id(type(a)) for a in probes):
            return at
    raise ImportError("cannot find an object's type in its header")


def _find_list_layout(ob_type):
    """(where a list keeps its size, where its pointer to the items is), checked on probes."""
    probes = [[np.empty(2), 1.5, "x"], [None] * 9, [], list(range(40))]
    size_at, items_at = ob_type + 8, ob_type + 16
    for lst in probes:
        if _read(lst, size_at) != len(lst):
            raise ImportError("a Python list is not laid out as xopt.engines.cpu_memory expects")
        items = _read(lst, items_at)
        if [ctypes.c_int64.from_address(items + 8 * i).value for i in range(len(lst))] != list(map(id, lst)):
            raise ImportError("a Python list is not laid out as xopt.engines.cpu_memory expects")
    return size_at, items_at


_OFF = _find_struct()
_OB_TYPE = _find_type_slot()
_LIST_SIZE, _LIST_ITEMS = _find_list_layout(_OB_TYPE)
_FOREIGN_ORDER = ord(">" if sys.byteorder == "little" else "<")  # the byte-order mark of a swapped dtype

# What the compiled code reads, by index into OFFSETS.
DATA, ND, DIMS, DESCR, FLAGS, TYPE_NUM, BYTEORDER, FOREIGN, OB_TYPE, NDARRAY, LIST_SIZE, LIST_ITEMS, INT, NONE, \
    STRIDES = range(15)
OFFSETS = np.array([_OFF["data"], _OFF["nd"], _OFF["dims"], _OFF["descr"], _OFF["flags"], _OFF["type_num"],
                    _OFF["byteorder"], _FOREIGN_ORDER, _OB_TYPE, id(np.ndarray), _LIST_SIZE, _LIST_ITEMS, id(int),
                    id(None), _OFF["strides"]], dtype=np.int64)
C_CONTIGUOUS, ALIGNED, WRITEABLE = 0x0001, 0x0100, 0x0400
READ_FLAGS = C_CONTIGUOUS | ALIGNED
WRITE_FLAGS = C_CONTIGUOUS | ALIGNED | WRITEABLE

# The int64 head of a step (see check_step), then per part of the step three "keeps" flags.
HEAD = ("params", "grads", "slot0", "slot1", "slot2", "steps", "n", "param_type", "state_type",
        "param_size", "state_size", "n_parts", "mode", "split_at", "answer")
N_HEAD = len(HEAD)
ANSWER = HEAD.index("answer")  # where a step that did not run leaves its answer

# A step's answers besides 0 (done) and 1 + a refused row, left in the head's ANSWER slot
LARGE = -1  # checked, not run: the caller runs it on several threads, or computes the clip norm first
NONFINITE = -2  # checked, not run: a grad holds a NaN or an Inf (skip_nonfinite)
# A step's mode bit (head[12]; head[13]: from how many elements a step may be split over threads)
CHECK_FINITE = 1

# The int64 block a small step's call reads (cpu_native.step_function): the rule's function, the addresses and
# sizes of OFFSETS, of the head and of the scalars (rows, columns), room for the step's work (WORK_PER_ROW int64
# per tensor) and the exception it sets where it does not run.
CALL = ("function", "offsets", "head", "head_size", "scal", "rows", "cols", "work", "work_size", "not_run")
WORK_PER_ROW = 30  # ptrs (5), sizes (1), byte ranges and their sort (6 rows of 4)
