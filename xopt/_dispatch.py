"""The one place that decides how a step is computed.

``reference``: the optimizer's array-API ``rule``, one param at a time, for any
array library.  ``fused``: a kernel that reads and writes each element once
(:mod:`xopt.fused_cpu` for NumPy arrays).  ``auto`` takes the fused kernel where
one exists for the array and the optimizer's flags, the reference elsewhere.
"""

from __future__ import annotations

from . import _backend
from ._inputs import describe

__all__ = ["IMPLS", "check_impl", "select", "apply_reference", "plan"]

IMPLS = ("auto", "reference", "fused")


def _fused_cpu():
    """The NumPy fused module, or None when its engine (numba) is not installed."""
    try:
        from . import fused_cpu
    except ImportError:
        return None
    return fused_cpu


def check_impl(impl, optimizer_name):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    if impl == "fused":
        fused = _fused_cpu()
        if fused is None:
            raise ValueError("impl='fused' needs numba (pip install numba); use impl='auto' to fall back "
                             "to the reference rule")
        if optimizer_name not in fused.KERNELS:
            raise ValueError(f"impl='fused': there is no fused kernel for {optimizer_name}")
    return impl


def apply_reference(opt, entries):
    """Run ``opt.rule`` on each entry; float16 params and bfloat16 state compute in float32."""
    for e in entries:
        xp = e.xp
        dtype = _backend.compute_dtype(xp, e.p.dtype)
        p = xp.astype(e.p, dtype, copy=False)
        g = xp.astype(e.g, dtype, copy=False)
        state = {k: xp.astype(e.state[k], dtype, copy=False) for k in opt.buffers()}
        p_new, buffers = opt.rule(xp, p, g, state, e.scalars)
        e.state.update({k: xp.astype(v, e.state[k].dtype, copy=False) for k, v in buffers.items()})
        p_new = xp.astype(p_new, e.p.dtype, copy=False)
        if e.rebind:
            e.p = p_new
        else:
            e.p[...] = p_new


def select(opt, entries):
    """The function that will apply this step; raises (before any write) if impl can't be honoured."""
    if opt.impl == "reference":
        return apply_reference
    fused = _fused_cpu()
    can_fuse = fused is not None and fused.supports(opt)
    fused_entries = [e for e in entries if can_fuse and fused.accepts(opt, e)]
    if opt.impl == "fused" and len(fused_entries) != len(entries):
        if not can_fuse:
            raise ValueError(f"impl='fused': no fused kernel for {opt!r}")
        bad = next(e for e in entries if not fused.accepts(opt, e))
        raise TypeError(f"impl='fused': param {describe(bad.key)} is a {_backend.library_name(bad.p)} "
                        f"array of {_backend.dtype_name(bad.p.dtype)}; the fused CPU kernels take NumPy "
                        "float16/32/64 arrays (float16/32 with state_dtype='bfloat16')")
    if not fused_entries:
        return apply_reference
    if len(fused_entries) == len(entries):
        return fused.apply

    def apply_mixed(opt, entries):
        fused.apply(opt, [e for e in entries if fused.accepts(opt, e)])
        apply_reference(opt, [e for e in entries if not fused.accepts(opt, e)])

    return apply_mixed


def plan(opt, params, entries):
    """A fast path for the next step if this one can repeat without per-param checks, else None."""
    if opt.impl == "reference":
        return None
    fused = _fused_cpu()
    return None if fused is None else fused.Plan.build(opt, params, entries)
