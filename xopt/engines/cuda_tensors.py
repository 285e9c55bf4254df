"""torch CUDA tensors for the CUDA engine, read through torch's own accessors: no view of any tensor.

A lane step on torch CUDA tensors needs, of each param, grad and state buffer, what the CUDA engine's
compiled reader (:func:`xopt.engines.cuda_memory.gather`) reads from a CuPy array's struct: that it is a
dense tensor of the step's dtype on the params' GPU, shaped as its param, and where its data is.
:func:`gather` asks torch, one accessor mapped over a whole list at a time (a loop in C per question: a
DLPack view costs about 10 us a tensor, four a param), then checks the addresses (not NULL, aligned,
no shared bytes) and writes the step's table (:func:`xopt.engines.cuda_table.table_of`, compiled).  The engine queues the
launch on torch's current stream of that GPU, after torch's work on the tensors, and the step's commit bumps
the written tensors' version counters, as torch's in-place writes do, so autograd sees the change.

A tensor taken is an exact ``torch.Tensor`` or ``torch.nn.Parameter`` (a subclass may keep its data
elsewhere, or run Python in its methods), on the device's GPU (``device.tensor_devices``), strided,
contiguous, without torch's lazy negation bit (a conjugation bit is complex tensors' alone), not an
inference tensor outside ``torch.inference_mode()`` (torch refuses to write one there), of the step's dtype
(the state buffers of its state dtype), with a shape and strided storage (``data_ptr`` raises for a sparse
tensor); anything else is declined, nothing written, and the checked path takes the step and explains.
torch is not imported here: a step on tensors has it imported already.
"""

from __future__ import annotations

import functools
import operator
import sys
from itertools import chain

import numpy as np

from .. import _backend, _numba
from . import cuda_reader

__all__ = ["dtype_of", "gather", "bumping", "REFUSED"]

_DTYPES = {"torch.float16": np.dtype(np.float16), "torch.float32": np.dtype(np.float32),
           "torch.float64": np.dtype(np.float64)}  # and torch.bfloat16: ml_dtypes' bfloat16, once asked
REFUSED = (RuntimeError, TypeError, ValueError, AttributeError, BufferError)
_DTYPE = operator.attrgetter("dtype")
_INT = {int}


def _exact(torch):
    return torch.Tensor, torch.nn.Parameter


def dtype_of(device, t):
    """The NumPy dtype of the kernel a step on tensors like ``t`` runs (float16, bfloat16, float32, float64), or None:
    ``t`` is not an exact ``torch.Tensor`` or ``Parameter`` that ``device`` takes (``device.takes_tensor``: CUDA)."""
    torch = sys.modules.get("torch")
    if torch is None or type(t) not in _exact(torch) or not device.takes_tensor(t):
        return None
    name = str(t.dtype)
    if name == "torch.bfloat16" and name not in _DTYPES:  # CuPy's bfloat16 is ml_dtypes'
        low = _backend.low_precision_dtype(np, "bfloat16")
        _DTYPES[name] = None if low is None else np.dtype(low)
    return _DTYPES.get(name)


def _torch_dtype(torch, dtype):
    return getattr(torch, np.dtype(dtype).name, None)


def gather(device, kind, lists, flags, part, scalar_bytes):
    """(GPU, blocks, table, the tensors the step writes) of a step on torch tensors, or None: declined.

    ``lists``: params, grads, the three slots' buffers (None: a slot no part keeps; None items: rows whose part does
    not keep it) and the step counts, n of each; ``flags``: each part's kept-slot flags, three a part; ``part``: each
    tensor's part (None: all part 0).  The table is :func:`xopt.engines.cuda_reader.table_of`'s (its scalars' rows
    left for the caller)."""
    torch = sys.modules["torch"]
    ps, gs, slots, steps = lists[0], lists[1], lists[2:5], lists[5]
    n = len(ps)
    if len(gs) != n or not _INT.issuperset(map(type, steps)):
        return None
    found = cuda_reader.rows_kept(n, slots, [flags[i:i + 3] for i in range(0, len(flags), 3)], part)
    if found is None:
        return None
    part, rows = found
    bufs = [[slots[j][i] for i in rows[j]] for j in range(3)]
    flat = list(chain.from_iterable(bufs))
    every = [*ps, *gs, *flat]
    tensor = torch.Tensor
    try:
        if (not set(_exact(torch)).issuperset(map(type, every))
                or set(map(_DTYPE, (*ps, *gs))) != {_torch_dtype(torch, kind.dtype)}
                or (flat and set(map(_DTYPE, flat)) != {_torch_dtype(torch, kind.state)})
                or not all(map(tensor.is_contiguous, every)) or any(map(tensor.is_neg, every))
                or (any(map(tensor.is_inference, every)) and not torch.is_inference_mode_enabled())):
            return None
        devices = device.tensor_devices(every)
        if len(devices) != 1:
            return None
        device_id = devices.pop()
        if device_id < 0:
            return None
        shapes = list(map(tensor.size, ps))  # raises for a nested tensor: it has no shape
        if list(map(tensor.size, gs)) != shapes:
            return None
        for j in range(3):
            if list(map(tensor.size, bufs[j])) != [shapes[i] for i in rows[j]]:
                return None
        data_ptr = tensor.data_ptr  # raises where the tensor has no strided storage (sparse)
        ptrs = cuda_reader.addresses(n, rows, map(data_ptr, ps), map(data_ptr, gs),
                                     [map(data_ptr, bufs[j]) for j in range(3)])
    except REFUSED:
        return None
    sizes = np.fromiter(map(tensor.numel, ps), dtype=np.int64, count=n)
    answer, n_blocks, table = _table_of()(ptrs, sizes, rows, part, kind.dtype.itemsize, kind.state.itemsize,
                                          scalar_bytes)
    if answer:
        return None
    return device_id, n_blocks, table, [*flat, *ps]


def _table_of():
    """The compiled :func:`xopt.engines.cuda_table.table_of` where numba's code runs here, else NumPy's (the same
    answers and bytes)."""
    global _TABLE_OF
    if _TABLE_OF is None:
        if _numba.usable():
            from .cuda_table import table_of as _TABLE_OF
        else:
            _TABLE_OF = cuda_reader.table_of
    return _TABLE_OF


_TABLE_OF = None


def bumping(commit, written):
    """``commit`` and, for a step that ran, the version counters of the tensors it wrote, in the same calls; the clip
    norm (the device's 0-d float64 array) handed on as a torch tensor over the same memory, as the checked path's
    norm of torch grads is a torch tensor."""
    torch = sys.modules["torch"]
    bump = functools.partial(torch._C._increment_version, written)

    def counted(norm, skipped):
        calls = commit(None if norm is None else torch.from_dlpack(norm), skipped)
        return calls if skipped else [*calls, bump]
    return counted
