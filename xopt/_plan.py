"""The fast path of a step that repeats: same params, same state, grads of the same layout.

Built after a checked step in which every param was a contiguous array that one fused
engine took, all of one dtype at one step count.  :meth:`Plan.try_step` then runs a step
with a few C-level passes over lists in place of the per-param checks, or declines
(returns False, having written nothing) and leaves everything to the general path, which
checks and explains.

What it proves each step, before anything is written (everything the general path would check):
- the same params container, the same keys in the same order, the same param objects;
- the same state: ``opt.state``'s dict of every param is the one the table was built on, and
  holds the same buffer objects (a buffer replaced or deleted, a param's state reset: declined),
  every step count equal to the plan's;
- the same configuration: ``impl``, the buffers kept, ``state_dtype``, no ``skip_nonfinite``;
- grads of the engine's array type; the engine's :meth:`Table.run` vouches for every array's
  address, shape, dtype, flags and for no overlap between a grad and a param or buffer.
Ids are compared where objects are: the plan holds every object it compares, so no id it
holds can be reused by another object.

An engine (:mod:`xopt.fused_cpu`, :mod:`xopt.fused_cuda`) gives the Plan its ``supports``/``accepts``,
the dtypes it runs without copies (``PLAN_DTYPES``), ``device_of`` and its ``Table``.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from itertools import chain

__all__ = ["Plan"]

_step_of = operator.itemgetter("step")


def config(opt):
    """What fixes the kernel and the buffers of a step: a change ends the plan."""
    return opt.impl, opt.buffers(), opt._hyper.get("state_dtype"), opt.skip_nonfinite


class Plan:
    @classmethod
    def build(cls, engine, opt, params, entries):
        if not entries or len(entries) != len(params) or not engine.supports(opt) or opt.skip_nonfinite:
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
        self.config = config(opt)
        self.state_root = opt.state
        self.states = [e.state for e in entries]
        self.state_ids = list(map(id, self.states))
        names = opt.buffers()
        self.buffers = [e.state[name] for e in entries for name in names]  # held: their ids stay theirs
        self.buffer_ids = list(map(id, self.buffers))
        if len(names) == 0:
            self.current_buffers = lambda states: []
        elif len(names) == 1:
            self.current_buffers = lambda states, get=operator.itemgetter(names[0]): map(get, states)
        else:
            self.current_buffers = lambda states, get=operator.itemgetter(*names): chain.from_iterable(
                map(get, states))
        self.step = entries[0].state["step"]
        self.table = engine.Table(opt, self.arrays, self.states, entries[0].p.dtype)

    def try_step(self, opt, params, grads) -> bool:
        n = len(self.keys)
        if params is not self.container or config(opt) != self.config or opt.state is not self.state_root:
            return False
        if len(params) != n or len(grads) != n:
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
        states = list(map(self.state_root.get, self.keys))
        if list(map(id, states)) != self.state_ids:
            return False
        try:
            if list(map(id, self.current_buffers(states))) != self.buffer_ids:
                return False
            if list(map(_step_of, states)).count(self.step) != n:
                return False
        except (KeyError, TypeError):  # a buffer or a step count deleted
            return False
        if not self.table.run(opt, gs, opt.scalars(self.step + 1)):
            return False
        self.step += 1
        for st in self.states:
            st["step"] = self.step
        return True
