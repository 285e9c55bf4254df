"""Reading a state file, member by member: each array read in blocks into memory of its own.

A member's bytes go from the file into the array that keeps them, :data:`~xopt.state_format.BLOCK`
bytes at a time, so a load takes the state's memory and one block, not the state twice.  Every size
is checked against the bytes the file holds before anything is allocated.
"""

from __future__ import annotations

import json
import os
import tokenize
import zipfile
import zlib

import numpy as np

from . import _backend, _pages
from ._inputs import describe
from .state_check import _short
from .state_format import (BLOCK, COLUMNS, FORMAT, FORMAT_1, STANDARD_FIELDS, StateFileError, decode, foreign,
                           loaded_key)

__all__ = ["load_state"]

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
        except StateFileError as exc:
            raise ValueError(str(exc)) from None
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError, NotImplementedError,
                UnicodeDecodeError, OSError, TypeError, IndexError, OverflowError, SyntaxError, tokenize.TokenError,
                RuntimeError) as exc:  # truncated, corrupt (zipfile: RuntimeError for an entry flagged encrypted;
            # a .npy header NumPy cannot parse: SyntaxError or tokenize's TokenError from its header filter)
            raise ValueError(f"{path} is not an xopt state file ({type(exc).__name__}: {exc})") from exc


class _Archive:
    """The .npy arrays of a zip archive by name (as ``np.load`` names them), read with their sizes checked.

    ``np.load`` allocates whatever shape a member's header claims before reading it;
    here a header must agree with the member's size first, and that size with the
    bytes the file has (a stored member holds at most the file, a deflated one at most
    1032 times what it takes in it; other compressions, unbounded, are refused), and object
    arrays are refused.
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
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            # bzip2 and LZMA have no bound on how much a few bytes expand to (1 KiB of bzip2: hundreds of MiB),
            # so no size of theirs can be checked against the file's; xopt writes stored, np.savez_compressed deflates
            raise foreign(self.path, f"entry {name!r} is compressed with zip method {info.compress_type}, "
                                     "not stored or deflated")
        if (info.compress_size > self.length
                or info.compress_type == zipfile.ZIP_STORED and size != info.compress_size
                or info.compress_type == zipfile.ZIP_DEFLATED and size > 1032 * info.compress_size + 1024):
            raise foreign(self.path, f"entry {name!r} claims {size} bytes, which the file cannot hold")
        with self.zf.open(member) as m:
            version = np.lib.format.read_magic(m)  # ValueError if it is no .npy
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(m)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(m)
            else:
                raise foreign(self.path, f"entry {name!r} is a version {version} .npy")
            if dtype.hasobject:
                raise foreign(self.path, f"entry {name!r} holds Python objects")
            count = int(np.prod(shape, dtype=object))
            nbytes = count * dtype.itemsize
            if nbytes != size - m.tell():
                raise foreign(self.path, f"entry {name!r} claims shape {shape} of {dtype} ({nbytes} bytes) "
                                          f"but holds {size - m.tell()} bytes")
            a = _pages.empty(shape[::-1] if fortran else shape, dtype)
            _read_into(m, a.reshape(-1).view(np.uint8), self.path, name)
        if fortran:  # xopt writes none; another writer might
            a = np.ascontiguousarray(a.T)
        if not dtype.isnative:  # re-saved big-endian, say: the kernels read raw bytes
            a = a.byteswap(inplace=True).view(dtype.newbyteorder("="))
        return a


def _read_into(member, out, path, name):
    """Fill the bytes ``out`` from ``member``, a block at a time; its end must come right after them."""
    view, at = memoryview(out), 0
    while at < len(view):
        got = member.readinto(view[at:at + BLOCK])
        if not got:
            raise foreign(path, f"entry {name!r} is truncated")
        at += got
    if member.read(1):  # also where the zip's CRC is checked, on reaching the end
        raise foreign(path, f"entry {name!r} holds more than its header says")


def _read(archive, path):
    if "meta" not in archive:
        raise foreign(path, "no 'meta' entry")
    blob = archive["meta"]
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise foreign(path, "its 'meta' entry is not the uint8 text xopt writes")
    meta = json.loads(blob.tobytes().decode("utf-8"))
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), str):
        raise foreign(path, "its 'meta' entry is not xopt's")
    if meta["format"] not in _READERS:
        if meta["format"].startswith("xopt-state-"):
            raise StateFileError(f"{path} has format {meta['format']!r}; this xopt reads "
                                  f"{' and '.join(map(repr, _READERS))}")
        raise foreign(path, f"format {meta['format']!r}")
    kinds = {"optimizer": str, "hyperparameters": dict, **_READERS[meta["format"]][1]}
    for field, kind in kinds.items():
        if not isinstance(meta.get(field), kind):
            raise foreign(path, f"'meta' has no {field} {kind.__name__}")
    for field in ("iter", "skipped_steps"):
        if field not in meta:
            raise foreign(path, f"'meta' has no {field}")
    state = _READERS[meta["format"]][0](archive, meta, path)
    overrides = meta.get("overrides", [])
    if not (isinstance(overrides, list) and all(isinstance(o, list) and len(o) == 2 and isinstance(o[1], dict)
                                                 for o in overrides)):
        raise foreign(path, "its 'overrides' are not xopt's")
    try:
        hyper = {k: decode(v) for k, v in meta["hyperparameters"].items()}
        overrides = {pattern: {k: decode(v) for k, v in values.items()} for pattern, values in overrides}
    except (TypeError, ValueError, KeyError) as exc:
        raise foreign(path, f"a schedule it names cannot be made ({exc})") from None
    extra = meta.get("extra", {})  # an optimizer's own plain fields, as state_dict() gave them
    if not (isinstance(extra, dict) and all(type(v) in (bool, int, float, str) for v in extra.values())
            and not STANDARD_FIELDS & set(extra)):
        raise foreign(path, "its 'extra' fields are not xopt's")
    return {
        **extra,
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
            raise foreign(path, "a malformed state entry")
        key = loaded_key(entry["key"])
        if key is None:
            raise foreign(path, f"param name {entry['key']!r} is neither str nor int, nor a list of them")
        if key in state:
            raise foreign(path, f"param {describe(key)} appears twice")
        st = {"step": entry["step"]}
        for name, ref in entry["buffers"].items():
            if name == "step" or not isinstance(ref, str) or ref == "meta" or ref not in archive:
                raise foreign(path, f"buffer {name!r} of param {describe(key)} has no array")
            buf = archive[ref]  # in native byte order: the kernels read raw bytes
            bits = entry.get("bits_of", {}).get(name)
            if bits == "bfloat16":
                if buf.dtype != np.uint16:
                    raise foreign(path, f"buffer {name!r} of param {describe(key)}: bfloat16 bits stored as "
                                         f"{buf.dtype}, not uint16")
                buf = buf.view(_backend.low_precision_dtype(np, "bfloat16"))
            elif bits is not None:
                raise foreign(path, f"buffer {name!r} of param {describe(key)} is stored as {bits!r}")
            st[name] = buf
        state[key] = st
    return state


def _int_table(archive, name, ndim, path):
    if name not in archive:
        raise foreign(path, f"no {name!r} entry")
    a = archive[name]
    if a.dtype != np.int64 or a.ndim != ndim:
        raise foreign(path, f"its {name!r} entry is not the {ndim}-d int64 array xopt writes")
    return a


def _state_v2(archive, meta, path):
    """Format 2: the param names in 'meta', their steps in 'steps', one row per buffer in 'table' and the
    buffers of one dtype one after the other in 'data_<dtype>'; every size checked before a buffer is made."""
    names, dtypes = meta["buffers"], meta["dtypes"]
    keys = [loaded_key(key) for key in meta["keys"]]
    if None in keys:
        key = meta["keys"][keys.index(None)]
        raise foreign(path, f"param name {_short(key)} is neither str nor int, nor a list of them")
    if len(set(keys)) != len(keys):
        seen = set()
        raise foreign(path, f"param {describe(next(k for k in keys if k in seen or seen.add(k)))} appears twice")
    for what, listed in (("buffer", names), ("dtype", dtypes)):
        if not all(isinstance(n, str) and n != "step" for n in listed) or len(set(listed)) != len(listed):
            raise foreign(path, f"its {what} names are not xopt's")
    steps = _int_table(archive, "steps", 1, path)
    if len(steps) != len(keys):
        raise foreign(path, f"it has {len(steps)} steps for {len(keys)} params")
    flats = [_data(archive, dname, path) for dname in dtypes]
    table = _int_table(archive, "table", 2, path)
    rows, width = table.shape
    if not COLUMNS <= width <= COLUMNS + 64:
        raise foreign(path, f"its table has {width} columns")
    param, buf_name, dtype, ndim = table[:, 0], table[:, 1], table[:, 2], table[:, 3]
    dims = table[:, COLUMNS:]
    for column, what, bound in ((param, "a param index", len(keys)), (buf_name, "a buffer name index", len(names)),
                                (dtype, "a dtype index", len(dtypes)), (ndim, "an ndim", width - COLUMNS + 1)):
        if rows and not (0 <= column.min() and column.max() < bound):
            raise foreign(path, f"its table has {what} out of range")
    pad = np.arange(dims.shape[1]) >= ndim[:, None]
    if np.any(dims[pad] != 1) or np.any(dims < 0):
        raise foreign(path, "its table holds a shape xopt does not write")
    which = param * len(names) + buf_name  # in increasing order as xopt writes them, else sorted to compare
    if rows > 1 and not np.all(which[1:] > which[:-1]) and len(np.unique(which)) != rows:
        raise foreign(path, "its table names a buffer twice")
    # The size of each buffer, without overflow: none holds more than its dtype's data has.
    largest = max((len(f) for f in flats), default=0)
    empty = np.any(dims == 0, axis=1)
    if np.any(dims[~empty] > largest) or np.any(np.prod(dims[~empty].astype(np.float64), axis=1) > largest):
        raise foreign(path, "its table claims a buffer larger than the data it has")
    sizes = np.where(empty, 0, np.prod(dims, axis=1))
    starts = np.empty(rows, dtype=np.int64)
    for d, flat in enumerate(flats):
        at = np.flatnonzero(dtype == d)
        ends = np.cumsum(sizes[at])
        if (ends[-1] if len(ends) else 0) != len(flat):
            raise foreign(path, f"its table claims {ends[-1] if len(ends) else 0} {dtypes[d]} numbers but "
                                 f"its data has {len(flat)}")
        starts[at] = ends - sizes[at]

    # Each buffer a view of its own span of its dtype's data: the spans do not overlap, and the data
    # arrays are this state's alone (fresh, writeable, C-contiguous, native).
    state = {key: {"step": step} for key, step in zip(keys, steps.tolist())}
    shaped = {i: tuple(row[COLUMNS:COLUMNS + row[3]]) for i, row in zip(
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
        raise foreign(path, f"no {name!r} entry")
    flat = archive[name]
    stored = np.dtype(np.uint16) if dname == "bfloat16" else None
    if flat.ndim != 1 or (flat.dtype != stored if stored is not None else
                          flat.dtype.kind not in "biufc" or flat.dtype.name != dname):
        raise foreign(path, f"its {name!r} entry is {flat.dtype} {flat.shape}, not 1-d {dname}"
                             + (" bits (uint16)" if stored is not None else ""))
    return flat.view(_backend.low_precision_dtype(np, "bfloat16")) if stored is not None else flat


# format -> (its reader, the fields its 'meta' holds besides those of every format)
_READERS = {FORMAT_1: (_state_v1, {"state": list}),
            FORMAT: (_state_v2, {"keys": list, "buffers": list, "dtypes": list})}
