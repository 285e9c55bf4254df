"""What 8-bit state costs a step of many small params: the per-param work of the checked step, not the kernel.

An 8-bit step (``state_dtype="8bit"``) takes the checked path, which checks and gathers each param in Python
before one call runs the kernels; a float32-state step takes the exact-type lane.  For each set of float32
params (``--sets``: COUNTxSIZE, each param at least ``min_8bit_size``), this times ``Adam(state_dtype="8bit")``
and ``Adam()`` updates of the same params, interleaved in rounds (``--calls`` updates each), one thread, and
reports medians in microseconds and the ratio 8-bit / float32 (of the medians of each round's ratio).

With ``--trees A B``, each checkout runs in its own processes (``sys.path`` set to the tree), alternating,
``--runs`` times each, so their figures come from one run.

    python benchmarks/state_8bit_overhead.py [--trees /tmp/base .] [--sets 10x8192,100x8192] [--out FILE]
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
for count, size in sets:
    rng = np.random.default_rng(0)
    params = {f"p{i}": rng.standard_normal(size).astype(np.float32) for i in range(count)}
    grads = {k: rng.standard_normal(size).astype(np.float32) for k in params}
    eight = xopt.Adam(state_dtype="8bit")
    plain = xopt.Adam()
    for opt in (eight, plain):
        opt.update(params, grads)
        opt.update(params, grads)
    times = {"8bit": [], "float32": []}
    for _ in range(rounds):
        for name, opt in (("8bit", eight), ("float32", plain)):
            start = time.perf_counter()
            for _ in range(calls):
                opt.update(params, grads)
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    out[f"{count}x{size}"] = times
print(json.dumps(out))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs="+", default=["."])
    ap.add_argument("--sets", default="10x8192,100x8192")
    ap.add_argument("--runs", type=int, default=3, help="processes per tree")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    sets = [[int(x) for x in s.split("x")] for s in args.sets.split(",")]
    runs = {tree: [] for tree in args.trees}
    for _ in range(args.runs):
        for tree in args.trees:
            done = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(tree), json.dumps(sets),
                                   str(args.rounds), str(args.calls)], capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(done.stderr)
            runs[tree].append(json.loads(done.stdout))
    rows = []
    print(f"{'tree':28s} {'params':>10s} {'8-bit us':>10s} {'float32 us':>11s} {'8-bit / float32':>16s}")
    for tree, results in runs.items():
        for name in results[0]:
            eight = [t for r in results for t in r[name]["8bit"]]
            plain = [t for r in results for t in r[name]["float32"]]
            ratio = statistics.median(a / b for a, b in zip(eight, plain))
            rows.append({"tree": tree, "params": name, "median_us_8bit": statistics.median(eight),
                         "median_us_float32": statistics.median(plain), "ratio": ratio})
            print(f"{tree:28s} {name:>10s} {statistics.median(eight):10.0f} {statistics.median(plain):11.0f} "
                  f"{ratio:16.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python benchmarks/state_8bit_overhead.py " + " ".join(argv or sys.argv[1:]),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
