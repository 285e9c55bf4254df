"""Fused CUDA kernels (CuPy ``ElementwiseKernel``): one pass over memory per tensor.

UNVERIFIED: written without a GPU at hand and not yet run on one.  Until
``tests/test_fused_gpu.py`` has passed on a real NVIDIA GPU (and VERIFIED below is
set to True with the results committed under ``benchmarks/results/``), ``impl="auto"``
keeps CuPy arrays on the array-API reference rule and these kernels run only when
asked for with ``impl="fused"``.

Each kernel body is the optimizer's reference ``rule`` (in ``xopt/<name>.py``)
written per element, with the same names, the same order of operations and the
scalars of the same ``scalars(step)``, in the order of ``fused_cpu``'s
``*_scalars`` functions.  ``P`` is the param's type, ``S`` the state's and the
math's (float for half params); per-step scalars arrive already cast to ``S``, so
a small eps is not lost to a half-precision scalar.  State buffers are ``raw``
(they are xopt's own, always contiguous, indexed by ``i``), so a buffer that the
configuration does not keep is a one-element placeholder that is never read.
Kernels are built on first use and cached by CuPy (in memory and on disk).
"""

from __future__ import annotations

import numpy as np

from . import _backend
from ._kernel_table import KERNELS

__all__ = ["VERIFIED", "supports", "accepts", "apply"]

VERIFIED = False  # set True only with a committed GPU test and benchmark run of these kernels

_BODIES = {
    0: """  // SGD
        S gi = (S)g;
        S pi = (S)p;
        if (s1 != (S)0) gi = gi + s1 * pi;
        if (s5 != (S)0) {
            S bi = s3 * b0[i] + s4 * gi;
            b0[i] = bi;
            gi = (s6 != (S)0) ? gi + s2 * bi : bi;
        }
        p = (P)(pi - s0 * gi);
    """,
    1: """  // Momentum, Nesterov
        S gi = (S)g;
        S vi = s1 * b0[i] - s0 * gi;
        b0[i] = vi;
        p = (s2 != (S)0) ? (P)((S)p + s1 * vi - s0 * gi) : (P)((S)p + vi);
    """,
    2: """  // AdaGrad
        S gi = (S)g;
        S pi = (S)p;
        if (s2 != (S)0) gi = gi + s2 * pi;
        S hi = b0[i] + gi * gi;
        b0[i] = hi;
        p = (P)(pi - s0 * gi / (sqrt(hi) + s1));
    """,
    3: """  // RMSprop
        S gi = (S)g;
        S pi = (S)p;
        if (s5 != (S)0) gi = gi + s5 * pi;
        S hi = s1 * b0[i] + s2 * gi * gi;
        b0[i] = hi;
        S d;
        if (s6 != (S)0) {
            S ai = b1[i] + s2 * (gi - b1[i]);
            b1[i] = ai;
            d = sqrt(hi - ai * ai) + s3;
        } else {
            d = sqrt(hi) + s3;
        }
        if (s7 != (S)0) {
            S bi = s4 * b2[i] + gi / d;
            b2[i] = bi;
            p = (P)(pi - s0 * bi);
        } else {
            p = (P)(pi - s0 * gi / d);
        }
    """,
    4: """  // Adam, AdamW
        S gi = (S)g;
        S pi = (S)p;
        if (s6 != (S)0) gi = gi + s6 * pi;
        if (s7 != (S)1) pi = pi * s7;
        S mi = b0[i] + s0 * (gi - b0[i]);
        S vi = s1 * b1[i] + s2 * gi * gi;
        b0[i] = mi;
        b1[i] = vi;
        if (s8 != (S)0) {
            vi = max(b2[i], vi);
            b2[i] = vi;
        }
        p = (P)(pi - s4 * (mi / (sqrt(vi) / s5 + s3)));
    """,
}

_N_SCALARS = 9
_kernels = {}


def _kernel(rule):
    """The ElementwiseKernel of ``rule``, built once."""
    if rule not in _kernels:
        import cupy

        scalars = ", ".join(f"S s{k}" for k in range(_N_SCALARS))
        _kernels[rule] = cupy.ElementwiseKernel(
            f"G g, raw S b0, raw S b1, raw S b2, {scalars}", "P p", _BODIES[rule], f"xopt_rule{rule}")
    return _kernels[rule]


def supports(opt) -> bool:
    return type(opt).__name__ in KERNELS and opt._hyper.get("state_dtype") is None


def accepts(opt, e) -> bool:
    """CuPy float16/32/64 params with CuPy grads."""
    return (type(e.p).__module__.startswith("cupy") and type(e.g).__module__.startswith("cupy")
            and np.dtype(e.p.dtype) in (np.float16, np.float32, np.float64))


def apply(opt, entries):
    """One launch per tensor; scalars computed on the host, cast to the state's type."""
    import cupy

    rule, scalar_order, slots = KERNELS[type(opt).__name__]
    for e in entries:
        dtype = np.dtype(_backend.compute_dtype(np, np.dtype(e.p.dtype)))
        values = scalar_order(opt, e.scalars)
        scalars = [dtype.type(v) for v in values] + [dtype.type(0)] * (_N_SCALARS - len(values))
        placeholder = cupy.empty(1, dtype=dtype)
        buffers = [e.state.get(name, placeholder) for name in slots] + [placeholder] * (3 - len(slots))
        g = e.g if e.g.dtype == e.p.dtype else e.g.astype(e.p.dtype)
        _kernel(rule)(g, *buffers, *scalars, e.p)
