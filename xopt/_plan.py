"""The fast path of a step that repeats: same params, same state, grads of the same layout.

Built after a checked step in which every param was updated (no ``None`` grad), in place,
and by one path: :class:`FusedPlan` when one fused engine took them all (contiguous, one
dtype, one step count), :class:`ReferencePlan` when the array-API rule did (torch, CuPy
today, array-api-strict, ``impl="reference"``).  :meth:`Plan.try_step` then runs a step with
a few C-level passes over lists in place of the per-param checks, or declines (returns
False, having written nothing) and leaves everything to the general path, which checks
and explains.

What it proves each step, before anything is written (everything the general path would check):
- the same params container, the same keys in the same order, the same param objects, of the
  same dtype and shape, still writeable;
- the same state: ``opt.state``'s dict of every param is the one the plan was built on, and
  holds the same objects for the buffers its hyperparameter set keeps (an override may keep other
  buffers than the optimizer's own; a buffer replaced or deleted, a param's state reset: declined),
  every step count what the plan counted;
- the same configuration: ``impl``, the buffers kept, ``state_dtype``, ``skip_nonfinite`` (planned only
  with ``clip_grad_norm``, whose norm finds a non-finite grad), clipping on or off;
- grads of the type, dtype and shape (and device) of the first step's, sharing no byte with a
  param or a state buffer.  The fused engines' ``Table.run`` vouches again, from each array's
  own struct, for the addresses it hands its kernel (see :mod:`xopt.engines.fused_cpu`).
Ids are compared where objects are: the plan holds every object it compares, so no id it
holds can be reused by another object.

The quick step (:meth:`FusedPlan._quick`): with one CPU table run on the calling thread (fewer than
``PARALLEL_MIN`` elements), params in a dict or a list, no clipping and no schedule,
``update()``, under the optimizer's lock, hands the table's compiled call the ids of
what it was given (params, state dicts, buffers, in order), the step counts and the grads;
the call compares them with what the plan holds, checks each grad's type, vouches for every
array, and only then writes.  So a repeated small step is a few Python operations instead of a
few dozen, which matters in a training loop, where they run cold (``benchmarks/cold_call.py``);
a step whose scalars cannot change (``Optimizer.steady_from``) does not even compute them.
Anything it does not recognise it declines, having written nothing, to :meth:`Plan.try_step`.
"""

from __future__ import annotations

import bisect
import math
import operator
import struct
import sys
from collections.abc import Mapping
from itertools import chain

import numpy as np

from . import _backend, _clip

__all__ = ["Plan", "FusedPlan", "ReferencePlan"]

_step_of = operator.itemgetter("step")
_numpy_sig = operator.attrgetter("dtype", "shape")
_sig = operator.attrgetter("dtype", "shape", "device")


SKIPPED = "skipped"  # what _run returns for a step skip_nonfinite skipped


def config(opt):
    """What fixes the kernel and the buffers of a step: a change ends the plan."""
    return (opt.impl, tuple(view.buffers() for view, _ in opt._groups()), opt._hyper.get("state_dtype"),
            opt.skip_nonfinite, opt.clip_grad_norm is None)


def _config_key(opt):
    return opt.__dict__.get("_version", 0), opt.impl


def _steady_from(view):
    """``view.steady_from()``, or None where a class redefines ``scalars`` below the one whose ``steady_from``
    it inherits (a subclass that names a kernel and computes its own scalars): that answer is not about them."""
    mro = type(view).__mro__
    where = [next(i for i, c in enumerate(mro) if name in vars(c)) for name in ("steady_from", "scalars")]
    return view.steady_from() if where[0] <= where[1] else None


def _views(opt, groups, steps):
    """{(group, step): (view, its scalars for the step after ``step``)} for the params of a step."""
    out = {}
    for key in set(zip(groups, steps)):
        view = opt._at(*key)
        out[key] = (view, view.scalars(key[1] + 1))
    return out


class Plan:
    """What both plans check; a subclass runs the step (``_run``)."""

    check_params = True  # dtype, shape and writeable of the params, here (or by the engine's table)
    quick = False  # True: _quick(opt, params, grads) -> bool takes a whole step, checks and all (FusedPlan)

    def __init__(self, opt, params, entries):
        self.container = params
        self.keys = [e.key for e in entries]
        self.arrays = [e.p for e in entries]
        self.config = config(opt)
        self.config_key = _config_key(opt)  # while it holds, so does config (hyperparameters unset since)
        self.scheduled = any(scheduled for _, scheduled in opt._groups())
        self.state_root = opt.state
        self.states = [e.state for e in entries]
        self.steps = [e.state["step"] for e in entries]
        self.groups = [opt._group_of(e.key) for e in entries]  # which hyperparameter set each param takes
        kept = [view.buffers() for view, _ in opt._groups()]  # an override may keep other buffers (amsgrad)
        self.keeps = []  # (getter of a buffer, the states of the params whose set keeps it)
        for name in dict.fromkeys(chain.from_iterable(kept[group] for group in sorted(set(self.groups)))):
            states = [st for st, group in zip(self.states, self.groups) if name in kept[group]]
            self.keeps.append((operator.itemgetter(name), states))
        self.held = [list(map(get, states)) for get, states in self.keeps]  # held: compared by identity
        self.grad_type = type(entries[0].g)
        numpy = all(type(e.p).__module__ == "numpy" for e in entries)
        self.sig = _numpy_sig if numpy else _sig
        self.param_sigs = list(map(self.sig, self.arrays))
        self.writable = operator.attrgetter("flags.writeable") if numpy else None

    def try_step(self, opt, params, grads) -> bool:
        n = len(self.keys)
        if params is not self.container or not self._same_config(opt) or opt.state is not self.state_root:
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
        if not all(map(operator.is_, arrays, self.arrays)):
            return False
        if self.check_params:  # a fused table checks these itself, from each array's own struct
            if list(map(self.sig, arrays)) != self.param_sigs:  # reshaped, retyped or resized in place
                return False
            if self.writable is not None and not all(map(self.writable, arrays)):  # made read-only since
                return False
        if not all(map(operator.is_, map(self.state_root.get, self.keys), self.states)):
            return False
        try:  # the same buffer objects (a replaced or deleted one: declined), the same step counts
            if not all(all(map(operator.is_, map(get, states), held))
                       for (get, states), held in zip(self.keeps, self.held)):
                return False
            if not self._same_steps():
                return False
        except KeyError:  # a buffer or a step count deleted
            return False
        ran = self._run(opt, gs)
        if ran is SKIPPED:
            return True  # handled: skip_nonfinite found a non-finite norm, and nothing was written
        if not ran:
            return False
        self._count()
        opt.iter += 1
        return True

    def _same_config(self, opt) -> bool:
        key = _config_key(opt)
        if key == self.config_key:
            return True
        if config(opt) != self.config:  # a hyperparameter was set: only what fixes kernel and buffers counts
            return False
        self.config_key = key
        self.scheduled = any(scheduled for _, scheduled in opt._groups())  # lr set to a schedule, or to a number
        self._settle(opt)
        return True

    def _settle(self, opt):
        """After a hyperparameter set that keeps the plan: forget what was derived from the old values."""

    def _same_steps(self) -> bool:
        return list(map(_step_of, self.states)) == self.steps

    def _count(self):
        self.steps = [step + 1 for step in self.steps]
        for st, step in zip(self.states, self.steps):
            st["step"] = step


class FusedPlan(Plan):
    """One fused engine's :class:`Table` per hyperparameter set: a step is one kernel call per set.

    With more than one set, or with ``clip_grad_norm``, every table vouches for its arrays before
    any is written (the engine's ``Table.vouch``/``launch``); the norm is one more compiled pass.
    """

    check_params = False  # Table.run vouches for every param's address, dtype, shape and flags

    @classmethod
    def build(cls, engine, opt, params, entries):
        if not entries or len(entries) != len(params) or not engine.supports(opt):
            return None
        if opt.skip_nonfinite and opt.clip_grad_norm is None:  # the norm's pass is what finds a non-finite grad
            return None
        dtype, step = entries[0].p.dtype, entries[0].state["step"]
        for e in entries:
            if not (engine.accepts(e.opt, e) and e.p.flags.c_contiguous and e.p.dtype == dtype
                    and e.state["step"] == step):
                return None
        if dtype.name not in engine.PLAN_DTYPES or len({engine.device_of(e.p) for e in entries}) != 1:
            return None  # a table spans one device
        split = hasattr(engine.Table, "vouch")
        if opt.clip_grad_norm is not None and not (split and getattr(engine, "CLIPS", False)):
            return None
        if len({opt._group_of(e.key) for e in entries}) > 1 and not split:
            return None
        return cls(engine, opt, params, entries)

    def __init__(self, engine, opt, params, entries):
        super().__init__(opt, params, entries)
        self.engine = engine
        self.step = entries[0].state["step"]
        at = {}
        for i, group in enumerate(self.groups):
            at.setdefault(group, []).append(i)
        self.views_key = None
        self.tables = []  # (group, table, picks its grads from the step's)
        for group, idx in at.items():
            table = engine.Table(entries[idx[0]].opt, [self.arrays[i] for i in idx], [self.states[i] for i in idx],
                                 entries[0].p.dtype)
            pick = None if len(at) == 1 else (lambda gs, idx=idx: list(map(gs.__getitem__, idx)))
            self.tables.append((group, table, pick))
        if (len(self.tables) == 1 and opt.clip_grad_norm is None and getattr(table, "can_watch", False)
                and type(params) in (dict, list) and all(states == self.states for _, states in self.keeps)):
            # What try_step compares by identity, as ids for the table's compiled call to compare: the
            # plan holds every object named (self.arrays, self.states, self.held), so no id is reused.
            table.watch([*map(id, self.arrays), *map(id, self.states), *map(id, chain.from_iterable(self.held))])
            self.getters = [get for get, _ in self.keeps]
            self.quick_table = table
            self.quick = True
            self._settle(opt)

    def _settle(self, opt):
        if self.quick:
            self.values = None  # the kernel's scalars for step values_step: kept while they cannot change
            self.values_step = 0
            # from the hyperparameters now: one set later may unsettle them (AdaGrad's lr_decay)
            self.steady = _steady_from(opt._groups()[self.tables[0][0]][0]) or sys.maxsize

    def _views(self, opt):
        """Each table's view for this step: kept while no hyperparameter is set and no lr is scheduled, with
        None kept for opt itself (opt -> its plan -> opt would be a cycle, which only the cyclic GC frees, and
        with it the state buffers the plan holds)."""
        if self.scheduled or self.views_key != self.config_key:
            self.views = [None if view is opt else view for view in (opt._at(g, self.step) for g, _, _ in self.tables)]
            self.views_key = None if self.scheduled else self.config_key
        return [opt if view is None else view for view in self.views]

    def _quick(self, opt, params, grads) -> bool:
        """:meth:`try_step` for one table, no clipping and no schedule, its checks done in the table's
        compiled call (``Table.quick``): a repeated small step is a few Python operations, which in a
        training loop run cold (benchmarks/cold_call.py).  Called under the optimizer's lock.
        False: declined, nothing written (the caller then takes the checked path)."""
        n = len(self.keys)
        if (params is not self.container or type(grads) is not type(params) or opt.state is not self.state_root
                or len(params) != n or len(grads) != n or self.scheduled
                or _config_key(opt) != self.config_key):
            return False
        table, keys, states, step = self.quick_table, self.keys, self.states, self.step + 1
        values = self.values
        if values is None or (step != self.values_step and self.values_step < self.steady):
            view = self._views(opt)[0]
            values = self.values = table.scalar_order(view, view.scalars(step)) + (1.0,)  # clip scale 1: none
            self.values_step = step
        try:
            if not table.quick(list(map(grads.__getitem__, keys)), values, self.step, chain(
                    map(id, map(params.__getitem__, keys)), map(id, map(opt.state.get, keys)),
                    *[map(id, map(get, states)) for get in self.getters], map(_step_of, states))):
                return False
        except (LookupError, TypeError, struct.error):  # a key gone, a buffer deleted, a step count not an int
            return False
        for st in states:
            st["step"] = step
        self.step = step
        opt.iter += 1
        return True

    def _same_steps(self) -> bool:  # one step count for all
        return list(map(_step_of, self.states)).count(self.step) == len(self.states)

    def _count(self):
        step = self.step
        for st in self.states:
            st["step"] = step

    def _run(self, opt, gs):
        # The tables check the grads' type, layout, dtype and overlap themselves, from the arrays' own structs.
        views = self._views(opt)  # a schedule's error: before any write
        if len(self.tables) == 1 and opt.clip_grad_norm is None:
            (_, table, _), view = self.tables[0], views[0]
            if not table.run(view, gs, view.scalars(self.step + 1)):
                return False
        else:
            grads = [gs if pick is None else pick(gs) for _, _, pick in self.tables]
            if not all(table.vouch(g) for (_, table, _), g in zip(self.tables, grads)):
                return False
            factor = None
            if opt.clip_grad_norm is not None:
                opt.last_grad_norm = math.sqrt(sum(table.sum_squares() for _, table, _ in self.tables))
                if opt.skip_nonfinite and not math.isfinite(opt.last_grad_norm):
                    opt.skipped_steps += 1
                    return SKIPPED
                factor = _clip.scale(opt.last_grad_norm, opt.clip_grad_norm)
            for (_, table, _), view in zip(self.tables, views):
                table.launch(view, view.scalars(self.step + 1), factor)
        self.step += 1
        return True


class ReferencePlan(Plan):
    """The array-API rule over every param, without the per-param checks of the general path."""

    @classmethod
    def build(cls, opt, params, entries):
        if (not entries or len(entries) != len(params) or opt.skip_nonfinite or any(e.rebind for e in entries)
                or len({type(e.g) for e in entries}) != 1 or len({type(e.p) for e in entries}) != 1):
            return None
        try:
            return cls(opt, params, entries)
        except AttributeError:  # an array library without .device
            return None

    def __init__(self, opt, params, entries):
        super().__init__(opt, params, entries)
        self.entries = entries
        self._let_go(entries)
        self.grad_sigs = [self.sig(e.g) for e in entries]
        # NumPy params and grads (not scalars): overlap found by one compiled pass and vectorized searches
        self.numpy = self.writable is not None and issubclass(self.grad_type, np.ndarray)
        self._hold(self.held)

    @staticmethod
    def _let_go(entries):
        """Between steps an entry holds no view: group 0's is opt itself (opt -> its plan -> opt, a cycle)."""
        for e in entries:
            e.opt = None

    def _hold(self, held):
        """Take ``held`` (per buffer name, per param) as the state's: the rule gives a small param new buffers."""
        self.held = held
        arrays = self.arrays + list(chain.from_iterable(held))
        if self.numpy:
            arrays = [a for a in arrays if isinstance(a, np.ndarray)]  # a 0-d rule's result is a NumPy scalar
            lo, hi = _backend.numpy_bounds(arrays)
            order = np.argsort(lo[lo < hi], kind="stable")
            self.starts, self.ends = lo[lo < hi][order], hi[lo < hi][order]
            return
        spans = _backend.byte_spans(arrays)
        self.spans = sorted(s for s in spans if s is not None and s[1] < s[2])  # disjoint: checked at the step
        self.span_starts = [s[:2] for s in self.spans]

    def _overlap(self, gs) -> bool:
        """Whether a grad shares a byte range with a param or a state buffer."""
        if self.numpy:
            if not len(self.starts):
                return False
            lo, hi = _backend.numpy_bounds(gs)
            j = np.searchsorted(self.starts, hi)  # ranges before j start below the grad's end; they are
            return bool(np.any((lo < hi) & (j > 0) & (self.ends[j - 1] > lo)))  # disjoint: j - 1 is the one
        for s in _backend.byte_spans(gs):
            if s is None or s[1] >= s[2]:
                continue
            j = bisect.bisect_left(self.span_starts, (s[0], s[2]))
            if j and self.spans[j - 1][0] == s[0] and self.spans[j - 1][2] > s[1]:
                return True
        return False

    def _run(self, opt, gs):
        if set(map(type, gs)) != {self.grad_type} or list(map(self.sig, gs)) != self.grad_sigs or self._overlap(gs):
            return False
        from ._dispatch import apply_reference  # at call time: tests replace it

        views = _views(opt, self.groups, self.steps)
        factor = None
        if opt.clip_grad_norm is not None:
            opt.last_grad_norm = _clip.global_norm(gs)
            factor = _clip.scale(opt.last_grad_norm, opt.clip_grad_norm)
        for e, g, key in zip(self.entries, gs, zip(self.groups, self.steps)):
            e.g, (e.opt, e.scalars), e.clip = g, views[key], factor
        try:
            apply_reference(opt, self.entries)
        finally:
            self._let_go(self.entries)
        held = [list(map(get, states)) for get, states in self.keeps]
        if not all(all(map(operator.is_, now, before)) for now, before in zip(held, self.held)):
            self._hold(held)
        return True
