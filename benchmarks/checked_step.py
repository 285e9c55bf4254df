"""What the checked step costs a step of many small params: its per-param Python, beside the lane's step.

An 8-bit step (``state_dtype="8bit"``) and an Adafactor step take the checked path, which checks and gathers
each param in Python before the kernels run; a float32-state Adam step takes the exact-type lane.  For each set
of float32 params (``--sets``: COUNTxSHAPE, a shape as ROWSxCOLS or SIZE; each 8-bit param at least
``min_8bit_size``), this times updates of the same params by ``Adam(state_dtype="8bit")``, ``Adafactor()`` and
``Adam()``, interleaved in rounds (``--calls`` updates each), one thread, and reports medians in microseconds
and each one's time over Adam's (the median of each round's ratio).

With ``--trees A B``, each checkout runs in its own processes (``sys.path`` set to the tree), alternating,
``--runs`` times each, so their figures come from one run.

    python benchmarks/checked_step.py [--trees /tmp/base .] [--sets 10x8192,100x8192,10x64x128] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, os, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, xopt

assert os.path.realpath(xopt.__file__).startswith(os.path.realpath(sys.argv[1])), xopt.__file__
xopt.set_num_threads(1)
sets, rounds, calls = json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out = {}
for count, shape in sets:
    rng = np.random.default_rng(0)
    params = {f"p{i}": rng.standard_normal(shape).astype(np.float32) for i in range(count)}
    grads = {k: rng.standard_normal(shape).astype(np.float32) for k in params}
    opts = {"Adam 8-bit": xopt.Adam(state_dtype="8bit"), "Adafactor": xopt.Adafactor(), "Adam": xopt.Adam()}
    copies = {name: {k: v.copy() for k, v in params.items()} for name in opts}
    for name, opt in opts.items():
        opt.update(copies[name], grads)
        opt.update(copies[name], grads)
    times = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            ps = copies[name]
            start = time.perf_counter()
            for _ in range(calls):
                opt.update(ps, grads)
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    out[f"{count}x" + "x".join(map(str, shape))] = times
print(json.dumps(out))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs="+", default=["."])
    ap.add_argument("--sets", default="10x8192,100x8192,10x64x128")
    ap.add_argument("--runs", type=int, default=3, help="processes per tree")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    sets = []
    for item in args.sets.split(","):
        count, *shape = (int(x) for x in item.split("x"))
        sets.append([count, shape])
    runs = {tree: [] for tree in args.trees}
    for _ in range(args.runs):
        for tree in args.trees:
            done = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(tree), json.dumps(sets),
                                   str(args.rounds), str(args.calls)], capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(done.stderr)
            runs[tree].append(json.loads(done.stdout))
    rows = []
    print(f"{'tree':24s} {'params':>12s} {'optimizer':>11s} {'median us':>10s} {'/ Adam':>7s}")
    for tree, results in runs.items():
        for params in results[0]:
            adam = [t for r in results for t in r[params]["Adam"]]
            for name in results[0][params]:
                times = [t for r in results for t in r[params][name]]
                ratio = statistics.median(a / b for a, b in zip(times, adam))
                rows.append({"tree": tree, "params": params, "optimizer": name, "median_us": statistics.median(times),
                             "over_adam": ratio})
                print(f"{tree:24s} {params:>12s} {name:>11s} {statistics.median(times):10.0f} {ratio:7.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python benchmarks/checked_step.py " + " ".join(argv or sys.argv[1:]),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
