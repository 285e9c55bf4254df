"""On the Dask scheduler: the Active Memory Manager's ``ReduceReplicas`` policy, but for durable points; the
span of xopt's steps kept to the task groups the scheduler still holds.

``ReduceReplicas`` (on by default) drops every replica but one of a key no task waits for, within
seconds; ``Client.replicate``'s documentation calls it incompatible.  The copies of a durable point
(:mod:`xopt.engines.dask_lineage`) are kept for the workers that may be lost, so :class:`KeepDurable`
makes the same suggestions as ``ReduceReplicas`` except for keys named ``xopt-durable-...``, and
:func:`keep_durable` puts it in the place of a running ``ReduceReplicas``.

The scheduler's spans extension (``distributed.spans``) never forgets a span, nor the task groups it
holds, even after the scheduler forgot their tasks.  A step of a param is a task group of its own (its
keys are named for its inputs), so a long run would leave one group per step there, and, where each step
is waited for, one span per step (the default span ends whenever the cluster is idle).  The steps are
therefore submitted in one span of xopt's (``xopt``, see :func:`xopt.engines.dask_lineage.one_span`), and
:class:`ForgetSteps`, a scheduler plugin, drops from the spans tagged ``xopt`` the task groups the
scheduler has forgotten, each time a graph is submitted, and keeps the metadata every graph adds to it (the
types of its collections) to the last graphs': the span's metrics (``Span.cumulative_worker_metrics``, kept
per span, not per group) stay whole, its task counts and times cover the groups still held.

Each step also leaves about ten new keys in ``dask.utils.key_split``'s memo (an ``lru_cache`` of 100,000 keys,
about 0.2 KiB each): on a scheduler that runs for days it fills to about 21 MiB.  :class:`ForgetSteps` clears it
whenever it holds more than :data:`KEY_SPLIT_KEPT` keys; it is a memo of a pure function (a key's prefix), so
what is cleared is only recomputed, a microsecond a key.
"""

from __future__ import annotations

from dask.utils import key_split
from distributed.active_memory_manager import ReduceReplicas
from distributed.diagnostics.plugin import SchedulerPlugin

PREFIX = "xopt-durable-"
SPAN_TAG = "xopt"  # the name of xopt's span (dask_lineage.one_span)


def _durable(key) -> bool:
    name = key[0] if isinstance(key, tuple) and key else key
    return isinstance(name, str) and name.startswith(PREFIX)


class KeepDurable(ReduceReplicas):
    """``ReduceReplicas`` that never suggests dropping a replica of a durable point."""

    def run(self):
        policy = super().run()
        answer = None
        while True:
            try:
                suggestion = policy.send(answer)
            except StopIteration:
                return
            answer = None if _durable(suggestion.ts.key) else (yield suggestion)


def keep_durable(scheduler) -> str:
    """Replace the running ``ReduceReplicas`` (exactly that class) of ``scheduler``'s Active Memory Manager by
    :class:`KeepDurable`; what it found: "replaced", "kept" (done before), "none" (no such policy running)."""
    amm = scheduler.extensions.get("amm")
    if amm is None:
        return "none"
    if any(type(p) is KeepDurable for p in amm.policies):
        return "kept"
    found = [p for p in amm.policies if type(p) is ReduceReplicas]
    for p in found:
        amm.policies.discard(p)
        amm.add_policy(KeepDurable())
    return "replaced" if found else "none"


KEY_SPLIT_KEPT = 4096  # keys of dask.utils.key_split's memo, above which ForgetSteps clears it (about 1 MiB)
COLLECTIONS_KEPT = 100  # the last graphs' collections a span keeps in its metadata, of those a step touches


def _trim(span) -> None:
    collections = (getattr(span, "_metadata", None) or {}).get("collections")
    if isinstance(collections, list) and len(collections) > 2 * COLLECTIONS_KEPT:
        del collections[:-COLLECTIONS_KEPT]


def forget_steps(scheduler, touched=()) -> int:
    """Drop from every span of xopt's (its name's last part ``xopt``, as :func:`_ours` reads it) the task groups
    ``scheduler`` no longer holds (all their tasks forgotten); a span keeps at least one group (``Span.stop`` reads them).  The metadata that every graph adds
    to each span it touches (the types of its collections) is kept to the last :data:`COLLECTIONS_KEPT` graphs'
    in the spans of xopt and in those of the keys ``touched`` (the inputs a step read: a param's data, the
    user's persisted arrays).  Returns how many groups were dropped."""
    ext = scheduler.extensions.get("spans")
    if ext is None:
        return 0
    dropped = 0
    for span in ext.spans_search_by_tag.get(SPAN_TAG, ()):
        if tuple(span.name)[-1:] != (SPAN_TAG,):  # a span of the caller's own with "xopt" in its name
            continue
        gone = [tg for tg in span.groups if scheduler.task_groups.get(tg.name) is not tg]
        if gone and len(gone) == len(span.groups):
            gone.remove(max(gone, key=lambda tg: tg.stop))
        span.groups.difference_update(gone)
        dropped += len(gone)
        _trim(span)
    for span_id in {ts.group.span_id for ts in map(scheduler.tasks.get, touched) if ts is not None}:
        if span_id in ext.spans:
            _trim(ext.spans[span_id])
    return dropped


def _ours(annotations) -> bool:
    """Whether a graph's tasks went to a span of xopt's (``update_graph``'s annotations for plugins)."""
    span = next(iter((annotations or {}).get("span", {}).values()), None)
    return isinstance(span, dict) and tuple(span.get("name", ()))[-1:] == (SPAN_TAG,)


class ForgetSteps(SchedulerPlugin):
    """On every graph submitted, :func:`forget_steps` (with the keys of the graph, where it is a step's)."""

    name = "xopt-forget-steps"

    def update_graph(self, scheduler, *, tasks=(), annotations=None, **kwargs):
        forget_steps(scheduler, tasks if _ours(annotations) else ())
        trim_key_split()


def trim_key_split(kept=None) -> bool:
    """Clear ``dask.utils.key_split``'s memo where it holds more than ``kept`` (:data:`KEY_SPLIT_KEPT`) keys;
    whether it did (not where a Dask release made it something other than an ``lru_cache``)."""
    info = getattr(key_split, "cache_info", None)
    if info is None or info().currsize <= (KEY_SPLIT_KEPT if kept is None else kept):
        return False
    key_split.cache_clear()
    return True


def register(scheduler, who_has, nbytes, client, groups) -> None:
    """``Scheduler.update_data`` (the keys of a durable point, known as data), then each new task group put in
    the span of the group it was made from (``groups``: (new, old) names): else the next step that reads them
    opens a default span for them (a step's tasks are in a span; keys made by ``update_data`` are in none)."""
    scheduler.update_data(who_has=who_has, nbytes=nbytes, client=client)
    ext = scheduler.extensions.get("spans")
    if ext is None:
        return
    for new, old in groups:
        tg, source = scheduler.task_groups.get(new), scheduler.task_groups.get(old)
        if tg is not None and tg.span_id is None and source is not None and source.span_id in ext.spans:
            tg.span_id = source.span_id
            ext.spans[source.span_id].groups.add(tg)


def setup(scheduler, keep: bool) -> dict:
    """What xopt's durable points ask of the scheduler, once: :class:`ForgetSteps` added, and where ``keep``
    (copies kept on more than one worker), :func:`keep_durable`.  Returns what each found."""
    had = ForgetSteps.name in scheduler.plugins
    scheduler.add_plugin(ForgetSteps(), name=ForgetSteps.name, idempotent=True)
    return {"amm": keep_durable(scheduler) if keep else "not asked", "spans": "kept" if had else "added"}
