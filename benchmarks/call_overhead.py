"""What a small step costs in one checkout against another: the fixed cost of ``update`` per call.

Each checkout runs in its own processes (the two cannot share one), alternating A, B, A, B, ... ``--rounds``
times, each pinned to one core where ``taskset`` exists; each process times 3,000 updates of each case after
50 warm-up ones and reports medians in microseconds.  Printed: per case the median over rounds of each
checkout's medians, and B / A.

    git worktree add /tmp/base <commit>
    python benchmarks/call_overhead.py /tmp/base . [--rounds 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, xopt

rng = np.random.default_rng(0)


def timed(opt, params, grads):
    for _ in range(50):
        opt.update(params, grads)
    ts = []
    for _ in range(3000):
        t = time.perf_counter()
        opt.update(params, grads)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def arrays(n, size):
    return {f"w{i}": rng.standard_normal(size) for i in range(n)}


out = {}
for name, make, n, size in (("SGD, 1 param of 10", lambda: xopt.SGD(lr=1e-3), 1, 10),
                            ("Adam, 1 param of 10", xopt.Adam, 1, 10),
                            ("Adam, 10 params of 100", xopt.Adam, 10, 100),
                            ("Adam clip_grad_norm, 10 params of 100", lambda: xopt.Adam(clip_grad_norm=1.0), 10, 100)):
    params = arrays(n, size)
    out[name] = timed(make(), params, {k: rng.standard_normal(v.shape) for k, v in params.items()})
out["SGD, 2 Python floats"] = timed(xopt.SGD(lr=1e-4), {"x": 1.0, "y": 2.0}, {"x": 1.0, "y": 1.0})
print(json.dumps(out))
"""


def run(root):
    pin = ["taskset", "-c", "1"] if shutil.which("taskset") else []
    done = subprocess.run([*pin, sys.executable, "-c", CHILD, root], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="checkout A (the base)")
    ap.add_argument("b", help="checkout B")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rounds = {"a": [], "b": []}
    for _ in range(args.rounds):
        rounds["a"].append(run(args.a))
        rounds["b"].append(run(args.b))
    result = {}
    print(f"{'case':42s} {'A (us)':>8s} {'B (us)':>8s} {'B / A':>6s}")
    for case in rounds["a"][0]:
        a = statistics.median(r[case] for r in rounds["a"])
        b = statistics.median(r[case] for r in rounds["b"])
        result[case] = {"a_us": a, "b_us": b, "ratio": b / a}
        print(f"{case:42s} {a:8.1f} {b:8.1f} {b / a:6.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"a": args.a, "b": args.b, "rounds": rounds, "medians": result}, f, indent=1)


if __name__ == "__main__":
    main()
