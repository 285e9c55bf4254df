"""The machinery every optimizer shares: ``update``, state, checks, state_dict.

An optimizer subclass declares its hyperparameters (:class:`~xopt._hyper.Hyper`),
the names of its state buffers, the per-step scalars it needs (computed here, on
the host, once per step) and one elementwise ``rule`` written against the array
API.  That rule is the reference: every fused path is tested against it.
"""

from __future__ import annotations

import numbers

from . import _backend, _dispatch
from ._atomic import StepGuard
from ._hyper import Hyper, flag
from ._inputs import check_overlaps, collect, describe

__all__ = ["Optimizer"]


class Optimizer:
    """Base class: see the subclasses for the update rules.

    Args common to every optimizer (keyword only):
        skip_nonfinite: when True, a step in which any gradient holds a NaN or an
            Inf changes nothing (params, state, step counts) and is counted in
            ``skipped_steps``.  Default False: non-finite values propagate, as in
            the seed and torch.optim.
        impl: ``"auto"`` (the fastest path available for each array),
            ``"reference"`` (the array-API rule) or ``"fused"`` (require a fused
            kernel; raises if none can be had).
    """

    skip_nonfinite = Hyper(flag)

    def __init__(self, *, skip_nonfinite=False, impl="auto", **hyperparameters):
        self._constructing = True
        self._hyper = {}
        for name, value in hyperparameters.items():
            if not isinstance(getattr(type(self), name, None), Hyper):
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {name!r}")
            setattr(self, name, value)
        self.skip_nonfinite = skip_nonfinite
        self._constructing = False
        self._check_hyperparameters()
        self.impl = _dispatch.check_impl(impl, self)
        self.state = {}  # param key -> {"step": int, buffer name -> array}
        self.iter = 0  # update() calls that changed something (the seed's Adam.iter)
        self.skipped_steps = 0
        self._plan = None  # the fast path of a step that repeats (see _dispatch.plan)
        self._guard = StepGuard()  # one step at a time; Ctrl-C between steps (see _atomic)

    def __getstate__(self):  # copy/pickle: the plan (ids of this process's arrays) and the lock stay behind
        state = dict(self.__dict__)
        state["_plan"], state["_guard"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._guard = StepGuard()

    # -- what a subclass defines -------------------------------------------------------
    def buffers(self) -> tuple:
        """Names of the state buffers kept per param, for the current hyperparameters."""
        return ()

    def initial_value(self, name) -> float:
        """The value a state buffer starts from."""
        return 0.0

    def scalars(self, step: int) -> dict:
        """The per-step numbers the rule needs, computed on the host."""
        raise NotImplementedError

    def rule(self, xp, p, g, state: dict, s: dict):
        """The reference update: returns (new p, {buffer name: new buffer})."""
        raise NotImplementedError

    def _check_hyperparameters(self):
        """Checks that involve more than one hyperparameter."""

    # -- the public API ---------------------------------------------------------------
    def hyperparameters(self) -> dict:
        return {k: v for k, v in self._hyper.items() if k != "skip_nonfinite"}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"

    def __getattr__(self, name):
        # The seed's attributes: Adam.m, Adam.v, AdaGrad.h, ... as {key: buffer}, None before the first step.
        if name.startswith("_") or name not in self.buffers():
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if not self.state:
            return None
        return {k: st[name] for k, st in self.state.items() if name in st}

    def update(self, params, grads):
        """Update ``params`` in place from ``grads`` (both dicts name -> array, or lists).

        All or nothing: everything is checked before the first array is written, so a call
        that raises changes no param, no state and no step count; a step's arrays and step
        counts move together, Ctrl-C included (it is raised when the step is whole).  Calls
        from several threads on one optimizer run one after the other.
        """
        self._guard.run(self._update, params, grads)

    def _update(self, params, grads):
        if self._plan is not None and self._plan.try_step(self, params, grads):
            self.iter += 1
            return
        self._plan = None
        entries = collect(params, grads)
        for e in entries:
            self._check_state(e)
        check_overlaps(self._named_arrays(entries))
        if self.skip_nonfinite and not all(_all_finite(e) for e in entries):
            self.skipped_steps += 1
            return
        paths = _dispatch.select(self, entries)  # raises before any write if impl can't be honoured
        created = {e.key for e in entries if e.key not in self.state}
        try:
            scalars_by_step = {}
            for e in entries:
                e.state = self._state_for(e)
                step = e.state["step"] + 1
                if step not in scalars_by_step:
                    scalars_by_step[step] = self.scalars(step)
                e.scalars = scalars_by_step[step]
        except BaseException:
            for key in created:  # nothing written yet: take back the state this call made
                self.state.pop(key, None)
            raise
        for done, (apply, group) in enumerate(paths):
            try:
                apply(self, group)
            except BaseException:
                # The groups after this one are unwritten: the state this call made for them goes.
                # (This one may be half-written only if its array library failed inside the rule.)
                for _, later in paths[done + 1:]:
                    for e in later:
                        if e.key in created:
                            self.state.pop(e.key, None)
                raise
        for e in entries:
            e.state["step"] = int(e.state["step"]) + 1
            if e.rebind:
                params[e.key] = e.p
        self.iter += 1
        self._plan = _dispatch.plan(self, params, entries, paths)

    def _named_arrays(self, entries):
        """Every array a step writes or reads, named for messages: (array, name, is a grad)."""
        named = []
        for e in entries:
            named.append((e.p, f"param {describe(e.key)}", False))
            named.append((e.g, f"the grad of param {describe(e.key)}", True))
            for name, buf in self.state.get(e.key, {}).items():
                if name != "step":
                    named.append((buf, f"optimizer state {name!r} of param {describe(e.key)}", False))
        return named

    # -- state ------------------------------------------------------------------------
    def buffer_dtype(self, e):
        """The dtype of e's state buffers: its compute dtype, or the lower ``state_dtype`` if one is set."""
        low = self._hyper.get("state_dtype")
        if low is None:
            return _backend.compute_dtype(e.xp, e.p.dtype)
        dtype = _backend.low_precision_dtype(e.xp, low)
        if dtype is None:
            raise TypeError(f"param {describe(e.key)}: state_dtype={low!r} is supported for NumPy arrays only, "
                            f"not {_backend.library_name(e.p)}")
        return dtype

    def _check_state(self, e):
        dtype = self.buffer_dtype(e)  # raises for an unsupported state_dtype, before any write
        st = self.state.get(e.key)
        if st is None:
            return
        step = st.get("step")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 0 <= step < 2**63:
            raise ValueError(f"param {describe(e.key)}: its optimizer state has step {step!r}; a step count "
                             "is an int >= 0")
        for name in self.buffers():
            buf = st.get(name)
            if buf is None:
                continue
            if tuple(buf.shape) != tuple(e.p.shape):
                raise ValueError(f"param {describe(e.key)} has shape {tuple(e.p.shape)} but its optimizer "
                                 f"state {name!r} was made for shape {tuple(buf.shape)}")
            # Compared by name: a state loaded from a file is NumPy until its first use.
            if _backend.dtype_name(buf.dtype) != _backend.dtype_name(dtype):
                raise TypeError(f"param {describe(e.key)} keeps its state in {_backend.dtype_name(dtype)} but its "
                                f"optimizer state {name!r} is {_backend.dtype_name(buf.dtype)}")

    def _state_for(self, e):
        st = self.state.setdefault(e.key, {"step": 0})
        xp, dtype = e.xp, self.buffer_dtype(e)
        for name in self.buffers():
            buf = st.get(name)
            if buf is None:
                # full_like: a Dask param's state is chunked like the param
                st[name] = xp.full_like(e.p, self.initial_value(name), dtype=dtype, device=_backend.device(e.p))
            elif _backend.library_name(buf) != _backend.library_name(e.p):
                st[name] = _backend.from_numpy(_backend.to_numpy(buf), e.p)
            elif not (_backend.can_rebind_only(buf) or _backend.is_writable(buf)):
                st[name] = _copy(buf)  # a read-only buffer (a user's, a file's): the step writes a copy
        return st

    def state_dict(self) -> dict:
        """A snapshot: plain Python numbers and copies of every buffer (taken between steps)."""
        return self._guard.run(self._state_dict)

    def _state_dict(self) -> dict:
        return {
            "optimizer": type(self).__name__,
            "hyperparameters": dict(self._hyper),
            "iter": self.iter,
            "skipped_steps": self.skipped_steps,
            "state": {
                key: {name: (v if name == "step" else _copy(v)) for name, v in st.items()}
                for key, st in self.state.items()
            },
        }

    def load_state_dict(self, state_dict: dict, params=None):
        """Restore a :meth:`state_dict`.  Checked whole first: a misfit raises and changes nothing.

        If ``params`` is given, its names and shapes must be those of the state.
        """
        from .state_io import checked_state

        self._guard.run(self._load_state_dict, checked_state, state_dict, params)

    def _load_state_dict(self, checked_state, state_dict, params):
        hyper, state, counters = checked_state(self, state_dict, params)
        self._hyper = hyper
        self.state = state
        self._plan = None
        self.iter, self.skipped_steps = counters

    def save(self, path):
        """Write :meth:`state_dict` to ``path`` (an ``.npz`` file; no pickled code)."""
        from .state_io import save_state

        save_state(self.state_dict(), path)

    def load(self, path, params=None):
        """Read a file written by :meth:`save` and :meth:`load_state_dict` it."""
        from .state_io import load_state

        self.load_state_dict(load_state(path), params)


def _copy(x):
    xp = _backend.namespace(x)
    return xp.asarray(x, copy=True)


def _all_finite(e) -> bool:
    return bool(e.xp.all(e.xp.isfinite(e.g)))

