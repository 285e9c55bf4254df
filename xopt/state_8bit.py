"""Where the 8-bit state (``state_dtype="8bit"``, format in :mod:`xopt.engines.blockwise`) meets the rest:
the dtype a param's state is kept in, the state a param starts from, its checks, and the conversions a
load makes (a float state into an 8-bit optimizer is quantized, an 8-bit state into another is
dequantized)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from . import _backend, _pages
from ._inputs import describe
from .engines import blockwise
from .engines.blockwise import REFERENCE_CHUNK, SUFFIX, dequantize, is_8bit, map_of, n_blocks, quantize

__all__ = ["buffer_dtype", "state_for", "check_state", "convert", "holds_8bit", "checked_entry", "full_dtype"]


def buffer_dtype(opt, e):
    """uint8 (the codes) for a NumPy or CuPy param of at least ``min_8bit_size`` elements, its compute dtype for a
    smaller one; raises for other array libraries."""
    p = e.p
    if type(p) is np.ndarray:
        size = p.size
    elif _backend.library_name(p) in blockwise.LIBRARIES or isinstance(p, (float, np.floating)):
        size = math.prod(np.shape(p))
    else:
        raise TypeError(f"param {describe(e.key)}: state_dtype='8bit' is supported for NumPy and CuPy arrays "
                        f"only, not {_backend.library_name(p)}")
    if is_8bit(opt, size):
        return _CODES
    return _backend.compute_dtype(e.xp, p.dtype)


_CODES = np.dtype(np.uint8)


def holds_8bit(st) -> bool:
    """Whether a param's state dict holds 8-bit buffers."""
    return any(isinstance(name, str) and name.endswith(SUFFIX) for name in st)


def state_for(opt, e):
    """The state of an 8-bit param, its missing buffers made (each the quantized start value) and read-only
    ones (a file's, a user's) copied; a CuPy param's on its device (a file's NumPy buffers moved there)."""
    st = opt.state.setdefault(e.key, {"step": 0})
    view = e.opt or opt
    block = opt._hyper["block_size"]
    host = type(e.p) is np.ndarray
    for slot, name in enumerate(view.buffers()):
        if st.get(name) is None:
            # every block of a constant has the same codes and absmax: those of one (no param-sized temporaries)
            codes, absmax = quantize(np, np.full(1, view.initial_value(name), dtype=np.float32),
                                     map_of(view, name), block)
            nb = n_blocks(math.prod(e.p.shape), block)
            if host:
                st[name] = _pages.full(e.p.shape, codes[0], np.uint8, e.p, slot)
                st[name + SUFFIX] = np.full(nb, absmax[0], dtype=np.float32)
            else:
                xp, where = e.xp, _backend.device(e.p)
                st[name] = xp.full(e.p.shape, int(codes[0]), dtype=xp.uint8, device=where)
                st[name + SUFFIX] = xp.full(nb, float(absmax[0]), dtype=xp.float32, device=where)
        for key in (name, name + SUFFIX):
            buf = st[key]
            if type(buf) is not type(e.p):  # a file's (NumPy) for a CuPy param, a CuPy state for a NumPy one
                buf = _native(_on_host(buf))
                st[key] = buf if host else _backend.from_numpy(buf, e.p)
            elif host:
                # the kernel reads raw bytes of native byte order: a big-endian absmax is stepped as a native copy
                # (and a misaligned one as an aligned copy, which the lane takes at the next steps)
                if (not buf.flags.writeable or not buf.flags.c_contiguous or not buf.dtype.isnative
                        or not buf.flags.aligned):
                    st[key] = _native(buf)
            elif not getattr(getattr(buf, "flags", None), "c_contiguous", True):  # what the CUDA kernel takes
                st[key] = buf.copy(order="C")
    return st


def check_state(opt, e, st):
    """Every 8-bit buffer of e's state (uint8 codes of the param's shape) has its absmax: float32, one per block (a
    NumPy or CuPy array: the step moves it to the param's library, :func:`state_for`)."""
    block = opt._hyper["block_size"]
    want = (n_blocks(math.prod(e.p.shape), block),)
    for name in (e.opt or opt).buffers():
        codes = st.get(name)
        dtype = getattr(codes, "dtype", None)
        if dtype is None or _backend.dtype_name(dtype) != "uint8" or tuple(codes.shape) != tuple(e.p.shape):
            continue  # missing (made afresh), or not codes of e's shape: the checks that follow name what it is
        absmax = st.get(name + SUFFIX)
        if (absmax is None or not _array(absmax) or _backend.dtype_name(absmax.dtype) != "float32"
                or tuple(absmax.shape) != want):
            have = "missing" if absmax is None else f"{type(absmax).__name__} {getattr(absmax, 'dtype', '')} " \
                                                   f"{tuple(getattr(absmax, 'shape', ()))}"
            raise ValueError(f"param {describe(e.key)}: its 8-bit state {name!r} needs {name + SUFFIX!r}, float32 of "
                             f"shape {want} (block_size={block}), got {have}")


def convert(trial, state, arrays, saved_block):
    """``state`` (a state_dict's, param key -> dict) in the layout ``trial`` keeps: float buffers of params
    it keeps 8-bit quantized, 8-bit buffers of params it does not dequantized (to the compute dtype of the param
    in ``arrays`` where given, else to float32, which a float64 param's next step widens, exactly);
    ``saved_block``: the block size the state was made with.
    Entries that need neither are passed through as they are (the usual checks follow); returns a new dict, or
    ``state`` itself where nothing changes."""
    eight = trial._hyper.get("state_dtype") == "8bit"
    if not eight and not any(isinstance(st, Mapping) and holds_8bit(st) for st in state.values()):
        return state
    out = {}
    for key, st in state.items():
        if not isinstance(st, Mapping):
            out[key] = st
            continue
        names = [n for n in st if n != "step" and not (isinstance(n, str) and n.endswith(SUFFIX))]
        p = None if arrays is None else arrays.get(key)
        if isinstance(p, (float, np.floating)):  # a number param steps as a 0-d array of its dtype (float: float64)
            p = np.asarray(p)
        size = _size(st, names, p)
        want_8bit = eight and size is not None and is_8bit(trial, size)
        out[key] = _converted(trial, key, st, names, want_8bit, p, saved_block)
    return out


def _size(st, names, p):
    if p is not None and hasattr(p, "shape"):
        return math.prod(p.shape)
    for name in names:
        shape = getattr(st[name], "shape", None)
        if shape is not None:
            return math.prod(shape)
    return None


def _converted(trial, key, st, names, want_8bit, p, saved_block):
    block = trial._hyper.get("block_size")
    bfloat16 = trial._hyper.get("state_dtype") == "bfloat16"
    entry = dict(st)
    for name in names:
        buf = st[name]
        absmax = st.get(name + SUFFIX)
        if absmax is None and not want_8bit:
            if bfloat16 and _array(buf) and _backend.is_real_floating(_backend.namespace(buf), buf.dtype):
                # a float buffer of an 8-bit optimizer's state (a param below min_8bit_size) into one that keeps
                # bfloat16, which keeps its own state_dtype here: rounded, as setting state_dtype rounds it
                entry[name] = _backend.namespace(buf).astype(buf, _backend.low_precision_dtype(
                    _backend.namespace(buf), "bfloat16"))
            continue
        for what, a in ((name, buf), (name + SUFFIX, absmax)):
            if a is not None and not _array(a):
                raise TypeError(f"state {what!r} of param {describe(key)}: 8-bit state converts from and to NumPy "
                                f"and CuPy arrays only, got {type(a).__name__}")
        if absmax is not None:
            _check_blocks(key, name, buf, absmax, saved_block)
            if want_8bit and saved_block == block:
                continue  # kept as it is: the usual 8-bit checks follow
            buf, absmax = _on_host(buf), _on_host(absmax)  # converted on the host (a CuPy state's: copied there)
            values = _dequantize_all(buf.reshape(-1), absmax, map_of(trial, name), saved_block)
            del entry[name + SUFFIX]
        else:
            values = np.asarray(_on_host(buf), dtype=np.float32).reshape(-1)
        if want_8bit:
            codes, scales = _quantize_all(values, map_of(trial, name), block)
            entry[name], entry[name + SUFFIX] = codes.reshape(buf.shape), scales
        else:
            dtype = full_dtype(p) or np.float32  # without the param: float32
            if trial._hyper.get("state_dtype") == "bfloat16":
                dtype = _backend.low_precision_dtype(np, "bfloat16")
            entry[name] = values.astype(dtype).reshape(buf.shape)
    for name in st:
        if isinstance(name, str) and name.endswith(SUFFIX) and name[:-len(SUFFIX)] not in st:
            raise ValueError(f"state of param {describe(key)} holds {name!r} without {name[:-len(SUFFIX)]!r}")
    return entry


def full_dtype(p):
    """The name of the dtype param ``p`` (any array library's, or a float) keeps its float state in: its compute
    dtype (:func:`xopt._backend.compute_dtype`); None where ``p`` is None or not a real floating array (the checks
    that follow name what it is)."""
    if isinstance(p, (float, np.floating)):  # a number param steps as a 0-d array of its dtype (float: float64)
        p = np.asarray(p)
    if p is None or not hasattr(p, "dtype"):
        return None
    try:
        xp = _backend.namespace(p)
        if not _backend.is_real_floating(xp, p.dtype):
            return None
        return _backend.dtype_name(_backend.compute_dtype(xp, p.dtype))
    except (TypeError, ValueError):
        return None


def _array(a) -> bool:
    return isinstance(a, np.ndarray) or _backend.library_name(a) in blockwise.LIBRARIES


def _on_host(a) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else _backend.to_numpy(a)


def _own(a):
    """A C-ordered copy of ``a`` in its own library (NumPy or CuPy), in native byte order."""
    return _native(a) if isinstance(a, np.ndarray) else a.copy(order="C")


def _native(a) -> np.ndarray:
    """A C-ordered NumPy copy of NumPy array ``a`` in native byte order."""
    return np.array(a, dtype=a.dtype.newbyteorder("="), order="C")


def _chunk(block) -> int:
    return max(1, REFERENCE_CHUNK // block) * block  # whole blocks: temporaries of a chunk, not of the param


def _quantize_all(values, code, block):
    """:func:`~xopt.engines.blockwise.quantize` of 1-D float32 ``values``, a chunk at a time."""
    n = values.shape[0]
    codes, absmax = np.empty(n, np.uint8), np.empty(n_blocks(n, block), np.float32)
    step = _chunk(block)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        codes[lo:hi], absmax[lo // block:n_blocks(hi, block)] = quantize(np, values[lo:hi], code, block)
    return codes, absmax


def _dequantize_all(codes, absmax, code, block):
    """:func:`~xopt.engines.blockwise.dequantize` of 1-D ``codes`` to float32, a chunk at a time."""
    n = codes.shape[0]
    values = np.empty(n, np.float32)
    step = _chunk(block)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        values[lo:hi] = dequantize(np, codes[lo:hi], absmax[lo // block:n_blocks(hi, block)], code, block,
                                   np.float32)
    return values


def _check_blocks(key, name, codes, absmax, block):
    """An 8-bit buffer: uint8 codes, and a 1-D float32 absmax with one number per block of ``block``."""
    if codes.dtype != np.uint8 or absmax.dtype.newbyteorder("=") != np.float32 or absmax.ndim != 1:  # any byte order
        raise TypeError(f"state {name!r} of param {describe(key)}: 8-bit state is uint8 codes and a 1-D float32 "
                        f"{name + SUFFIX!r}, got {codes.dtype} and {absmax.dtype} of shape {absmax.shape}")
    if absmax.shape[0] != n_blocks(codes.size, block):
        raise ValueError(f"state {name!r} of param {describe(key)}: {codes.size} codes in blocks of {block} "
                         f"(block_size) need {n_blocks(codes.size, block)} {name + SUFFIX!r}, got {absmax.shape[0]}")


def checked_entry(kind, key, st, step, always, possible, p):
    """A param's 8-bit state (after :func:`convert`), its step count checked already, checked and copied: its
    names, shapes."""
    name = describe(key)
    names = {n for n in st if n != "step" and not n.endswith(SUFFIX)}
    unknown = names - possible
    if unknown:
        raise ValueError(f"state of param {name} holds {sorted(unknown)}, which no {kind} keeps")
    if step > 0 and not always <= names:
        raise ValueError(f"state of param {name} lacks {sorted(always - names)}, which every {kind} keeps "
                         f"from a param's first step (its step is {step})")
    shape = tuple(np.shape(p)) if p is not None else None  # a Python float param: ()
    entry, first = {"step": step}, None
    for n in sorted(names):
        codes = st[n]
        if shape is not None and tuple(codes.shape) != shape:
            raise ValueError(f"state {n!r} of param {name} has shape {tuple(codes.shape)} but the param has "
                             f"shape {shape}")
        if first is not None and tuple(codes.shape) != tuple(st[first].shape):  # no param: the buffers agree
            raise ValueError(f"state of param {name}: {first!r} has shape {tuple(st[first].shape)} but {n!r} has "
                             f"shape {tuple(codes.shape)}; a param's buffers have its shape")
        first = first or n
        entry[n], entry[n + SUFFIX] = _own(codes), _own(st[n + SUFFIX])
    return entry
