"""Where a CPU step starts to gain from a second thread: the measurement behind cpu_step.PARALLEL_MIN.

For Adam on one float32 tensor of each size, times xopt's update on the calling thread alone
and split over ``--threads`` threads, both alone and inside a loop that runs a NumPy matmul
(OpenBLAS's threads) before every update, as training does.  Rounds interleave the two
settings; each figure is a median.  Prints, per size, the time with threads over the time
without (< 1: threads win) and writes JSON with --out.

    python benchmarks/thread_threshold.py [--threads 2] [--rounds 7] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import xopt
from xopt.bench.report import commit, machine
from xopt.engines import cpu_arrays, cpu_step


def _time_updates(opt, params, grads, a, b, with_matmul, n):
    times = []
    for _ in range(n):
        if with_matmul:
            a @ b
        t0 = time.perf_counter()
        opt.update(params, grads)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--sizes", default="14,15,16,17,18,19,20,21,22,23,24", help="log2 of the tensor sizes")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 256)), rng.standard_normal((256, 256))
    saved = cpu_step.PARALLEL_MIN
    cpu_step.PARALLEL_MIN = cpu_arrays.PARALLEL_MIN = 0  # let the thread count alone decide (both read it)
    rows = []
    try:
        for log2 in (int(s) for s in args.sizes.split(",")):
            n = 1 << log2
            params = {"w": rng.standard_normal(n).astype(np.float32)}
            grads = {"w": rng.standard_normal(n).astype(np.float32)}
            opt = xopt.Adam()
            per_round = max(3, min(200, (1 << 22) // n))
            results = {}
            for loop in (False, True):
                samples = {1: [], args.threads: []}
                for r in range(args.rounds + 1):
                    for threads in ((1, args.threads) if r % 2 else (args.threads, 1)):
                        xopt.set_num_threads(threads)
                        t = _time_updates(opt, params, grads, a, b, loop, per_round)
                        if r:  # round 0 warms up
                            samples[threads].append(t)
                one, many = statistics.median(samples[1]), statistics.median(samples[args.threads])
                results["loop" if loop else "alone"] = dict(one_thread_us=one * 1e6, threads_us=many * 1e6,
                                                            ratio=many / one)
            rows.append(dict(elements=n, **{f"{k}_{m}": v for k, d in results.items() for m, v in d.items()}))
            print(f"2^{log2:<3d} alone: 1 thread {results['alone']['one_thread_us']:9.1f} us, {args.threads} threads "
                  f"x{results['alone']['ratio']:.2f} | in a loop: 1 thread {results['loop']['one_thread_us']:9.1f} us,"
                  f" {args.threads} threads x{results['loop']['ratio']:.2f}", flush=True)
    finally:
        cpu_step.PARALLEL_MIN = cpu_arrays.PARALLEL_MIN = saved
        xopt.set_num_threads(None)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(commit=commit(), machine=machine(), threads=args.threads,
                           rounds=args.rounds, optimizer="Adam", dtype="float32", rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
