"""The machinery of :mod:`xopt.torch`'s optimizers: a torch.optim.Optimizer that steps its param groups with one
xopt optimizer (param groups as ``overrides``); its torch-shaped state is :mod:`xopt._torch_state`'s."""

from __future__ import annotations

import functools
import numbers
import os
import re
from collections.abc import Mapping
from itertools import repeat
from operator import attrgetter, is_, is_not

import numpy as np
import torch
import torch.optim.optimizer as _torch_optimizer

from xopt._hyper import check_overrides, check_value, flag, publish
from xopt._lane import take_tensors
from xopt._torch_state import TorchState, _StateView
from xopt.optimizer import Optimizer

_REFUSED = ("maximize", "capturable", "differentiable")
_set_grad_enabled = torch._C._set_grad_enabled  # the C call under torch.no_grad(), a fifth of its cost a step
_GRAD = attrgetter("grad")
_PLAIN_UPDATE = Optimizer._update  # the step of a rule without one of its own (NAdam's, Schedule-Free's have theirs)


class _Front(TorchState, torch.optim.Optimizer):
    """What every class here shares; a subclass sets ``rule`` (the xopt class), ``reads`` (the group keys the
    rule's hyperparameters come from), ``names`` (torch's state buffer name -> xopt's), and ``hyper(group)``."""

    rule = None
    reads = ()
    names = {}
    fixed = {}  # xopt hyperparameters that torch's numbers fix (Adam: eps_hat=False)
    counts_steps = True  # torch's state holds a "step" (SGD's and Lion's do not)

    def __init__(self, params, defaults):
        _refuse(type(self).__name__, defaults)
        super().__init__(params, defaults)
        hyper = self._checked_hyper(0, self.param_groups[0])
        try:
            self._xopt = self.rule(**hyper)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{type(self).__name__} param_groups[0]: {exc}") from None
        for i, group in enumerate(self.param_groups[1:], start=1):
            self._check_group(i, group)
        self._seen = [None] * len(self.param_groups)  # each group's values at the last step (None: not pushed yet)
        self._present = ()  # the groups > 0 whose patterns the xopt optimizer's overrides hold
        self._keys = []  # per group: its params' xopt keys, "i.j"
        self._bound = [tuple(g["params"]) for g in self.param_groups]  # the params the state's keys are places of
        self._aside = []  # [(param, its state)] of params taken out of param_groups (_follow_params)

    def _patch_step_function(self):
        """torch.optim's, with a leaner wrapper of ``step`` (:func:`_hook_step`)."""
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"
        cls = type(self)
        if not getattr(cls.step, "hooked", None):
            cls.step = _hook_step(cls.step)

    # what torch's pickle leaves out, kept
    _OWN = ("_xopt", "_seen", "_pushed", "_present", "_keys", "_bound", "_aside", "rule", "reads")
    _LR_AT = 0  # where "lr" is in every class's ``reads``

    def __getstate__(self):
        """torch's (``defaults``, ``param_groups``; not the hooks) and the xopt optimizer with its state; the
        ``state`` view is made again by :meth:`__setstate__`."""
        out = {k: v for k, v in super().__getstate__().items() if k != "state"}
        out.update((k, self.__dict__[k]) for k in self._OWN if k in self.__dict__)
        return out

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.pop("state", None)  # torch's __setstate__ may leave one: the property reads the xopt state
        if "_bound" not in self.__dict__:  # pickled before the state followed its param: keyed by place
            self._bound, self._aside = [tuple(g["params"]) for g in self.param_groups], []

    @property
    def state(self):
        """torch's ``opt.state``: each param's state under torch's names, read from the xopt optimizer."""
        return _StateView(self)

    @state.setter
    def state(self, value):
        """torch.optim.Optimizer's ``__init__`` sets ``state`` (the view replaces it), and so does torch's idiom
        for dropping every param's state, ``opt.state = defaultdict(dict)``: an empty mapping assigned drops
        the xopt state, as it does torch.optim's; anything else is refused (a state loads through
        ``load_state_dict``), where it would have been a dict that no step reads."""
        if "_xopt" not in self.__dict__ or (isinstance(value, _StateView) and value._front is self):
            return
        if not isinstance(value, Mapping) or len(value):
            raise TypeError(f"{type(self).__name__}.state: only an empty dict may be assigned (every param's state "
                            "dropped); a state loads through load_state_dict")
        self._xopt.state = {}
        self._xopt.iter = 0
        self._aside = []

    @staticmethod
    def hyper(group) -> dict:
        """The xopt hyperparameters of ``group`` (torch's names -> xopt's)."""
        raise NotImplementedError

    def _checked_hyper(self, i, group) -> dict:
        where = f"{type(self).__name__} param_groups[{i}]"
        _refuse(where, group)
        try:
            return _truth_values(self.rule, {**self.fixed, **self.hyper(group)})
        except KeyError as exc:
            raise KeyError(f"{where} lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError, RuntimeError) as exc:  # a value torch cannot read as a number
            raise (ValueError if type(exc) is RuntimeError else type(exc))(f"{where}: {exc}") from None

    def _check_group(self, i, group):
        """Group ``i``'s values as the xopt optimizer would take them (each checked, then together)."""
        xo = self._xopt
        hyper = self._checked_hyper(i, group)
        try:
            hyper = {name: check_value(getattr(type(xo), name), value) for name, value in hyper.items()}
            xo._view({**xo._hyper, **hyper})._check_hyperparameters()
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{type(self).__name__} param_groups[{i}]: {exc}") from None
        return hyper

    def add_param_group(self, param_group):
        """torch's ``add_param_group``; the new group's values are checked here (a bad one adds nothing)."""
        super().add_param_group(param_group)
        seen = self.__dict__.get("_seen")
        if seen is not None:
            try:
                self._check_group(len(self.param_groups) - 1, self.param_groups[-1])
            except BaseException:
                self.param_groups.pop()
                raise
            seen.append(None)

    # -- the step ----------------------------------------------------------------------------------
    def step(self, closure=None):
        """One step of every param that has a grad; ``closure`` (re-evaluates the model, returns the loss)
        runs first, with grad enabled.  Returns the closure's loss, or None."""
        if _compiling():  # under torch.compile: run as it is (a graph break), the kernel's writes are no graph's
            return _eagerly(_Front.step, self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        if len(groups) == 1:
            ps = groups[0]["params"]
            bound = self._bound
            if len(bound) != 1 or len(bound[0]) != len(ps) or not all(map(is_, ps, bound[0])):
                self._follow_params()  # a param moved in param_groups takes its state along
            keys = self._keys_of(0, len(ps))
            gs = list(map(_GRAD, ps))
            if not all(map(is_not, gs, repeat(None))):
                keys, ps, gs = _with_grads(keys, ps, gs)
            if self._present or _changed(self._seen[0], groups[0], self.reads):
                self._push(groups, ())
        else:
            self._follow_params()
            keys, ps, gs, present = [], [], [], []
            for i, group in enumerate(groups):
                group_ps = group["params"]
                group_keys = self._keys_of(i, len(group_ps))
                group_gs = list(map(_GRAD, group_ps))
                if not all(map(is_not, group_gs, repeat(None))):
                    group_keys, group_ps, group_gs = _with_grads(group_keys, group_ps, group_gs)
                if group_ps:
                    keys += group_keys
                    ps += group_ps
                    gs += group_gs
                    if i:
                        present.append(i)
            present = tuple(present)
            seen = self._seen  # shorter than groups: a group appended to param_groups itself, not by add_param_group
            if (present != self._present or len(seen) != len(groups)
                    or any(_changed(seen[i], g, self.reads) for i, g in enumerate(groups))):
                self._push(groups, present)
        if keys:
            xo = self._xopt
            # The lane, given our lists (no dicts to build and take apart), where the rule has no step of its own;
            # the kernel records no graph.  What it declines, update() takes, with grad off as in torch.optim's step.
            try:
                if type(xo)._update is not _PLAIN_UPDATE or not xo._guard.run(take_tensors, xo, keys, ps, gs):
                    enabled = torch.is_grad_enabled()
                    _set_grad_enabled(False)
                    try:
                        xo.update(dict(zip(keys, ps)), dict(zip(keys, gs)))
                    finally:
                        _set_grad_enabled(enabled)
            except (TypeError, ValueError) as exc:
                self._torch_names(exc)
                raise
        return loss

    def _torch_names(self, exc):
        """``exc``'s message, where xopt raised it, with the state buffers under torch's names (``state 'm'`` ->
        ``state 'exp_avg'``), as ``state_dict()`` and ``opt.state`` show them: each buffer its param's (the one
        named after it, else the message's first)."""
        if not (exc.args and isinstance(exc.args[0], str)) or not _raised_in_xopt(exc):
            return  # a user's exception (a schedule's) is left as it is
        message = exc.args[0]
        first = _PARAM_KEY.search(message)

        def renamed(m):
            key = m[2] or (first[1] if first else None)
            torch_names = {xopt_name: name for name, xopt_name in self._names_for(key).items()}
            return f"state {torch_names.get(m[1], m[1])!r}" + (f" of param '{m[2]}'" if m[2] else "")

        exc.args = (_STATE_NAME.sub(renamed, message), *exc.args[1:])

    def _names_for(self, key):
        """torch's buffer name -> xopt's, for the param of xopt key ``key`` (None: not known)."""
        return self.names

    def _keys_of(self, i, n):
        while len(self._keys) <= i:
            self._keys.append([])
        keys = self._keys[i]
        if len(keys) < n:
            keys += [f"{i}.{j}" for j in range(len(keys), n)]
        return keys if len(keys) == n else keys[:n]

    def _push(self, groups, present):
        """The groups' hyperparameters into the xopt optimizer: group 0's as its own, group i's (those with
        grads this step) as the override ``"i.*"``.  Each group is checked first: a bad value raises, naming
        its group, and changes nothing."""
        xo = self._xopt
        pushed = self.__dict__.get("_pushed") or {}
        values = {}  # group -> its values, as _values reads them
        checked = {i: self._lr_changed(i, groups[i], pushed, values) for i in (0, *present)}  # a scheduler's step
        if None not in checked.values() and present == self._present:  # the lrs alone, the same patterns
            _set_lrs(xo, checked[0]["lr"], {f"{i}.*": checked[i]["lr"] for i in present})
        else:
            if None in checked.values():  # something besides a group's lr changed: every group checked whole
                checked = {i: self._check_group(i, groups[i]) for i in (0, *present)}
            overrides = check_overrides(xo, {f"{i}.*": checked[i] for i in present})
            publish(xo, {**xo._hyper, **checked[0]})
            xo._overrides = overrides
            xo.__dict__["_version"] = xo.__dict__.get("_version", 0) + 1  # the cached override sets are rebuilt
            if present != self._present:
                xo._reset_groups()  # other patterns: each key's group is looked up again
        self._present = present
        self._seen = [values[i] if i in values else _values(g, self.reads) for i, g in enumerate(groups)]
        self._pushed = checked

    def _lr_changed(self, i, group, pushed, values):
        """Group ``i``'s hyperparameters where only its lr changed since the last push (a scheduler's step): the
        values pushed then with the new lr, checked alone (no rule's checks of its values together read lr);
        None where anything else changed, or the group was not pushed.  Its values read go into ``values``."""
        seen, last = self._seen, pushed.get(i)
        if last is None or i >= len(seen) or seen[i] is None:
            return None
        try:
            now = values[i] = _values(group, self.reads)  # ``values[i]``: what the push leaves as seen
        except Exception:  # a value that is no number: the whole check names it
            return None
        at = self._LR_AT
        if now[:at] != seen[i][:at] or now[at + 1:] != seen[i][at + 1:]:
            return None
        if callable(group["lr"]) or callable(last["lr"]):  # a schedule, or one no more: the sets are built again
            return None
        try:
            lr = check_value(type(self._xopt).lr, _float(group["lr"]))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{type(self).__name__} param_groups[{i}]: {exc}") from None
        return {**last, "lr": lr}


def _set_lrs(xo, lr, overrides):
    """Learning rates alone changed (a scheduler's step): xopt optimizer ``xo``'s own ``lr`` and its override
    sets' (pattern -> lr, patterns it has), numbers checked by the caller, set in place, in the hyperparameter sets
    ``xo._groups()`` keeps too: their other values are unchanged, so nothing is checked or built again."""
    publish(xo, {**xo._hyper, "lr": lr})
    xo._overrides = {pattern: {**values, "lr": overrides[pattern]} if pattern in overrides else values
                     for pattern, values in xo._overrides.items()}  # new dicts: a copy.copy shares the old ones
    cache = xo._group_cache
    if cache is not None and cache[0] == xo._sets_version():
        for (view, _), values in zip(cache[1], xo._overrides.values()):
            publish(view, {**view._hyper, "lr": values.get("lr", lr)})


def _hook_step(step):
    """``step`` wrapped as torch.optim wraps its optimizers' (``Optimizer.profile_hook_step``: a profiler range,
    the step hooks), through torch's wrapper only while a profiler runs or a step hook is registered: otherwise
    the wrapper's Python (a fifth of a small step's) would run for nothing.  "A profiler runs" is torch's
    ``_profiler_enabled()``, the stepping thread's: a step taken on another thread than the profiling one, or
    under a standalone ``ExecutionTraceObserver``, records no ``Optimizer.step#...`` range (torch.optim's does)."""
    hooked = torch.optim.Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        if (_profiling() or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or _GLOBAL_PRE_HOOKS or _GLOBAL_POST_HOOKS):
            return hooked(self, *args, **kwargs)
        return step(self, *args, **kwargs)

    wrapper.hooked = True
    return wrapper


_GLOBAL_PRE_HOOKS = _torch_optimizer._global_optimizer_pre_hooks  # the dicts torch registers global hooks into
_GLOBAL_POST_HOOKS = _torch_optimizer._global_optimizer_post_hooks
_profiling = getattr(torch._C._autograd, "_profiler_enabled", lambda: True)  # without it: always torch's wrapper
_disable_dynamo = getattr(torch, "_disable_dynamo", None)  # torch._dynamo.disable, imported at its first call
_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
if _disable_dynamo is None or _compiling is None:
    _compiling = lambda: False  # noqa: E731
else:
    _eagerly = _disable_dynamo(lambda f, *args: f(*args))  # f(*args) run by Python, not traced by torch.compile


_STATE_NAME = re.compile(r"state '(\w+)'(?: of param '(\d+\.\d+)')?")  # how xopt's errors name a state buffer
_PARAM_KEY = re.compile(r"param '(\d+\.\d+)'")  # and a param (its xopt key)
_XOPT = os.path.dirname(os.path.abspath(__file__)) + os.sep  # xopt's own code


def _raised_in_xopt(exc) -> bool:
    """Whether ``exc`` was raised by xopt's own code (its traceback's last frame is in the package)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(_XOPT)


def _refuse(where, values):
    for name in _REFUSED:
        if values.get(name):
            raise ValueError(f"{where}: {name}=True is not supported by xopt.torch")


def _changed(seen, group, reads) -> bool:
    """Whether the group's values of ``reads`` differ from ``seen`` (plain numbers, as :func:`_values` gives
    them).  Compared as they are: a tensor lr (a scheduler changes it in place) compares by its value with the
    number seen; one that cannot be compared (a tensor of several elements) counts as changed, and the push
    that follows names it."""
    try:
        return not (seen == tuple(map(group.get, reads)) or seen == _values(group, reads))  # lists as tuples
    except Exception:
        return True


def _values(group, reads):
    """The group's values of ``reads``, as plain numbers: a scheduler changes a tensor lr in place, so the
    tensor itself would compare equal to the one seen before."""
    values = tuple(map(group.get, reads))
    kinds = set(map(type, values))
    if kinds <= _PLAIN or (kinds <= _PLAIN_OR_TUPLE and all(
            _PLAIN.issuperset(map(type, v)) for v in values if type(v) is tuple)):
        return values  # what _plain gives back (betas: a tuple of floats), without a call per value
    return tuple(map(_plain, values))


_PLAIN = frozenset({float, int, bool, str, type(None)})  # exact types: values that _plain gives back unchanged
_PLAIN_OR_TUPLE = _PLAIN | {tuple}


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (tuple, list)):
        return tuple(map(_plain, value))
    return value


def _with_grads(keys, ps, gs):
    """The keys, params and grads of the params that have a grad (torch skips the others)."""
    kept = [i for i, g in enumerate(gs) if g is not None]
    return [keys[i] for i in kept], [ps[i] for i in kept], [gs[i] for i in kept]


def _float(value):
    return float(value.item()) if isinstance(value, torch.Tensor) else value


def _betas(group):
    beta1, beta2 = group["betas"]
    return {"beta1": _float(beta1), "beta2": _float(beta2)}


def _truth_values(cls, hyper) -> dict:
    """``hyper`` (of xopt optimizer class ``cls``) with each flag given as a number, a NumPy bool or a one-element tensor (from a config file, say)
    as the bool torch.optim takes it for (``if amsgrad:``); other values as they are, for the checks to name."""
    for name, value in hyper.items():
        if type(value) is bool or getattr(getattr(cls, name, None), "check", None) is not flag:
            continue
        if isinstance(value, (numbers.Number, np.generic)) or isinstance(value, torch.Tensor) and value.numel() == 1:
            hyper[name] = bool(value)
    return hyper
