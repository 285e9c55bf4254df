"""How fast this machine reads: the floor under clip_grad_norm's extra pass over the grads.

A clipped step first sums the squares of every grad (a pure read, 4 bytes per float32 element),
then runs the update.  This times that read over one float32 array of ``--size`` elements on one
thread and on two (chunks of 2^15 elements dealt alternately; the kernel's threads take them from
a shared counter), four ways.  At the default 2^25 (128 MiB) the array is out of the caches: on
this project's machine a 2^22 array (16 MiB) read about twice as fast, best of 7.

- ``xopt``: xopt's own pass (``cpu_drivers.sum_of_squares``: four streams per chunk, float64 sums);
- ``one stream``: the same sum as one plain loop;
- ``one stream + prefetch``: that loop with a software prefetch ``--ahead`` elements ahead (LLVM's
  ``llvm.prefetch``), to keep more reads in flight than the hardware prefetcher does;
- ``np.add.reduce`` (one thread): NumPy's own sum, for reference.

Best of ``--repeat`` passes each, in GB/s.  Prints a table, writes JSON with --out.

    python benchmarks/read_bandwidth.py [--size 2^25] [--repeat 7] [--ahead 2048] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from xopt.bench.report import commit
from xopt.engines import cpu_drivers

CHUNK = cpu_drivers.CHUNK
BLOCK = 1024  # elements between two rounds of prefetches


@intrinsic
def _prefetch(typingctx, addr):
    """Prefetch the cache line at ``addr`` for reading (locality 2: keep it in L2)."""
    sig = types.void(types.int64)

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.PointerType(ir.IntType(8)))
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(fastmath={"reassoc", "nsz", "contract"}, nogil=True)
def _one_stream(g):
    a = 0.0
    for i in range(g.shape[0]):
        x = np.float64(g[i])
        a += x * x
    return a


@njit(fastmath={"reassoc", "nsz", "contract"}, nogil=True)
def _one_stream_prefetch(g, ahead):
    base, n = g.ctypes.data, g.shape[0]
    a = 0.0
    for b in range(n // BLOCK):
        if b * BLOCK + ahead < n:
            for j in range(0, BLOCK * 4, 64):
                _prefetch(base + (b * BLOCK + ahead) * 4 + j)
        block = g[b * BLOCK:(b + 1) * BLOCK]
        for i in range(BLOCK):
            x = np.float64(block[i])
            a += x * x
    for i in (n // BLOCK) * BLOCK + np.arange(n % BLOCK):
        x = np.float64(g[i])
        a += x * x
    return a


def _best(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2^25")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--ahead", type=int, default=2048, help="prefetch distance in elements")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    base, _, exp = args.size.partition("^")
    n = int(base) ** int(exp) if exp else int(base)
    g = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    ways = {"xopt": cpu_drivers.sum_of_squares, "one stream": _one_stream,
            "one stream + prefetch": lambda a: _one_stream_prefetch(a, args.ahead)}
    for fn in ways.values():
        fn(g[:4 * BLOCK])  # compiled before timing
    pool = ThreadPoolExecutor(2)

    def on_threads(fn, threads):
        def part(k):
            return sum(fn(g[c * CHUNK:(c + 1) * CHUNK]) for c in range(k, -(-n // CHUNK), threads))
        return lambda: sum(pool.map(part, range(threads)))

    rows = []
    for threads in (1, 2):
        for name, fn in ways.items():
            rows.append({"way": name, "threads": threads,
                         "GBps": g.nbytes / _best(on_threads(fn, threads), args.repeat) / 1e9})
    rows.append({"way": "np.add.reduce", "threads": 1, "GBps": g.nbytes / _best(lambda: np.add.reduce(g), args.repeat)
                 / 1e9})
    for row in rows:
        print(f"{row['way']:24s} {row['threads']} thread(s) {row['GBps']:6.1f} GB/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python benchmarks/read_bandwidth.py " + " ".join(argv or []), "commit": commit(), "elements": n,
                       "dtype": "float32", "repeat": args.repeat, "ahead": args.ahead, "machine": platform.machine(),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
