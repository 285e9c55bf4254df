"""What one call of ``Optimizer.update`` costs where little repeats: the per-call overhead, case by case.

``perf_counter`` around the update call alone, in these cases:

1. ``repeated``: the same optimizer, params dict and grads dict, step after step.  Workloads: the book's
   net (``xopt.bench.loop``'s, 10 float64 tensors, 37,810 params) and 2,000 float32 tensors of 64..4096
   elements (log-uniform, seed 0); SGD and Adam.
2. ``new every way``: the same workloads, but each timed update gets a new params dict (the same arrays),
   new grad arrays (copies) in a new dict, and a new optimizer given a deep copy of the last one's state and
   its ``iter``, all made outside the timed call: never the optimizer's first update.  Reported as its time
   over ``repeated after copies``'s: the same optimizer, params and grads every call, each timed call after
   the same copies (a deep copy of the state, new grad arrays; kept until the call returns), so that both
   start from the same caches and allocator and the ratio shows what newness itself costs (the target);
   and, for information, over ``repeated``'s, whose arrays stay hot in the cache between calls.
3. torch: ``torch.optim.Adam(fused=True)`` on CPU tensors of the 2,000 sizes (grads set once, ``step()``
   timed) against xopt's ``repeated`` Adam row; and both on one float32 tensor of 2**25 elements.  Skipped
   without torch.
4. scalars: Rosenbrock's two params as 0-d float64 arrays with NumPy-scalar grads, and as Python floats with
   float grads (grads computed once); xopt's SGD and Adam (lr=1e-3) against the seed's; and beside them
   ``floor SGD`` (:func:`floor_sgd`): the least a checked, locked, counted SGD step does, in plain Python.
5. many params: 100,000 float32 params of 1..16 elements, Adam: the first update of a new optimizer, a later
   update, ``save()``, ``load()`` into a new optimizer and that one's first update; seconds, one shot each
   per round (``--many-rounds``), run after the other cases.

Cases 1-4 run in rounds after a warm-up: each round runs every case, in an order rotated from round to round,
``calls`` timed calls in a row (more for the cheap ones).  Figures are medians over all timed calls, in
microseconds; ratios are ratios of medians from this one run.  No thread count is set.  Prints a table and
writes JSON with --out.

    python benchmarks/lean_step.py [--rounds 60] [--many-rounds 3] [--skip-many] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time

import numpy as np

import xopt
from xopt.bench import loop, seed
from xopt.bench.report import commit, machine

try:
    import torch
except ImportError:
    torch = None

clock = time.perf_counter
TARGETS = {"new/repeated": ("<=", 1.2), "torch/xopt": (">=", 4.0), "xopt/torch": ("<=", 1.0),
           "xopt/seed": ("<=", 2.0), "seconds": ("<=", 2.0), "info": None}


def book_net():
    rng = np.random.default_rng(0)
    params = loop.init_params(loop.NETS["book"], rng)
    return params, {k: rng.standard_normal(p.shape).astype(p.dtype) for k, p in params.items()}


def many_tensors(count, low, high, log_uniform=True):
    """``count`` float32 params of random sizes (seed 0) and grads for them."""
    rng = np.random.default_rng(0)
    if log_uniform:
        sizes = np.exp(rng.uniform(np.log(low), np.log(high), count)).astype(int)
    else:
        sizes = rng.integers(low, high + 1, count)
    params = {f"p{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)}
    return params, {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()}


def copied(arrays):
    return {k: v.copy() for k, v in arrays.items()}


def repeated(update, params, grads):
    def once():
        t0 = clock()
        update(params, grads)
        return clock() - t0
    return once


def repeated_after_copies(update, state_of, params, grads):
    """``repeated``, each timed call after the copies ``new_every_way`` makes (see the module)."""
    def once():
        state = {k: {n: (v.copy() if hasattr(v, "copy") else v) for n, v in st.items()}
                 for k, st in state_of().items()}
        new_grads = copied(grads)
        t0 = clock()
        update(params, grads)
        elapsed = clock() - t0
        del state, new_grads
        return elapsed
    return once


def new_every_way(cls, params, grads):
    """Each call: a new optimizer with a deep copy of the last one's state, a new params dict, new grads."""
    last = cls()
    last.update(params, copied(grads))

    def once():
        nonlocal last
        opt = type(last)()
        opt.state = {k: {n: (v.copy() if hasattr(v, "copy") else v) for n, v in st.items()}
                     for k, st in last.state.items()}
        opt.iter = last.iter
        new_params, new_grads = dict(params), copied(grads)
        t0 = clock()
        opt.update(new_params, new_grads)
        elapsed = clock() - t0
        last = opt
        return elapsed
    return once


def torch_adam(params, grads):
    tensors = [torch.from_numpy(p.copy()) for p in params.values()]
    for t, g in zip(tensors, grads.values()):
        t.grad = torch.from_numpy(g.copy())
    opt = torch.optim.Adam(tensors, fused=True)

    def once():
        t0 = clock()
        opt.step()
        return clock() - t0
    return once


def rosenbrock(as_float):
    """Rosenbrock's params at (-1.5, 2) and its grads there, as 0-d arrays and NumPy scalars or Python floats."""
    x, y = np.array(-1.5), np.array(2.0)
    gx, gy = -2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)  # np.float64
    if as_float:
        return (lambda: {"x": -1.5, "y": 2.0}), {"x": float(gx), "y": float(gy)}
    return (lambda: {"x": np.array(-1.5), "y": np.array(2.0)}), {"x": gx, "y": gy}


def floor_sgd(lr=1e-3):
    """The least a step of SGD does that keeps update's per-call promises, written for the Rosenbrock cases alone in
    plain Python: one lock, the containers and every param's and grad's type (and a 0-d array's dtype and shape)
    checked, every new value computed before the first write, a step count per param; no kernel, no options.
    Not xopt's code: a floor for what any checked step costs beside the seed's bare ``params[key] -= lr * g``."""
    lock, counts = threading.Lock(), {}

    def update(params, grads):
        with lock:
            if type(params) is not dict or type(grads) is not dict or len(params) != len(grads):
                raise TypeError("params and grads: dicts of one length")
            new = []
            for key, p in params.items():
                g = grads[key]
                if type(p) is float:
                    if type(g) is not float:
                        raise TypeError(key)
                    new.append((key, p - lr * g))
                elif type(p) is np.ndarray and p.dtype == np.float64 and p.shape == () and type(g) is np.float64:
                    new.append((key, p - lr * g))
                else:
                    raise TypeError(key)
            for key, value in new:
                if type(params[key]) is float:
                    params[key] = value
                else:
                    params[key][...] = value
                counts[key] = counts.get(key, 0) + 1
    return update


def cases(big):
    """{(section, name): (timed call, calls per round)} and the ratios [(name, kind, numerator, denominator)]."""
    timed, ratios = {}, []
    workloads = {"book net": book_net(), "2000 tensors": many_tensors(2000, 64, 4096)}
    for workload, (params, grads) in workloads.items():
        cheap = workload == "book net"
        for name in ("SGD", "Adam"):
            rep, new = ("repeated", f"xopt {name}, {workload}"), ("new every way", f"xopt {name}, {workload}")
            after = ("repeated after copies", f"xopt {name}, {workload}")
            timed[rep] = repeated(getattr(xopt, name)().update, copied(params), grads), 10 if cheap else 3
            timed[new] = new_every_way(getattr(xopt, name), copied(params), grads), 5 if cheap else 1
            opt = getattr(xopt, name)()
            timed[after] = repeated_after_copies(opt.update, lambda o=opt: o.state, copied(params), grads), (
                5 if cheap else 1)
            ratios.append((f"{name}, {workload}: new every way / repeated after copies", "new/repeated", new, after))
            ratios.append((f"{name}, {workload}: new every way / repeated (hot)", "info", new, rep))
    if torch is not None:
        params, grads = workloads["2000 tensors"]
        timed["torch", "torch fused Adam, 2000 tensors"] = torch_adam(params, grads), 3
        ratios.append(("Adam, 2000 tensors: torch fused / xopt", "torch/xopt",
                       ("torch", "torch fused Adam, 2000 tensors"), ("repeated", "xopt Adam, 2000 tensors")))
    rng = np.random.default_rng(0)
    one = {"w": rng.standard_normal(big).astype(np.float32)}, {"w": rng.standard_normal(big).astype(np.float32)}
    label = f"1 tensor of 2^{big.bit_length() - 1}"
    timed["torch", f"xopt Adam, {label}"] = repeated(xopt.Adam().update, copied(one[0]), one[1]), 1
    if torch is not None:
        timed["torch", f"torch fused Adam, {label}"] = torch_adam(*one), 1
        ratios.append((f"Adam, {label}: xopt / torch fused", "xopt/torch", ("torch", f"xopt Adam, {label}"),
                       ("torch", f"torch fused Adam, {label}")))
    for as_float in (False, True):
        make, grads = rosenbrock(as_float)
        kind = "Python floats" if as_float else "0-d arrays"
        for name in ("SGD", "Adam"):
            ours, theirs = ("scalars", f"xopt {name}, {kind}"), ("scalars", f"seed {name}, {kind}")
            timed[ours] = repeated(getattr(xopt, name)(lr=1e-3).update, make(), grads), 20
            timed[theirs] = repeated(getattr(seed, name)(lr=1e-3).update, make(), grads), 20
            ratios.append((f"{name}, Rosenbrock as {kind}: xopt / seed", "xopt/seed", ours, theirs))
        least = ("scalars", f"floor SGD, {kind}")
        timed[least] = repeated(floor_sgd(), make(), grads), 20
        ratios.append((f"SGD, Rosenbrock as {kind}: floor / seed", "info", least, ("scalars", f"seed SGD, {kind}")))
    return timed, ratios


def many_params(rounds):
    """Seconds per round of each stage of Adam over 100,000 params of 1..16 elements."""
    params, grads = many_tensors(100_000, 1, 16, log_uniform=False)
    stages = ("first update", "later update", "save", "load", "first update after load")
    seconds = {s: [] for s in stages}

    def shot(stage, f, *args):
        t0 = clock()
        f(*args)
        seconds[stage].append(clock() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adam.npz")
        for _ in range(rounds):
            opt = xopt.Adam()
            shot("first update", opt.update, params, grads)
            opt.update(params, grads)
            shot("later update", opt.update, params, grads)
            shot("save", opt.save, path)
            loaded = xopt.Adam()
            shot("load", loaded.load, path)
            shot("first update after load", loaded.update, params, grads)
            del opt, loaded
    return seconds


def quartiles(values):
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return q[0], q[2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls of every case before the rounds")
    ap.add_argument("--big", type=int, default=25, help="log2 of the one-tensor Adam case's size")
    ap.add_argument("--many-rounds", type=int, default=3)
    ap.add_argument("--skip-many", action="store_true", help="leave out the 100,000-param case")
    ap.add_argument("--quick", action="store_true", help="10 rounds, 2^22 elements, 1 many-params round")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.big, args.many_rounds = min(args.rounds, 10), min(args.big, 22), 1
    timed, ratio_specs = cases(2**args.big)
    for f, _ in timed.values():
        for _ in range(args.warmup):
            f()
    samples = {k: [] for k in timed}
    names = list(timed)
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            f, calls = timed[k]
            samples[k].extend(f() * 1e6 for _ in range(calls))
    rows = []
    for (section, name), us in samples.items():
        q1, q3 = quartiles(us)
        rows.append({"section": section, "case": name, "us": statistics.median(us), "q1_us": q1, "q3_us": q3,
                     "calls": len(us)})
    median = {(r["section"], r["case"]): r["us"] for r in rows}
    ratios = []
    for label, kind, num, den in ratio_specs:
        value = median[num] / median[den]
        if TARGETS[kind] is None:  # shown for information
            ratios.append({"ratio": label, "kind": kind, "value": value, "target": "", "meets": None})
            continue
        op, target = TARGETS[kind]
        ratios.append({"ratio": label, "kind": kind, "value": value, "target": f"{op} {target}",
                       "meets": value <= target if op == "<=" else value >= target})
    many = {}
    if not args.skip_many:
        for stage, secs in many_params(args.many_rounds).items():
            many[stage] = {"seconds": statistics.median(secs), "all": secs,
                           "meets": statistics.median(secs) <= TARGETS["seconds"][1]}

    print(f"{'section':14s} {'case':36s} {'median us':>11s} {'IQR':>5s} {'calls':>6s}")
    for r in rows:
        iqr = f"{100 * (r['q3_us'] - r['q1_us']) / r['us']:.0f}%"
        print(f"{r['section']:14s} {r['case']:36s} {r['us']:11.1f} {iqr:>5s} {r['calls']:6d}")
    print(f"\n{'ratio (of medians)':62s} {'value':>8s} {'target':>8s}")
    for r in ratios:
        print(f"{r['ratio']:62s} {r['value']:7.2f}x {r['target']:>8s} {'MISSED' if r['meets'] is False else ''}")
    if torch is None:
        print("torch is not installed: its rows are left out")
    if many:
        print(f"\nAdam, 100,000 float32 params of 1..16 elements ({args.many_rounds} rounds; target <= 2 s each)")
        for stage, m in many.items():
            shots = ", ".join(f"{s:.2f}" for s in m["all"])
            print(f"  {stage:26s} {m['seconds']:8.2f} s   ({shots}) {'' if m['meets'] else 'MISSED'}")
    if args.out:
        threads = {"xopt": xopt.get_num_threads(), "torch": torch.get_num_threads() if torch else None}
        result = {"command": "python benchmarks/lean_step.py " + " ".join(argv or []), "commit": commit(),
                  "machine": machine(), "cpu_count": os.cpu_count(),
                  "threads": threads, "versions": {"numpy": np.__version__,
                                                   "torch": torch.__version__ if torch else None},
                  "rounds": args.rounds, "warmup": args.warmup, "big": 2**args.big,
                  "many_rounds": None if args.skip_many else args.many_rounds,
                  "rows": rows, "ratios": ratios, "many_params_seconds": many}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])  # recorded in the JSON's "command"
