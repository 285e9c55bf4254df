"""Optimizer state files: a state_dict in and out of an ``.npz`` (checking one: :mod:`xopt.state_check`).

A file is an ``.npz`` archive of a few arrays, whatever the number of params (format
``xopt-state-2``):

- ``meta``: JSON stored in a uint8 array: the optimizer's name, hyperparameters (a
  built-in schedule by name and arguments), overrides, step counts, and the param names
  (``keys``, str or int), buffer names (``buffers``) and dtype names (``dtypes``) the
  other arrays refer to by index;
- ``steps``: int64, the step count of each param, in the order of ``keys``;
- ``table``: int64, one row per buffer: its param, buffer name and dtype (indices), its
  ndim, then its dims (padded with 1 to the widest);
- ``data_<dtype>``: every buffer of that dtype flattened (C order), one after the other
  in the order of the table's rows; bfloat16 (which ``.npy`` lacks) as its bits, uint16.

Nothing is pickled, so loading a file runs no code, and every size is checked against the
bytes the file holds before anything is allocated.  Files of format ``xopt-state-1``
(earlier xopt: one ``.npy`` member per buffer, the state entries in ``meta``) still load.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import stat
import zipfile
import zlib

import numpy as np

from . import _backend
from ._inputs import describe
from .schedules import Schedule, from_spec
from .state_check import SavedCustomSchedule, _short, checked_state

__all__ = ["save_state", "load_state", "checked_state"]

FORMAT = "xopt-state-2"  # what save_state writes
FORMAT_1 = "xopt-state-1"  # what xopt wrote before, which load_state reads too
_INT64_MAX = 2**63 - 1


class _StateFileError(ValueError):
    """A refusal whose message is already final (not wrapped as 'not an xopt state file')."""


def _encode(value):
    """A hyperparameter as JSON: a built-in schedule by name and arguments, a custom one by its repr only."""
    if isinstance(value, Schedule):
        return value.spec()
    if callable(value):
        return {"custom_schedule": repr(value)}
    return value


def _decode(value):
    if isinstance(value, dict) and "schedule" in value:
        return from_spec(value)
    if isinstance(value, dict) and "custom_schedule" in value:
        return SavedCustomSchedule(str(value["custom_schedule"]))
    return value


# -- files -------------------------------------------------------------------------------
def save_state(state_dict, path):
    """Write a state_dict to ``path`` as an ``.npz`` archive (format 2, see the module's docstring).

    Atomic: written to a temp file in the target's directory, flushed to disk, then
    renamed onto it.  A symlink is written through (its target is replaced, the link
    stays) and an existing file keeps its permission bits; a new file gets the
    usual 0o666 less the umask.
    """
    arrays = _pack(state_dict)

    target = os.path.realpath(os.fspath(path))  # through symlinks: the link stays, its target is replaced
    directory = os.path.dirname(target)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = None
    fd, tmp = _new_temp(directory, os.path.basename(target))
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _meta(state_dict, form, **fields):
    meta = {
        "format": form,
        "optimizer": state_dict["optimizer"],
        "hyperparameters": {k: _encode(v) for k, v in state_dict["hyperparameters"].items()},
        "overrides": [[pattern, {k: _encode(v) for k, v in values.items()}]
                      for pattern, values in state_dict.get("overrides", {}).items()],
        "iter": int(state_dict["iter"]),
        "skipped_steps": int(state_dict["skipped_steps"]),
        **fields,
    }
    return np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)


def _saved_key(key):
    if type(key) is not str and (isinstance(key, bool) or not isinstance(key, (str, int))):
        raise TypeError(f"param name {key!r} cannot be saved: names must be str (dict) or int (list)")
    return key


def _pack(state_dict) -> dict:
    """The arrays of a format-2 file: 'meta', 'steps', 'table' and one 'data_<dtype>' per dtype."""
    keys, steps = [], []
    rows, shapes = [], []  # per buffer: its param, buffer name and dtype (indices, flat); its shape
    names, name_at = [], {}  # buffer names in order of appearance
    groups, group_at = [], {}  # per dtype of the file: [native dtype, name, [arrays]]; dtype -> its index
    for i, (key, st) in enumerate(state_dict["state"].items()):
        keys.append(key if type(key) is str or type(key) is int else _saved_key(key))
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
            a = buf if type(buf) is np.ndarray else _backend.to_numpy(buf)
            g = group_at.get(a.dtype)
            if g is None:
                g = group_at[a.dtype] = _group(groups, a.dtype, name, key)
            groups[g][2].append(a)
            rows += (i, n, g)
            shapes.append(a.shape)

    count = len(shapes)
    ndim = np.fromiter(map(len, shapes), dtype=np.int64, count=count)
    table = np.ones((count, _COLUMNS + int(ndim.max(initial=0))), dtype=np.int64)
    table[:, :3] = np.array(rows, dtype=np.int64).reshape(count, 3)
    table[:, 3] = ndim
    dims = table[:, _COLUMNS:]
    dims[np.arange(dims.shape[1]) < ndim[:, None]] = np.fromiter(
        itertools.chain.from_iterable(shapes), dtype=np.int64, count=int(ndim.sum()))
    try:
        steps = np.array(steps, dtype=np.int64)
    except OverflowError:
        at = next(i for i, s in enumerate(steps) if not -2**63 <= s <= _INT64_MAX)
        raise ValueError(f"the step of param {describe(keys[at])} cannot be saved: {_short(steps[at])} is not "
                         "an int64") from None
    arrays = {"meta": _meta(state_dict, FORMAT, keys=keys, buffers=names, dtypes=[name for _, name, _ in groups]),
              "steps": steps, "table": table}
    for native, name, parts in groups:
        flat = np.concatenate(parts, axis=None, dtype=native)  # each buffer in C order, all in native order
        arrays[f"data_{name}"] = flat.view(np.uint16) if name == "bfloat16" else flat  # .npy has no bfloat16
    return arrays


_COLUMNS = 4  # a format-2 table's columns before the dims: param, buffer name, dtype (indices), ndim


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


def _save_v1(state_dict, path):
    """A format-1 file (one .npy member per buffer), as xopt wrote before format 2: for tests of the reader."""
    arrays, entries = {}, []
    for key, st in state_dict["state"].items():
        refs, bits = {}, {}
        for name, buf in st.items():
            if name != "step":
                refs[name] = f"a{len(arrays)}"
                arrays[refs[name]] = _backend.to_numpy(buf)
                if _backend.dtype_name(buf.dtype) == "bfloat16":
                    arrays[refs[name]] = arrays[refs[name]].view(np.uint16)
                    bits[name] = "bfloat16"
        entries.append({"key": _saved_key(key), "step": int(st["step"]), "buffers": refs, "bits_of": bits})
    np.savez(path, meta=_meta(state_dict, FORMAT_1, state=entries), **arrays)


def _new_temp(directory, base):
    """A new file next to the target, created with mode 0o666 so the umask applies as for any new file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def _fsync_directory(directory):
    """Make the rename durable where the platform allows it (POSIX); best effort elsewhere."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_ZIP_MAGIC = b"PK\x03\x04"


def load_state(path) -> dict:
    """Read a file written by :func:`save_state` (format 2, or format 1 of earlier xopt) into a state_dict
    of NumPy arrays in native byte order: each buffer C-contiguous and writeable, sharing no memory with
    another (those of format 2 are views of one fresh array per dtype, each its own span of it).

    Anything else (an ``.npy`` or text file, an empty or truncated file, another
    archive) raises ``ValueError("... is not an xopt state file ...")``; a missing
    file raises FileNotFoundError.
    """
    with open(os.fspath(path), "rb") as f:  # FileNotFoundError, IsADirectoryError, PermissionError pass as they are
        head = f.read(len(_ZIP_MAGIC))
        if head != _ZIP_MAGIC:
            what = "it is empty" if not head else "it is not an .npz (zip) archive"
            raise ValueError(f"{path} is not an xopt state file ({what})")
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as archive:
                return _read(_Archive(archive, path, os.fstat(f.fileno()).st_size), path)
        except _StateFileError as exc:
            raise ValueError(str(exc)) from None
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError, NotImplementedError,
                UnicodeDecodeError, OSError, TypeError, IndexError, OverflowError) as exc:  # truncated, corrupt
            raise ValueError(f"{path} is not an xopt state file ({type(exc).__name__}: {exc})") from exc


def _foreign(path, why):
    return _StateFileError(f"{path} is not an xopt state file ({why})")


class _Archive:
    """The .npy arrays of a zip archive by name (as ``np.load`` names them), read with their sizes checked.

    ``np.load`` allocates whatever shape a member's header claims before reading it;
    here a header must agree with the member's size first, and that size with the
    bytes the file has (a stored member holds at most the file, a deflated one at most
    1032 times what it takes in it), and object arrays are refused.
    """

    def __init__(self, zf, path, length):
        self.zf, self.path, self.length = zf, path, length
        self.members = {}
        for name in zf.namelist():
            self.members.setdefault(name[:-4] if name.endswith(".npy") else name, name)

    def __contains__(self, name):
        return name in self.members

    def __getitem__(self, name):
        member = self.members[name]
        info = self.zf.getinfo(member)
        size = info.file_size
        if (info.compress_size > self.length
                or info.compress_type == zipfile.ZIP_STORED and size != info.compress_size
                or info.compress_type == zipfile.ZIP_DEFLATED and size > 1032 * info.compress_size + 1024):
            raise _foreign(self.path, f"entry {name!r} claims {size} bytes, which the file cannot hold")
        with self.zf.open(member) as m:
            version = np.lib.format.read_magic(m)  # ValueError if it is no .npy
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(m)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(m)
            else:
                raise _foreign(self.path, f"entry {name!r} is a version {version} .npy")
            if dtype.hasobject:
                raise _foreign(self.path, f"entry {name!r} holds Python objects")
            count = int(np.prod(shape, dtype=object))
            nbytes = count * dtype.itemsize
            if nbytes != size - m.tell():
                raise _foreign(self.path, f"entry {name!r} claims shape {shape} of {dtype} ({nbytes} bytes) "
                                          f"but holds {size - m.tell()} bytes")
            data = m.read(nbytes)  # the zip's CRC is checked on reaching the end
        if len(data) != nbytes:
            raise _foreign(self.path, f"entry {name!r} is truncated")
        a = np.frombuffer(data, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")
        native = dtype if dtype.isnative else dtype.newbyteorder("=")  # re-saved big-endian, say
        return np.array(a, dtype=native, order="C", copy=True)


def _read(archive, path):
    if "meta" not in archive:
        raise _foreign(path, "no 'meta' entry")
    blob = archive["meta"]
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise _foreign(path, "its 'meta' entry is not the uint8 text xopt writes")
    meta = json.loads(blob.tobytes().decode("utf-8"))
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), str):
        raise _foreign(path, "its 'meta' entry is not xopt's")
    if meta["format"] not in _READERS:
        if meta["format"].startswith("xopt-state-"):
            raise _StateFileError(f"{path} has format {meta['format']!r}; this xopt reads "
                                  f"{' and '.join(map(repr, _READERS))}")
        raise _foreign(path, f"format {meta['format']!r}")
    kinds = {"optimizer": str, "hyperparameters": dict, **_READERS[meta["format"]][1]}
    for field, kind in kinds.items():
        if not isinstance(meta.get(field), kind):
            raise _foreign(path, f"'meta' has no {field} {kind.__name__}")
    for field in ("iter", "skipped_steps"):
        if field not in meta:
            raise _foreign(path, f"'meta' has no {field}")
    state = _READERS[meta["format"]][0](archive, meta, path)
    overrides = meta.get("overrides", [])
    if not (isinstance(overrides, list) and all(isinstance(o, list) and len(o) == 2 and isinstance(o[1], dict)
                                                 for o in overrides)):
        raise _foreign(path, "its 'overrides' are not xopt's")
    try:
        hyper = {k: _decode(v) for k, v in meta["hyperparameters"].items()}
        overrides = {pattern: {k: _decode(v) for k, v in values.items()} for pattern, values in overrides}
    except (TypeError, ValueError, KeyError) as exc:
        raise _foreign(path, f"a schedule it names cannot be made ({exc})") from None
    return {
        "optimizer": meta["optimizer"],
        "hyperparameters": hyper,
        "overrides": overrides,
        "iter": meta["iter"],
        "skipped_steps": meta["skipped_steps"],
        "state": state,
    }


def _state_v1(archive, meta, path):
    """Format 1: the state entries in 'meta', each buffer an .npy member of its own."""
    state = {}
    for entry in meta["state"]:
        if not (isinstance(entry, dict) and {"key", "step", "buffers"} <= set(entry)
                and isinstance(entry["buffers"], dict) and isinstance(entry.get("bits_of", {}), dict)):
            raise _foreign(path, "a malformed state entry")
        key = entry["key"]
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise _foreign(path, f"param name {key!r} is neither str nor int")
        if key in state:
            raise _foreign(path, f"param {describe(key)} appears twice")
        st = {"step": entry["step"]}
        for name, ref in entry["buffers"].items():
            if name == "step" or not isinstance(ref, str) or ref == "meta" or ref not in archive:
                raise _foreign(path, f"buffer {name!r} of param {describe(key)} has no array")
            buf = archive[ref]  # in native byte order: the kernels read raw bytes
            bits = entry.get("bits_of", {}).get(name)
            if bits == "bfloat16":
                if buf.dtype != np.uint16:
                    raise _foreign(path, f"buffer {name!r} of param {describe(key)}: bfloat16 bits stored as "
                                         f"{buf.dtype}, not uint16")
                buf = buf.view(_backend.low_precision_dtype(np, "bfloat16"))
            elif bits is not None:
                raise _foreign(path, f"buffer {name!r} of param {describe(key)} is stored as {bits!r}")
            st[name] = buf
        state[key] = st
    return state


def _int_table(archive, name, ndim, path):
    if name not in archive:
        raise _foreign(path, f"no {name!r} entry")
    a = archive[name]
    if a.dtype != np.int64 or a.ndim != ndim:
        raise _foreign(path, f"its {name!r} entry is not the {ndim}-d int64 array xopt writes")
    return a


def _state_v2(archive, meta, path):
    """Format 2: the param names in 'meta', their steps in 'steps', one row per buffer in 'table' and the
    buffers of one dtype one after the other in 'data_<dtype>'; every size checked before a buffer is made."""
    keys, names, dtypes = meta["keys"], meta["buffers"], meta["dtypes"]
    for key in keys:
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise _foreign(path, f"param name {_short(key)} is neither str nor int")
    if len(set(keys)) != len(keys):
        seen = set()
        raise _foreign(path, f"param {describe(next(k for k in keys if k in seen or seen.add(k)))} appears twice")
    for what, listed in (("buffer", names), ("dtype", dtypes)):
        if not all(isinstance(n, str) and n != "step" for n in listed) or len(set(listed)) != len(listed):
            raise _foreign(path, f"its {what} names are not xopt's")
    steps = _int_table(archive, "steps", 1, path)
    if len(steps) != len(keys):
        raise _foreign(path, f"it has {len(steps)} steps for {len(keys)} params")
    flats = [_data(archive, dname, path) for dname in dtypes]
    table = _int_table(archive, "table", 2, path)
    rows, width = table.shape
    if not _COLUMNS <= width <= _COLUMNS + 64:
        raise _foreign(path, f"its table has {width} columns")
    param, buf_name, dtype, ndim = table[:, 0], table[:, 1], table[:, 2], table[:, 3]
    dims = table[:, _COLUMNS:]
    for column, what, bound in ((param, "a param index", len(keys)), (buf_name, "a buffer name index", len(names)),
                                (dtype, "a dtype index", len(dtypes)), (ndim, "an ndim", width - _COLUMNS + 1)):
        if rows and not (0 <= column.min() and column.max() < bound):
            raise _foreign(path, f"its table has {what} out of range")
    pad = np.arange(dims.shape[1]) >= ndim[:, None]
    if np.any(dims[pad] != 1) or np.any(dims < 0):
        raise _foreign(path, "its table holds a shape xopt does not write")
    which = param * len(names) + buf_name  # in increasing order as xopt writes them, else sorted to compare
    if rows > 1 and not np.all(which[1:] > which[:-1]) and len(np.unique(which)) != rows:
        raise _foreign(path, "its table names a buffer twice")
    # The size of each buffer, without overflow: none holds more than its dtype's data has.
    largest = max((len(f) for f in flats), default=0)
    empty = np.any(dims == 0, axis=1)
    if np.any(dims[~empty] > largest) or np.any(np.prod(dims[~empty].astype(np.float64), axis=1) > largest):
        raise _foreign(path, "its table claims a buffer larger than the data it has")
    sizes = np.where(empty, 0, np.prod(dims, axis=1))
    starts = np.empty(rows, dtype=np.int64)
    for d, flat in enumerate(flats):
        at = np.flatnonzero(dtype == d)
        ends = np.cumsum(sizes[at])
        if (ends[-1] if len(ends) else 0) != len(flat):
            raise _foreign(path, f"its table claims {ends[-1] if len(ends) else 0} {dtypes[d]} numbers but "
                                 f"its data has {len(flat)}")
        starts[at] = ends - sizes[at]

    # Each buffer a view of its own span of its dtype's data: the spans do not overlap, and the data
    # arrays are this state's alone (fresh, writeable, C-contiguous, native).
    state = {key: {"step": step} for key, step in zip(keys, steps.tolist())}
    shaped = {i: tuple(row[_COLUMNS:_COLUMNS + row[3]]) for i, row in zip(
        np.flatnonzero(ndim != 1).tolist(), table[ndim != 1].tolist())}
    for i, (p, n, d, start, end) in enumerate(zip(param.tolist(), buf_name.tolist(), dtype.tolist(),
                                                  starts.tolist(), (starts + sizes).tolist())):
        buf = flats[d][start:end]
        state[keys[p]][names[n]] = buf if i not in shaped else buf.reshape(shaped[i])
    return state


def _data(archive, dname, path):
    """The numbers of one dtype, bfloat16 kept as its bits (uint16)."""
    name = f"data_{dname}"
    if name not in archive:
        raise _foreign(path, f"no {name!r} entry")
    flat = archive[name]
    stored = np.dtype(np.uint16) if dname == "bfloat16" else None
    if flat.ndim != 1 or (flat.dtype != stored if stored is not None else
                          flat.dtype.kind not in "biufc" or flat.dtype.name != dname):
        raise _foreign(path, f"its {name!r} entry is {flat.dtype} {flat.shape}, not 1-d {dname}"
                             + (" bits (uint16)" if stored is not None else ""))
    return flat.view(_backend.low_precision_dtype(np, "bfloat16")) if stored is not None else flat


# format -> (its reader, the fields its 'meta' holds besides those of every format)
_READERS = {FORMAT_1: (_state_v1, {"state": list}),
            FORMAT: (_state_v2, {"keys": list, "buffers": list, "dtypes": list})}
