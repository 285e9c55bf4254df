"""Writing a state_dict as a format-2 file, buffer by buffer: no copy of the state is made.

:func:`plan` checks everything a file cannot hold and lays out the small members ('meta', 'steps',
'table') before a byte is written; :func:`write` then streams each dtype's buffers into its
'data_<dtype>' member, the small ones gathered into blocks of :data:`~xopt.state_format.BLOCK`
bytes, the others written from their own memory.  The memory a save takes beyond the state is one
block, and one buffer only where a buffer must be converted first (a device array brought to the
host, a byte-swapped or strided one put in native C order).
"""

from __future__ import annotations

import itertools
import zipfile

import numpy as np
from array_api_compat import is_torch_array

from . import _backend
from ._inputs import describe
from .state_check import _short
from .state_format import BLOCK, COLUMNS, FORMAT, INT64_MAX, meta_array, saved_key

__all__ = ["plan", "write"]


class Plan:
    """The small members of a file ('meta', 'steps', 'table'), and per dtype of the file: (native dtype, its
    name, number of elements, [buffers]); ``culprit(g, j)`` names buffer ``j`` of dtype ``g``."""

    __slots__ = ("small", "groups", "keys", "names")

    def __init__(self, small, groups, keys, names):
        self.small, self.groups, self.keys, self.names = small, groups, keys, names

    def culprit(self, g, j) -> str:
        table = self.small["table"]
        row = table[np.flatnonzero(table[:, 2] == g)[j]]
        return f"state {self.names[row[1]]!r} of param {describe(self.keys[row[0]])}"


def plan(state_dict) -> Plan:
    """Check that a file can hold ``state_dict`` and lay it out; raises TypeError/ValueError naming the
    culprit, before anything is written."""
    keys, steps = [], []
    rows, shapes = [], []  # per buffer: its param, buffer name and dtype (indices, flat); its shape
    names, name_at = [], {}  # buffer names in order of appearance
    groups, group_at = [], {}  # per dtype of the file: [native dtype, name, [buffers]]; dtype -> index
    last = None, None  # the dtype of the buffer before and its index: most buffers share one
    append_shape = shapes.append
    for i, (key, st) in enumerate(state_dict["state"].items()):
        keys.append(key if type(key) is str or type(key) is int else saved_key(key))
        steps.append(int(st["step"]))
        for name, buf in st.items():
            if name == "step":
                continue
            n = name_at.get(name)
            if n is None:
                if not isinstance(name, str):
                    raise TypeError(f"state {name!r} of param {describe(key)} cannot be saved: buffer names "
                                    "must be str")
                n = name_at[name] = len(names)
                names.append(name)
            if type(buf) is np.ndarray:
                dtype = buf.dtype
                append_shape(buf.shape)
            else:
                dtype = _numpy_dtype(buf, name, key)
                append_shape(tuple(buf.shape))
            if dtype is last[0]:
                g = last[1]
            else:
                g = group_at.get(dtype)
                if g is None:
                    g = group_at[dtype] = _group(groups, dtype, name, key)
                last = dtype, g
            groups[g][2].append(buf)
            rows += (i, n, g)

    count = len(shapes)
    ndim = np.fromiter(map(len, shapes), dtype=np.int64, count=count)
    table = np.ones((count, COLUMNS + int(ndim.max(initial=0))), dtype=np.int64)
    table[:, :3] = np.array(rows, dtype=np.int64).reshape(count, 3)
    table[:, 3] = ndim
    dims = table[:, COLUMNS:]
    dims[np.arange(dims.shape[1]) < ndim[:, None]] = np.fromiter(
        itertools.chain.from_iterable(shapes), dtype=np.int64, count=int(ndim.sum()))
    sizes = np.prod(dims, axis=1)  # the padding is 1s
    try:
        steps = np.array(steps, dtype=np.int64)
    except OverflowError:
        at = next(i for i, s in enumerate(steps) if not -2**63 <= s <= INT64_MAX)
        raise ValueError(f"the step of param {describe(keys[at])} cannot be saved: {_short(steps[at])} is not "
                         "an int64") from None
    meta = meta_array(state_dict, FORMAT, keys=keys, buffers=names, dtypes=[g[1] for g in groups])
    laid_out = [(native, dname, int(sizes[table[:, 2] == g].sum()), buffers)
                for g, (native, dname, buffers) in enumerate(groups)]
    return Plan({"meta": meta, "steps": steps, "table": table}, laid_out, keys, names)


def _numpy_dtype(buf, name, key):
    """The NumPy dtype a buffer of another library becomes on the host (its dtype is not NumPy's: torch's)."""
    dtype = buf.dtype
    if isinstance(dtype, np.dtype):  # CuPy's and Dask's
        return dtype
    dname = _backend.dtype_name(dtype)
    if dname == "bfloat16":
        return np.dtype(_backend.low_precision_dtype(np, "bfloat16"))
    try:
        return np.dtype(dname)
    except TypeError:
        raise TypeError(f"state {name!r} of param {describe(key)} has dtype {dtype}, which a state file cannot "
                        "hold (it holds numbers)") from None


def _group(groups, dtype, name, key) -> int:
    """The index of the file's dtype for buffers of ``dtype`` (native and byte-swapped ones share one)."""
    dname = _backend.dtype_name(dtype)
    if dname != "bfloat16" and dtype.kind not in "biufc":
        raise TypeError(f"state {name!r} of param {describe(key)} has dtype {dtype}, which a state file "
                        "cannot hold (it holds numbers)")
    native = dtype.newbyteorder("=") if not dtype.isnative else dtype
    for g, (other, other_name, _) in enumerate(groups):
        if other_name == dname:
            if other != native:
                raise TypeError(f"state {name!r} of param {describe(key)} has dtype {dtype}, another dtype "
                                f"than the {other} of others named {dname}")
            return g
    groups.append([native, dname, []])
    return len(groups) - 1


def write(f, laid_out: Plan):
    """Write the file ``plan`` laid out into the binary file ``f`` (an .npz archive, stored)."""
    archive = _Zip(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
    for name, a in laid_out.small.items():
        with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, a, allow_pickle=False)
    for g, (native, dname, count, buffers) in enumerate(laid_out.groups):
        stored = np.dtype(np.uint16) if dname == "bfloat16" else native  # .npy has no bfloat16: its bits
        with archive.open(f"data_{dname}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": np.lib.format.dtype_to_descr(stored),
                                                          "fortran_order": False, "shape": (count,)})
            written = _stream(member, native, buffers, lambda j, g=g: laid_out.culprit(g, j))
        if written != count * native.itemsize:
            raise RuntimeError(f"the {dname} buffers changed while they were saved ({written} bytes written "
                               f"for {count} numbers): save the state between steps")
    archive.close()


class _Zip(zipfile.ZipFile):
    """A ZipFile closed only by its own ``close()``: one abandoned with its temp file (an error, or a signal's
    KeyboardInterrupt mid-write, even mid-construction) writes nothing more when collected.

    ZipFile's ``__del__`` closes it: after an interruption with a member still open that raised into the output,
    and, being Python code, it was a place where a signal's KeyboardInterrupt came to be lost ("Exception
    ignored in __del__").  Here ``__del__`` is a C method that does nothing (``object.__sizeof__``)."""

    __del__ = object.__sizeof__


def _stream(member, native, buffers, culprit) -> int:
    """Write ``buffers`` one after the other in C order and ``native`` byte order; return the bytes written."""
    pending, pending_bytes, written = [], 0, 0
    fits = {native: True}  # dtype -> whether it is ``native`` in some byte order (dtype.name is slow to ask)
    for j, buf in enumerate(buffers):
        a = _host(buf)
        ok = fits.get(a.dtype)
        if ok is None:
            ok = fits[a.dtype] = _backend.dtype_name(a.dtype) == _backend.dtype_name(native)
        if not ok:
            raise RuntimeError(f"{culprit(j)} came to the host as {a.dtype}, not {native}")
        if a.nbytes < BLOCK:
            pending.append(a)
            pending_bytes += a.nbytes
            if pending_bytes >= BLOCK:
                written += _write_block(member, np.concatenate(pending, axis=None, dtype=native))
                pending, pending_bytes = [], 0
            continue
        if pending:
            written += _write_block(member, np.concatenate(pending, axis=None, dtype=native))
            pending, pending_bytes = [], 0
        if not (a.flags.c_contiguous and a.dtype == native):
            a = np.ascontiguousarray(a, dtype=native)  # one buffer's copy, freed before the next
        written += _write_block(member, a)
    if pending:
        written += _write_block(member, np.concatenate(pending, axis=None, dtype=native))
    return written


def _write_block(member, a) -> int:
    data = a.reshape(-1).view(np.uint8)
    member.write(memoryview(data))
    return data.size


def _host(buf) -> np.ndarray:
    """``buf`` as a NumPy array: itself, a view of a CPU tensor's memory, else a host copy (one buffer)."""
    if type(buf) is np.ndarray:
        return buf
    if is_torch_array(buf) and buf.device.type == "cpu":
        try:
            return buf.detach().numpy()
        except (TypeError, RuntimeError):  # a dtype NumPy lacks (bfloat16)
            pass
    if isinstance(buf, np.ndarray):
        return np.asarray(buf)
    return _backend.to_numpy(buf)
