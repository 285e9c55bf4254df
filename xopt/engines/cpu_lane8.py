"""The exact-type lane's step of 8-bit state (``state_dtype="8bit"``) on NumPy params: one compiled call that checks
every array and then steps them all.

:mod:`xopt._lane` gathers params, grads and state dicts into lists; :func:`step` gathers each kept slot's codes and
absmax from the state dicts (one list each) and hands the lists' ids to one compiled call
(:func:`_make_step`), which reads every array's own struct (:mod:`xopt.engines.cpu_memory`) and checks it before
it writes anything: each param an exact ``numpy.ndarray`` of the step's dtype, C-contiguous, aligned, writeable, in
native byte order, not empty, and of fewer elements than the engine's ``split_at`` (a larger one is split over
threads: the checked path's); its grad the same but for writeable, of the param's shape; for a param of at least
``min_8bit_size`` elements each kept slot's codes uint8 of the param's shape and its absmax 1-D float32 of one number
per block, both writeable; for a smaller one each kept slot's float buffer as the param (its dtype and shape) and no
absmax; its step count an exact ``int``; no two written arrays sharing a byte, no grad sharing one with any of them.
Then it steps each param on the calling thread, as the checked path does: an 8-bit one's blocks by the kernel of
:mod:`xopt.engines.cpu_blockwise` (:func:`~xopt.engines.cpu_blockwise.blocks`, the same compiled code), a smaller
one by the float kernel's rule (:mod:`xopt.engines.fused_cpu`'s C function of the rule, through its address).

A step this lane does not take (a first step, a clipped step, ``skip_nonfinite``, several parts, torch tensors,
anything the check refuses) it declines having written nothing, and the checked path takes it.  The step's writes
and its counts run in one C-level call (``xopt._atomic.together``): a refusal raises
:class:`~xopt.engines.cpu_step.NotRun` from the compiled call, before any write, and stops the commit.
"""

from __future__ import annotations

import functools
import operator
from itertools import repeat

import numpy as np
from numba import carray, njit

from .._atomic import together
from . import fused_cpu
from .blockwise import SIGNED, SUFFIX, map_of
from .cpu_blockwise import _widen, blocks
from .cpu_drivers import _run
from .cpu_memory import _is_array, _list_item, disjoint, load_i32, load_i64, typed_pointer
from .cpu_rules import ELEMENTS
from .cpu_step import NotRun, split_at
from .cpu_structs import DATA, DIMS, INT, LIST_SIZE, ND, NONE, OB_TYPE, OFFSETS, READ_FLAGS, WRITE_FLAGS
from .kernels import lookup

__all__ = ["kind", "Kind", "step", "new_state", "step_tensors"]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_LISTS = 9  # the head's list ids: params, grads, codes and absmax of three slots, step counts
# then: n, the param dtype's number and item size, min_8bit_size, block_size, split_at, the codes' and the absmax's
# dtype numbers, the address of the float kernel's rule (a smaller param's), the answer (0: run; 1 + a refused row;
# n + 1: the lists or the memory)
_N, _TYPE, _ITEMSIZE, _MIN, _BLOCK, _SPLIT, _CODES, _ABSMAX, _FLOAT_RULE, _ANSWER = range(_LISTS, _LISTS + 10)
_ROW = 8  # ptrs per row: param, grad, then codes and absmax of each slot


class Kind:
    """What an 8-bit lane step of one optimizer class on one param dtype runs: the kernel's rule, slots and the
    order of its scalars, each slot's map, and its compiled steps (one per kept slots and flags)."""

    __slots__ = ("rule", "order", "slots", "signed", "dtype", "flags", "steps", "floats")

    def __init__(self, opt, kernel, dtype, floats):
        self.rule, self.order, self.dtype = kernel.rule, kernel.order, dtype
        pad = 3 - len(kernel.slots)
        self.slots = kernel.slots + ("",) * pad
        self.signed = tuple(map_of(opt, name) is SIGNED for name in kernel.slots) + (True,) * pad
        self.flags = ELEMENTS[kernel.rule][1].py_func
        self.steps = {}
        self.floats = floats  # fused_cpu's Kind: the float kernel of the params below min_8bit_size

    def function(self, keep, flags):
        key = (keep, flags)
        found = self.steps.get(key)
        if found is None:
            found = self.steps[key] = _step_of((self.rule, self.signed, keep, flags))
        return found


_KINDS = {}  # (optimizer class, param dtype) -> its Kind, or None: no kernel


def kind(opt, dtype):
    """The :class:`Kind` of an 8-bit step of ``opt`` on params of ``dtype`` (float32 or float64), or None."""
    key = (type(opt), dtype)
    found = _KINDS.get(key, False)
    if found is False:
        kernel = lookup(opt)
        ok = kernel is not None and kernel.rule in ELEMENTS and not kernel.factored and dtype in _DTYPES
        floats = fused_cpu.kind(opt, dtype) if ok else None
        found = _KINDS[key] = Kind(opt, kernel, dtype, floats) if floats is not None else None
    return found


def new_state(view, kind, p):
    """None: a param's first step is the checked path's (it makes the 8-bit state)."""
    return None


def step_tensors(opt, kind, views, values, ps, gs, states, steps, part, commit):
    """None: 8-bit state of torch tensors is the checked path's."""
    return None


def step(opt, kind, views, values, ps, gs, states, steps, part, commit):
    """The whole step, committed, in one compiled call; or None: declined, nothing written (see the module and
    ``xopt.engines.fused_cpu.step``, whose arguments these are)."""
    view, hyper = views[0], opt._hyper  # the step's options and the 8-bit layout: one value for every group
    if part is not None or hyper["clip_grad_norm"] is not None or hyper["skip_nonfinite"]:
        return None
    names = view.buffers()
    keep = tuple(name in names for name in kind.slots)
    lists = [ps, gs]
    try:
        for name, kept in zip(kind.slots, keep):
            if kept:  # the codes (a float buffer below min_8bit_size) and the absmax (None there)
                lists += [list(map(operator.itemgetter(name), states)),
                          list(map(dict.get, states, repeat(name + SUFFIX)))]
            else:
                lists += [None, None]
    except (KeyError, TypeError):  # made at the checked path's next step (an option turned on), or not a dict
        return None
    lists.append(steps)
    n = len(ps)
    # sizes above any array's (Python ints of any size) as int64: the same blocks, the same params 8-bit
    head = np.array([*map(id, lists), n, kind.dtype.num, kind.dtype.itemsize, min(hyper["min_8bit_size"], _HUGE),
                     min(hyper["block_size"], _HUGE), split_at(), _CODES_NUM, _ABSMAX_NUM, kind.floats.function, 0],
                    dtype=np.int64)
    s = tuple(map(kind.dtype.type, values[0]))
    flags = tuple(bool(f) for f in kind.flags(s))
    scal = np.array([*values[0], 1.0], dtype=kind.dtype)  # the float kernel's: its scalars, then the clip scale
    run = functools.partial(kind.function(keep, flags), OFFSETS, head, np.empty((n, _ROW), np.int64),
                            np.empty(n, np.int64), np.empty((6, 7 * n), np.int64), s, scal)
    try:
        together([run, *commit(None, False)])
    except NotRun:
        return None
    return True


_CODES_NUM, _ABSMAX_NUM = np.dtype(np.uint8).num, np.dtype(np.float32).num
_HUGE = 2**62  # above any array's element count


@njit(cache=True)
def _check(off, head, ptrs, sizes, spans, keep0, keep1, keep2):
    """0 if the arrays of a step are what the kernel may read and write (see the module), else 1 + the first row
    that is not (n + 1: the lists or the memory).  Writes only ``ptrs`` (each row's addresses: param, grad, then
    codes and absmax of each slot, 0 where not kept), ``sizes`` (each param's element count) and ``spans``."""
    n = head[_N]
    param_type, itemsize, least, block, most = head[_TYPE], head[_ITEMSIZE], head[_MIN], head[_BLOCK], head[_SPLIT]
    for k in range(_LISTS):
        if head[k] != off[NONE] and load_i64(head[k] + off[LIST_SIZE]) != n:
            return n + 1
    lo, hi = spans[0], spans[1]
    m = 0
    for t in range(n):
        p = _list_item(off, head[0], t)
        if not _is_array(off, p, WRITE_FLAGS, param_type, -1, 0):
            return t + 1
        nd = load_i32(p + off[ND])
        dims = load_i64(p + off[DIMS])
        size = 1
        for d in range(nd):
            size *= load_i64(dims + 8 * d)
        if size == 0 or size >= most:
            return t + 1
        small = size < least  # float state, the param's dtype and shape
        sizes[t] = size
        ptrs[t, 0] = load_i64(p + off[DATA])
        lo[m], hi[m] = ptrs[t, 0], ptrs[t, 0] + size * itemsize
        m += 1
        g = _list_item(off, head[1], t)
        if not _is_array(off, g, READ_FLAGS, param_type, nd, dims):
            return t + 1
        ptrs[t, 1] = load_i64(g + off[DATA])
        nb = -(-size // block)
        for j in range(3):
            ptrs[t, 2 + 2 * j] = ptrs[t, 3 + 2 * j] = 0
            if not (keep0 if j == 0 else keep1 if j == 1 else keep2):
                continue
            c = _list_item(off, head[2 + 2 * j], t)
            a = _list_item(off, head[3 + 2 * j], t)
            if small:
                if not _is_array(off, c, WRITE_FLAGS, param_type, nd, dims) or a != off[NONE]:
                    return t + 1
                ptrs[t, 2 + 2 * j] = load_i64(c + off[DATA])
                lo[m], hi[m] = ptrs[t, 2 + 2 * j], ptrs[t, 2 + 2 * j] + size * itemsize
                m += 1
                continue
            if not _is_array(off, c, WRITE_FLAGS, head[_CODES], nd, dims):
                return t + 1
            if (not _is_array(off, a, WRITE_FLAGS, head[_ABSMAX], -1, 0) or load_i32(a + off[ND]) != 1
                    or load_i64(load_i64(a + off[DIMS])) != nb):
                return t + 1
            ptrs[t, 2 + 2 * j], ptrs[t, 3 + 2 * j] = load_i64(c + off[DATA]), load_i64(a + off[DATA])
            lo[m], hi[m] = ptrs[t, 2 + 2 * j], ptrs[t, 2 + 2 * j] + size
            lo[m + 1], hi[m + 1] = ptrs[t, 3 + 2 * j], ptrs[t, 3 + 2 * j] + 4 * nb
            m += 2
        if load_i64(_list_item(off, head[_LISTS - 1], t) + off[OB_TYPE]) != off[INT]:
            return t + 1
    return 0 if disjoint(lo[:m], hi[:m], ptrs, sizes, itemsize, spans[2:]) else n + 1


_STEPS = {}  # (rule, the slots' maps, the slots kept, the rule's flags) -> its compiled step


def _step_of(key):
    found = _STEPS.get(key)
    if found is None:
        found = _STEPS[key] = _make_step(*key)
    return found


def _make_step(rule, signed, keep, flags):
    """The compiled step of element rule number ``rule`` with the three slots on the signed map or not, kept or
    not, and the rule's two ``flags``: constants of the compiled code, as in ``cpu_blockwise._make_claim``."""
    (signed0, signed1, signed2), (keep0, keep1, keep2), (flag0, flag1) = signed, keep, flags

    # the GIL held throughout: no other thread runs, or forks, between an array's check and its use
    @njit(cache=True, error_model="numpy")
    def run(off, head, ptrs, sizes, spans, s, scal):
        """Check every array (:func:`_check`), raising :class:`NotRun` (its answer in the head) before any write
        if one is refused; then step each param: its blocks, or below min_8bit_size the float kernel's rule (at
        the head's address, with ``scal``: the scalars, then the clip scale 1) over its float state."""
        answer = _check(off, head, ptrs, sizes, spans, keep0, keep1, keep2)
        if answer != 0:
            head[_ANSWER] = answer
            raise NotRun()
        n, block, least = head[_N], head[_BLOCK], head[_MIN]
        width = 0
        for t in range(n):
            width = max(width, min(block, sizes[t]))
        table = np.empty((n, 5), np.int64)  # the float rule's rows: param, grad, its three slots (the param's if not
        no_scratch = scal[:0]  # kept: never read); no clip scale, no room for scaled grads
        x0 = np.empty(width if keep0 else 0, np.float32)
        x1 = np.empty(width if keep1 else 0, np.float32)
        x2 = np.empty(width if keep2 else 0, np.float32)
        proto = scal[:0]
        one = _widen(np.float32(1.0), proto)  # the clip scale: not read (scaled is False)
        for t in range(n):
            size = sizes[t]
            if size < least:
                table[t, 0], table[t, 1] = ptrs[t, 0], ptrs[t, 1]
                table[t, 2] = ptrs[t, 2] if keep0 else ptrs[t, 0]
                table[t, 3] = ptrs[t, 4] if keep1 else ptrs[t, 0]
                table[t, 4] = ptrs[t, 6] if keep2 else ptrs[t, 0]
                _run(head[_FLOAT_RULE], table, t, 0, size, scal, no_scratch)
                continue
            span = min(block, size)  # a block_size above the size is one block of the size
            nb = -(-size // span)
            p = carray(typed_pointer(ptrs[t, 0], proto), (size,))
            g = carray(typed_pointer(ptrs[t, 1], proto), (size,))
            c0 = carray(typed_pointer(ptrs[t, 2], np.uint8), (size if keep0 else 0,))
            a0 = carray(typed_pointer(ptrs[t, 3], np.float32), (nb if keep0 else 0,))
            c1 = carray(typed_pointer(ptrs[t, 4], np.uint8), (size if keep1 else 0,))
            a1 = carray(typed_pointer(ptrs[t, 5], np.float32), (nb if keep1 else 0,))
            c2 = carray(typed_pointer(ptrs[t, 6], np.uint8), (size if keep2 else 0,))
            a2 = carray(typed_pointer(ptrs[t, 7], np.float32), (nb if keep2 else 0,))
            blocks(rule, signed0, signed1, signed2, keep0, keep1, keep2, flag0, flag1, False, 0, nb, p, g, c0, a0,
                   c1, a1, c2, a2, s, one, span, x0, x1, x2)
        return 0

    return run
