"""What clip_grad_norm costs: a clipped Adam step over an unclipped one, on the default path (the fused CPU lane).

Two workloads: one float32 tensor of 2^25 elements, and 2,000 small float32 tensors (the sizes of a
mixed net: 2,000 tensors of 64 to 4,096 elements).  Every round times a block of unclipped steps and a
block of clipped steps on their own optimizers and arrays, in alternating order, after untimed steps;
each figure is the median over rounds, and the ratio is clipped over unclipped within the same run.
The clipped optimizer's max_norm is below the grads' norm, so every step scales its grads.

    python benchmarks/clip_cost.py [--rounds 9] [--threads N] [--out FILE]

``--threads 1`` times with the thread's CPU clock (``time.thread_time``): the step runs on the calling
thread alone, and time the OS gives other processes (a shared machine) is not counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

import xopt
from xopt import _lane
from xopt.bench.report import commit, machine


def _workloads(rng):
    big = {"big": [1 << 25]}
    small = {"small": list(rng.integers(64, 4097, size=2000))}
    return {**big, **small}


def _block(opt, params, grads, n, clock):
    t0 = clock()
    for _ in range(n):
        opt.update(params, grads)
    return (clock() - t0) / n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, help="xopt.set_num_threads (default: all cores)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.threads:
        xopt.set_num_threads(args.threads)
    clock = time.thread_time if xopt.get_num_threads() == 1 else time.perf_counter
    rng = np.random.default_rng(0)
    rows = {}
    for name, sizes in _workloads(rng).items():
        runs = {}
        for clipped in (False, True):
            params = {f"p{i}": rng.standard_normal(int(n)).astype(np.float32) for i, n in enumerate(sizes)}
            grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
            opt = xopt.Adam(clip_grad_norm=1e-3 if clipped else None)
            for _ in range(3):  # compile, make the state, warm the caches
                opt.update(params, grads)
            runs[clipped] = (opt, params, grads)
        n = 5 if name == "big" else 50
        samples = {False: [], True: []}
        for r in range(args.rounds):
            for clipped in ((False, True) if r % 2 else (True, False)):
                opt, params, grads = runs[clipped]
                opt.update(params, grads)  # untimed: the other block's threads settle
                samples[clipped].append(_block(opt, params, grads, n, clock))
        opt, params, grads = runs[True]
        if not _lane.take(opt, params, grads):  # one more step, through the lane itself
            raise RuntimeError("clip_cost: the clipped run left the lane: the timing would not be the fast path's")
        plain, clip = statistics.median(samples[False]), statistics.median(samples[True])
        rows[name] = {"tensors": len(sizes), "elements": int(sum(sizes)), "unclipped_ms": plain * 1e3,
                      "clipped_ms": clip * 1e3, "ratio": clip / plain,
                      "samples_ms": {str(k): [x * 1e3 for x in v] for k, v in samples.items()}}
        print(f"{name:5s} {len(sizes):5d} tensors {int(sum(sizes)):>9d} elements: unclipped {plain * 1e3:8.3f} ms, "
              f"clipped {clip * 1e3:8.3f} ms, ratio {clip / plain:.3f}")
    if args.out:
        meta = {"commit": commit(), "machine": machine(), "threads": xopt.get_num_threads(),
                "numpy": np.__version__, "rounds": args.rounds, "clock": clock.__name__,
                "command": "python benchmarks/clip_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        runs = {}
        try:
            with open(args.out) as f:
                runs = json.load(f)
        except FileNotFoundError:
            pass
        runs[f"threads={xopt.get_num_threads()}"] = {"meta": meta, "rows": rows}
        with open(args.out, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
