"""Global-norm clipping (``clip_grad_norm=``): the norm of a step's grads and the scale it gives.

As ``torch.nn.utils.clip_grad_norm_``: ``norm`` is the L2 norm over every grad of the step,
and each grad is multiplied by ``min(1, max_norm / (norm + 1e-6))`` before the rule.  The
user's grads are never written: the engines (the CPU and CUDA kernels, a Dask chunk's, the
reference rule) multiply as they read, in the math type (``Entry.clip``); an engine that did not
would get scaled copies.

The norm of NumPy grads is summed in float64 on the host (one compiled pass when numba is
there); grads of one other library (torch, CuPy) are summed by it in float64, and the norm
stays a 0-d array on their device: no host synchronisation unless ``skip_nonfinite`` asks.
"""

from __future__ import annotations

import math

import numpy as np

from . import _backend, _numba

__all__ = ["global_norm", "is_finite", "computed", "scale", "EPS"]

EPS = 1e-6  # torch's clip_grad_norm_ adds it to the norm


def _numpy_sum_squares(arrays) -> float:
    if _numba.usable():  # numba's code runs here
        from .engines.cpu_drivers import sum_squares

        return sum_squares(arrays)
    return float(sum(np.sum(np.square(np.asarray(a), dtype=np.float64)) for a in arrays))


def global_norm(gs):
    """The L2 norm over all of ``gs``: a float, or a 0-d array where every grad is of one non-NumPy library."""
    host = [g for g in gs if isinstance(g, (np.ndarray, np.generic))]
    other = [g for g in gs if not isinstance(g, (np.ndarray, np.generic))]
    total = _numpy_sum_squares(host) if host else 0.0
    if not other:
        return math.sqrt(total)
    parts = []
    for g in other:
        xp = _backend.namespace(g)
        wide = xp.astype(g, _wide(xp, g))
        parts.append(xp.sum(wide * wide))
    if host or len({_backend.library_name(g) for g in other}) > 1:  # summed on the host
        return math.sqrt(total + sum(float(_backend.to_numpy(x)) for x in parts))
    on_device = parts[0]
    for x in parts[1:]:
        on_device = on_device + x
    return _backend.namespace(on_device).sqrt(on_device)


def _wide(xp, g):
    """float64 where the library has it, else float32 at least."""
    try:
        return xp.float64
    except AttributeError:
        return xp.float32


_COMPUTED = {}  # a lazy (Dask) norm's key -> its value, once is_finite computed it: scale reads it, no second pass


def is_finite(norm) -> bool:
    if isinstance(norm, float):
        return math.isfinite(norm)
    if _backend.is_dask(norm):
        _COMPUTED.clear()
        _COMPUTED[norm.name] = value = float(norm.compute())
        return math.isfinite(value)
    return bool(_backend.namespace(norm).isfinite(norm))


def computed(norm):
    """The number of a lazy (Dask) norm that :func:`is_finite` computed, else None."""
    return _COMPUTED.get(norm.name)


def scale(norm, max_norm):
    """``min(1, max_norm / (norm + 1e-6))`` as torch computes it (a NaN norm gives NaN); None for 1."""
    if not isinstance(norm, float) and _backend.is_dask(norm):
        norm = _COMPUTED.get(norm.name, norm)  # computed by is_finite (skip_nonfinite): a number now
    if isinstance(norm, float):
        coef = max_norm / (norm + EPS)
        return None if coef >= 1.0 else coef
    xp = _backend.namespace(norm)
    return xp.minimum(max_norm / (norm + EPS), xp.ones_like(norm))
