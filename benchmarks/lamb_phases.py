"""Where a fused LAMB step's time goes: its two phases alone, against the whole step and Adam's, CPU time.

Over one float32 tensor of ``--size`` elements, on the calling thread, in interleaved rounds: a plain read
of p, g, m and v (their sum, vectorized: the floor under the norms' phase), LAMB's norms'
phase alone (``cpu_norms._chunk_sums`` chunk by chunk: reads p, g, m, v, writes nothing), u alone (the
norms' phase without its sums: the same reads), its elements' phase alone (``cpu_norms._write``: the same
reads and three writes), the whole LAMB step and Adam's step (``update``, impl="fused", one thread).  CPU
seconds of the process (``time.process_time``), medians over ``--rounds``.

    python benchmarks/lamb_phases.py [--size 2^25] [--rounds 9] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
from numba import njit

import xopt
from xopt.bench.report import commit, machine
from xopt.engines import cpu_norms
from xopt.engines.cpu_drivers import CHUNK


@njit(error_model="numpy")
def _norms(p, g, m, v, s):
    pp = uu = 0.0
    for a in range(0, p.shape[0], CHUNK):
        b = min(a + CHUNK, p.shape[0])
        x, y = cpu_norms._chunk_sums(p[a:b], g[a:b], m[a:b], v[a:b], s)
        pp += x
        uu += y
    return pp, uu


@njit(error_model="numpy", fastmath=True)
def _read(p, g, m, v):
    total = np.float32(0.0)
    for i in range(p.shape[0]):
        total += p[i] + g[i] + m[i] + v[i]
    return total


@njit(error_model="numpy")
def _u(p, g, m, v, s):
    lanes = cpu_norms.LANES
    u = np.empty(lanes, dtype=p.dtype)
    for a in range(0, p.shape[0] - p.shape[0] % lanes, lanes):
        cpu_norms._u_loop(p, g, m, v, s, u, a, lanes, True, False)
    return u[0]


@njit(error_model="numpy")
def _elements(p, g, m, v, s, ratio):
    for a in range(0, p.shape[0], CHUNK):
        b = min(a + CHUNK, p.shape[0])
        cpu_norms._write(p[a:b], g[a:b], m[a:b], v[a:b], s, ratio)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="2^25")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    base, _, exp = args.size.partition("^")
    n = int(base) ** int(exp) if exp else int(base)
    xopt.set_num_threads(1)
    rng = np.random.default_rng(0)
    p, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    m, v = np.full(n, 0.1, np.float32), np.full(n, 0.2, np.float32)
    lamb = xopt.LAMB(weight_decay=0.01, impl="fused")
    s = np.array([*lamb.kernel.order(lamb.scalars(2)), 1.0], dtype=np.float32)  # the step's row: ratio -1, no clip
    params, grads = {"p": p.copy()}, {"p": g}
    adam, adam_params = xopt.Adam(impl="fused"), {"p": p.copy()}
    ways = {"read alone": lambda: _read(p, g, m, v), "norms' phase": lambda: _norms(p, g, m, v, s), "u alone": lambda: _u(p, g, m, v, s),
            "elements' phase": lambda: _elements(p, g, m, v, s, np.float32(1.0)),
            "LAMB step": lambda: lamb.update(params, grads), "Adam step": lambda: adam.update(adam_params, grads)}
    for fn in ways.values():
        fn()
        fn()
    cpu = {k: [] for k in ways}
    for r in range(args.rounds):
        names = list(ways)
        k = r % len(names)
        for name in names[k:] + names[:k]:
            c0 = time.process_time()
            ways[name]()
            cpu[name].append(time.process_time() - c0)
    result = {"commit": commit(), "command": "python benchmarks/lamb_phases.py " + " ".join(argv or sys.argv[1:]),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), "load": os.getloadavg(), "elements": n,
              "rounds": args.rounds,
              "median_cpu_ms": {k: 1e3 * statistics.median(v) for k, v in cpu.items()},
              "min_cpu_ms": {k: 1e3 * min(v) for k, v in cpu.items()}}
    print(f"{n} float32 elements, one thread, CPU time over {args.rounds} interleaved rounds (median, min):")
    for k in ways:
        print(f"  {k:<16} {result['median_cpu_ms'][k]:8.2f} {result['min_cpu_ms'][k]:8.2f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
