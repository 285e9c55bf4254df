"""Dask arrays: one task per chunk per step, on the worker that holds the chunk.

A step of a param is one ``blockwise`` layer whose task for a chunk takes the chunks of p, g
and the state buffers and returns all their new values together, as one :class:`Chunks`
object, computed by the engine that fits the chunk (:mod:`xopt.engines.fused_cpu` for NumPy
chunks, the reference rule otherwise), exactly as a single-process step would.  The steps of
all params are persisted in one call, so only these tasks run: one per chunk, where plain
``dask.array`` runs one per chunk for each array it writes (three for Adam) and
``apply_gufunc`` adds a ``getitem`` and a ``transpose`` task per output.

The new p and buffers are then handed out as lazy picks of the persisted step
(``chunks.arrays[i]``, a reference, not a copy): a pick runs only when something reads that
array, and Dask's graph optimisation fuses it into the task that reads it, so the next step
reads the persisted chunks directly and an elementwise ``grads(params)`` fused into the step
pays no extra task either.  Where two kinds of task read p (a reduction's and the step's, say),
p's pick runs as a task of its own: one more per chunk, still fewer than plain ``dask.array``.
Every array's graph after a step is the step's persisted chunks and one pick per chunk: it does
not grow with the number of steps, and nothing is gathered to the client.  Dask arrays cannot
be written in place: ``update`` puts the new arrays into the params dict (a list works too; a
tuple cannot take them).

With ``clip_grad_norm`` the norm is a lazy reduction over every chunk of every grad, persisted
with the steps (one key every chunk's task reads, the number it scales its grad by as a
single-process step does); with ``skip_nonfinite`` it is computed first, on the client's call,
and the steps get its number.  ``opt.last_grad_norm`` is the norm as the step persisted it (with
``skip_nonfinite``, its number as a 0-d Dask array): reading it reads no grad again, and it holds no
graph of the grads (which would keep last step's chunks on the workers).

On a ``distributed`` cluster, every ``k`` steps is a durable point (:mod:`xopt.engines.dask_lineage`): the
step is waited for and its chunks held under keys with no task behind them, on two workers, so the
scheduler keeps at most ``k`` steps of tasks and a lost worker replays at most those.  A step whose state
the cluster lost for good (a restart) raises :class:`LostStateError` before anything is written.

Where the tasks run is Dask's choice, as for any ``dask.persist``: the current
``distributed.Client``, or ``dask.config.set(scheduler=...)`` (``"threads"``, ``"processes"``,
``"sync"``).  How many threads a chunk's kernel uses follows Dask's thread budget for a task
(:func:`task_threads`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref

import dask
import dask.array as da
import numpy as np
from dask.base import get_scheduler, tokenize
from dask.local import get_sync
from dask.sizeof import sizeof

from .. import _backend, _threads
from .._atomic import together_unforked
from .._inputs import Entry, describe
from . import dask_lineage
from .dask_lineage import LostStateError, check_state

__all__ = ["accepts", "refuse_masked", "apply", "apply_whole", "Chunks", "task_threads", "SELECT", "LostStateError", "check_state"]

SELECT = None  # xopt._dispatch.select, set by the dispatcher when it loads this engine: each chunk's task runs it


class Chunks:
    """One chunk of every array a step wrote: p, then the state buffers in ``opt.buffers()`` order."""

    __slots__ = ("arrays",)

    def __init__(self, arrays):
        self.arrays = arrays

    def __reduce__(self):  # pickled as the tuple of arrays: NumPy's buffers travel out of band
        return Chunks, (self.arrays,)


@sizeof.register(Chunks)
def _sizeof_chunks(c):  # a worker's memory accounting and spilling see the arrays' bytes
    return sum(sizeof(a) for a in c.arrays)


def accepts(opt, e) -> bool:
    return _backend.is_dask(e.p)


def refuse_masked(entries):
    """A param or grad whose chunks are NumPy masked arrays is refused, naming it, as a NumPy masked array is
    (:mod:`xopt._inputs`): no engine applies the mask, and each chunk's step would read the masked values and
    return the param without its mask."""
    for e in entries:
        for what, x in ((f"param {describe(e.key)}", e.p), (f"grad of param {describe(e.key)}", e.g)):
            if isinstance(getattr(x, "_meta", None), np.ma.MaskedArray):
                raise TypeError(f"{what} is a Dask array of NumPy masked arrays; xopt does not apply masks: pass "
                                "da.ma.getdata(x) or da.ma.filled(x, value)")


def task_threads(whole=None) -> int:
    """How many threads one chunk's kernel may use inside a Dask task.

    Dask runs one task per thread of a worker and tells a task how many threads of its own it
    may start through ``OMP_NUM_THREADS``: a ``distributed`` nanny sets it to 1 in every worker
    process (``distributed.nanny.pre-spawn-environ``), as a worker already runs ``nthreads``
    tasks at once.  numba's and xopt's threads do not read it, so it is read here: the kernel
    takes ``OMP_NUM_THREADS`` threads, 1 where it is unset (an in-process worker or the threaded
    scheduler, where each of the pool's threads runs a task), never more than
    :func:`xopt.get_num_threads` of that process.  ``whole``: the client's budget when the
    tasks run one at a time on its thread (the synchronous scheduler).
    """
    budget = whole
    if budget is None:
        try:
            budget = max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
        except ValueError:
            budget = 1
    return min(budget, _threads.get_num_threads())


def _update_chunks(clip, p, g, *buffers, opt, names, step, scalars, threads, select):
    """On a worker: the new p and buffers of one chunk, by the path a single-process step takes.

    ``clip``: the clip scale (``clip_grad_norm``; None: off), a number or a 0-d array (the scale
    computed on the cluster from the norm of every chunk of every grad, one key every task reads),
    given to the chunk's engine as a float, which multiplies as it reads the grad, as in one process.

    The kernels write in place, so each new array starts as a copy of its input chunk, and
    none of the copies can go: an input chunk is the value of a Dask key that may still be
    read after this task wrote it.  Other tasks of the same graph may read it (a p chunk by
    the user's grads, a buffer by a ``state_dict()`` snapshot; in a thread they would see the
    write half-done); a user may hold last step's arrays; a worker that fetched the chunk keeps
    its replica, from which Dask recomputes this task after a worker is lost, which must see the
    old values or it applies the step twice; under the local schedulers a chunk of
    ``da.from_array`` is a view of the user's NumPy array and ``da.full_like``'s chunks are one
    read-only scalar broadcast.  The grad is only read: never copied here.
    """
    xp = _backend.namespace(p, g)
    state = {"step": step - 1, **{n: xp.asarray(b, copy=True) for n, b in zip(names, buffers)}}
    e = Entry(key="chunk", p=xp.asarray(p, copy=True), g=g, xp=xp, state=state, scalars=scalars,
              clip=None if clip is None else float(clip))
    with _threads.limit(task_threads(threads)):
        for apply_group, group in select(opt, [e]):
            together_unforked(apply_group(opt, group))
    return Chunks((e.p, *(e.state[n] for n in names)))


@contextlib.contextmanager
def _naming(entries):
    """Where a step is computed: an exception raised there (a user's grad that fails computes nothing of xopt's)
    gets a note naming the params whose step it was (Python 3.11 and later), as it propagates."""
    try:
        yield
    except Exception as exc:
        note = getattr(exc, "add_note", None)
        if note is not None and not isinstance(exc, LostStateError):  # that one names its param
            names = ", ".join(describe(e.key) for e in entries)
            which = "param" if len(entries) == 1 else "one of params"  # computed together: which, Dask does not say
            note(f"xopt: raised computing the Dask step of {which} {names} (its grad, the param or its state); "
                 "nothing was changed")
        raise


def _pick(chunks, i):
    return chunks.arrays[i]


def _picked(step, i, like, what):
    """The ``i``-th array of a persisted step, as a Dask array chunked and typed like ``like``."""
    ind = tuple(range(like.ndim))
    return da.blockwise(_pick, ind, step, ind, i, None, dtype=like.dtype, meta=like._meta,
                        name=f"{step.name}-{what}")


_PERSISTED = {}  # "last": (a weak reference to a step's lazy norm, its clip scale and norm persisted): its other
#                  groups (overrides) read them


def _persisted(norm, clip):
    """(clip scale, norm) as persisted by an earlier group of this step, else themselves; forgets older steps'.

    A step is known by its lazy norm object, which every group of the step gets and the next step makes anew: not
    by its key, which a later step of the same grads has too, where the persisted scale may be gone (a cluster
    restarted, then a step taken again from a state file)."""
    last = _PERSISTED.get("last")  # one read: another thread's step may replace it meanwhile
    if last is not None and last[0]() is norm:
        return last[1], last[2]
    _PERSISTED.pop("last", None)  # an older step's: its persisted scale is not kept
    return clip, norm


def apply(opt, entries) -> list:
    """One blockwise layer per param, all persisted in one call (with the clip scale where it is lazy); returns
    the writes that rebind the state to the new arrays (``e.p`` is the new param, rebound by the step's commit).
    The computation can be interrupted (Ctrl-C): nothing is written until the writes run."""
    names = opt.buffers()
    refuse_masked(entries)
    dask_lineage.check_alive(entries, names)  # a step of lost state raises here, before anything is done
    # Hyperparameters only: no state travels.  A user's subclass may read attributes of its own (set by its
    # __init__ from arguments that are not hyperparameters): its hyperparameter set holds them, as its views do.
    worker_opt = (type(opt).fresh(impl=opt.impl, **opt._hyper) if type(opt).__module__.startswith("xopt.")
                  else opt._view(dict(opt._hyper)))
    # The synchronous scheduler runs the tasks one after the other on this thread: all its threads.
    threads = _threads.get_num_threads() if get_scheduler() is get_sync else None
    lazy = entries[0].norm if entries else None  # the step's norm (clip_grad_norm), where it is lazy
    clip, norm = _persisted(lazy, entries[0].clip) if lazy is not None else (entries[0].clip if entries else None,
                                                                              None)  # one scale for the step
    clip_arg = (clip, ()) if isinstance(clip, da.Array) else (clip, None)  # a 0-d array: one key all tasks read
    steps = []
    for e in entries:
        arrays = [e.p, e.g] + [e.state[n] for n in names]
        arrays = [a if a.chunks == e.p.chunks else a.rechunk(e.p.chunks) for a in arrays]
        ind = tuple(range(e.p.ndim))
        step = int(e.state["step"]) + 1  # the count checked: an int of any type; +1 as an int (np.int8 would wrap)
        clip_token = clip.name if isinstance(clip, da.Array) else clip
        token = tokenize(opt.impl, opt._hyper, step, clip_token, *(a.name for a in arrays))  # the inputs: a pure key
        name = f"xopt-{type(opt).__name__.lower()}-{token}"
        steps.append(da.blockwise(
            _update_chunks, ind, *clip_arg, *(x for a in arrays for x in (a, ind)),
            dtype=object, meta=np.empty((0,) * e.p.ndim, dtype=object), name=name,
            opt=worker_opt, names=names, step=step, scalars=e.scalars, threads=threads, select=SELECT))
    with dask_lineage.one_span(), _naming(entries):  # on a cluster, every step in one span: see one_span
        if lazy is not None and norm is lazy:  # the norm's pass runs with the steps, the norm kept without it
            *steps, clip, norm = dask.persist(*steps, clip, norm)
            _PERSISTED["last"] = (weakref.ref(lazy), clip, norm)
        else:
            steps = list(dask.persist(*steps))
    for e in entries:
        e.norm = norm
    holders = [dask_lineage.carried([e.p, *(e.state[n] for n in names)]) for e in entries]
    every = dask_lineage.durable_every()
    due = [i for i, e in enumerate(entries) if dask_lineage.due(e, names, every)]
    if due:  # waits for these steps; the steps after read the durable copies, and nothing older
        with _naming([entries[i] for i in due]):
            durable = dask_lineage.make_durable([steps[i] for i in due])
        for i, made in zip(due, durable or ()):
            steps[i] = made
            holders[i] = dask_lineage.Durable(int(entries[i].state["step"]) + 1, made)
    writes = []
    for e, step, holder in zip(entries, steps, holders):
        like = [e.p] + [e.state[n] for n in names]
        e.p = dask_lineage.carry(_picked(step, 0, e.p, "p"), holder)
        writes += [functools.partial(dict.__setitem__, e.state, n,
                                     dask_lineage.carry(_picked(step, i, like[i], n), holder))
                   for i, n in enumerate(names, 1)]
    return writes



def apply_whole(entries, compute) -> list:
    """The steps of Dask params by a rule that reads whole params (:class:`xopt.optimizers._tensor_rule.TensorRule`:
    norms, factors, matmuls), all persisted in one call, with durable points as :func:`apply` makes them: each new
    array's graph is its persisted chunks, which does not grow with the steps.  ``compute(e)``: e's writes by the
    reference rule on whole arrays (lazy: e.p rebound to the new param, ``dict.__setitem__`` of each new buffer);
    returns them with the persisted arrays.  Each grad is chunked like its param first, so the new param and
    the buffers in its shape keep its chunks."""
    names = sorted({n for e in entries for n in e.opt.buffer_shapes(e.p.shape)}, key=str)  # those the step reads
    refuse_masked(entries)
    dask_lineage.check_alive(entries, names)  # a step of lost state raises here, before anything is done
    holders = [dask_lineage.carried([e.p, *(e.state[n] for n in names if n in e.state)]) for e in entries]
    every = dask_lineage.durable_every()
    due = [i for i, e in enumerate(entries) if dask_lineage.due(e, names, every)]
    for e in entries:
        if e.g.chunks != e.p.chunks:
            e.g = e.g.rechunk(e.p.chunks)
        for n in names:  # a buffer in the param's shape chunked otherwise (a param rechunked, another run's state)
            b = e.state.get(n)
            if b is not None and tuple(b.shape) == tuple(e.p.shape) and getattr(b, "chunks", e.p.chunks) != e.p.chunks:
                dict.__setitem__(e.state, n, b.rechunk(e.p.chunks))
    computed = []
    for e in entries:
        chunks = e.p.chunks
        with _naming([e]):  # the rule may compute a number of its own (LAMB's norms)
            computed.append(compute(e))
        if e.p.chunks != chunks:  # (Adafactor's factors chunked otherwise: broadcasting meets both chunkings)
            e.p = e.p.rechunk(chunks)
    lazy = [[e.p, *(w.args[2] for w in writes)] for e, writes in zip(entries, computed)]
    with dask_lineage.one_span(), _naming(entries):  # on a cluster, every step in one span: see one_span
        *flat, norm = dask.persist(*(a for arrays in lazy for a in arrays), entries[0].norm)
    flat = iter(flat)
    steps = [[next(flat) for _ in arrays] for arrays in lazy]
    for e in entries:
        e.norm = norm  # clip_grad_norm's, where it is lazy: kept without the grads' graph
    if due:  # waits for these steps; the steps after read the durable copies, and nothing older
        with _naming([entries[i] for i in due]):
            durable = dask_lineage.make_durable([a for i in due for a in steps[i]])
        if durable is not None:
            made = iter(durable)
            for i, e in zip(due, (entries[i] for i in due)):
                steps[i] = [next(made) for _ in steps[i]]
                holders[i] = dask_lineage.Durable(int(e.state["step"]) + 1, steps[i])
    out = []
    for e, writes, arrays, holder in zip(entries, computed, steps, holders):
        e.p = dask_lineage.carry(arrays[0], holder)
        out += [functools.partial(dict.__setitem__, w.args[0], w.args[1], dask_lineage.carry(a, holder))
                for w, a in zip(writes, arrays[1:])]
    return out
