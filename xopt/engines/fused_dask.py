"""Dask arrays: every chunk updated where it lives, params and state persisted together each step.

A step is one ``apply_gufunc`` per param whose function takes the chunks of p, g and
the state buffers and returns their new values, computed on the worker by the
engine that fits the chunk (:mod:`xopt.engines.fused_cpu` for NumPy chunks, the reference
rule otherwise), exactly as a single-process step would.  All outputs of a step are
persisted in one call, so each new array's graph is just its chunks: neither the
graph nor the step time grows with the number of steps, and nothing is gathered to
the client.  Dask arrays cannot be written in place: ``update`` puts the new arrays
into the params dict (a list works too; a tuple cannot take them).
"""

from __future__ import annotations

import dask
import dask.array as da

from .. import _backend
from .._inputs import Entry

__all__ = ["accepts", "apply"]


def accepts(opt, e) -> bool:
    return _backend.is_dask(e.p)


def _update_chunks(p, g, *buffers, opt, names, step, scalars):
    """On a worker: new (p, *buffers) for one chunk, by the same path a single-process step takes."""
    from .. import _dispatch  # on the worker

    xp = _backend.namespace(p, g)
    state = {"step": step - 1, **{n: xp.asarray(b, copy=True) for n, b in zip(names, buffers)}}
    e = Entry(key="chunk", p=xp.asarray(p, copy=True), g=g, xp=xp, state=state, scalars=scalars)
    for apply, group in _dispatch.select(opt, [e]):
        apply(opt, group)
    return (e.p, *(e.state[n] for n in names))


def apply(opt, entries):
    names = opt.buffers()
    worker_opt = type(opt)(impl=opt.impl, **opt._hyper)  # hyperparameters only: no state travels
    outputs = []
    for e in entries:
        g = e.g if e.g.chunks == e.p.chunks else e.g.rechunk(e.p.chunks)
        buffers = [e.state[n] if e.state[n].chunks == e.p.chunks else e.state[n].rechunk(e.p.chunks)
                   for n in names]
        signature = ",".join(["()"] * (2 + len(names))) + "->" + ",".join(["()"] * (1 + len(names)))
        result = da.apply_gufunc(
            _update_chunks, signature, e.p, g, *buffers,
            output_dtypes=[e.p.dtype] + [b.dtype for b in buffers],
            opt=worker_opt, names=names, step=e.state["step"] + 1, scalars=e.scalars)
        outputs.append(result if isinstance(result, tuple) else (result,))
    persisted = dask.persist(*[a for out in outputs for a in out])
    k = 0
    for e, out in zip(entries, outputs):
        e.p = persisted[k]
        for n in names:
            k += 1
            e.state[n] = persisted[k]
        k += 1
