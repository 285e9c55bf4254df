"""The fast path of a step that repeats: same params, same arrays, grads of the same layout.

Built after a checked step in which every param was a contiguous array that one fused
engine took, all of one dtype at one step count.  :meth:`Plan.try_step` then runs a
step with a few C-level list comparisons in place of the per-param checks, or declines
(returns False) and leaves everything to the general path, which checks and explains.

An engine (:mod:`xopt.fused_cpu`, :mod:`xopt.fused_cuda`) gives the Plan its
``supports``/``accepts``, the dtypes it runs without copies (``PLAN_DTYPES``), how an
array's ``layout``, ``writable`` and ``device_of`` are read, and its ``Table``.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping

__all__ = ["Plan"]


class Plan:
    @classmethod
    def build(cls, engine, opt, params, entries):
        if not entries or len(entries) != len(params) or not engine.supports(opt):
            return None
        dtype, step = entries[0].p.dtype, entries[0].state["step"]
        for e in entries:
            if not (engine.accepts(opt, e) and e.p.flags.c_contiguous and e.p.dtype == dtype
                    and e.state["step"] == step):
                return None
        if dtype.name not in engine.PLAN_DTYPES or len({engine.device_of(e.p) for e in entries}) != 1:
            return None  # a table spans one device
        return cls(engine, opt, params, entries)

    def __init__(self, engine, opt, params, entries):
        self.engine = engine
        self.container = params
        self.keys = [e.key for e in entries]
        self.arrays = [e.p for e in entries]
        self.array_type = type(self.arrays[0])
        self.layout = [engine.layout(p) for p in self.arrays]
        self.states = [e.state for e in entries]
        self.buffers = opt.buffers()
        self.impl = opt.impl
        self.step = entries[0].state["step"]
        self.table = engine.Table(opt, self.arrays, self.states, entries[0].p.dtype)

    def try_step(self, opt, params, grads) -> bool:
        if (params is not self.container or opt.impl != self.impl or opt.skip_nonfinite
                or opt.buffers() != self.buffers):
            return False
        if len(params) != len(self.keys) or len(grads) != len(self.keys):
            return False
        if isinstance(params, Mapping):
            if not isinstance(grads, Mapping) or list(params) != self.keys:
                return False
            arrays = list(params.values())
            try:
                gs = list(map(grads.__getitem__, self.keys))
            except KeyError:
                return False
        else:
            arrays, gs = list(params), list(grads)
        if not all(map(operator.is_, arrays, self.arrays)) or set(map(type, gs)) != {self.array_type}:
            return False
        writable = self.engine.writable  # None: the library has no read-only arrays
        if writable is not None and not all(map(writable, arrays)):  # made read-only since: let the checks say so
            return False
        if list(map(self.engine.layout, gs)) != self.layout:
            return False
        self.step += 1
        self.table.run(opt, gs, opt.scalars(self.step))
        for st in self.states:
            st["step"] = self.step
        return True
