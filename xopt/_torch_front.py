"""The machinery of :mod:`xopt.torch`'s optimizers: a torch.optim.Optimizer that steps its param groups with one
xopt optimizer (param groups as ``overrides``), and torch-shaped state."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from itertools import repeat
from operator import attrgetter, is_not

import torch
import torch.optim.optimizer as _torch_optimizer

from xopt._backend import compute_dtype
from xopt._hyper import check_overrides, check_value, publish
from xopt._lane import take_tensors
from xopt.optimizer import Optimizer

_REFUSED = ("maximize", "capturable", "differentiable")
_set_grad_enabled = torch._C._set_grad_enabled  # the C call under torch.no_grad(), a fifth of its cost a step
_GRAD = attrgetter("grad")
_PLAIN_UPDATE = Optimizer._update  # the step of a rule without one of its own (NAdam's, Schedule-Free's have theirs)


class _Front(torch.optim.Optimizer):
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
        self.state = _StateView(self)

    def _patch_step_function(self):
        """torch.optim's, with a leaner wrapper of ``step`` (:func:`_hook_step`)."""
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"
        cls = type(self)
        if not getattr(cls.step, "hooked", None):
            cls.step = _hook_step(cls.step)

    _OWN = ("_xopt", "_seen", "_present", "_keys", "rule", "reads")  # what torch's pickle leaves out, kept

    def __getstate__(self):
        """torch's (``defaults``, ``param_groups``; not the hooks) and the xopt optimizer with its state; the
        ``state`` view is made again by :meth:`__setstate__`."""
        out = {k: v for k, v in super().__getstate__().items() if k != "state"}
        out.update((k, self.__dict__[k]) for k in self._OWN if k in self.__dict__)
        return out

    def __setstate__(self, state):
        super().__setstate__(state)
        self.state = _StateView(self)

    @staticmethod
    def hyper(group) -> dict:
        """The xopt hyperparameters of ``group`` (torch's names -> xopt's)."""
        raise NotImplementedError

    def _checked_hyper(self, i, group) -> dict:
        where = f"{type(self).__name__} param_groups[{i}]"
        _refuse(where, group)
        try:
            return {**self.fixed, **self.hyper(group)}
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
            keys = self._keys_of(0, len(ps))
            gs = list(map(_GRAD, ps))
            if not all(map(is_not, gs, repeat(None))):
                keys, ps, gs = _with_grads(keys, ps, gs)
            if self._present or _changed(self._seen[0], groups[0], self.reads):
                self._push(groups, ())
        else:
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
            if type(xo)._update is not _PLAIN_UPDATE or not xo._guard.run(take_tensors, xo, keys, ps, gs):
                enabled = torch.is_grad_enabled()
                _set_grad_enabled(False)
                try:
                    xo.update(dict(zip(keys, ps)), dict(zip(keys, gs)))
                finally:
                    _set_grad_enabled(enabled)
        return loss

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
        own = self._check_group(0, groups[0])
        overrides = {f"{i}.*": self._check_group(i, groups[i]) for i in present}
        old = (xo._hyper, xo._overrides, self._present)
        publish(xo, {**xo._hyper, **own})
        xo._overrides = check_overrides(xo, overrides)
        xo.__dict__["_version"] = xo.__dict__.get("_version", 0) + 1  # the cached override sets are rebuilt
        if present != old[2]:
            xo._reset_groups()  # other patterns: each key's group is looked up again
        self._present = present
        self._seen = [_values(g, self.reads) for g in groups]

    # -- state in torch's shape ---------------------------------------------------------------------
    def _torch_state(self, st, p, group) -> dict:
        """A param's xopt state under torch's names (its buffers themselves, not copies; step a tensor)."""
        out = {} if not self.counts_steps else {"step": torch.tensor(float(st["step"]), dtype=_scalar_dtype())}
        for theirs, ours in self.names.items():
            if ours in st:
                out[theirs] = st[ours]
        return out or None  # torch keeps no state for a param that holds nothing (SGD without momentum)

    def _unstepped_state(self, p, group):
        """The state torch holds for a param before its first step (None: none; Adagrad makes it up front)."""
        return None

    def state_dict(self) -> dict:
        """torch.optim's state_dict: ``{"state": {param index: {torch's buffer names...}}, "param_groups":
        [{hyperparameters..., "params": [param indices]}]}``; the buffers are the optimizer's own tensors."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        index, groups, start = {}, [], 0
        for i, group in enumerate(self.param_groups):
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(start, start + len(group["params"])))
            for j, p in enumerate(group["params"]):
                index[f"{i}.{j}"] = (start + j, p, group)
            start += len(group["params"])
            groups.append(packed)
        state = {}
        for key, (n, p, group) in index.items():
            st = self._xopt.state.get(key)
            made = self._torch_state(st, p, group) if st is not None else self._unstepped_state(p, group)
            if made is not None:
                state[n] = made
        state_dict = {"state": dict(sorted(state.items())), "param_groups": groups}
        for post_hook in self._optimizer_state_dict_post_hooks.values():  # as torch's: one may return another
            found = post_hook(self, state_dict)
            state_dict = state_dict if found is None else found
        return state_dict

    def load_state_dict(self, state_dict):
        """Load a state_dict of this class or of its torch.optim counterpart.  Checked whole first (groups and
        their sizes, every buffer's name and shape, the hyperparameters): a misfit raises, changing nothing.
        Buffers are copied, on each param's device, in the dtype xopt keeps its state in (the param's; float32
        for a float16 or bfloat16 param)."""
        kind = type(self).__name__
        if isinstance(state_dict, Mapping):
            state_dict = dict(state_dict)  # a shallow copy, as torch's: a hook may change it
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            found = pre_hook(self, state_dict)
            state_dict = state_dict if found is None else found
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"{kind}.load_state_dict: expected a dict with 'state' and 'param_groups'")
        groups, saved = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved):
            raise ValueError(f"{kind}.load_state_dict: the state_dict has {len(saved)} parameter groups, "
                             f"the optimizer {len(groups)}")
        where = {}
        for i, (group, s) in enumerate(zip(groups, saved)):
            if len(group["params"]) != len(s["params"]):
                raise ValueError(f"{kind}.load_state_dict: parameter group {i} holds {len(s['params'])} params in "
                                 f"the state_dict, {len(group['params'])} in the optimizer")
            for j, (n, p) in enumerate(zip(s["params"], group["params"])):
                where[n] = (f"{i}.{j}", p)
        new_groups = [{**g, **{k: v for k, v in s.items() if k != "params"}, "params": g["params"]}
                      for g, s in zip(groups, saved)]  # a key the saved group lacks keeps its value
        hypers = [self._check_group(i, g) for i, g in enumerate(new_groups)]  # every value checked, nothing changed yet
        state = {}
        for n, st in state_dict["state"].items():
            if n not in where:
                raise KeyError(f"{kind}.load_state_dict: state for param index {n!r}, which no group holds")
            key, p = where[n]
            made = self._xopt_state(key, st, p, hypers[int(key.split(".")[0])])
            if made is not None:
                state[key] = made
        for group, new in zip(groups, new_groups):  # in place: a scheduler holding a group sees the new values
            group.clear()
            group.update(new)
        self._xopt.state = state
        self._xopt.iter = max((st["step"] for st in state.values()), default=0)
        self._seen = [None] * len(groups)
        self._present = None  # the next step pushes every group's values and patterns
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _xopt_state(self, key, st, p, hyper) -> dict:
        """A param's torch-shaped state as xopt's, checked: its names, shapes; buffers copied into its state's dtype."""
        kind = type(self).__name__
        if not isinstance(st, Mapping):
            raise TypeError(f"{kind}.load_state_dict: the state of param {key} must be a dict, got "
                            f"{type(st).__name__}")
        out = {"step": _step_count(kind, key, st.get("step", 1 if st else 0))}
        for name, value in st.items():
            if name == "step" or name in self.derived:
                continue
            ours = self.names.get(name)
            if ours is None:
                raise ValueError(f"{kind}.load_state_dict: param {key} has state {name!r}; {kind} keeps "
                                 f"{', '.join(['step', *self.names]) if self.counts_steps else ', '.join(self.names)}")
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{kind}.load_state_dict: state {name!r} of param {key} must be a tensor, got "
                                f"{type(value).__name__}")
            want = self._buffer_shape(ours, p)
            if tuple(value.shape) != want:
                raise ValueError(f"{kind}.load_state_dict: state {name!r} of param {key} has shape "
                                 f"{tuple(value.shape)}, the param needs {want}")
            out[ours] = value.detach().to(dtype=_state_dtype(p), device=p.device,
                                          memory_format=torch.contiguous_format, copy=True)
        needed = set(self._buffers_for(hyper, p)) - set(out)
        if needed and len(out) == 1 and out["step"] == 0:
            return None  # a state before the first step that holds nothing: the first step makes it
        if needed:
            theirs = {v: k for k, v in self.names.items()}
            raise ValueError(f"{kind}.load_state_dict: param {key} lacks state "
                             f"{', '.join(sorted(theirs[n] for n in needed))}")
        return out

    derived = ()  # torch state kept alongside that xopt derives from the step count (NAdam's mu_product)

    def _buffer_shape(self, name, p):
        return tuple(p.shape)

    def _buffers_for(self, hyper, p):
        return self._xopt._view({**self._xopt._hyper, **hyper}).buffers()


def _hook_step(step):
    """``step`` wrapped as torch.optim wraps its optimizers' (``Optimizer.profile_hook_step``: a profiler range,
    the step hooks), through torch's wrapper only while a profiler runs or a step hook is registered: otherwise
    the wrapper's Python (a fifth of a small step's) would run for nothing."""
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


def _step_count(kind, key, step) -> int:
    value = float(step.item() if isinstance(step, torch.Tensor) else step)
    if not value.is_integer() or value < 0:
        raise ValueError(f"{kind}.load_state_dict: param {key} has step {step!r}, not a count")
    return int(value)


def _state_dtype(p):
    """The dtype xopt keeps ``p``'s state buffers in: its math's (float32 for a float16 or bfloat16 param)."""
    return compute_dtype(torch, p.dtype)


def _scalar_dtype():
    """The dtype torch.optim keeps its per-param scalars in (``step``): float64 under a float64 default."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _float(value):
    return float(value.item()) if isinstance(value, torch.Tensor) else value


def _betas(group):
    beta1, beta2 = group["betas"]
    return {"beta1": _float(beta1), "beta2": _float(beta2)}


class _StateView(Mapping):
    """``opt.state``: each param with state -> its state under torch's names (read-only; see the module).  As
    torch.optim's (a defaultdict), a param that holds no state reads as an empty dict, which is not kept."""

    def __init__(self, front):
        self._front = front

    def _index(self):
        """[(param, its torch-shaped state)] of every param that holds state, in the groups' order."""
        front, held, out = self._front, self._front._xopt.state, []
        for i, group in enumerate(front.param_groups):
            for j, p in enumerate(group["params"]):
                st = held.get(f"{i}.{j}")
                made = front._torch_state(st, p, group) if st is not None else front._unstepped_state(p, group)
                if made is not None:
                    out.append((p, made))
        return out

    def _find(self, p):
        for q, made in self._index():
            if q is p:
                return made
        return None

    def __getitem__(self, p):
        made = self._find(p)
        return {} if made is None else made

    def __contains__(self, p):
        return self._find(p) is not None

    def get(self, p, default=None):
        made = self._find(p)
        return default if made is None else made

    def __iter__(self):
        return iter([p for p, _ in self._index()])

    def __len__(self):
        return len(self._index())
