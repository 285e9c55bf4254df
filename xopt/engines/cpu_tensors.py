"""CPU torch tensors for the fused CPU engine, read through torch's own accessors instead of NumPy views.

A step on torch tensors (:func:`step`) needs, of each param, grad and
state buffer, what :func:`xopt.engines.cpu_memory.check_step` reads from a NumPy array's struct: that
it is a dense CPU tensor of the step's dtype, shaped as its param, and where its data is.  Here that is
asked of torch, one accessor mapped over a whole list at a time (a loop in C per question, where
``Tensor.numpy()`` costs a microsecond or two per tensor and a NumPy array to free); then
:func:`xopt.engines.cpu_memory.check_table` checks the addresses (not NULL, aligned, no shared bytes) in
the compiled call before the kernel runs.  Nothing is remembered from one call to the next.

A tensor taken is an exact ``torch.Tensor`` or ``torch.nn.Parameter`` (a subclass may keep its data
elsewhere, or run Python in its methods), on the CPU, strided, contiguous, without torch's lazy negation
bit, not an inference tensor outside ``torch.inference_mode()`` (torch refuses to write one there: it has no
version counter), of the step's dtype (float32, float64), with a shape (a nested tensor has none) and strided storage
(``data_ptr`` raises for a sparse, MKL-DNN or functorch wrapper tensor); anything else is declined, and the
checked path takes the step and explains.
"""

from __future__ import annotations

import functools
import operator
from itertools import chain

import numpy as np
import torch

from .cpu_arrays import Arrays, give_back, run, split_at, taken
from .cpu_step import CHECK_FINITE, NONFINITE, NotRun
from .cpu_table import N_TABLE_HEAD, TABLE_ANSWER, check_table, table_step
from .._atomic import together

__all__ = ["dtype_of", "addresses", "shapes", "sizes", "torch_dtype", "increment_version", "TAKEN", "step"]

_NO_PART = np.empty(0, dtype=np.int64)

TAKEN = frozenset({torch.Tensor, torch.nn.Parameter})  # exact types: a subclass is declined
_TO_NUMPY = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
_TO_TORCH = {v: k for k, v in _TO_NUMPY.items()}
_DTYPE, _IS_CPU = operator.attrgetter("dtype"), operator.attrgetter("is_cpu")
_data_ptr, _size, _numel = torch.Tensor.data_ptr, torch.Tensor.size, torch.Tensor.numel
_is_contiguous, _is_neg = torch.Tensor.is_contiguous, torch.Tensor.is_neg
_is_inference, _inference_mode = torch.Tensor.is_inference, torch.is_inference_mode_enabled
_REFUSED = (RuntimeError, TypeError, AttributeError, ValueError)
increment_version = torch._C._increment_version  # what torch's in-place writes do: autograd sees the change


def dtype_of(t):
    """The NumPy dtype of the kernel a step on params like ``t`` runs (float32, float64), or None: ``t`` is not
    a CPU tensor this engine takes."""
    if type(t) in TAKEN and t.is_cpu:
        return _TO_NUMPY.get(t.dtype)
    return None


def torch_dtype(dtype):
    """The torch dtype of NumPy's ``dtype`` (float32, float64), or None."""
    return _TO_TORCH.get(dtype)


def addresses(ts, dtype, lists=1):
    """The data addresses of the tensors ``ts``, or None where one is not a tensor this engine takes (see the
    module) of torch dtype ``dtype``.  ``lists``: ``ts`` is that many lists of n tensors one after the other
    (params, grads, buffers), and the k-th tensor of each list must have the shape of the first list's."""
    try:
        if (not TAKEN.issuperset(map(type, ts)) or set(map(_DTYPE, ts)) != {dtype} or not all(map(_IS_CPU, ts))
                or not all(map(_is_contiguous, ts)) or any(map(_is_neg, ts))
                or (any(map(_is_inference, ts)) and not _inference_mode())):
            return None
        shaped = list(map(_size, ts))  # raises for a nested tensor: it has no shape
        if lists > 1 and shaped != shaped[:len(ts) // lists] * lists:
            return None
        return list(map(_data_ptr, ts))  # raises where the tensor has no strided storage (sparse, MKL-DNN)
    except _REFUSED:
        return None


def shapes(ts):
    """Each tensor's torch.Size, or None where one has none (a nested tensor)."""
    try:
        return list(map(_size, ts))
    except _REFUSED:
        return None


def sizes(ts):
    """Each tensor's element count (a list of its own)."""
    return list(map(_numel, ts))


_INT = {int}


def step(opt, kind, views, values, ps, gs, states, steps, part, commit):
    """:func:`xopt.engines.fused_cpu.step` on CPU torch tensors: ``ps``, ``gs`` and the buffers in ``states``
    are tensors, read through torch's accessors (above: type, dtype, device, contiguity, shape, data address)
    into one int64 table that the compiled call checks (``cpu_memory.check_table``) before the kernel runs;
    the kernel writes the tensors in place and their version counters are bumped with the commit, as
    torch's own in-place writes bump them.  Returns True where the step ran or was skipped, None: declined,
    nothing written."""
    if not _INT.issuperset(map(type, steps)):  # each count an exact int (the caller checked their values)
        return None
    dtype = torch_dtype(kind.dtype)
    if dtype is None or kind.state_dtype != kind.dtype:
        return None
    hyper = opt._hyper
    clip = hyper["clip_grad_norm"]
    if clip is not None:  # the norm as the checked path gives it for torch grads: a float64 tensor
        commit = _tensor_norm(commit)
    n, size = len(ps), kind.dtype.itemsize
    mode, split = CHECK_FINITE if hyper["skip_nonfinite"] else 0, split_at()
    layout = kind.layout(views[0].buffers(), mode, split) if part is None else None
    if layout is not None and layout.first:  # the usual: one part, its buffers the first slots (their columns)
        try:
            lists = [ps, gs, *[list(map(get, states)) for _, get in layout.kept]]
        except KeyError:  # made at the checked path's next step (an option turned on)
            return None
        listed = list(chain.from_iterable(lists))
        at = addresses(listed, dtype, len(lists))  # all checked at once
        if at is None:
            return None
        at += [0] * ((5 - len(lists)) * n)  # the slots not kept
        keeps = [layout.keep]
        table = [n, 1, size, size, mode, split, 0, *sizes(ps), *at, *layout.keep]
        written = listed[2 * n:]
        written += ps
    else:
        found = _gathered(kind, views, ps, gs, states, part, dtype, n)
        if found is None:
            return None
        body, written, keeps = found
        table = [n, len(keeps), size, size, mode, split, 0, *sizes(ps), *body]
        for k in keeps:
            table += k
        if part is not None:
            table += part
    table = np.array(table, dtype=np.int64)
    if len(values) == 1:
        key, held = taken(kind)  # this thread's, for the length of the step (see cpu_step.taken)
        scal = held[1]
        kind.scalars_struct.pack_into(scal, 0, *values[0], 1.0)
    else:
        held, scal = None, np.array([(*v, 1.0) for v in values], dtype=kind.dtype)
    try:
        return _run(opt, kind, table, scal, n, part, keeps, clip, functools.partial(increment_version, written),
                    commit)
    finally:
        if held is not None:
            give_back(key, held)


def _run(opt, kind, table, scal, n, part, keeps, clip, bump, commit):
    """:func:`step` once its table and scalars are made: the small step's one call, or the checked-again large or
    clipped one."""
    if clip is None:
        try:
            together([functools.partial(table_step, kind.function, table, scal), bump, *commit(None, False)])
            return True
        except NotRun:
            answer = table[TABLE_ANSWER]
        if answer > 0:
            return None
        if answer == NONFINITE:
            together(commit(None, True))
            return True
    ptrs = np.empty((n, 5), dtype=np.int64)  # a large step, or a clipped one: checked again, run from here
    total = check_table(table, ptrs)
    if total < 0:
        if clip is not None:
            return None
        raise RuntimeError("xopt internal error: a step's table changed between two checks")
    at = N_TABLE_HEAD + 6 * n + 3 * len(keeps)  # each row's part, where there are several
    arrays = Arrays.of_table(kind.function, ptrs, table[N_TABLE_HEAD:N_TABLE_HEAD + n], scal,
                             _NO_PART if part is None else table[at:at + n], total, kind.norms)
    return run(opt, arrays, clip, commit, [bump])


def _tensor_norm(commit):
    """``commit`` with the clip norm (a float) as a 0-d float64 tensor."""
    def counted(norm, skipped):
        return commit(None if norm is None else torch.tensor(norm, dtype=torch.float64), skipped)
    return counted


def _gathered(kind, views, ps, gs, states, part, dtype, n):
    """(the table's five columns of addresses, the tensors the step writes, each part's kept-slot flags) of a
    step of several parts, or of one whose buffers are not its first slots; None: declined."""
    keeps = [kind.keeps(view.buffers()) for view in views]
    lists, columns, partly = [ps, gs], [0, 1], []  # the lists every row fills, their columns; the others
    for j, get in enumerate(kind.getters):
        kept = [k[j] for k in keeps]
        try:
            if all(kept):
                lists.append(list(map(get, states)))
                columns.append(2 + j)
            elif any(kept):  # a buffer some parts keep: the rows of those parts
                rows = [t for t in range(n) if kept[part[t]]]
                partly.append((2 + j, rows, [get(states[t]) for t in rows]))
        except KeyError:  # made at the checked path's next step (an option turned on)
            return None
    listed = list(chain.from_iterable(lists))
    at = addresses(listed, dtype, len(lists))  # all checked at once
    if at is None:
        return None
    written = listed[2 * n:]
    found = dict(zip(columns, (at[i * n:(i + 1) * n] for i in range(len(lists)))))
    shaped = shapes(ps)
    for j, rows, bufs in partly:
        at = addresses(bufs, dtype)
        if at is None or shapes(bufs) != [shaped[t] for t in rows]:
            return None
        found[j] = column = [0] * n
        for t, a in zip(rows, at):
            column[t] = a
        written += bufs
    written += ps
    zeros = [0] * n
    return [a for j in range(5) for a in found.get(j, zeros)], written, keeps
