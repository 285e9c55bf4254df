"""The exact-type lane: a whole step in a few passes over lists, for arrays a fused engine reads itself.

``update(params, grads)`` tries this first.  It takes params and grads in a ``dict`` (or a
``list``) of exact NumPy arrays whose state exists (every step after a param's first), gathers
params, grads and state dicts into lists in one pass each, splits the step into parts (a
hyperparameter set at a step count: one part in a plain run), computes each part's scalars on
the host, and hands the lists to the engine, whose one compiled call checks every array from
its own struct (type, dtype, shape, flags, shared memory) before it writes anything.  CPU torch
tensors take the same lane: the engine's ``step_tensors`` reads their facts with torch's accessors
(:mod:`xopt.engines.cpu_tensors`) into one table that its compiled call checks; CUDA tensors, the CUDA
engine's, read the same way (:mod:`xopt.engines.cuda_tensors`), launched on torch's current stream.  Params that
are each one float64 number go to the scalar lane first (:mod:`xopt._scalar_lane`: the rule on Python floats, no
kernel call), and come here where it declines.  Nothing is remembered from one call to the next.

Whatever the lane does not take (another container or array type, a first step, a ``None``
grad, mixed dtypes, float16, a read-only or strided array, anything wrong) it declines having
written nothing, and the checked path (``Optimizer._update``) takes the step, converting what it
can and naming the culprit of what it cannot.
"""

from __future__ import annotations

import operator
import sys
from functools import partial
from itertools import repeat

import numpy as np

from . import _dispatch, _numba, _scalar_lane
from ._atomic import CALL, each
from ._inputs import number_grad

__all__ = ["take", "take_tensors"]

_MAX_STEP = 2**63 - 2  # a step count and the one after it fit in int64
_NUMBERS = (float, int, np.floating)
_SCALARS = (float, np.float64)  # params the scalar lane may take (and 0-d arrays)


def take(opt, params, grads) -> bool:
    """The whole step, counted, or False: declined, nothing written (the checked path takes it)."""
    container = type(params)
    if container is dict:
        if type(grads) is not dict or len(grads) != len(params):
            return False
        keys = list(params)
        ps = list(params.values())
        try:
            gs = list(map(grads.__getitem__, keys))
        except KeyError:
            return False
    elif container is list:
        if type(grads) is not list or len(grads) != len(params):
            return False
        keys = range(len(params))
        ps, gs = list(params), list(grads)  # our own lists: the compiled call reads them
    else:
        return False  # the checked path names what is wrong with the containers before it checks the patterns
    if opt._overrides and not opt._patterns_checked:  # until a step is taken (its commit marks them checked)
        opt._check_patterns(params)  # raises, naming the pattern that matches no param, before any write
    return _take(opt, params, keys, ps, gs)


def take_tensors(opt, keys, ps, gs) -> bool:
    """:func:`take` of torch tensors given as lists (``xopt.torch``'s step: its param groups' params with
    grads, ``keys`` their names), without the dicts of an ``update`` call; False also where ``ps`` are not
    tensors (the caller then calls ``update``)."""
    torch = sys.modules.get("torch")
    if not ps or torch is None or not isinstance(ps[0], torch.Tensor):
        return False
    if opt._overrides and not opt._patterns_checked:
        opt._check_patterns(dict.fromkeys(keys))
    return _take(opt, None, keys, ps, gs)


def _take(opt, params, keys, ps, gs) -> bool:
    """:func:`take` once the params, grads and their keys are in lists of our own (``params`` the container
    they came in: float params are rebound in it; None for tensors)."""
    if not ps:
        return False
    boxes = tensors = None
    first = ps[0]  # picks the engine and the kernel
    if params is not None and (type(first) in _SCALARS or type(first) is np.ndarray and first.shape == ()) \
            and _scalar_lane.take(opt, params, keys, ps, gs):
        return True
    if type(first) is not np.ndarray:
        if isinstance(first, _NUMBERS) and params is not None:
            boxes = _box(ps)  # Python or NumPy float params: the step writes 0-d copies, then rebinds
            if boxes is None:
                return False
            ps = boxes[0]
            first = ps[0]
            gs = _arrays(gs, ps)
            if gs is None:
                return False
        else:
            torch = sys.modules.get("torch")
            if torch is not None and isinstance(first, torch.Tensor):  # the engine reads them by their addresses
                dtype = _tensor_dtype(first)  # CPU tensors: the CPU engine; CUDA ones: the CUDA engine
                found = (_dispatch.lane_kind(opt, _prototype(dtype)) if dtype is not None
                         else _dispatch.gpu_tensor_kind(opt, first))
                if found is None:
                    return False
                tensors = ps
    if tensors is None:
        found = _dispatch.lane_kind(opt, first)
        if found is None:
            return False
    engine, kind = found
    states = list(map(opt.state.get, keys))
    created = []
    try:
        if None in states and (tensors is not None or not _new_states(opt, engine, kind, keys, ps, states, created)):
            took = False  # a tensor's first step: the checked path makes its state (torch tensors)
        else:
            took = _step(opt, engine, kind, params, keys, ps, gs, states, boxes, created, tensors)
    except BaseException:
        _forget(opt, created)
        raise
    if not took:
        _forget(opt, created)
    return took


def _new_states(opt, engine, kind, keys, ps, states, made) -> bool:
    """The state of each param that has none (its first step), made by the engine into ``opt.state`` and
    ``states``, its key appended to ``made``; False where the lane leaves the first step to the checked path
    (the caller then forgets what ``made`` holds)."""
    views = {}
    for i, st in enumerate(states):
        if st is None:
            if keys[i] in opt.state:  # a state set to None: the checked path's to refuse
                return False
            group = opt._group_of(keys[i]) if opt._overrides else 0
            view = views.get(group)
            if view is None:
                view = views[group] = opt._at(group, 0)
            st = engine.new_state(view, kind, ps[i])
            if st is None:
                return False
            opt.state[keys[i]] = states[i] = st
            made.append(keys[i])
    return True


def _forget(opt, keys):
    """Take back the states made for a step that did not happen (a count still 0: not committed)."""
    for key in keys:
        st = opt.state.get(key)
        if st is not None and st.get("step") == 0:
            del opt.state[key]


def _step(opt, engine, kind, params, keys, ps, gs, states, boxes, created, tensors=None):
    """True: the step is done and counted, or skipped by skip_nonfinite; False: declined (nothing written).
    ``tensors``: ``ps`` when they are torch tensors (the engine's ``step_tensors`` reads them)."""
    try:  # dict's own lookup: a state that is not a dict (the commit could not count it) is the checked path's
        steps = list(map(dict.__getitem__, states, repeat("step")))
    except (KeyError, TypeError):
        return False
    first = steps[0]
    if type(first) is not int or not 0 <= first <= _MAX_STEP:  # each one's type is checked by the engine
        return False
    try:  # a step count that is an array or unhashable: the checked path's to refuse, naming it
        same = steps.count(first) == len(steps)
    except (TypeError, ValueError):
        return False
    if same and not opt._overrides:  # one part: the usual step
        part = None
        view = opt if not callable(opt._hyper.get("lr")) else opt._at(0, first)  # a schedule's error raises here
        views, values = [view], [kind.order(view.scalars(first + 1))]
    else:
        groups = _groups(opt, keys) if opt._overrides else [0] * len(steps)
        if same and groups.count(groups[0]) == len(groups):
            part, pairs = None, [(groups[0], first)]
        else:
            try:  # each count's type is checked by the engine; here their values, as int64 takes them
                if min(steps) < 0 or max(steps) > _MAX_STEP:
                    return False
            except (TypeError, ValueError):
                return False
            pairs = list(dict.fromkeys(zip(groups, steps)))  # each (group, count) once, in order
            part = list(map({pair: i for i, pair in enumerate(pairs)}.__getitem__, zip(groups, steps)))
        views, values = [], []
        for group, count in pairs:
            view = opt._at(group, count)  # a schedule's error raises here, before any write
            views.append(view)
            values.append(kind.order(view.scalars(count + 1)))
    if type(ps[0]) is np.ndarray and type(gs[0]) is not np.ndarray:
        gs = _arrays(gs, ps)  # number grads (arithmetic on 0-d arrays gives NumPy scalars)
        if gs is None:
            return False

    def commit(norm, skipped):
        """The calls into C that count the step (the engine runs them in the C-level call that writes it,
        ``xopt._atomic.together``): each param's step count, ``iter``, the clip norm, float params rebound; or,
        for a step skip_nonfinite skips, ``skipped_steps``, the norm, and the state this call made taken back."""
        own = opt.__dict__.__setitem__
        if skipped:
            calls = [partial(own, "skipped_steps", opt.skipped_steps + 1)]
            calls += [partial(opt.state.pop, key, None) for key in created]
        else:
            calls = [each(dict.__setitem__, states, repeat("step"), list(map(_ONE.__add__, steps))),
                     partial(own, "iter", opt.iter + 1)]
            if boxes is not None:  # the new values of float params, read from their boxes once written
                calls.append(each(operator.setitem, repeat(params), keys, map(CALL, map(partial, boxes[1], ps))))
        if norm is not None:
            calls.append(partial(own, "last_grad_norm", norm))
        if not opt._patterns_checked:
            calls.append(partial(own, "_patterns_checked", True))
        return calls

    if tensors is not None:  # torch tensors: the engine reads them itself, and bumps their version counters
        return engine.step_tensors(opt, kind, views, values, ps, gs, states, steps, part, commit) is True
    took = engine.step(opt, kind, views, values, ps, gs, states, steps, part, commit)
    if took is None and type(ps[0]) is np.ndarray and any(type(g) is not np.ndarray for g in gs):
        gs = _arrays(gs, ps)  # number grads after array ones
        if gs is not None:
            took = engine.step(opt, kind, views, values, ps, gs, states, steps, part, commit)
    return took is True


_ONE = 1
_PROTOTYPES = {}  # NumPy dtype -> an empty array of it: what picks the engine and kind of a step on tensors


def _tensor_dtype(t):
    """``cpu_tensors.dtype_of(t)``, or None where numba's code cannot run (:mod:`xopt._numba`; the CUDA engine or
    the checked path takes the step).  The module imports torch and numba: imported at a first step on tensors,
    after ``usable()`` has found numba a place to cache (a read-only install)."""
    global _DTYPE_OF
    if _DTYPE_OF is None:
        if not _numba.usable():
            return None
        from .engines.cpu_tensors import dtype_of as _DTYPE_OF
    return _DTYPE_OF(t)


_DTYPE_OF = None


def _prototype(dtype):
    """An empty NumPy array of ``dtype`` (None: None), for the engine and kind of a step on tensors of it."""
    if dtype is None:
        return None
    found = _PROTOTYPES.get(dtype)
    if found is None:
        found = _PROTOTYPES[dtype] = np.empty(0, dtype)
    return found


def _groups(opt, keys):
    """Each key's hyperparameter set (its override's, 0: the optimizer's own), known keys looked up in C."""
    groups = list(map(opt._group_index.get, keys))
    return groups if None not in groups else list(map(opt._group_of, keys))


def _arrays(gs, ps):
    """Number grads as 0-d arrays, as the checked path converts them (``_inputs.number_grad``); None where some
    grad is neither an array nor such a number, or is a number whose param is not a 0-d array (a float param
    after an array one: the checked path boxes it), or an int too large for its param's dtype."""
    out = []
    for g, p in zip(gs, ps):
        if type(g) is np.ndarray:
            out.append(g)
        elif isinstance(g, _NUMBERS) and not isinstance(g, bool) and type(p) is np.ndarray and p.ndim == 0:
            try:
                out.append(number_grad(None, g, p.dtype))
            except ValueError:  # an int too large for the dtype: the checked path names its param
                return None
        else:
            return None
    return out


def _box(ps):
    """(0-d arrays holding the float params, how to turn each back), or None if some param is not a float.

    A Python float steps in float64 and comes back a float; a NumPy float scalar steps in its dtype
    and comes back a scalar of it."""
    boxes, unboxes = [], []
    for p in ps:
        kind = type(p)
        if kind is float:
            boxes.append(np.array(p, dtype=np.float64))
            unboxes.append(float)
        elif kind in (np.float64, np.float32, np.float16):
            boxes.append(np.array(p))
            unboxes.append(operator.itemgetter(()))
        else:
            return None
    return boxes, unboxes
