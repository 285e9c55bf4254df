"""The machinery every optimizer shares: ``update``, state, checks, state_dict.

An optimizer subclass declares its hyperparameters (:class:`~xopt._hyper.Hyper`),
the names of its state buffers, the per-step scalars it needs (computed here, on
the host, once per step) and one elementwise ``rule`` written against the array
API.  That rule is the reference: every fused path is tested against it.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import sys

import numpy as np

from . import _backend, _checked, _dispatch, _lane
from ._atomic import StepGuard
from ._checked import _copy, _state_8bit
from ._hyper import Hyper, check_overrides, flag, optional_positive, publish
from ._inputs import describe, param_keys

__all__ = ["Optimizer", "fresh"]


class Optimizer:
    """Base class: see the subclasses for the update rules.

    Args common to every optimizer (keyword only):
        overrides: ``{pattern: {hyperparameter: value}}``, hyperparameters for some params:
            ``pattern`` is an ``fnmatch`` glob matched against dict keys (case-sensitive) or an
            int matching that list index; the first pattern that matches a param wins; params
            no pattern matches use the optimizer's own values.  Example:
            ``AdamW(weight_decay=0.01, overrides={"b*": {"weight_decay": 0.0}})``.  A pattern
            that matches no param at the first update raises ValueError.
        clip_grad_norm: None, or ``max_norm``: before the rule, every grad of the step is
            scaled by ``min(1, max_norm / (norm + 1e-6))``, ``norm`` the L2 norm over all
            grads of the step, as ``torch.nn.utils.clip_grad_norm_`` then the step does.  The
            grad arrays passed in are not modified; ``opt.last_grad_norm`` holds the norm.
        skip_nonfinite: when True, a step in which any gradient holds a NaN or an
            Inf changes nothing (params, state, step counts) and is counted in
            ``skipped_steps``.  Default False: non-finite values propagate, as in
            the seed and torch.optim.  With ``clip_grad_norm`` the norm decides.
        impl: ``"auto"`` (the fastest path available for each array),
            ``"reference"`` (the array-API rule) or ``"fused"`` (require a fused
            kernel; raises if none can be had).

    Schedules: ``lr`` (an override's too) may be a function ``f(count) -> lr``, ``count`` the
    number of updates already applied to the param (0 on its first step), as in optax; see
    :mod:`xopt.schedules`.  ``opt.lr`` gives back what was set, ``opt.current_lr(key)`` the
    value the next step of param ``key`` uses.
    """

    skip_nonfinite = Hyper(flag)
    clip_grad_norm = Hyper(optional_positive)

    def __init_subclass__(cls, **kwargs):
        """help(SomeOptimizer) shows the arguments every optimizer takes: in its signature and its docstring."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None:
            own = [p for p in inspect.signature(init).parameters.values() if p.kind is not p.VAR_KEYWORD]
            common = [p for p in inspect.signature(Optimizer.__init__).parameters.values()
                      if p.kind is p.KEYWORD_ONLY]
            init.__signature__ = inspect.signature(init).replace(parameters=own + common)
        if cls.__doc__ and "Args common to every optimizer" not in cls.__doc__:
            cls.__doc__ = cls.__doc__.rstrip() + "\n\n    " + _COMMON_ARGS

    def __init__(self, *, skip_nonfinite=False, clip_grad_norm=None, impl="auto", overrides=None,
                 **hyperparameters):
        self._constructing = True
        self._hyper = {}
        for name, value in hyperparameters.items():
            if not isinstance(getattr(type(self), name, None), Hyper):
                raise TypeError(_unexpected(type(self).__name__, name))
            setattr(self, name, value)
        self.skip_nonfinite = skip_nonfinite
        self.clip_grad_norm = clip_grad_norm
        self._constructing = False
        self._check_hyperparameters()
        self._overrides = check_overrides(self, overrides)
        self._reset_groups()
        self._groups()  # each override's hyperparameters checked together, as the optimizer's own are
        self.impl = impl  # checked by __setattr__
        self.state = {}  # param key -> {"step": int, buffer name -> array}
        self.iter = 0  # update() calls taken, as the seed's Adam.iter (all-None grads too; not raised or skipped)
        self.skipped_steps = 0
        self.last_grad_norm = None  # with clip_grad_norm: the norm of the last step's grads
        self._guard = StepGuard()  # one step at a time (see _atomic)

    _attributes = ("state", "iter", "skipped_steps", "last_grad_norm", "impl")  # set besides the hyperparameters

    def __setattr__(self, name, value):
        """A misspelt hyperparameter (``opt.learning_rate = 0.1``) raises instead of being kept unread.  Only
        xopt's own classes are held to their names: a user's subclass sets what it likes."""
        if (name[0] != "_" and name not in self._attributes and not hasattr(type(self), name)
                and name not in self.__dict__ and type(self).__module__.startswith("xopt.")):
            hyper = ", ".join(n for n in self.__dict__.get("_hyper", ()) if n not in ("skip_nonfinite",))
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r} to set (its hyperparameters: "
                                 f"{hyper}; and {', '.join(self._attributes)})")
        if name == "impl":  # checked when set, as the constructor's (a misspelt impl would run as "auto")
            value = _dispatch.check_impl(value, self)
        object.__setattr__(self, name, value)
        if name[0] != "_" and not type(self).__module__.startswith("xopt.") and self.__dict__.get("_group_cache"):
            # a user's subclass: its overrides' sets hold copies of its own attributes (_view), made again
            self.__dict__["_version"] = self.__dict__.get("_version", 0) + 1

    def __getstate__(self):
        """pickle: the lock and the cached hyperparameter sets stay behind, and the buffers are copied between two
        steps (a step from another thread writes them outside the GIL; it waits for the copies)."""
        return self._between_steps(self._plain_state, True)

    def __copy__(self):  # copy.copy: the same state dicts and buffers, its own hyperparameters
        made = object.__new__(type(self))
        made.__setstate__(self._plain_state(False))
        return made

    def __deepcopy__(self, memo):  # copied between two steps, as pickled (a step from another thread waits)
        return self._between_steps(self._deep_copy, memo)

    def _between_steps(self, f, *args):
        """``f(*args)`` while no step of this optimizer runs: at once from inside one (a schedule), where its
        writes have not begun, or where there is no lock (a hyperparameter set)."""
        guard = self.__dict__.get("_guard")
        if guard is None or guard.mine():
            return f(*args)
        return guard.run(f, *args)

    def _deep_copy(self, memo):
        made = memo[id(self)] = object.__new__(type(self))
        made.__setstate__(copy.deepcopy(self._plain_state(False), memo))
        return made

    def _plain_state(self, copies):
        state = dict(self.__dict__)
        state["_guard"], state["_group_cache"] = None, None
        if copies:
            state["state"] = {key: {name: _snapshot(v) for name, v in st.items()} if type(st) is dict else st
                              for key, st in self.state.items()}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        publish(self, dict(state["_hyper"]))  # a copy's hyperparameters are its own (copy.copy shares the dict)
        self._guard = StepGuard()

    @classmethod
    def fresh(cls, **arguments):
        """An optimizer of this class made from every argument (all its hyperparameters by name), checked as
        its constructor checks them: what a state is checked with, and what runs a step elsewhere (a Dask
        worker).  A user's subclass whose ``__init__`` takes other arguments (it fixes some
        hyperparameters) is made through ``Optimizer.__init__``, which takes every hyperparameter by name."""
        try:
            return cls(**arguments)
        except TypeError:
            if cls.__module__.startswith("xopt."):
                raise
            made = object.__new__(cls)
            Optimizer.__init__(made, **arguments)  # a wrong name or type raises here as it would have
            return made

    # -- what a subclass defines -------------------------------------------------------
    def buffers(self) -> tuple:
        """Names of the state buffers kept per param, for the current hyperparameters."""
        return ()

    def initial_value(self, name) -> float:
        """The value a state buffer starts from."""
        return 0.0

    # Buffers whose first step is not the param's: a step that makes one of them after the param's first (its
    # option turned on mid-run) gets the scalars of step 1 (SGD's momentum buffer starts at g, as torch's).
    first_step_buffers = ()

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
        """The rule's hyperparameters (not the step's options skip_nonfinite and clip_grad_norm)."""
        return {k: v for k, v in self._hyper.items() if k not in ("skip_nonfinite", "clip_grad_norm")}

    @property
    def overrides(self) -> dict:
        """The per-param hyperparameters: {pattern: {name: value}} (a copy)."""
        return {pattern: dict(values) for pattern, values in self._overrides.items()}

    def __repr__(self):
        args = [f"{k}={v!r}" for k, v in self.hyperparameters().items()]
        if self.clip_grad_norm is not None:
            args.append(f"clip_grad_norm={self.clip_grad_norm!r}")
        overrides = self.__dict__.get("_overrides")  # a hyperparameter set has none: it is one
        if overrides:
            args.append(f"overrides={overrides!r}")
        return f"{type(self).__name__}({', '.join(args)})"

    def current_lr(self, key) -> float:
        """The learning rate the next step of param ``key`` uses (its override's, its schedule's value)."""
        st = self.state.get(key)
        return self._at(self._group_of(key), int(st["step"]) if st else 0).lr

    # -- hyperparameter sets: the optimizer's own (group 0) and each override's (group i + 1) --------
    def _reset_groups(self):
        self._group_index = {}  # param key -> its group
        self._patterns_checked = False
        self._group_cache = None

    def _sets_version(self):
        """What the hyperparameter sets :meth:`_groups` keeps were built from: they are rebuilt when it changes."""
        return self.__dict__.get("_version", 0), self.__dict__.get("impl")  # views copy impl too

    def _groups(self):
        """[(view, scheduled)] per group, rebuilt when a hyperparameter is set: ``view`` is an optimizer
        that reads the group's hyperparameters (``self`` for group 0), ``scheduled`` whether its lr is one."""
        version = self._sets_version()
        if self._group_cache is None or self._group_cache[0] != version:
            views = []
            for pattern, values in self._overrides.items():
                view = self._view({**self._hyper, **values})
                try:
                    view._check_hyperparameters()
                except ValueError as exc:
                    raise ValueError(f"overrides[{pattern!r}]: {exc}") from None
                views.append((view, callable(view._hyper.get("lr"))))
            # The overrides' sets only: self kept in self would be a cycle, freed by the cyclic GC alone
            self._group_cache = (version, views)
        return [(self, callable(self._hyper.get("lr"))), *self._group_cache[1]]

    _view_carries = ("impl",)  # what a hyperparameter set holds of its optimizer besides the hyperparameters

    def _view(self, hyper):
        """A hyperparameter set: an object of this class holding ``hyper`` (and what ``_view_carries`` names of
        this optimizer) and nothing else, whose ``rule``, ``scalars`` and ``buffers`` read it; what a group's step
        is computed with.  It holds no state, no lock and no other set."""
        view = object.__new__(type(self))
        mine = self.__dict__
        if type(self).__module__.startswith("xopt."):
            view.__dict__.update({name: mine[name] for name in self._view_carries if name in mine})
        else:  # a user's subclass may read attributes of its own: all but the state, the lock and the sets
            view.__dict__.update({name: v for name, v in mine.items() if name not in _VIEW_LEAVES})
        publish(view, hyper)
        return view

    def _at(self, group, count):
        """The view of ``group`` for a param with ``count`` updates applied: its schedule read at ``count``."""
        view, scheduled = (self, callable(self._hyper.get("lr"))) if group == 0 else self._groups()[group]
        if not scheduled:
            return view
        schedule = view._hyper["lr"]
        pattern = list(self._overrides)[group - 1] if group else None
        where = f"overrides[{pattern!r}].lr" if group and "lr" in self._overrides[pattern] else "lr"
        lr = type(self).lr.check(f"{where} at count {count} ({schedule!r})", schedule(count))
        return self._view({**view._hyper, "lr": lr})

    def _group_of(self, key) -> int:
        group = self._group_index.get(key)
        if group is None:
            group = next((i + 1 for i, pattern in enumerate(self._overrides) if _matches(pattern, key)), 0)
            self._group_index[key] = group
        return group

    def _check_patterns(self, params):
        """Until a step is taken: every override pattern must match some param.  (The step's commit sets
        ``_patterns_checked``: a step refused or interrupted before it leaves it unset.)"""
        if self._patterns_checked or not self._overrides:
            return
        keys = param_keys(params)
        for pattern in self._overrides:
            if not any(_matches(pattern, k) for k in keys):
                names = ", ".join(map(describe, keys[:10])) + (", ..." if len(keys) > 10 else "")
                raise ValueError(f"overrides pattern {pattern!r} matches no param (the params are {names}); "
                                 "a str pattern is an fnmatch glob over dict keys, an int a list index")

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
        counts move together, whatever signal arrives (its writes are one call into C).  Calls
        from several threads on one optimizer run one after the other.
        """
        with self._guard.entered():
            self._update(params, grads)

    def _update(self, params, grads):
        if not _lane.take(self, params, grads):  # the exact-type lane takes the whole step, or nothing
            _checked.step(self, params, grads)

    # -- state ------------------------------------------------------------------------
    def buffer_dtype(self, e):
        """The dtype of e's state buffers: its compute dtype, or the lower ``state_dtype`` if one is set."""
        low = self._hyper.get("state_dtype")
        if low is None:
            return _backend.compute_dtype(e.xp, e.p.dtype)
        if low == "8bit":
            return _state_8bit().buffer_dtype(self, e)
        dtype = _backend.low_precision_dtype(e.xp, low)
        if dtype is None:
            raise TypeError(f"param {describe(e.key)}: state_dtype={low!r} is supported for NumPy and CuPy arrays only, "
                            f"not {_backend.library_name(e.p)}")
        return dtype

    def state_dict(self) -> dict:
        """A snapshot: plain Python numbers and copies of every buffer (taken between steps)."""
        return self._guard.run(self._state_dict)

    def _state_dict(self, copy=True) -> dict:
        for key, st in self.state.items():  # a state set to something else: named here, not deep in a copy or a file
            if not isinstance(st, dict):
                raise _checked.not_a_state(key, st)
        # Dask state the cluster lost raises, naming it (not a file that can't be written); an engine another
        # thread is still importing has stepped nothing yet
        check_dask = getattr(sys.modules.get("xopt.engines.fused_dask"), "check_state", None)
        if check_dask is not None:
            check_dask(self)
        return {
            "optimizer": type(self).__name__,
            "hyperparameters": dict(self._hyper),
            "overrides": self.overrides,
            "iter": self.iter,
            "skipped_steps": self.skipped_steps,
            "state": {
                key: {name: (v if name == "step" else _copy(v)) for name, v in st.items()}
                for key, st in self.state.items()
            } if copy else self.state,  # without copies: for save, which holds the guard while it writes
        }

    def load_state_dict(self, state_dict: dict, params=None):
        """Restore a :meth:`state_dict`.  Checked whole first: a misfit raises and changes nothing.

        If ``params`` is given, its names and shapes must be those of the state.
        """
        from .state_io import checked_state

        self._guard.run(self._load_state_dict, checked_state, state_dict, params)

    def _load_state_dict(self, checked_state, state_dict, params):
        """Check the whole of ``state_dict`` (``checked_state``; a subclass's own fields, :meth:`_loaded`), then set
        everything the load sets in one call into C (``dict.update`` of the attributes): a signal handler, or a
        fork from another thread, finds the optimizer as it was before the load or as it is after it."""
        hyper, overrides, state, counters = checked_state(self, state_dict, params)
        own = self._loaded(state_dict, overrides)
        if params is not None:
            from .state_io import as_torch

            as_torch(state, params)
        loaded = {"_hyper": hyper, **hyper, "_overrides": overrides, "_version": self.__dict__.get("_version", 0) + 1,
                  "_group_index": {}, "_patterns_checked": False, "_group_cache": None,  # as _reset_groups() sets
                  "state": state, "iter": counters[0], "skipped_steps": counters[1], **own}
        self.__dict__.update(loaded)

    def _loaded(self, state_dict, overrides) -> dict:
        """A subclass's own attributes from a loaded ``state_dict`` (``overrides``: the loaded ones), checked: it
        raises before the load sets anything."""
        return {}

    def save(self, path):
        """Write :meth:`state_dict` to ``path`` (an ``.npz`` file; no pickled code)."""
        from .state_io import save_optimizer

        save_optimizer(self, path)

    def load(self, path, params=None):
        """Read a file written by :meth:`save` and :meth:`load_state_dict` it."""
        from .state_io import load_optimizer

        load_optimizer(self, path, params)


_VIEW_LEAVES = ("state", "iter", "skipped_steps", "last_grad_norm", "_guard", "_group_cache", "_group_index",
                "_overrides", "_patterns_checked", "_version", "_constructing")  # what no hyperparameter set holds


def fresh(cls, **arguments):
    """``cls.fresh(**arguments)``: see :meth:`Optimizer.fresh`."""
    return cls.fresh(**arguments)


_COMMON_ARGS = Optimizer.__doc__[Optimizer.__doc__.index("Args common"):].rstrip()


def _unexpected(kind, name) -> str:
    if name in ("state_dtype", "block_size", "min_8bit_size"):
        return (f"{kind}() got an unexpected keyword argument {name!r}: {kind} keeps its state in its params' "
                "dtype; lower-precision state is for Adam and AdamW (state_dtype='bfloat16' or '8bit') and Lion, "
                "RMSprop, AdaGrad, SGD, Momentum and Nesterov ('8bit')")
    if name == "betas":
        return (f"{kind}() got an unexpected keyword argument 'betas': xopt names them as the paper and the "
                "seed do, beta1=0.9, beta2=0.999 (torch's betas=(0.9, 0.999))")
    return f"{kind}() got an unexpected keyword argument {name!r}"


def _matches(pattern, key) -> bool:
    """A str pattern is an fnmatch glob over str keys (case-sensitive); an int one matches that list index."""
    if isinstance(pattern, str):
        return isinstance(key, str) and fnmatch.fnmatchcase(key, pattern)
    return not isinstance(key, (bool, str)) and key == pattern


def _snapshot(x):
    """A copy of a buffer that a CPU kernel writes in place (a NumPy array, a torch tensor); anything else as it is."""
    if isinstance(x, np.ndarray):
        return x.copy()
    if type(x).__module__ == "torch" and not x.requires_grad:
        return x.detach().clone()
    return x
