"""Optimizer state in and out: checking a state_dict, and files that hold one.

A file is an ``.npz`` archive: one array per buffer, and the rest (optimizer
name, hyperparameters, step counts, param names) as JSON stored in a uint8
array.  Nothing is pickled, so loading a file runs no code.
"""

from __future__ import annotations

import json
import numbers
import os
import tempfile
from collections.abc import Mapping

import array_api_compat
import numpy as np

from . import _backend
from ._inputs import describe

__all__ = ["save_state", "load_state", "checked_state"]

FORMAT = "xopt-state-1"


def _count(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"state_dict[{name!r}] must be a non-negative integer, got {value!r}")
    return int(value)


def _param_shapes(params):
    if isinstance(params, Mapping):
        return {k: tuple(v.shape) for k, v in params.items()}
    if isinstance(params, (list, tuple)):
        return {i: tuple(v.shape) for i, v in enumerate(params)}
    raise TypeError(f"params must be a dict, a list or a tuple, got {type(params).__name__}")


def checked_state(opt, state_dict, params=None):
    """Validate ``state_dict`` for ``opt`` as a whole; return (hyperparameters, state, (iter, skipped)).

    Nothing of ``opt`` is touched here, so a misfit leaves it as it was.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    missing = {"optimizer", "hyperparameters", "iter", "skipped_steps", "state"} - set(state_dict)
    if missing:
        raise KeyError(f"state_dict lacks {', '.join(sorted(missing))}")
    kind = type(opt).__name__
    if state_dict["optimizer"] != kind:
        raise ValueError(f"state_dict is for {state_dict['optimizer']}, not {kind}")
    hyper = dict(state_dict["hyperparameters"])
    expected = set(opt._hyper)
    if set(hyper) != expected:
        raise ValueError(f"state_dict hyperparameters do not fit {kind}: missing "
                         f"{sorted(expected - set(hyper))}, unknown {sorted(set(hyper) - expected)}")
    trial = type(opt)(impl=opt.impl, **hyper)  # the constructor's checks, on a scratch optimizer
    buffers = set(trial.buffers())
    shapes = None if params is None else _param_shapes(params)

    state = {}
    if not isinstance(state_dict["state"], Mapping):
        raise TypeError("state_dict['state'] must be a dict: param name -> its state")
    for key, st in state_dict["state"].items():
        name = describe(key)
        if shapes is not None and key not in shapes:
            raise KeyError(f"state_dict has state for param {name}, which is not among the params")
        if not isinstance(st, Mapping) or "step" not in st:
            raise ValueError(f"state of param {name} must be a dict with a 'step'")
        step = _count(f"state'][{key!r}]['step", st["step"])
        names = set(st) - {"step"}
        if step > 0 and names != buffers:
            raise ValueError(f"state of param {name} holds {sorted(names)} but {trial!r} keeps {sorted(buffers)}")
        entry, first_shape = {"step": step}, None
        for buf_name in sorted(names):
            buf = st[buf_name]
            if not array_api_compat.is_array_api_obj(buf):
                raise TypeError(f"state {buf_name!r} of param {name} is not an array ({type(buf).__name__})")
            xp = _backend.namespace(buf)
            if not _backend.is_real_floating(xp, buf.dtype):
                raise TypeError(f"state {buf_name!r} of param {name} has dtype {buf.dtype}")
            shape = tuple(buf.shape)
            if shapes is not None and shape != shapes[key]:
                raise ValueError(f"state {buf_name!r} of param {name} has shape {shape} but the param has "
                                 f"shape {shapes[key]}")
            if first_shape is not None and first_shape != shape:
                raise ValueError(f"state buffers of param {name} differ in shape: {first_shape} and {shape}")
            first_shape = shape
            entry[buf_name] = xp.asarray(buf, copy=True)
        state[key] = entry
    counters = (_count("iter", state_dict["iter"]), _count("skipped_steps", state_dict["skipped_steps"]))
    return trial._hyper, state, counters


def save_state(state_dict, path):
    """Write a state_dict to ``path`` as an ``.npz`` archive (atomically: a temp file, then a rename)."""
    arrays, entries = {}, []
    for key, st in state_dict["state"].items():
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise TypeError(f"param name {key!r} cannot be saved: names must be str (dict) or int (list)")
        refs, bits = {}, {}
        for name, buf in st.items():
            if name != "step":
                refs[name] = f"a{len(arrays)}"
                arrays[refs[name]] = _backend.to_numpy(buf)
                if _backend.dtype_name(buf.dtype) == "bfloat16":  # .npy has no bfloat16: keep its bits
                    arrays[refs[name]] = arrays[refs[name]].view(np.uint16)
                    bits[name] = "bfloat16"
        entries.append({"key": key, "step": st["step"], "buffers": refs, "bits_of": bits})
    meta = {
        "format": FORMAT,
        "optimizer": state_dict["optimizer"],
        "hyperparameters": state_dict["hyperparameters"],
        "iter": state_dict["iter"],
        "skipped_steps": state_dict["skipped_steps"],
        "state": entries,
    }
    blob = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=blob, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_state(path) -> dict:
    """Read a file written by :func:`save_state` into a state_dict of NumPy arrays."""
    with np.load(os.fspath(path), allow_pickle=False) as archive:
        if "meta" not in archive.files:
            raise ValueError(f"{path} is not an xopt state file (no 'meta' entry)")
        meta = json.loads(archive["meta"].tobytes().decode("utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} has format {meta.get('format')!r}; this xopt reads {FORMAT!r}")
        state = {}
        for entry in meta["state"]:
            st = {"step": entry["step"]}
            for name, ref in entry["buffers"].items():
                st[name] = archive[ref]
                if entry.get("bits_of", {}).get(name) == "bfloat16":
                    st[name] = st[name].view(_backend.low_precision_dtype(np, "bfloat16"))
            state[entry["key"]] = st
    return {
        "optimizer": meta["optimizer"],
        "hyperparameters": meta["hyperparameters"],
        "iter": meta["iter"],
        "skipped_steps": meta["skipped_steps"],
        "state": state,
    }
