"""The fused CPU engine (numba): one pass over memory, one compiled call for any number of tensors.

A step hands :func:`step` the lists it gathered (params, grads, each param's state dict) and
the scalars of each part of the step (one hyperparameter set at one step count).  One compiled
call (:mod:`xopt.engines.cpu_step`) reads every array's own struct, checks it
(:func:`xopt.engines.cpu_memory.check_rows`: types, dtypes, shapes, flags, no shared memory) and
only then runs the kernel (:mod:`xopt.engines.cpu_rules`, :mod:`xopt.engines.cpu_drivers`) through the
addresses it checked.
Nothing is remembered from one call to the next: a step on new arrays, a new dict or a new
optimizer costs what a repeated one does.  Anything the check refuses is refused whole, before
any write, and the checked path (``Optimizer._update``) takes the step and explains.

Small steps run on the calling thread; a step of at least ``PARALLEL_MIN`` elements is split into
chunks of ``CHUNK`` elements over ``get_num_threads()`` threads (the caller and a pool of idle
workers that sleep, never spin, between steps, so they leave the cores to BLAS between the steps of
a training loop).  See :func:`xopt.set_num_threads`.

Compiled code is cached on disk: a second process does not compile again.  A small step's code (the step and
the rule) is in xopt's own cache (:mod:`xopt.engines.cpu_objects`), which a process loads without starting
numba; the rest (large, clipped and torch steps) in numba's (``cache=True``), imported at its first use.
"""

from __future__ import annotations

import functools
import operator
import struct
import time

import numpy as np

from .. import _backend, _pages
from .._atomic import together
from .cpu_step import (ANSWER, CHECK_FINITE, NONFINITE, PARALLEL_MIN, NotRun, SCRATCH as _SCRATCH, call_block,
                       give_back_call, rule_function, split_at as _split_at, step_function, taken as _taken)
from .cpu_structs import N_HEAD
from .kernels import KeptSlots, lookup

__all__ = ["supports", "accepts", "apply", "step", "step_tensors", "tensor_dtype", "tensor_device", "kind", "Kind",
           "new_state", "CHUNK", "PARALLEL_MIN", "chunk_table", "device_of", "compile_all", "NotRun"]

_FLOATS = (np.float16, np.float32, np.float64)
_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # float16, bfloat16 go through float32 copies
_BF16 = None  # ml_dtypes' bfloat16 dtype, once needed
_HEAD_ONE_PART = struct.Struct(f"{N_HEAD + 3}q")


def _cpu_arrays():
    """:mod:`xopt.engines.cpu_arrays` (large, clipped and checked-path steps), imported at its first use: it
    starts numba, which a small step does not need."""
    found = _LATER.get("cpu_arrays")
    if found is None:
        from . import cpu_arrays as found

        _LATER["cpu_arrays"] = found
    return found


_LATER = {}  # name -> a module imported at its first use (an import statement costs a step some 0.5 us)


def _factored():
    """:mod:`xopt.engines.cpu_factored` (Adafactor's passes), imported at its first use."""
    found = _LATER.get("cpu_factored")
    if found is None:
        from . import cpu_factored as found

        _LATER["cpu_factored"] = found
    return found


def __getattr__(name):
    """CHUNK and chunk_table: :mod:`xopt.engines.cpu_arrays`'s, imported when first asked for."""
    if name in ("CHUNK", "chunk_table"):
        return getattr(_cpu_arrays(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def supports(opt) -> bool:
    return lookup(opt) is not None


def _bf16_state(opt) -> bool:
    return opt._hyper.get("state_dtype") == "bfloat16"


def accepts(opt, e) -> bool:
    """NumPy float16/bfloat16/float32/float64 params whose grads are NumPy arrays (or scalars) too;
    float16/bfloat16/float32 for bfloat16 state.  float16 and bfloat16 (ml_dtypes') params step through float32
    copies (the checked path's :func:`apply`), rounded back once, as the reference rounds them."""
    if lookup(opt).factored:
        return _factored().accepts(opt, e)
    if type(e.p) is not np.ndarray or not isinstance(e.g, (np.ndarray, np.generic)) or e.rebind:
        return False
    bf16 = e.p.dtype.name == "bfloat16"
    if _bf16_state(opt):
        return bf16 or e.p.dtype in (np.float16, np.float32)
    return bf16 or e.p.dtype in _FLOATS


def device_of(a):
    return "cpu"


class Kind(KeptSlots):
    """What a step of one optimizer class on one param dtype runs: its rule (the bfloat16 form where the
    state is bfloat16), the order of its scalars, its state slots, the dtypes, and the head's dtype numbers;
    ``norms``: the address of the norms' phase of a rule that reads its tensors' norms first (0: none)."""

    __slots__ = ("rule", "function", "norms", "small_step", "order", "slots", "size", "getters", "dtype", "state_dtype",
                 "numbers", "_keeps", "layouts", "scalars_struct")

    def __init__(self, kernel, rule, dtype, state_dtype):
        self.rule, self.order, self.slots, self.size = rule, kernel.order, kernel.slots, kernel.size
        self.function = rule_function(rule, dtype)  # the rule's compiled code's address
        self.small_step = step_function(dtype)  # the compiled small step (cpu_step.step_function)
        self.norms = rule_function(rule, dtype, "norms") if kernel.norms else 0
        self.dtype, self.state_dtype = dtype, state_dtype
        self.numbers = [dtype.num, state_dtype.num, dtype.itemsize, state_dtype.itemsize]
        self.getters = [operator.itemgetter(name) for name in self.slots]
        self._keeps = {}
        self.layouts = {}  # (buffers, mode, split_at) -> Layout of a one-part step
        self.scalars_struct = struct.Struct(f"{self.size + 1}{dtype.char}")  # the scalars, then the clip scale

    def layout(self, buffers, mode, split_at):
        """The :class:`Layout` of a one-part step whose hyperparameter set keeps ``buffers``."""
        key = (buffers, mode, split_at)
        found = self.layouts.get(key)
        if found is None:
            keep = self.keeps(buffers)
            kept = [(2 + j, get) for j, get in enumerate(self.getters) if keep[j]]
            found = self.layouts[key] = Layout(kept, (*self.numbers, 1, mode, split_at, 0, *keep), keep)
        return found


class Layout:
    """A one-part step's constant part: which slot lists to gather (``kept``: (list index, getter)), the head's
    numbers after n (``tail``), and the kept-slot flags (``keep``)."""

    __slots__ = ("kept", "tail", "keep", "first")

    def __init__(self, kept, tail, keep):
        self.kept, self.tail, self.keep = kept, tail, keep
        self.first = all(at == 2 + i for i, (at, _) in enumerate(kept))  # the kept slots are the first ones


_KINDS = {}  # (optimizer class, param dtype, state_dtype) -> its Kind, or None: no kernel


def kind(opt, dtype):
    """The :class:`Kind` of a step of ``opt`` on params of ``dtype`` (float32 or float64), or None: no kernel."""
    key = (type(opt), dtype, opt._hyper.get("state_dtype"))
    found = _KINDS.get(key, False)
    if found is False:
        found = _KINDS[key] = _new_kind(opt, dtype)
    return found


def _new_kind(opt, dtype):
    global _BF16
    found = lookup(opt)
    if found is None or found.factored or dtype not in _KERNEL_DTYPES:  # factored state: the checked path's
        return None
    if not _bf16_state(opt):
        return Kind(found, found.rule, dtype, dtype)
    if dtype != np.float32:
        return None
    from .cpu_rules import BF16_RULES

    if _BF16 is None:
        _BF16 = np.dtype(_backend.low_precision_dtype(np, "bfloat16"))
    return Kind(found, BF16_RULES[found.rule], dtype, _BF16)


def new_state(view, kind, p):
    """The state a param starts from (its first step), as the checked path makes it, or None where ``p`` is
    not an array this kind's step takes (the checked path then makes it, and explains)."""
    if type(p) is not np.ndarray or p.dtype != kind.dtype:
        return None
    st = {"step": 0}
    for slot, name in enumerate(view.buffers()):
        st[name] = _pages.full(p.shape, view.initial_value(name), kind.state_dtype, p, slot)
    return st


def _head(lists, n, kind, keeps, mode, part):
    """The compiled step's head (``cpu_step.step_function``) for a step of several parts (see ``cpu_structs.HEAD``):
    the lists' ids, the numbers, the kept slots of each part, each tensor's part."""
    head = list(map(id, lists))  # id(None): no list
    head += [n, *kind.numbers, len(keeps), mode, _split_at(), 0]  # 0: the answer's slot
    for kept in keeps:
        head += kept
    head += part
    return np.array(head, dtype=np.int64)


def step(opt, kind, views, values, ps, gs, states, steps, part, commit):
    """The whole step, committed, in one engine call; or None: declined, nothing written.

    ``kind``: :func:`kind` of ``opt`` and the params' dtype; ``views``: the hyperparameter set of each
    part of the step, ``values`` its kernel scalars (``kind.order``); ``part`` each tensor's part (a list,
    or None: all part 0); ``ps``, ``gs``, ``states`` and ``steps`` (their step counts) lists the caller holds.
    ``commit(norm, skipped)``: the calls that count the step (``norm`` the clip norm, None without
    ``clip_grad_norm``; ``skipped`` True where skip_nonfinite skips it), run in the same C-level call as the
    kernel (``xopt._atomic.together``).  Returns True where the step ran or was skipped.
    """
    hyper = opt._hyper
    clip = hyper["clip_grad_norm"]
    mode = CHECK_FINITE if hyper["skip_nonfinite"] else 0
    lists = [ps, gs, None, None, None, steps]  # step counts: their types checked in the compiled call
    if part is None:  # one part: the usual step
        layout = kind.layout(views[0].buffers(), mode, _split_at())
        try:
            for at, get in layout.kept:
                lists[at] = list(map(get, states))
        except KeyError:  # made at the checked path's next step (an option turned on)
            return None
        key, held = _taken(kind)
        head, scal, call = held
        if len(ps) > call.rows:
            call.fit(len(ps))
        _HEAD_ONE_PART.pack_into(head, 0, *map(id, lists), len(ps), *layout.tail)
        kind.scalars_struct.pack_into(scal, 0, *values[0], 1.0)
    else:
        keeps = [kind.keeps(view.buffers()) for view in views]
        for j, get in enumerate(kind.getters):
            if all(k[j] for k in keeps):
                try:
                    lists[2 + j] = list(map(get, states))
                except KeyError:
                    return None
            elif any(k[j] for k in keeps):  # a buffer some parts keep: None for the others' params, never read
                lists[2 + j] = [st.get(kind.slots[j]) for st in states]
        head = _head(lists, len(ps), kind, keeps, mode, part)
        scal = np.array([(*v, 1.0) for v in values], dtype=kind.dtype)
        key, call = call_block(kind.function, head, scal, kind.small_step)
        held = None
    try:
        if clip is None:
            try:
                together([call.run, *commit(None, False)])
                return True
            except NotRun:
                answer = head[ANSWER]
            if answer > 0:
                return None
            if answer == NONFINITE:
                together(commit(None, True))
                return True
        later = _cpu_arrays()
        arrays = later.Arrays(kind.function, head, scal, kind.norms)  # checked again: a large step, or a clipped one
        if not arrays.good:
            if clip is not None:
                return None
            raise RuntimeError("xopt internal error: a step's arrays changed between two checks")
        return later.run(opt, arrays, clip, commit)
    finally:  # this thread's buffers back in its pool, whatever happened (cpu_step.give_back, give_back_call)
        if held is not None:
            _SCRATCH[key] = held
        else:
            give_back_call(key, call)


def tensor_dtype(t):
    """:func:`xopt.engines.cpu_tensors.dtype_of` (float32, float64 CPU tensors; the module imports torch)."""
    from .cpu_tensors import dtype_of

    return dtype_of(t)


def tensor_device(t):
    return "cpu"


def step_tensors(opt, kind, views, values, ps, gs, states, steps, part, commit):
    """:func:`step` on CPU torch tensors (:func:`xopt.engines.cpu_tensors.step`, imported at a first step on
    tensors: it imports torch)."""
    step = _LATER.get("cpu_tensors.step")
    if step is None:
        from .cpu_tensors import step

        _LATER["cpu_tensors.step"] = step
    return step(opt, kind, views, values, ps, gs, states, steps, part, commit)


def _kernel_ready(a):
    """A state buffer the kernel can take: C-contiguous, aligned, writeable, native byte order; an ndarray
    subclass (a np.memmap) as a plain view of its memory, written in place as the reference writes it."""
    if isinstance(a, np.ndarray) and a.flags.c_contiguous and a.flags.aligned and a.flags.writeable and a.dtype.isnative:
        return a if type(a) is np.ndarray else a.view(np.ndarray)
    return np.array(a, dtype=a.dtype.newbyteorder("="), order="C")


def apply(opt, entries) -> list:
    """The checked path's call: the writes (calls into C, for ``xopt._atomic.together``) of one fused call
    per (dtype, step) group of entries whose hyperparameter set is ``opt``; arrays the kernel can't take
    directly (float16, strided, byte-swapped, unaligned, scalar grads) go through copies, written back."""
    if lookup(opt).factored:
        return _factored().apply(opt, entries)
    Arrays = _cpu_arrays().Arrays
    groups = {}
    for e in entries:
        groups.setdefault((np.dtype(e.p.dtype), e.state["step"]), []).append(e)
    names = opt.buffers()
    writes = []
    for (dtype, _), group in groups.items():
        ps, gs, write_back = [], [], []
        work_dtype = np.dtype(_backend.compute_dtype(np, dtype))  # float16 via float32 copies: numba has none
        for e in group:
            p = e.p
            if p.dtype != work_dtype or not (p.flags.c_contiguous and p.flags.aligned):
                p = np.array(p, dtype=work_dtype, order="C")  # a fresh, aligned copy
                write_back.append(functools.partial(operator.setitem, e.p, Ellipsis, p))  # C, as np.copyto is not
            ps.append(p)
            g = np.asarray(e.g)
            if g.dtype != work_dtype or not (g.flags.c_contiguous and g.flags.aligned) or g.shape != p.shape:
                g = np.array(g, dtype=work_dtype, order="C").reshape(p.shape)
            gs.append(g)
        states = []
        for e in group:  # each buffer in an array the kernel takes: a copy where it must, put in place with the step
            st = dict(e.state)
            for name in names:
                st[name] = _kernel_ready(e.state[name])
                if st[name] is not e.state[name] and st[name].base is not e.state[name]:  # a copy, not a view
                    write_back.insert(0, functools.partial(dict.__setitem__, e.state, name, st[name]))
            states.append(st)
        found = kind(opt, work_dtype)
        keep = found.keeps(names)
        live = [i for i, p in enumerate(ps) if p.size]  # an empty param has nothing to update
        if live:
            lists = [[ps[i] for i in live], [gs[i] for i in live]]
            lists += [[states[i][name] for i in live] if kept else None for name, kept in zip(found.slots, keep)]
            lists += [None] * (6 - len(lists))
            scal = np.array([found.order(group[0].scalars) + (1.0 if group[0].clip is None else group[0].clip,)],
                            dtype=work_dtype)
            arrays = Arrays(found.function, _head(lists, len(live), found, [keep], 0, [0] * len(live)), scal,
                            found.norms)
            if not arrays.good:
                raise RuntimeError("xopt internal error: the fused CPU kernel refused arrays the checks passed")
            writes += arrays.writes()
            writes.append(functools.partial(len, lists))  # holds the copies the kernel reads until it has run
        writes += write_back
    return writes


def sum_squares(arrays) -> float:
    """The sum of the squares of NumPy arrays, in float64, by chunks of CHUNK as :meth:`Arrays.sum_squares`."""
    from .cpu_drivers import sum_squares

    return sum_squares(arrays)


def compile_all():
    """Compile (or load from the disk cache) every kernel for float32 and float64; returns seconds."""
    from .. import LAMB, AdaDelta, Adafactor, Adam, Adamax, AdaGrad, Lion, Momentum, NAdam, RAdam, RMSprop, SGD

    t0 = time.perf_counter()
    for dtype in (np.float32, np.float64):
        for opt in (SGD(momentum=0.9, impl="fused"), Momentum(impl="fused"), AdaGrad(impl="fused"),
                    RMSprop(impl="fused"), Adam(impl="fused"), AdaDelta(impl="fused"), Adamax(impl="fused"),
                    NAdam(impl="fused"), RAdam(impl="fused"), Lion(impl="fused"), LAMB(impl="fused"),
                    Adafactor(impl="fused")):
            for _ in range(2):
                opt.update({"p": np.ones(4, dtype=dtype), "w": np.ones((2, 2), dtype=dtype)},
                           {"p": np.ones(4, dtype=dtype), "w": np.ones((2, 2), dtype=dtype)})
    return time.perf_counter() - t0
