"""torch tensors for the CUDA engine: each viewed as the device's array over the same memory, on torch's stream.

A lane step on torch CUDA tensors (:func:`step`) views every param, grad and state buffer as a CuPy array
(``CupyDevice.tensor_view``: DLPack, never a copy) and hands the views to the engine's own step, inside torch's
current stream on the params' GPU (``CupyDevice.tensor_stream``: the views are made and the launch queued
there, after torch's work on the tensors).  The step's commit also bumps the written tensors' version
counters, as torch's in-place writes do, so autograd sees the change.  A tensor that cannot be viewed (sparse,
on another device, a lazy conjugate) declines the step, nothing written: the checked path takes it.  torch is
not imported here: a step on tensors has it imported already.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

from .. import _backend

__all__ = ["dtype_of", "step"]

_DTYPES = {"torch.float16": np.dtype(np.float16), "torch.float32": np.dtype(np.float32),
           "torch.float64": np.dtype(np.float64)}  # and torch.bfloat16: ml_dtypes' bfloat16, once asked
_REFUSED = (RuntimeError, TypeError, ValueError, AttributeError, BufferError)


def _exact(torch):
    return torch.Tensor, torch.nn.Parameter


def dtype_of(device, t):
    """The NumPy dtype of the kernel a step on tensors like ``t`` runs (float16, bfloat16, float32, float64), or None:
    ``t`` is not an exact ``torch.Tensor`` or ``Parameter`` that ``device`` takes (``device.takes_tensor``: CUDA)."""
    torch = sys.modules.get("torch")
    if torch is None or type(t) not in _exact(torch) or not device.takes_tensor(t):
        return None
    name = str(t.dtype)
    if name == "torch.bfloat16" and name not in _DTYPES:  # CuPy's bfloat16 (DLPack's view of it) is ml_dtypes'
        low = _backend.low_precision_dtype(np, "bfloat16")
        _DTYPES[name] = None if low is None else np.dtype(low)
    return _DTYPES.get(name)


def step(device, engine_step, opt, kind, views, values, ps, gs, states, steps, part, commit):
    """``engine_step`` (the CUDA engine's ``step``, same arguments) on ``device``'s views of the tensors, in torch's
    current stream, the version counters bumped with the commit; None: declined, nothing written."""
    exact = _exact(sys.modules["torch"])
    try:
        if len({str(t.dtype) for t in (*ps, *gs)}) != 1:
            return None
        written = [*ps, *(st[name] for st in states for name in kind.slots if name in st)]
        if not all(type(t) in exact for t in (*written, *gs)):
            return None
        gpu = device.tensor_device(ps[0])
    except _REFUSED:
        return None
    # torch's current stream on the params' GPU, made and entered with that GPU current: CuPy's stream refuses to be
    # entered on another GPU than its own (tensors on cuda:1, say, while the current GPU is 0: torch.cuda.set_device
    # is not needed to train there).  The views are made, and the launch queued, on it.
    with device.on(gpu):
        try:
            stream = device.tensor_stream(ps[0])
        except _REFUSED:
            return None
        with stream:
            try:
                view = device.tensor_view
                arrays = [{name: view(st[name]) for name in kind.slots if name in st} for st in states]
                vps, vgs = list(map(view, ps)), list(map(view, gs))
            except _REFUSED:
                return None
            return engine_step(opt, kind, views, values, vps, vgs, arrays, steps, part, _bumping(commit, written))


def _bumping(commit, written):
    """``commit`` and, for a step that ran, the version counters of the tensors it wrote, in the same calls."""
    bump = functools.partial(sys.modules["torch"]._C._increment_version, written)

    def counted(norm, skipped):
        calls = commit(norm, skipped)
        return calls if skipped else [*calls, bump]
    return counted
