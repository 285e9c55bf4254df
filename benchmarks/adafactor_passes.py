"""Where a fused Adafactor step's time goes: each of its passes alone, against the whole step, CPU time.

Over one float32 param of ``--shape`` (a matrix) and one of as many elements as a vector, on the calling
thread, in interleaved rounds: the factors' pass (``cpu_factored.factor_sums``: reads g), the norms' pass
(``cpu_factored.norm_sums``: reads p and g, and v for the vector), the elements' pass
(``cpu_factored.write``: reads p and g, writes p; v too for the vector) and the whole step (``update``,
impl="fused", one thread).  The passes run on the arrays and scalars of the step (their factors taken from
the optimizer's state).  Beside each pass, in the same rounds, its floor: a loop over the same arrays that
reads (and writes) what the pass reads (and writes) and computes next to nothing (a float32 sum, or p's
new value from p and g), the time the pass would take were it bound by memory alone; ``pass_over_floor``
is the pass's time over its floor's.  CPU seconds of the process (``time.process_time``), medians over
``--rounds``.

    python benchmarks/adafactor_passes.py [--shape 4096x8192] [--rounds 9] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np
from numba import njit

import xopt
from xopt.bench.report import commit, machine
from xopt.engines import cpu_factored
from xopt.optimizers.adafactor import inverse_roots
from xopt._norms import CHUNK, ROW_BLOCK

from _timing import cpu_seconds, write_json


@njit(fastmath=True, cache=True)
def _read(*arrays):
    """The sum of the arrays' elements (reassociated: vectorized, as a copy is): each read once."""
    total = np.float32(0.0)
    for a in arrays:
        for i in range(a.shape[0]):
            total += a[i]
    return total


@njit(fastmath=True, cache=True)
def _read_together(x, y, z):
    """Σ x y (z) in one loop: the streams read at once, as the passes read them."""
    total = np.float32(0.0)
    for i in range(x.shape[0]):
        total += x[i] * y[i] + (z[i] if z.shape[0] else np.float32(0.0))
    return total


@njit(fastmath=True, cache=True)
def _write_together(p, g, v):
    """p (and v) rewritten from p, g (and v) in one loop, as the elements' pass writes them."""
    for i in range(p.shape[0]):
        if v.shape[0]:
            v[i] = v[i] * np.float32(0.999) + g[i] * g[i]
        p[i] = p[i] * np.float32(0.999) + g[i] * np.float32(1e-3)


def _passes(shape, rng):
    """{name: a call} for one param of ``shape``: its passes on a step's arrays, and its whole step."""
    p = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    opt = xopt.Adafactor(impl="fused", weight_decay=0.01)
    params = {"p": p}
    for _ in range(3):
        opt.update(params, {"p": g})
    st, n = opt.state["p"], p.size
    eps1 = float(np.finfo(np.float32).eps)
    s = np.array([1.0, 1.0 - 0.01 * opt.lr, 4.0**-0.8, 1.0 - 4.0**-0.8, eps1**2, 1e-3, float(4.0**-0.8 < 0.5),
                  1.0 / eps1], dtype=np.float32)
    flat_p, flat_g, empty = p.reshape(-1), g.reshape(-1), np.empty(0, np.float32)
    sums = np.empty((-(-n // CHUNK), 2))
    calls = {}
    if len(shape) >= 2:
        rows, columns = shape[-2], shape[-1]
        row_chunks = np.zeros((-(-columns // CHUNK), n // columns))
        column_blocks = np.zeros((n // (rows * columns), -(-rows // ROW_BLOCK), columns))
        row_roots, column_roots = (r.reshape(-1) for r in inverse_roots(np, st["v_row"], st["v_col"], eps1))
        calls["factors"] = lambda: cpu_factored.factor_sums(flat_g, rows, columns, s, row_chunks, column_blocks,
                                                            np.zeros(2, np.int64))
        args = (flat_p, flat_g, empty, row_roots, column_roots, rows, columns, s)
    else:
        args = (flat_p, flat_g, st["v"].copy(), empty, empty, 1, 1, s)
    calls["norms"] = lambda: cpu_factored.norm_sums(*args, sums, np.zeros(2, np.int64))
    calls["elements"] = lambda: cpu_factored.write(*args, np.zeros(2, np.int64))
    spare_p, v = flat_p.copy(), args[2].copy()
    if len(shape) >= 2:
        calls["factors floor"] = lambda: _read(flat_g)
    calls["norms floor"] = lambda: _read_together(flat_p, flat_g, args[2])
    calls["elements floor"] = lambda: _write_together(spare_p, flat_g, v)
    calls["step"] = lambda: opt.update(params, {"p": g})
    return calls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="4096x8192")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    shape = tuple(int(d) for d in args.shape.split("x"))
    xopt.set_num_threads(1)
    rng = np.random.default_rng(0)
    calls = {f"matrix {k}": v for k, v in _passes(shape, rng).items()}
    calls.update({f"vector {k}": v for k, v in _passes((math.prod(shape),), rng).items()})
    for fn in calls.values():
        fn()
    order = list(calls)
    times = {k: [] for k in order}
    for r in range(args.rounds):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            times[name].append(cpu_seconds(calls[name]))
    result = {
        "commit": commit(),
        "command": "python benchmarks/adafactor_passes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "shape": list(shape),
        "rounds": args.rounds,
        "median_cpu_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "pass_over_floor": {k: statistics.median(a / b for a, b in zip(times[k], times[f"{k} floor"]))
                            for k in times if f"{k} floor" in times},
    }
    print(f"{args.shape} and {math.prod(shape)} float32 elements, one thread, {args.rounds} interleaved rounds, "
          "CPU time (medians):")
    for k, v in result["median_cpu_ms"].items():
        over = result["pass_over_floor"].get(k)
        print(f"  {k:<22} {v:8.2f} ms" + (f"  ({over:.2f}x its floor)" if over else ""))
    if args.out:
        write_json(result, args.out)


if __name__ == "__main__":
    main()
