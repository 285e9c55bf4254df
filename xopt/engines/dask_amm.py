"""On the Dask scheduler: the Active Memory Manager's ``ReduceReplicas`` policy, but for durable points.

``ReduceReplicas`` (on by default) drops every replica but one of a key no task waits for, within
seconds; ``Client.replicate``'s documentation calls it incompatible.  The copies of a durable point
(:mod:`xopt.engines.dask_lineage`) are kept for the workers that may be lost, so :class:`KeepDurable`
makes the same suggestions as ``ReduceReplicas`` except for keys named ``xopt-durable-...``, and
:func:`keep_durable` puts it in the place of a running ``ReduceReplicas``.
"""

from __future__ import annotations

from distributed.active_memory_manager import ReduceReplicas

PREFIX = "xopt-durable-"


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
