"""Muon's Newton-Schulz iteration: same-shaped matrices as one stack against one matrix at a time.

Each round times, in alternating order, ``orthogonalize`` on a ``(count, n, n)`` stack (one chain of
batched matmuls, what ``xopt.Muon`` runs for same-shaped matrices) and on each of the ``count``
matrices in turn, and a whole ``xopt.Muon`` update of the ``count`` matrices.  Reported: the median
times, the ratio one-at-a-time / stacked per round (above 1: the stack is faster) and the FLOP/s of
the stacked chain (k iterations of 3 matmuls of n x n: 2n^3 flops each, 6kn^3 per matrix).

    python benchmarks/muon_stack.py [--count 12] [--n 768] [--dtype float32] [--rounds 7] [--out FILE]

The machine may be shared: the per-round ratios are printed with the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

import xopt
from xopt.optimizers.muon import NS_COEFFICIENTS, orthogonalize

from _timing import timed
from xopt.bench.report import machine


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--n", type=int, default=768)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    dtype = np.dtype(args.dtype)
    stack = rng.standard_normal((args.count, args.n, args.n)).astype(dtype)
    mats = [np.ascontiguousarray(m) for m in stack]
    ns = (NS_COEFFICIENTS, args.steps, 1e-7)

    def stacked():
        orthogonalize(np, stack, *ns)

    def one_at_a_time():
        for m in mats:
            orthogonalize(np, m, *ns)

    params = {f"W{i}": m.copy() for i, m in enumerate(mats)}
    grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()}
    opt = xopt.Muon(lr=1e-3)

    def muon_update():
        opt.update(params, grads)

    for fn in (stacked, one_at_a_time, muon_update):  # warm: BLAS threads, first allocations
        fn()
    rows = []
    for r in range(args.rounds):
        order = [stacked, one_at_a_time] if r % 2 == 0 else [one_at_a_time, stacked]
        t = {fn.__name__: timed(fn) for fn in order}
        t["muon_update"] = timed(muon_update)
        t["ratio"] = t["one_at_a_time"] / t["stacked"]
        rows.append(t)
        print(f"round {r}: stacked {t['stacked'] * 1e3:.1f} ms, one at a time {t['one_at_a_time'] * 1e3:.1f} ms, "
              f"ratio {t['ratio']:.3f}, Muon update {t['muon_update'] * 1e3:.1f} ms")
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    flops = 6 * args.steps * args.n**3 * args.count
    out = {"count": args.count, "n": args.n, "dtype": dtype.name, "ns_steps": args.steps, "rounds": args.rounds,
           "median_s": {k: v for k, v in med.items() if k != "ratio"}, "median_ratio": med["ratio"],
           "ratios": [row["ratio"] for row in rows], "stacked_gflops": flops / med["stacked"] / 1e9,
           "numpy": np.__version__, "machine": machine()}
    print(json.dumps({k: out[k] for k in ("median_s", "median_ratio", "stacked_gflops")}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
