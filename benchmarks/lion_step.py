"""Lion's fused step against the memory roofline and against Adam's, measured in the same rounds.

A float32 Lion step reads p, g, m and writes p, m: 20 bytes an element, to Adam's 28.  Each round
times, in a rotated order: xopt.Lion's step, xopt.Adam's step (both impl="fused", one tensor of
``--size`` elements), and the fastest way this machine has to move Lion's 20 bytes an element
(xopt.bench.roofline's copies: NumPy's copy, a parallel copy, an in-place copy, over arrays that
hold 10 bytes an element, read once and written once).  Per round: roofline time / Lion time (the
fraction of the roofline Lion reaches) and Lion time / Adam time; the figures are medians over rounds.

    python benchmarks/lion_step.py [--size 2^25] [--rounds 15] [--out FILE]

The machine may be shared: the per-round ratios and their spread are printed with the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import xopt
from xopt.bench import roofline
from xopt.bench.report import commit, machine

from _timing import timed, write_json


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="2^25", help="elements of the tensor (e.g. 2^25)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    base, _, exp = args.size.partition("^")
    n = int(base) ** int(exp) if exp else int(base)

    rng = np.random.default_rng(0)
    steps = {}
    for name in ("Lion", "Adam"):
        opt = getattr(xopt, name)(impl="fused")
        params = {"p": rng.standard_normal(n).astype(np.float32)}
        grads = {"p": rng.standard_normal(n).astype(np.float32)}
        opt.update(params, grads)  # state, compiled kernel
        steps[name] = lambda opt=opt, params=params, grads=grads: opt.update(params, grads)
    # Lion's bytes: read 20 bytes an element and write 10 of them again = 10 bytes an element, read + written.
    src = rng.random(n * 10 // 4, dtype=np.float32) + 1.0  # 10 bytes an element of Lion's tensor
    dst = np.empty_like(src)
    copies = {"numpy copy": lambda: np.copyto(dst, src)}
    copies.update({name: (lambda k=k: k(dst, src)) for name, k in roofline._numba_kernels().items()})
    for fn in list(steps.values()) + list(copies.values()):
        fn()
        fn()  # warm-up: page faults, threads, caches

    order = list(steps) + ["copy"]
    times = {k: [] for k in order}
    for r in range(args.rounds):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            if name == "copy":
                times["copy"].append(min(timed(c) for c in copies.values()))
            else:
                times[name].append(timed(steps[name]))
    fraction = [c / lion for c, lion in zip(times["copy"], times["Lion"])]
    vs_adam = [lion / adam for lion, adam in zip(times["Lion"], times["Adam"])]
    result = {
        "commit": commit(),
        "command": "python benchmarks/lion_step.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "elements": n,
        "rounds": args.rounds,
        "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "lion_fraction_of_roofline": statistics.median(fraction),
        "lion_over_adam_time": statistics.median(vs_adam),
        "per_round": {"lion_fraction_of_roofline": fraction, "lion_over_adam_time": vs_adam},
        "lion_GBps": 20 * n / statistics.median(times["Lion"]) / 1e9,
        "roofline_GBps": 20 * n / statistics.median(times["copy"]) / 1e9,
    }
    print(f"{n} float32 elements, {args.rounds} interleaved rounds (medians; the machine may be shared):")
    for k, v in result["median_ms"].items():
        print(f"  {k:<5} {v:8.2f} ms")
    print(f"  Lion reaches {result['lion_fraction_of_roofline']:.2f} of the copy roofline "
          f"(per round {min(fraction):.2f}-{max(fraction):.2f}); "
          f"Lion / Adam time {result['lion_over_adam_time']:.2f} (per round {min(vs_adam):.2f}-{max(vs_adam):.2f})")
    if args.out:
        write_json(result, args.out)


if __name__ == "__main__":
    main()
