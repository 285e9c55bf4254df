"""LAMB's fused step against the memory roofline and against Adam's, measured in the same rounds.

A float32 LAMB step reads p, g, m, v for the norms (16 bytes an element, nothing written), then reads
them again and writes p, m, v (28 bytes): 44 bytes an element, to Adam's 28.  Each round times, in a
rotated order: xopt.LAMB's step, xopt.Adam's step (both impl="fused", one tensor of ``--size``
elements, ``--threads`` threads), and the fastest way this machine has to move LAMB's 44 bytes an
element (xopt.bench.roofline's copies: NumPy's copy, a parallel copy, an in-place copy, over arrays
that hold 22 bytes an element, read once and written once).  Per round: roofline time / LAMB time
(the fraction of the roofline LAMB reaches), the same against 28 bytes (the floor of a step that
reads and writes each array once) and LAMB time / Adam time; the figures are medians over rounds.  Each
step's CPU time (every thread's) is kept too: on a shared machine it moves less than the wall time.

    python benchmarks/lamb_step.py [--size 2^25] [--rounds 15] [--threads N] [--weight-decay 0.01] [--out FILE]

The machine may be shared: the per-round ratios and their spread are printed with the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

import xopt
from xopt.bench import roofline
from xopt.bench.report import commit, machine

from _timing import timed, write_json

LAMB_BYTES, ADAM_BYTES = 44, 28  # float32, per element, read + written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="2^25", help="elements of the tensor (e.g. 2^25)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="xopt.set_num_threads (default: xopt's)")
    ap.add_argument("--weight-decay", type=float, default=0.01, help="LAMB's weight_decay")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    base, _, exp = args.size.partition("^")
    n = int(base) ** int(exp) if exp else int(base)
    if args.threads is not None:
        xopt.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    steps = {}
    for name, kwargs in (("LAMB", dict(weight_decay=args.weight_decay)), ("Adam", {})):
        opt = getattr(xopt, name)(impl="fused", **kwargs)
        params = {"p": rng.standard_normal(n).astype(np.float32)}
        grads = {"p": rng.standard_normal(n).astype(np.float32)}
        opt.update(params, grads)  # state, compiled kernel
        steps[name] = lambda opt=opt, params=params, grads=grads: opt.update(params, grads)
    src = rng.random(n * LAMB_BYTES // 2 // 4, dtype=np.float32) + 1.0  # 22 bytes an element of LAMB's tensor
    dst = np.empty_like(src)
    copies = {"numpy copy": lambda: np.copyto(dst, src)}
    copies.update({name: (lambda k=k: k(dst, src)) for name, k in roofline._numba_kernels().items()})
    for fn in list(steps.values()) + list(copies.values()):
        fn()
        fn()  # warm-up: page faults, threads, caches

    order = list(steps) + ["copy"]
    times = {k: [] for k in order}
    cpu = {k: [] for k in steps}
    for r in range(args.rounds):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            if name == "copy":
                times["copy"].append(min(timed(c) for c in copies.values()))
            else:
                times[name].append(timed(steps[name], cpu[name]))
    fraction = [c / lamb for c, lamb in zip(times["copy"], times["LAMB"])]
    floor = [f * ADAM_BYTES / LAMB_BYTES for f in fraction]
    adam_fraction = [c * ADAM_BYTES / LAMB_BYTES / adam for c, adam in zip(times["copy"], times["Adam"])]
    vs_adam = [lamb / adam for lamb, adam in zip(times["LAMB"], times["Adam"])]
    result = {
        "commit": commit(),
        "command": "python benchmarks/lamb_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "load": os.getloadavg(),
        "elements": n,
        "rounds": args.rounds,
        "threads": xopt.get_num_threads(),
        "weight_decay": args.weight_decay,
        "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "median_cpu_ms": {k: 1e3 * statistics.median(v) for k, v in cpu.items()},
        "lamb_over_adam_cpu": statistics.median([a / b for a, b in zip(cpu["LAMB"], cpu["Adam"])]),
        "lamb_fraction_of_roofline": statistics.median(fraction),
        "lamb_fraction_of_28_byte_floor": statistics.median(floor),
        "adam_fraction_of_roofline": statistics.median(adam_fraction),
        "lamb_over_adam_time": statistics.median(vs_adam),
        "per_round": {"lamb_fraction_of_roofline": fraction, "adam_fraction_of_roofline": adam_fraction,
                      "lamb_over_adam_time": vs_adam},
        "lamb_GBps": LAMB_BYTES * n / statistics.median(times["LAMB"]) / 1e9,
        "roofline_GBps": LAMB_BYTES * n / statistics.median(times["copy"]) / 1e9,
    }
    print(f"{n} float32 elements, {result['threads']} thread(s), {args.rounds} interleaved rounds (medians; the "
          "machine may be shared):")
    for k, v in result["median_ms"].items():
        extra = f"  ({result['median_cpu_ms'][k]:.2f} ms CPU)" if k in cpu else ""
        print(f"  {k:<5} {v:8.2f} ms{extra}")
    print(f"  LAMB reaches {result['lamb_fraction_of_roofline']:.2f} of the copy roofline for its 44 bytes "
          f"(per round {min(fraction):.2f}-{max(fraction):.2f}), {result['lamb_fraction_of_28_byte_floor']:.2f} "
          f"of a 28-byte one; Adam {result['adam_fraction_of_roofline']:.2f} of its 28 bytes'; "
          f"LAMB / Adam time {result['lamb_over_adam_time']:.2f} (per round {min(vs_adam):.2f}-{max(vs_adam):.2f})")
    if args.out:
        write_json(result, args.out)


if __name__ == "__main__":
    main()
