"""Adafactor's fused CPU step against the copy roofline and against its reference rule, in the same rounds.

A float32 Adafactor step of a matrix reads g for the factors' row and column sums, p and g for the norms,
then p and g again and writes p: 24 bytes an element (the factors, R + C numbers, aside).  A vector keeps a
full second moment v: p, g, v for the norms, then p, g, v read and p, v written: 32 bytes an element.  Each
round times, in a rotated order: xopt.Adafactor(impl="fused") and xopt.Adafactor(impl="reference") on one
param of ``--size`` elements shaped ``--shape`` (a matrix) and on the same number as a vector, and the
fastest way this machine has to move each step's bytes (xopt.bench.roofline's copies: NumPy's copy, a
parallel copy, an in-place copy, over arrays of half the step's bytes an element, read once and written
once; NumPy's copy alone, one thread, too).  Per round: roofline time / fused time (the fraction of the
roofline the step reaches), the same against NumPy's copy, and reference time / fused time; the figures are medians over rounds.  Each step's CPU time (every thread's)
is kept too: on a shared machine it moves less than the wall time.

    python benchmarks/adafactor_step.py [--shape 4096x8192] [--rounds 9] [--threads N] [--out FILE]

The machine may be shared: the per-round ratios and their spread are printed with the medians.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np

import xopt
from xopt.bench import roofline
from xopt.bench.report import commit, machine

from _timing import timed, write_json

BYTES = {"matrix": 24, "vector": 32}  # float32, per element, read + written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="4096x8192", help="the matrix's shape; the vector has as many elements")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="xopt.set_num_threads (default: xopt's)")
    ap.add_argument("--weight-decay", type=float, default=0.01, help="Adafactor's weight_decay")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    shape = tuple(int(d) for d in args.shape.split("x"))
    n = math.prod(shape)
    if args.threads is not None:
        xopt.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    steps = {}
    for kind, kind_shape in (("matrix", shape), ("vector", (n,))):
        params = {"p": rng.standard_normal(kind_shape).astype(np.float32)}
        grads = {"p": rng.standard_normal(kind_shape).astype(np.float32)}
        for impl in ("fused", "reference"):
            opt = xopt.Adafactor(impl=impl, weight_decay=args.weight_decay)
            mine = {"p": params["p"].copy()}
            opt.update(mine, grads)  # state, compiled kernel
            steps[f"{kind} {impl}"] = lambda opt=opt, mine=mine, grads=grads: opt.update(mine, grads)
    copies = {}
    for kind, nbytes in BYTES.items():
        src = rng.random(n * nbytes // 2 // 4, dtype=np.float32) + 1.0  # half the step's bytes an element
        dst = np.empty_like(src)
        ways = {"numpy copy": lambda src=src, dst=dst: np.copyto(dst, src)}
        ways.update({name: (lambda k=k, src=src, dst=dst: k(dst, src)) for name, k in roofline._numba_kernels().items()})
        copies[f"{kind} copy"] = ways
    for fn in steps.values():
        fn()  # warm-up: page faults, threads, caches
    for ways in copies.values():
        for fn in ways.values():
            fn()
            fn()

    order = list(steps) + list(copies)
    times = {k: [] for k in order}
    cpu = {k: [] for k in steps}
    way_times = {f"{kind} {way}": [] for kind, ways in copies.items() for way in ways}
    for r in range(args.rounds):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            if name in copies:
                round_times = {way: timed(c) for way, c in copies[name].items()}
                for way, t in round_times.items():
                    way_times[f"{name} {way}"].append(t)
                times[name].append(min(round_times.values()))  # the fastest way: the roofline
            else:
                times[name].append(timed(steps[name], cpu[name]))
    result = {
        "commit": commit(),
        "command": "python benchmarks/adafactor_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "shape": list(shape),
        "elements": n,
        "rounds": args.rounds,
        "threads": xopt.get_num_threads(),
        "weight_decay": args.weight_decay,
        "bytes_per_element": BYTES,
        "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "median_cpu_ms": {k: 1e3 * statistics.median(v) for k, v in cpu.items()},
        "median_copy_ms": {k: 1e3 * statistics.median(v) for k, v in way_times.items()},
        "per_round": {},
    }
    print(f"{n} float32 elements ({args.shape} and 1-D), {result['threads']} thread(s), {args.rounds} interleaved "
          "rounds (medians; the machine may be shared):")
    for k, v in result["median_ms"].items():
        extra = f"  ({result['median_cpu_ms'][k]:.2f} ms CPU)" if k in cpu else ""
        print(f"  {k:<17} {v:9.2f} ms{extra}")
    for kind, nbytes in BYTES.items():
        fraction = [c / f for c, f in zip(times[f"{kind} copy"], times[f"{kind} fused"])]
        speedup = [r / f for r, f in zip(times[f"{kind} reference"], times[f"{kind} fused"])]
        one_core = [c / f for c, f in zip(way_times[f"{kind} copy numpy copy"], times[f"{kind} fused"])]
        result[f"{kind}_fraction_of_roofline"] = statistics.median(fraction)
        result[f"{kind}_fraction_of_numpy_copy"] = statistics.median(one_core)  # NumPy's copy: one thread
        result[f"{kind}_reference_over_fused"] = statistics.median(speedup)
        result[f"{kind}_fused_GBps"] = nbytes * n / statistics.median(times[f"{kind} fused"]) / 1e9
        result[f"{kind}_roofline_GBps"] = nbytes * n / statistics.median(times[f"{kind} copy"]) / 1e9
        result["per_round"][f"{kind}_fraction_of_roofline"] = fraction
        result["per_round"][f"{kind}_reference_over_fused"] = speedup
        print(f"  {kind}: the fused step reaches {statistics.median(fraction):.2f} of the copy roofline for its "
              f"{nbytes} bytes (per round {min(fraction):.2f}-{max(fraction):.2f}; of NumPy's one-thread copy "
              f"{statistics.median(one_core):.2f}); the reference rule takes "
              f"{statistics.median(speedup):.1f}x its time (per round {min(speedup):.1f}-{max(speedup):.1f})")
    if args.out:
        write_json(result, args.out)


if __name__ == "__main__":
    main()
