"""Long runs on a ``distributed`` cluster: a lineage of bounded length, durable points, lost state named.

Every Dask step reads the chunks the step before it persisted.  The scheduler keeps each task whose
result a later task read, so that it can compute that result again when the worker holding it is lost:
left alone, it keeps every step since the first (the number of chunks more tasks each step), and a lost
worker makes it replay them all.

**Durable points.**  Every ``k`` steps of a param (``dask.config`` key ``xopt.dask.durable-every``,
default :data:`DURABLE_EVERY`; 0 turns them off) the step's persisted chunks are made durable: the
step waits until they are computed, each worker holding one registers it again under a new key of
its own, one the scheduler knows as data (as ``Client.scatter`` makes), with no task behind it (the
same object in the worker's memory: no copy), and ``Client.replicate`` copies each such key to a
second worker (``xopt.dask.durable-copies``, default 2).  The step's new p and state are picks of
those keys, so the next step's tasks (and the user's grads computed from p) read them and nothing
older: the scheduler forgets the steps before, and a worker lost later costs at most the ``k`` steps
since, replayed from the copy on another worker.  The Active Memory Manager's ``ReduceReplicas``
policy (on by default) drops every second replica of a key no task waits for, within seconds; where
it runs, it is replaced on the scheduler by :class:`xopt.engines.dask_amm.KeepDurable`, which is
that policy but for the keys of durable points (named ``xopt-durable-...``; this needs xopt
importable on the scheduler, else a warning says the copies will not last).

The keys of the last durable point stay wanted by the client for as long as an array the engine
handed out since depends on them: each such array carries them (:data:`_HOLDER` attribute).

**Spans.**  The scheduler's spans extension keeps every span, with the task groups it holds, for as long
as the scheduler runs; each step is a task group of its own (its keys are named for its inputs), and a step
waited for before the next is submitted would open a default span of its own.  The steps are submitted in
one span of this process's (:func:`one_span`), the keys of a durable point are put in the span of the step
they were made from, and a scheduler plugin (:class:`xopt.engines.dask_amm.ForgetSteps`, added with the first
durable point) drops from it the groups the scheduler has forgotten: what the scheduler keeps for the spans
does not grow with the steps.

**Lost state.**  Before a step, :func:`check_alive` reads the status of every future the param's
arrays (p, grad, state) were computed from: a key the cluster no longer holds and cannot compute
again (cancelled: the cluster restarted, its client closed, every worker holding a durable point was
lost) or whose task failed makes the step raise :class:`LostStateError`, naming it, before anything is
written.  ``state_dict()`` and ``save()`` check the same.
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
import warnings

import dask
import dask.array as da
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from dask.sizeof import sizeof

__all__ = ["LostStateError", "DURABLE_EVERY", "DURABLE_COPIES", "check_alive", "check_state", "durable_every",
           "due", "make_durable", "carry", "one_span", "PREFIX", "SPAN"]

DURABLE_EVERY = 10  # steps between durable points (dask.config "xopt.dask.durable-every")
DURABLE_COPIES = 2  # workers holding each chunk of a durable point (dask.config "xopt.dask.durable-copies")
PREFIX = "xopt-durable-"
_HOLDER = "_xopt_durable"  # attribute of the arrays the engine hands out: their last durable point
SPAN = ("xopt",)  # the name of the span the steps are submitted in (one_span)
_SPAN_ID = f"xopt-{uuid.uuid4().hex}"  # that span's id: one for every step of every optimizer of this process


class LostStateError(RuntimeError):
    """A param's state (or its param or grad) can no longer be computed: the Dask cluster lost it."""


class Durable:
    """A durable point: the arrays over its keys (they keep the keys wanted) and the step count it was made at."""

    __slots__ = ("step", "arrays", "__weakref__")

    def __init__(self, step, arrays):
        self.step, self.arrays = step, arrays


def durable_every() -> int:
    k = dask.config.get("xopt.dask.durable-every", DURABLE_EVERY)
    if k is None or k is False:
        return 0
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise ValueError(f"dask.config 'xopt.dask.durable-every' must be an int >= 0 (0: never), got {k!r}")
    return int(k)


def durable_copies() -> int:
    n = dask.config.get("xopt.dask.durable-copies", DURABLE_COPIES)
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"dask.config 'xopt.dask.durable-copies' must be an int >= 1, got {n!r}")
    return int(n)


def _future_type():
    """``distributed.Future``, or None where ``distributed`` is not imported, or still being imported by another
    thread (Dask imports it at a step's persist): no future can exist before its import is done."""
    return getattr(sys.modules.get("distributed"), "Future", None)


def futures_of(array) -> list:
    """The ``distributed`` futures in ``array``'s graph (persisted chunks it reads), as (graph key, future)."""
    future = _future_type()
    if future is None:
        return []
    found = []
    for layer in array.__dask_graph__().layers.values():
        if isinstance(layer, MaterializedLayer):
            found += [(k, v) for k, v in layer.mapping.items() if isinstance(v, future)]
    return found


def carried(arrays):
    """The last durable point any of ``arrays`` carries (the latest), or None."""
    best = None
    for a in arrays:
        h = getattr(a, _HOLDER, None)
        if h is not None and (best is None or h.step > best.step):
            best = h
    return best


def carry(array, holder):
    if holder is not None:
        setattr(array, _HOLDER, holder)
    return array


def _on_cluster() -> bool:
    """Whether ``dask.persist`` here goes to a ``distributed`` client."""
    client = getattr(sys.modules.get("distributed"), "Client", None)  # None: not imported, or half imported
    if client is None:
        return False
    from dask.base import get_scheduler

    return isinstance(getattr(get_scheduler(), "__self__", None), client)


def one_span():
    """Where the steps are submitted: on a ``distributed`` cluster, in one span (``distributed.spans``) named
    ``xopt``, the same for every step of this process, where the caller has no span of its own (theirs is left
    as it is), as ``distributed.span("xopt")`` entered once would put them.

    The scheduler keeps a span and its task groups for as long as it runs; a step waited for before the next
    is submitted would otherwise open a default span of its own, every step.  The plugin that the first
    durable point adds to the scheduler (:class:`xopt.engines.dask_amm.ForgetSteps`) drops from this span the
    groups of the steps the scheduler has forgotten."""
    if "span" in dask.get_annotations() or not _on_cluster():
        return contextlib.nullcontext()
    return dask.annotate(span={"name": SPAN, "ids": (_SPAN_ID,)})


def due(e, names, every) -> bool:
    """Whether the step e is about to take is a durable point: ``every`` steps or more since the last one.  A
    point made at a later count than e's (its step count set back since) counts as none."""
    holder = carried([e.p, *(e.state[n] for n in names if n in e.state)])
    step = int(e.state["step"])
    return every > 0 and step + 1 - (holder.step if holder and holder.step <= step else 0) >= every


def _describe(key):
    from .._inputs import describe

    return describe(key)


def _lost(where, step, key, future) -> LostStateError:
    status = future.status
    if status == "error":
        try:
            cause = repr(future.exception(timeout=10))
        except Exception as exc:  # noqa: BLE001 (the cause is only named)
            cause = f"unknown ({type(exc).__name__})"
        how = f"the task that made it failed on the cluster: {cause}"
    else:
        how = (f"its key {future.key!r} is {status}: the cluster restarted, the client that computed it "
               "closed, or every worker holding it was lost")
    return LostStateError(
        f"{where}, at step count {step}, can no longer be computed: {how}. No later step can run from it; "
        f"nothing was changed (the step counts stay at {step}). To go on, load the last file written by save(): "
        "optimizer.load(path, params=params)")


def _check(where, step, array):
    for key, f in futures_of(array):
        if f.status in ("cancelled", "error"):
            raise _lost(where, step, key, f)


def check_alive(entries, names):
    """Raise :class:`LostStateError` (before anything is written) where a param, its state or its grad reads
    a key the cluster lost for good."""
    if _future_type() is None:
        return
    for e in entries:
        step = e.state.get("step", 0)
        what = f"param {_describe(e.key)}"
        _check(what, step, e.p)
        for n in names:
            if n in e.state:
                _check(f"state {n!r} of {what}", step, e.state[n])
        _check(f"the grad of {what}", step, e.g)


def check_state(opt):
    """:func:`check_alive` for every state buffer of ``opt`` (``state_dict()``, ``save()``)."""
    if _future_type() is None:
        return
    for key, st in opt.state.items():
        for n, buf in st.items():
            if n != "step" and isinstance(buf, da.Array):
                _check(f"state {n!r} of param {_describe(key)}", st.get("step", 0), buf)


def _alias(pairs, dask_worker=None):
    """On a worker: each (old, new) key pair whose old key this worker holds, held under the new key too
    (the same object: no copy), as a scatter would put it.  Returns {new key: bytes}."""
    data = {new: dask_worker.data[old] for old, new in pairs if old in dask_worker.data}
    if data:
        dask_worker.update_data(data=data, stimulus_id=f"xopt-durable-{time.time()}")
    return {k: sizeof(v) for k, v in data.items()}


def _setup(keep, dask_scheduler=None):
    """On the scheduler: :func:`xopt.engines.dask_amm.setup` (the steps' span kept small; where ``keep``, the
    Active Memory Manager's ReduceReplicas made to leave durable points alone).  Returns what it found."""
    from .dask_amm import setup

    return setup(dask_scheduler, keep)


_ASKED = {}  # (scheduler id, keep) -> what _setup answered (asked once per scheduler)


def _protect(client, keep) -> bool:
    """:func:`_setup` asked of the scheduler once; whether it answered (xopt is importable there)."""
    sid = (client.scheduler_info().get("id"), keep)
    if sid not in _ASKED:
        try:
            _ASKED[sid] = client.run_on_scheduler(_setup, keep)
        except Exception as exc:  # noqa: BLE001 (xopt not importable there, say)
            _ASKED[sid] = "failed"
            copies = ("its Active Memory Manager may drop the copies of durable points, and a lost worker may then "
                      "lose the optimizer state (install xopt where the scheduler runs, or remove ReduceReplicas "
                      "from distributed.scheduler.active-memory-manager.policies); " if keep else "")
            warnings.warn(f"xopt could not set up the Dask scheduler for durable points ({type(exc).__name__}: "
                          f"{exc}): {copies}its spans extension keeps a task group for every step (install xopt "
                          "where the scheduler runs)", stacklevel=4)
    return _ASKED[sid] != "failed"


def _scheduler_register(who_has, nbytes, client, groups, dask_scheduler=None):
    """On the scheduler: :func:`xopt.engines.dask_amm.register`."""
    from .dask_amm import register

    return register(dask_scheduler, who_has, nbytes, client, groups)


def _register(client, flat, pairs):
    """The new keys of ``pairs`` made on the workers holding the old ones, known to the scheduler as data and
    copied to ``durable-copies`` workers: {new key: its future}, or None where a holder went away meanwhile."""
    from distributed import Future

    copies = durable_copies()
    ours = _protect(client, copies > 1)
    holders = sorted({w for ws in client.who_has(flat).values() for w in ws})
    news = {new: Future(new, client) for _, new in pairs}  # before the scheduler reports them in memory
    got = client.run(_alias, pairs, workers=holders, on_error="return")
    who_has, nbytes = {}, {}
    for addr, answer in got.items():
        if isinstance(answer, dict):
            for k, n in answer.items():
                who_has.setdefault(k, []).append(addr)
                nbytes[k] = n
    if who_has and ours:  # whatever was made, known to the scheduler: released with the futures if not used
        groups = sorted({(new[0], old[0]) for old, new in pairs})
        client.run_on_scheduler(_scheduler_register, who_has, nbytes, client.id, groups)
    elif who_has:
        client.sync(client.scheduler.update_data, who_has=who_has, nbytes=nbytes, client=client.id)
    if len(who_has) != len(pairs):
        return None
    if copies > 1:
        client.replicate(list(news.values()), n=copies)
    return news


def make_durable(steps):
    """Durable copies of the persisted ``steps`` (arrays over distributed futures): arrays chunked like them
    over keys with no task behind them, each on ``durable-copies`` workers; None where the steps were not
    computed by a distributed cluster or a holder went away meanwhile (the next step tries again).

    Waits until the steps are computed; raises where one failed (its exception) or was cancelled."""
    found = [futures_of(s) for s in steps]
    if not all(found) or any(len(f) != s.npartitions for f, s in zip(found, steps)):
        return None
    import distributed

    flat = [f for fs in found for _, f in fs]
    client = flat[0].client
    try:
        distributed.wait(flat)
    except distributed.client.FuturesCancelledError as exc:  # a lost input: a restart, or a second lost worker
        raise LostStateError(f"a step was cancelled on the cluster before it was computed ({exc}). Nothing was "
                             "changed; to go on, load the last file written by save(): "
                             "optimizer.load(path, params=params)") from exc
    for f in flat:
        if f.status == "error":
            f.result()  # the step's own exception
        if f.status == "cancelled":
            raise LostStateError(f"a step was cancelled on the cluster while it ran (its key {f.key!r}): the "
                                 "cluster restarted or the client closed. Nothing was changed; to go on, load the "
                                 "last file written by save(): optimizer.load(path, params=params)")
    names = {s.name: PREFIX + tokenize(s.name) for s in steps}
    pairs = [(k, (names[k[0]], *k[1:])) for fs in found for k, _ in fs]
    try:
        news = _register(client, flat, pairs)
    except Exception as exc:  # noqa: BLE001 (a worker lost meanwhile, say: the step stands, the next tries again)
        warnings.warn(f"xopt: no durable point at this step ({type(exc).__name__}: {exc}); the next step tries "
                      "again", RuntimeWarning, stacklevel=4)
        return None
    if news is None:
        return None
    out = []
    for s, fs in zip(steps, found):
        name = names[s.name]
        layer = {(name, *k[1:]): news[(name, *k[1:])] for k, _ in fs}
        out.append(da.Array(HighLevelGraph.from_collections(name, layer, dependencies=()), name, s.chunks,
                            meta=s._meta))
    return out
