"""The reference path against the seed on the book's network: time of one update, as a ratio.

    python benchmarks/reference_speed.py [--rounds 15] [--steps 50] [--out results.json]

The book's MultiLayerNet 64-100-100-100-100-10 (W1..W5, b1..b5, float64) with fixed
grads.  For each of the seed's five optimizers, with default arguments (which give the
seed's numbers): ``xopt.<Name>(impl="reference").update`` against the seed's ``update``
(``xopt/bench/seed.py``), the reference path alone (``_reference.apply_reference`` on
entries already checked, i.e. update() less its checks and bookkeeping), and the rules alone (each
param's ``rule`` evaluated, its results thrown away: the NumPy calls a pure rule makes, with no write-back).  After warm-up
steps, each round times ``--steps`` calls of each, in alternating order; the figures are
medians over the rounds, and the ratios (xopt / seed, lower is faster) come from the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import numpy as np

import xopt
from xopt import _checked
from xopt.engines import reference as _reference
from xopt._inputs import collect
from xopt.bench import seed
from xopt.bench.report import commit

NAMES = ["SGD", "Momentum", "AdaGrad", "RMSprop", "Adam"]
LAYERS = [64, 100, 100, 100, 100, 10]


def book_net(rng, dtype):
    """The book's MultiLayerNet params (W1..W5, b1..b5) and grads of the same shapes."""
    shapes = {}
    for i in range(len(LAYERS) - 1):
        shapes[f"W{i + 1}"] = (LAYERS[i], LAYERS[i + 1])
        shapes[f"b{i + 1}"] = (LAYERS[i + 1],)
    params = {k: (0.1 * rng.standard_normal(s)).astype(dtype) for k, s in shapes.items()}
    grads = {k: (0.01 * rng.standard_normal(s)).astype(dtype) for k, s in shapes.items()}
    return params, grads


def _checked_entries(opt, params, grads):
    """What update() hands the reference path: entries with their state and this step's scalars."""
    entries = collect(params, grads)
    for e in entries:
        e.state = _checked.state_for(opt, e)
        e.scalars = opt.scalars(e.state["step"] + 1)
    return entries


def _rules_only(opt, entries):
    names = opt.buffers()
    for e in entries:
        opt.rule(np, e.p, e.g, {k: e.state[k] for k in names}, e.scalars)


def _per_call(fn, steps):
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=50, help="calls timed together in a round")
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    params0, grads = book_net(rng, np.dtype(args.dtype))

    runs = {}
    for name in NAMES:
        ours, theirs, path = ({k: v.copy() for k, v in params0.items()} for _ in range(3))
        opt, ref, base = getattr(xopt, name)(impl="reference"), getattr(seed, name)(), getattr(xopt, name)()
        base.update(path, grads)
        entries = _checked_entries(base, path, grads)
        runs[name] = {
            "xopt update": lambda opt=opt, p=ours: opt.update(p, grads),
            "reference path only": lambda base=base, es=entries: _reference.apply_reference(base, es),
            "rules only": lambda base=base, es=entries: _rules_only(base, es),
            "seed update": lambda ref=ref, p=theirs: ref.update(p, grads),
        }
    times = {name: {what: [] for what in fns} for name, fns in runs.items()}
    for name, fns in runs.items():  # warm-up
        for fn in fns.values():
            _per_call(fn, max(5, args.steps // 5))
    for r in range(args.rounds):
        for name, fns in runs.items():
            order = list(fns) if r % 2 == 0 else list(fns)[::-1]
            for what in order:
                times[name][what].append(_per_call(fns[what], args.steps))

    print(f"book net 64-100-100-100-100-10, {args.dtype}, {args.rounds} rounds of {args.steps} calls (medians)")
    print(f"{'optimizer':10s} {'seed':>10s} {'xopt ref.':>10s} {'ratio':>7s} {'path only':>10s} {'ratio':>7s} "
          f"{'rules only':>10s} {'ratio':>7s}")
    table = {}
    for name in NAMES:
        med = {what: statistics.median(ts) for what, ts in times[name].items()}
        row = {
            "seed_update_s": med["seed update"],
            "xopt_reference_update_s": med["xopt update"],
            "reference_path_only_s": med["reference path only"],
            "update_ratio": med["xopt update"] / med["seed update"],
            "path_only_ratio": med["reference path only"] / med["seed update"],
            "rules_only_s": med["rules only"],
            "rules_only_ratio": med["rules only"] / med["seed update"],
        }
        table[name] = row
        print(f"{name:10s} {row['seed_update_s'] * 1e6:8.1f}us {row['xopt_reference_update_s'] * 1e6:8.1f}us "
              f"{row['update_ratio']:6.2f}x {row['reference_path_only_s'] * 1e6:8.1f}us {row['path_only_ratio']:6.2f}x "
              f"{row['rules_only_s'] * 1e6:8.1f}us {row['rules_only_ratio']:6.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"what": "time per update on the book's net; ratio = xopt / seed (lower is faster)", "commit": commit(),
                       "command": "python benchmarks/reference_speed.py " + " ".join(sys.argv[1:]),
                       "dtype": args.dtype, "rounds": args.rounds, "steps": args.steps,
                       "date": str(datetime.date.today()), "machine": platform.platform(),
                       "numpy": np.__version__, "results": table}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
