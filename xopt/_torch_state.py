"""The state of :mod:`xopt.torch`'s optimizers in torch's shape: ``state_dict()`` / ``load_state_dict()`` as
torch.optim's (state keyed by param index, torch's buffer names) and ``opt.state[p]``, over the xopt optimizer's
state (keyed ``"group.index"``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from operator import is_

import torch

from xopt._backend import compute_dtype
from xopt.state_check import _buffer_sets

__all__ = ["TorchState"]


class TorchState:
    """What :class:`xopt._torch_front._Front` reads and writes its state with: a subclass sets ``names`` (torch's
    buffer name -> xopt's), ``counts_steps`` and ``derived``, and has ``_xopt``, ``_check_group``, ``_seen`` and
    ``_present`` (the front's)."""

    def _follow_params(self):
        """Keep each param's state with the param, as torch.optim's (keyed by the param itself): xopt keys a
        state by the param's place, ``"i.j"``, so where ``param_groups`` changed since the state was keyed (a
        param popped from a group's list, the list reordered, a param moved to another group) each state moves
        to its param's new key.  A param no longer in any group keeps its state aside, found again if it comes
        back (torch.optim's ``state`` keeps it too)."""
        groups, bound = self.param_groups, self._bound
        if len(bound) == len(groups) and all(
                len(b) == len(g["params"]) and all(map(is_, b, g["params"])) for b, g in zip(bound, groups)):
            return
        held = self._xopt.state
        aside = {id(p): (p, st) for p, st in self._aside}  # kept as a list: ids change in a copy
        for i, ps in enumerate(bound):
            for j, p in enumerate(ps):
                st = held.get(f"{i}.{j}")
                if st is not None:
                    aside[id(p)] = (p, st)
        now, state = [tuple(g["params"]) for g in groups], {}
        for i, ps in enumerate(now):
            for j, p in enumerate(ps):
                found = aside.pop(id(p), None)
                if found is not None:
                    state[f"{i}.{j}"] = found[1]
        self._xopt.state = state
        self._bound, self._aside = now, list(aside.values())

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
        self._follow_params()
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
        for a float16 or bfloat16 param).  A buffer that only an option keeps (``max_exp_avg_sq``...) may lack:
        the next step makes it, as after the option is turned on."""
        kind = type(self).__name__
        if isinstance(state_dict, Mapping):
            state_dict = dict(state_dict)  # a shallow copy, as torch's: a hook may change it
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            found = pre_hook(self, state_dict)
            state_dict = state_dict if found is None else found
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"{kind}.load_state_dict: expected a dict with 'state' and 'param_groups'")
        groups, saved = self.param_groups, state_dict["param_groups"]
        if not isinstance(state_dict["state"], Mapping):
            raise TypeError(f"{kind}.load_state_dict: its 'state' must be a dict (param index -> state), got "
                            f"{type(state_dict['state']).__name__}")
        if isinstance(saved, (str, bytes, Mapping)) or not all(
                isinstance(s, Mapping) and "params" in s for s in saved):
            raise TypeError(f"{kind}.load_state_dict: its 'param_groups' must be a list of dicts, each with "
                            "'params'")
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
        # a key the saved group lacks keeps its value; the saved values are copied, as torch's: a tensor lr shared
        # with the state_dict (and so with the optimizer it came from) would follow that one's scheduler
        new_groups = [{**g, **copy.deepcopy({k: v for k, v in s.items() if k != "params"}), **self.on_load,
                       "params": g["params"]} for g, s in zip(groups, saved)]
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
        self._bound, self._aside = [tuple(g["params"]) for g in groups], []  # the state loaded is keyed by place
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
            if want is None:
                raise ValueError(f"{kind}.load_state_dict: param {key} has state {name!r}, which {kind} does not "
                                 f"keep for a param of shape {tuple(p.shape)}")
            if tuple(value.shape) != want:
                raise ValueError(f"{kind}.load_state_dict: state {name!r} of param {key} has shape "
                                 f"{tuple(value.shape)}, the param needs {want}")
            if value.is_complex() or value.layout is not torch.strided or value.is_meta:
                raise TypeError(f"{kind}.load_state_dict: state {name!r} of param {key} is a "
                                f"{'complex' if value.is_complex() else 'meta' if value.is_meta else value.layout} "
                                "tensor: state buffers are dense real tensors")
            out[ours] = value.detach().to(dtype=_state_dtype(p), device=p.device,
                                          memory_format=torch.contiguous_format, copy=True)
        needed = set(self._buffers_for(hyper, p)) - set(out)
        if needed and len(out) == 1 and out["step"] == 0:
            return None  # a state before the first step that holds nothing: the first step makes it
        # a buffer that only an option keeps (amsgrad's, centered's, momentum's) the step makes where it lacks, as
        # after the option is turned on: this optimizer's own state_dict, taken before that step, loads back
        needed &= _buffer_sets(self._xopt)[0]
        if needed:
            theirs = {v: k for k, v in self.names.items()}
            raise ValueError(f"{kind}.load_state_dict: param {key} lacks state "
                             f"{', '.join(sorted(theirs[n] for n in needed))}")
        return out

    on_load = {}  # group values a load sets whatever the state_dict holds (AdamW's decoupled_weight_decay)
    derived = ()  # torch state kept alongside that xopt derives from the step count (NAdam's mu_product)

    def _buffer_shape(self, name, p):
        """The shape of ``p``'s buffer ``name`` (xopt's name); None where a param of its shape keeps none."""
        return tuple(p.shape)

    def _buffers_for(self, hyper, p):
        return self._xopt._view({**self._xopt._hyper, **hyper}).buffers()


def _step_count(kind, key, step) -> int:
    try:
        value = float(step.item() if isinstance(step, torch.Tensor) else step)
    except (TypeError, ValueError, RuntimeError):  # a tensor of several elements, a value that is not a number
        value = -1.0
    if not value.is_integer() or value < 0:
        raise ValueError(f"{kind}.load_state_dict: param {key} has step {step!r}, not a count")
    return int(value)


def _state_dtype(p):
    """The dtype xopt keeps ``p``'s state buffers in: its math's (float32 for a float16 or bfloat16 param)."""
    return compute_dtype(torch, p.dtype)


def _scalar_dtype():
    """The dtype torch.optim keeps its per-param scalars in (``step``): float64 under a float64 default."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class _StateView(Mapping):
    """``opt.state``: each param with state -> its state under torch's names (read-only; see the module).  As
    torch.optim's (a defaultdict), a param that holds no state reads as an empty dict, which is not kept."""

    def __init__(self, front):
        self._front = front

    def _index(self):
        """[(param, its torch-shaped state)] of every param that holds state, in the groups' order."""
        front, out = self._front, []
        front._follow_params()
        held = front._xopt.state
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
