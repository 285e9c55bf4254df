"""Optimizer state files: a state_dict in and out of an ``.npz`` (checking one: :mod:`xopt.state_check`).

A file is an ``.npz`` archive of a few arrays, whatever the number of params (format
``xopt-state-2``):

- ``meta``: JSON stored in a uint8 array: the optimizer's name, hyperparameters (a
  built-in schedule by name and arguments), overrides, step counts, and the param names
  (``keys``, str or int), buffer names (``buffers``) and dtype names (``dtypes``) the
  other arrays refer to by index; under ``extra`` an optimizer's own plain fields of its
  ``state_dict()`` (ScheduleFreeAdamW's ``training``);
- ``steps``: int64, the step count of each param, in the order of ``keys``;
- ``table``: int64, one row per buffer: its param, buffer name and dtype (indices), its
  ndim, then its dims (padded with 1 to the widest);
- ``data_<dtype>``: every buffer of that dtype flattened (C order), one after the other
  in the order of the table's rows; bfloat16 (which ``.npy`` lacks) as its bits, uint16.

Nothing is pickled, so loading a file runs no code, and every size is checked against the
bytes the file holds before anything is allocated.  Files of format ``xopt-state-1``
(earlier xopt: one ``.npy`` member per buffer, the state entries in ``meta``) still load.

Where the parts live: the layout and the streamed writing in :mod:`xopt.state_write`, the
reading in :mod:`xopt.state_read`, the atomic temp file and its clean-up in
:mod:`xopt.state_files`, what both sides share in :mod:`xopt.state_format`, and the checks
of a state for an optimizer in :mod:`xopt.state_check`.

Memory: a save writes the buffers from where they are (the optimizer's own arrays, while it
holds the optimizer's step lock), gathering small ones into blocks of a few MiB; a load reads
each member into the array that keeps it, a block at a time, and :meth:`Optimizer.load`
keeps those arrays as the state.  Neither holds the state twice.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

from . import _backend
from .state_check import checked_state
from .state_files import atomic_write
from .state_format import FORMAT, FORMAT_1, meta_array, saved_key
from .state_read import load_state
from .state_write import plan, write

__all__ = ["save_state", "load_state", "checked_state", "save_optimizer", "load_optimizer", "as_torch", "FORMAT"]


def save_state(state_dict, path):
    """Write a state_dict to ``path`` as an ``.npz`` archive (format 2, see the module's docstring).

    Atomic and durable: written to a temp file in the target's directory, flushed to disk,
    renamed onto the target, the directory flushed.  A symlink is written through (its target
    is replaced, the link stays) and an existing file keeps its permission bits; a new file gets
    the usual 0o666 less the umask.  Whatever a state file cannot hold raises TypeError or
    ValueError before anything is written; an OSError (a full disk, no permission, a directory
    in the way) names ``path``.  Either way no temp file stays, and temp files that saves of
    the same target killed before their end left (SIGKILL) are removed: see
    :mod:`xopt.state_files`.
    """
    laid_out = plan(state_dict)
    atomic_write(path, lambda f: write(f, laid_out))


def save_optimizer(opt, path):
    """``opt.save(path)``: :func:`save_state` of ``opt``'s state as it is between two steps, written from
    its own buffers (no copy) while its step lock is held; the file is flushed after the lock is let go."""
    atomic_write(path, lambda f: write(f, plan(opt._state_dict(copy=False))), run=opt._guard.run)


def load_optimizer(opt, path, params=None):
    """``opt.load(path, params)``: the arrays read from the file become ``opt``'s state (checked whole first,
    as :meth:`~xopt.Optimizer.load_state_dict` checks; nothing else holds them, so they are not copied)."""
    state_dict = load_state(path)
    opt._guard.run(opt._load_state_dict, functools.partial(checked_state, copy=False), state_dict, params)


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
        entries.append({"key": saved_key(key), "step": int(st["step"]), "buffers": refs, "bits_of": bits})
    np.savez(path, meta=meta_array(state_dict, FORMAT_1, state=entries), **arrays)


_TORCH_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))  # native order: a file's


def as_torch(state, params):
    """The NumPy buffers of torch params' states (a state file's) as torch tensors on their params' devices, as
    the state their steps make: so a loaded state steps where a kept one does (the fused lane of CPU tensors)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    for key, p in (params.items() if isinstance(params, dict) else enumerate(params)):
        st = state.get(key)
        if st is not None and isinstance(p, torch.Tensor):
            for name, buf in st.items():
                if type(buf) is np.ndarray and buf.dtype in _TORCH_FLOATS:
                    st[name] = torch.from_numpy(buf).to(p.device)
