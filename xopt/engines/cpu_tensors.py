"""CPU torch tensors for the fused CPU engine, read through torch's own accessors instead of NumPy views.

A step on torch tensors (:func:`xopt.engines.fused_cpu.step_tensors`) needs, of each param, grad and
state buffer, what :func:`xopt.engines.cpu_memory.check_step` reads from a NumPy array's struct: that
it is a dense CPU tensor of the step's dtype, shaped as its param, and where its data is.  Here that is
asked of torch, one accessor mapped over a whole list at a time (a loop in C per question, where
``Tensor.numpy()`` costs a microsecond or two per tensor and a NumPy array to free); then
:func:`xopt.engines.cpu_memory.check_table` checks the addresses (not NULL, aligned, no shared bytes) in
the compiled call before the kernel runs.  Nothing is remembered from one call to the next.

A tensor taken is an exact ``torch.Tensor`` or ``torch.nn.Parameter`` (a subclass may keep its data
elsewhere, or run Python in its methods), on the CPU, strided, contiguous, without torch's lazy negation
bit, of the step's dtype (float32, float64), with a shape (a nested tensor has none) and strided storage
(``data_ptr`` raises for a sparse, MKL-DNN or functorch wrapper tensor); anything else is declined, and the
checked path takes the step and explains.
"""

from __future__ import annotations

import operator

import numpy as np
import torch

__all__ = ["dtype_of", "addresses", "shapes", "sizes", "torch_dtype", "increment_version", "TAKEN"]

TAKEN = frozenset({torch.Tensor, torch.nn.Parameter})  # exact types: a subclass is declined
_TO_NUMPY = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
_TO_TORCH = {v: k for k, v in _TO_NUMPY.items()}
_DTYPE, _IS_CPU = operator.attrgetter("dtype"), operator.attrgetter("is_cpu")
_data_ptr, _size, _numel = torch.Tensor.data_ptr, torch.Tensor.size, torch.Tensor.numel
_is_contiguous, _is_neg = torch.Tensor.is_contiguous, torch.Tensor.is_neg
_REFUSED = (RuntimeError, TypeError, AttributeError, ValueError)
increment_version = torch._C._increment_version  # what torch's in-place writes do: autograd sees the change


def dtype_of(t):
    """The NumPy dtype of the kernel a step on params like ``t`` runs (float32, float64), or None: ``t`` is not
    a CPU tensor this engine takes."""
    if type(t) in TAKEN and t.is_cpu:
        return _TO_NUMPY.get(t.dtype)
    return None


def torch_dtype(dtype):
    """The torch dtype of NumPy's ``dtype`` (float32, float64), or None."""
    return _TO_TORCH.get(dtype)


def addresses(ts, dtype, lists=1):
    """The data addresses of the tensors ``ts``, or None where one is not a tensor this engine takes (see the
    module) of torch dtype ``dtype``.  ``lists``: ``ts`` is that many lists of n tensors one after the other
    (params, grads, buffers), and the k-th tensor of each list must have the shape of the first list's."""
    try:
        if (not TAKEN.issuperset(map(type, ts)) or set(map(_DTYPE, ts)) != {dtype} or not all(map(_IS_CPU, ts))
                or not all(map(_is_contiguous, ts)) or any(map(_is_neg, ts))):
            return None
        shaped = list(map(_size, ts))  # raises for a nested tensor: it has no shape
        if lists > 1 and shaped != shaped[:len(ts) // lists] * lists:
            return None
        return list(map(_data_ptr, ts))  # raises where the tensor has no strided storage (sparse, MKL-DNN)
    except _REFUSED:
        return None


def shapes(ts):
    """Each tensor's torch.Size, or None where one has none (a nested tensor)."""
    try:
        return list(map(_size, ts))
    except _REFUSED:
        return None


def sizes(ts):
    """Each tensor's element count (a list of its own)."""
    return list(map(_numel, ts))
