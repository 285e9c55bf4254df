"""What a step costs when the caches are cold, as in a training loop: what a small update costs beyond its arrays.

Between two updates a training loop runs a forward and a backward pass, which sweep megabytes of
activations through the caches.  The next update then finds its code and its Python objects cold.
This times, after sweeping ``--sweep-mib`` MiB through the caches ("cold") and without ("warm"):

- the update of 10 one-element params (all overhead, no work), xopt's default path and the seed's;
- pieces of xopt's path: a compiled numba call that does nothing, ``np.array`` of a few floats,
  the optimizer's lock, and a Python function that does nothing (the floor).

With ``--parts``, xopt's update is also split where its compiled call runs (the engine's ``together`` timed
around each of its calls): the Python before the call (``xopt/_lane.py``, the engine's ``step``), the compiled
step, the commit (step counts, ``iter``) and what follows; so one can see which of them the cold caches slow.

Rounds interleave every case; each figure is a median in microseconds.  Prints a table and
writes JSON with --out.

    python benchmarks/cold_call.py [--optimizer SGD] [--rounds 200] [--sweep-mib 16] [--parts] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numba
import numpy as np

import xopt
from xopt.bench import seed
from xopt.bench.report import commit, machine


@numba.njit(cache=True)
def _first(a):
    return a[0]


def _nothing():
    pass


def cases(optimizer):
    params = {k: np.ones(1) for k in range(10)}
    grads = {k: np.ones(1) for k in range(10)}
    seed_params = {k: np.ones(1) for k in range(10)}
    ours, theirs = getattr(xopt, optimizer)(), getattr(seed, optimizer)()
    for _ in range(3):  # compiled, the state made, the caches warm
        ours.update(params, grads)
        theirs.update(seed_params, grads)
    floats = (0.1, 0.9, 0.999, 1e-8, 0.001)
    scalars = np.array(floats)
    _first(scalars)
    return {
        f"xopt {optimizer} update, 10 params": lambda: ours.update(params, grads),
        f"seed {optimizer} update, 10 params": lambda: theirs.update(seed_params, grads),
        "numba call that does nothing": lambda: _first(scalars),
        "np.array of 5 floats": lambda: np.array(floats, dtype=np.float64),
        "optimizer's lock around nothing": lambda: ours._guard.run(_nothing),
        "Python call that does nothing": _nothing,
    }


_PARTS = ("Python before the compiled call", "the compiled step", "the commit", "after the commit")


def _split(f):
    """``f`` (xopt's update) timed in parts: the CPU engine's ``together`` replaced by one that times each call."""
    from xopt import _atomic
    from xopt.engines import fused_cpu

    clock, marks = time.perf_counter, {}

    def timed_together(calls):
        marks["run"] = clock()
        calls[0]()
        marks["commit"] = clock()
        _atomic.together(calls[1:])
        marks["done"] = clock()

    def run():
        fused_cpu.together = timed_together
        try:
            t0 = clock()
            f()
            t1 = clock()
        finally:
            fused_cpu.together = _atomic.together
        return (marks["run"] - t0, marks["commit"] - marks["run"], marks["done"] - marks["commit"],
                t1 - marks["done"])

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optimizer", default="SGD")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--sweep-mib", type=int, default=16)
    ap.add_argument("--parts", action="store_true", help="xopt's update split where its compiled call runs")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    sweep = np.ones(args.sweep_mib * 2**20 // 8)
    timed = cases(args.optimizer)
    times = {(name, cold): [] for name in timed for cold in (False, True)}
    split = _split(timed[f"xopt {args.optimizer} update, 10 params"]) if args.parts else None
    parts = {(name, cold): [] for name in _PARTS for cold in (False, True)}
    clock = time.perf_counter
    for _ in range(args.rounds):
        for name, f in timed.items():
            for cold in (False, True):
                if cold:
                    sweep += 1.0  # through the caches, as a forward and backward pass would
                else:
                    f()  # the same call just before: everything it touches is warm
                t0 = clock()
                f()
                times[name, cold].append(clock() - t0)
        for cold in (False, True) if split else ():
            if cold:
                sweep += 1.0
            else:
                split()
            for name, t in zip(_PARTS, split()):
                parts[name, cold].append(t)
    warm_up = max(1, args.rounds // 10)
    rows = [{"case": name, "warm_us": statistics.median(times[name, False][warm_up:]) * 1e6,
             "cold_us": statistics.median(times[name, True][warm_up:]) * 1e6} for name in timed]
    if split:
        rows += [{"case": f"xopt's update: {name}", "warm_us": statistics.median(parts[name, False][warm_up:]) * 1e6,
                  "cold_us": statistics.median(parts[name, True][warm_up:]) * 1e6} for name in _PARTS]
    print(f"{'case':55s} {'warm us':>9s} {'cold us':>9s}")
    for r in rows:
        print(f"{r['case']:55s} {r['warm_us']:9.1f} {r['cold_us']:9.1f}")
    if args.out:
        result = {"command": "python benchmarks/cold_call.py " + " ".join(argv or []), "commit": commit(),
                  "machine": machine(), "sweep_mib": args.sweep_mib,
                  "rounds": args.rounds, "rows": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])  # recorded in the JSON's "command"
