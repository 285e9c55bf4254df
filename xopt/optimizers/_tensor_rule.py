"""Optimizers whose rule reads a whole param at once: norms, row and column means, matmuls.

The elementwise optimizers' step (:mod:`xopt._checked`, :mod:`xopt.engines.reference`) may cut a large
param into chunks and run the rule on each, and keeps every state buffer in the param's shape.  Adafactor
(row and column factors), LAMB (a norm per param), Schedule-Free AdamW (its first ``z`` is the param) and
Muon (a matrix function of the update) need the whole param and, for Adafactor, buffers of other shapes.
:class:`TensorRule` keeps every promise of ``update`` (inputs checked whole, overlaps refused, clipping,
``skip_nonfinite``, overrides and schedules, all or nothing, one call into C for the writes) and runs
the rule on whole params; its state files are checked against the shapes :meth:`TensorRule.buffer_shapes`
gives.  A subclass with a fused kernel (LAMB: the CPU engine's two-phase rule, :mod:`xopt.engines.cpu_norms`)
takes the exact-type lane first, and the fused CPU engine for the params it accepts
(``_dispatch.select_whole``); Adafactor's kernel (:mod:`xopt.engines.cpu_factored`), whose factors are not in
the param's shape, only the latter.
"""

from __future__ import annotations

from collections.abc import Mapping

from .. import _backend, _dispatch, _lane
from .._atomic import together_unforked
from .._checked import WIDENED, _check_step, _commit, _plain_torch, clip_or_skip, lazy_norm, widen_float32
from .._inputs import check_overlaps, collect, describe
from ..engines.reference import _apply_whole, _kind
from ..optimizer import Optimizer

__all__ = ["TensorRule"]


class TensorRule(Optimizer):
    """Base of the optimizers whose ``rule`` takes a whole param (see the module's docstring).

    A subclass defines ``buffer_shapes(shape)`` (the state buffers a param of ``shape`` keeps, with their
    shapes), ``scalars(step)`` and ``rule(xp, p, g, state, s)`` as the elementwise optimizers do; ``rule``
    gets the whole param.  ``buffers()`` names every buffer some param may keep.
    """

    def buffer_shapes(self, shape) -> dict:
        """{buffer name: its shape} for a param of ``shape``; by default every buffer in the param's shape."""
        return {name: tuple(shape) for name in self.buffers()}

    def possible_buffer_shapes(self, shape) -> dict:
        """{buffer name: its shape} of every buffer a param of ``shape`` may hold under any hyperparameters (a
        state kept from other ones: Muon's v of a matrix once stepped with ``use_muon=False``); by default
        :meth:`buffer_shapes`'s.  A state holding any other buffer was made for another shape: refused."""
        return self.buffer_shapes(shape)

    # -- the step ------------------------------------------------------------------------------
    def _update(self, params, grads):
        if _lane.take(self, params, grads):  # a rule with a fused kernel (LAMB's): the exact-type lane first
            return
        entries = collect(params, grads)
        self._check_patterns(params)
        views = {}
        for e in entries:
            count = _check_step(self, e)
            group = self._group_of(e.key)
            view = views.get((group, count))
            if view is None:
                view = views[group, count] = self._at(group, count)
            e.opt = view
            try:
                view.buffer_shapes(e.p.shape)  # a shape the rule refuses (Muon's use_muon=True on a vector)
            except ValueError as exc:
                raise ValueError(f"param {describe(e.key)}: {exc}") from None
            self._check_buffers(e)
        check_overlaps(self._named_arrays(entries))
        skipped, norm, scale = clip_or_skip(self, entries)
        if skipped:
            return
        norm = lazy_norm(entries, norm)
        for e in entries:
            e.clip = scale
        created = [e.key for e in entries if e.key not in self.state]
        had = {e.key: list(self.state[e.key]) for e in entries if e.key in self.state}  # to take back new buffers
        try:
            scalars = {}
            for e in entries:
                e.state = self._state_for(e)
                step = int(e.state["step"]) + 1  # a NumPy count (np.int8(127)) would wrap
                key = (id(e.opt), step)
                if key not in scalars:
                    scalars[key] = e.opt.scalars(step)
                e.scalars = scalars[key]
            writes = self._compute(entries)
            writes += _commit(self, params, entries, norm)
        except BaseException:
            for key in created:
                st = self.state.get(key)
                if st is not None and st.get("step") == 0:
                    del self.state[key]
            for key, names in had.items():  # and the buffers it added to a state (Muon's v, use_muon turned off)
                st = self.state.get(key)
                if type(st) is dict:
                    for name in [n for n in st if n not in names]:
                        del st[name]
            raise
        with _plain_torch(entries):
            together_unforked(writes)

    def _compute(self, entries) -> list:
        """The new values of every entry's param and buffers, as writes (nothing written yet): the fused CPU
        engine's where it takes them (a rule with a kernel), the reference rule's on whole params elsewhere
        (their writes first, as ``_dispatch.select`` orders them)."""
        fused, entries = _dispatch.select_whole(self, entries)
        if any(_kind(e)[2] for e in entries):
            import torch

            with torch.no_grad():
                writes = self._compute_each(entries)
        else:
            writes = self._compute_each(entries)
        for apply, group in fused:
            writes += apply(group[0].opt, group)
        return writes

    def _compute_each(self, entries) -> list:
        writes, chunked = [], []
        for e in entries:
            if _backend.is_dask(e.p):  # persisted with the other Dask params' steps, below
                chunked.append(e)
                continue
            dtype, _, torch = _kind(e)
            writes += _apply_whole(e.opt, e, tuple(e.opt.buffer_shapes(e.p.shape)), dtype, torch)
        if chunked:
            writes += _dispatch.dask_engine().apply_whole(
                chunked, lambda e: _apply_whole(e.opt, e, tuple(e.opt.buffer_shapes(e.p.shape)), _kind(e)[0], False))
        return writes

    # -- state ---------------------------------------------------------------------------------
    def _named_arrays(self, entries):
        named = []
        for e in entries:
            named.append((e.p, ("param", e.key), False))
            named.append((e.g, ("grad", e.key), True))
            st = self.state.get(e.key, {})
            for name in e.opt.buffer_shapes(e.p.shape):
                if name in st:
                    named.append((st[name], (name, e.key), False))
        return named

    def _check_buffers(self, e):
        dtype = self.buffer_dtype(e)
        st = self.state.get(e.key)
        if st is None:
            return
        kept, possible = e.opt.buffer_shapes(e.p.shape), e.opt.possible_buffer_shapes(e.p.shape)
        for name in st:
            if name != "step" and name not in possible:
                raise ValueError(f"param {describe(e.key)} of shape {tuple(e.p.shape)} holds optimizer state "
                                 f"{name!r}, which {type(self).__name__} keeps for a param of another shape")
        for name, shape in {**possible, **kept}.items():
            buf = st.get(name)
            if buf is None:
                continue
            if tuple(buf.shape) != tuple(shape):
                raise ValueError(f"param {describe(e.key)} of shape {tuple(e.p.shape)} keeps its optimizer state "
                                 f"{name!r} in shape {tuple(shape)}, but that state has shape {tuple(buf.shape)}")
            have, want = _backend.dtype_name(buf.dtype), _backend.dtype_name(dtype)
            if have != want and (have, want) != WIDENED:  # float32: widened by _state_for, exactly
                raise TypeError(f"param {describe(e.key)} is {_backend.dtype_name(e.p.dtype)} but its optimizer "
                                f"state {name!r} is {_backend.dtype_name(buf.dtype)}")

    def _state_for(self, e):
        st = self.state.setdefault(e.key, {"step": 0})
        xp, dtype, view = e.xp, self.buffer_dtype(e), e.opt
        shapes = view.buffer_shapes(e.p.shape)
        widen_float32(st, dtype, e.p, shapes)
        for name, shape in shapes.items():
            buf = st.get(name)
            if buf is None and _backend.is_dask(e.p) and tuple(shape) == tuple(e.p.shape):
                st[name] = xp.full_like(e.p, view.initial_value(name), dtype=dtype)  # chunked like the param
            elif buf is None:
                st[name] = xp.full(shape, view.initial_value(name), dtype=dtype, device=_backend.device(e.p))
            elif _backend.library_name(buf) != _backend.library_name(e.p):
                st[name] = _backend.from_numpy(_backend.to_numpy(buf), e.p)
            elif not (_backend.can_rebind_only(buf) or _backend.is_writable(buf)):
                st[name] = xp.asarray(buf, copy=True)
        return st

    # -- state files ---------------------------------------------------------------------------
    def _load_state_dict(self, checked_state, state_dict, params):
        super()._load_state_dict(lambda opt, sd, ps: _checked_tensor_state(opt, checked_state, sd, ps),
                                 state_dict, params)


def _checked_tensor_state(opt, checked_state, state_dict, params):
    """``checked_state`` for a :class:`TensorRule`: the buffers are checked here, against the shapes
    ``buffer_shapes`` gives for each param (with the loaded hyperparameters and overrides); everything
    else (names, hyperparameters, overrides, counters) by ``checked_state`` on the state without its
    buffers."""
    from ..state_check import _count, _expected_layout, _native, _param_arrays, widened_on_load

    import array_api_compat

    if not isinstance(state_dict, Mapping):
        return checked_state(opt, state_dict, params)  # its message
    states = state_dict.get("state")
    if not isinstance(states, Mapping):
        return checked_state(opt, state_dict, params)
    bare = {key: ({"step": 0} if isinstance(st, Mapping) and "step" in st else st) for key, st in states.items()}
    hyper, overrides, _, counters = checked_state(opt, {**state_dict, "state": bare}, params)
    trial = type(opt).fresh(impl=opt.impl, overrides=overrides, **hyper)
    arrays = None if params is None else _param_arrays(params)
    kind, possible = type(opt).__name__, set(trial.buffers())
    state = {}
    for key, st in states.items():
        name = describe(key)
        entry = {"step": _count(f"the step of param {name}", st["step"])}
        expected = None
        if arrays is not None:
            dtype, shape = _expected_layout(trial, key, arrays[key])
            view = trial._at(trial._group_of(key), 0)
            expected = {k: tuple(s) for k, s in {**view.possible_buffer_shapes(shape),
                                                 **view.buffer_shapes(shape)}.items()}
        for buf_name in sorted(set(st) - {"step"}, key=str):
            buf = st[buf_name]
            if buf_name not in possible:
                raise ValueError(f"state of param {name} holds {buf_name!r}, which no {kind} keeps (a {kind} "
                                 f"keeps at most {sorted(possible)})")
            if not array_api_compat.is_array_api_obj(buf):
                raise TypeError(f"state {buf_name!r} of param {name} is not an array ({type(buf).__name__})")
            if not _backend.is_real_floating(_backend.namespace(buf), buf.dtype):
                raise TypeError(f"state {buf_name!r} of param {name} has dtype {buf.dtype}")
            if expected is not None:
                if buf_name not in expected:
                    raise ValueError(f"state of param {name} holds {buf_name!r}, which {kind} does not keep for "
                                     f"a param of shape {shape} (it keeps {sorted(expected)})")
                if tuple(buf.shape) != expected[buf_name]:
                    raise ValueError(f"state {buf_name!r} of param {name} has shape {tuple(buf.shape)}, but "
                                     f"{kind} keeps it in shape {expected[buf_name]} for a param of shape {shape}")
                if (_backend.dtype_name(buf.dtype), dtype) == WIDENED:
                    buf = widened_on_load(buf)
                elif _backend.dtype_name(buf.dtype) != dtype:
                    raise TypeError(f"state {buf_name!r} of param {name} is {_backend.dtype_name(buf.dtype)} but "
                                    f"{trial!r} keeps the state of that param in {dtype}")
            entry[buf_name] = _native(buf)
        state[key] = entry
    return hyper, overrides, state, counters

