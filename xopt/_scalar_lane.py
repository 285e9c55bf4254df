"""The scalar lane: a step of a few float64 scalar params in Python floats, with no kernel call.

A param that is a Python float, a NumPy float64 scalar or a 0-d float64 NumPy array (Rosenbrock's ``x`` and
``y``, the book's ``optimizer_compare_naive.py``) is one number: a compiled kernel's call costs more than its
arithmetic.  Here each param's rule (the optimizer's own array-API ``rule``, the reference) runs on Python
floats: IEEE float64 operations as NumPy's on 0-d float64 arrays, the same bits (``tests/test_scalar_lane.py``
holds every optimizer with a kernel to the checked path's numbers, edge values too).

It takes a step only in the plain case: every param such a scalar, every grad a float, a NumPy float64 or a
0-d float64 array, every state made and its buffers 0-d float64 arrays of their own, one step count, no
overrides, no clipping, no skip_nonfinite, ``impl="auto"``, and an optimizer whose kernel is an element rule
(:func:`_takes`).  Anything else it declines, having written nothing, and the exact-type lane
(:mod:`xopt._lane`) takes the step as before.  Its writes (params, buffers, step counts, ``iter``) are one
C-level loop, as :func:`xopt._atomic.together` makes every step's.
"""

from __future__ import annotations

import math
from collections import deque
from operator import setitem
from types import SimpleNamespace

import numpy as np

from .engines.kernels import lookup

__all__ = ["take"]

_F64 = np.dtype(np.float64)
_ARRAY, _NP_FLOAT = np.ndarray, np.float64
_MAX_STEP = 2**63 - 2
_TAKES = {}  # (optimizer class, impl) -> whether the lane may take its steps


def _takes(opt) -> bool:
    """Whether ``opt``'s steps may run here: its class's kernel an element rule (one number in, one out: not
    LAMB's norms, not Adafactor's factored state) and its impl "auto" (a fact of the two: "reference" and
    "fused" ask for a path by name)."""
    key = (type(opt), opt.impl)
    found = _TAKES.get(key)
    if found is None:
        kernel = lookup(opt)
        found = _TAKES[key] = (kernel is not None and not kernel.norms and not kernel.factored
                               and opt.impl == "auto")
    return found


def take(opt, params, keys, ps, gs) -> bool:
    """The whole step, counted, or False: declined, nothing written."""
    hyper = opt._hyper
    if opt._overrides or hyper["clip_grad_norm"] is not None or hyper["skip_nonfinite"] or not _takes(opt):
        return False
    state = opt.state
    st = state.get(keys[0])
    if type(st) is not dict:
        return False  # a first step (the exact-type lane makes the state), or a state the checked path refuses
    first = st.get("step")
    if type(first) is not int or not 0 <= first <= _MAX_STEP:
        return False
    view = opt if not callable(hyper["lr"]) else opt._at(0, first)  # a schedule's error raises here
    names = view.buffers()
    s = view.scalars(first + 1)
    rule = view.rule
    # what the step writes, one (target, index, value) each, in the order the writes run: 0-d arrays' values,
    # float params rebound, step counts, iter
    targets, where, values, steps, arrays, read = [], [], [], [], [], []  # arrays written, grad arrays read
    target, at, value, counted = targets.append, where.append, values.append, steps.append
    for key, p, g in zip(keys, ps, gs):
        kind = type(g)
        if kind is float or kind is _NP_FLOAT:
            g = float(g)
        elif kind is _ARRAY and g.dtype is _F64 and g.shape == () and g.base is None:
            read.append(g)
            g = float(g)
        else:
            return False
        st = state.get(key)
        if type(st) is not dict:
            return False
        count = st.get("step")
        if type(count) is not int or count != first:  # another int type: the other paths' to convert or refuse
            return False
        buffers = {}
        for name in names:
            b = st.get(name)
            if type(b) is not _ARRAY or b.dtype is not _F64 or b.shape != () or b.base is not None \
                    or not b.flags.writeable:
                return False
            buffers[name] = float(b)
        kind = type(p)
        if kind is _ARRAY:
            if p.dtype is not _F64 or p.shape != () or p.base is not None or not p.flags.writeable:
                return False
            target(p)
            at(())
            arrays.append(p)
        elif kind is float or kind is _NP_FLOAT:
            target(params)
            at(key)
        else:
            return False
        try:
            p_new, new = rule(FLOATS, float(p), g, buffers, s)
        except (ArithmeticError, ValueError, AttributeError, TypeError):
            return False  # where Python floats raise (1.0 / 0.0, sqrt(-1.0)) or FLOATS lacks a function
        value(p_new if kind is _ARRAY else kind(p_new))
        for name in names:
            b = st[name]
            target(b)
            at(())
            value(new[name])
            arrays.append(b)
        counted(st)
    written = set(map(id, arrays))
    if len(written) != len(arrays) or read and not written.isdisjoint(map(id, read)):
        return False  # an array written twice (under two keys, a param as a buffer), or a grad that is one: the
        # checked path refuses them, naming them
    n = len(steps)
    targets += steps
    where += ["step"] * n
    values += [first + 1] * n
    targets.append(opt.__dict__)
    where.append("iter")
    values.append(opt.iter + 1)
    if not opt._patterns_checked:
        targets.append(opt.__dict__)
        where.append("_patterns_checked")
        values.append(True)
    deque(map(setitem, targets, where, values), 0)  # one call into C: every write of the step (xopt._atomic)
    return True


def _sign(x):
    """np.sign's float64 result as a Python float: ±1, +0.0 for either zero, a NaN itself."""
    if x != x:
        return x
    return 1.0 if x > 0.0 else -1.0 if x < 0.0 else 0.0


def _maximum(a, b):
    """np.maximum's float64 result as a Python float: a NaN wins (the first), else b unless a > b (so
    maximum(-0.0, 0.0) is 0.0 and maximum(0.0, -0.0) is -0.0)."""
    if a != a:
        return a
    if b != b:
        return b
    return a if a > b else b


FLOATS = SimpleNamespace(
    sqrt=math.sqrt,  # correctly rounded, as np.sqrt; a negative raises ValueError (NumPy's NaN: declined)
    abs=math.fabs,
    sign=_sign,
    maximum=_maximum,
)  # the array-API functions the element rules call, for Python floats: NumPy's results on 0-d float64 arrays bit
# for bit, as Python floats (NumPy's scalars would carry on in NumPy's arithmetic, with its warnings)
