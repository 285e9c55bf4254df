"""Whether memory grows with the number of optimizers and schedules seen.

Makes ``--optimizers`` Adam optimizers, each with a schedule of its own (every other one a built-in
``exponential_decay`` with its own rate, the others a function of the user's), and for each: one update,
a save, a load into a new optimizer (with the params) and an update of that one.  After a warm-up of 200
it measures the memory traced by ``tracemalloc`` and the size of every dict, list and set held at the
top level of an ``xopt`` module, before and after; a cache that keeps an entry per optimizer or per
schedule shows in both.  Prints them and writes JSON with --out.

    python benchmarks/cache_growth.py [--optimizers 10000] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import tracemalloc

import numpy as np

import xopt
from xopt import schedules
from xopt.bench.report import commit


def containers():
    """Size of each dict, list and set at the top level of an xopt module, by dotted name."""
    sizes = {}
    for name, module in list(sys.modules.items()):
        if name == "xopt" or name.startswith("xopt."):
            for attr, value in vars(module).items():
                if isinstance(value, (dict, list, set)) and not attr.startswith("__"):
                    sizes[f"{name}.{attr}"] = len(value)
    return sizes


def one(i, path):
    if i % 2:
        lr = schedules.exponential_decay(0.1, 100, 0.5 + i * 1e-7)
    else:
        def lr(count, i=i):
            return 0.1 / (1 + count + i)
    opt = xopt.Adam(lr=lr)
    params = {"W": np.zeros(4, np.float32)}
    opt.update(params, {"W": np.ones(4, np.float32)})
    opt.save(path)
    back = xopt.Adam(lr=lr)
    back.load(path, params=params)
    back.update(params, {"W": np.ones(4, np.float32)})


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optimizers", type=int, default=10_000)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.npz")
        for i in range(200):
            one(i, path)
        gc.collect()
        before = containers()
        tracemalloc.start()
        start = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        for i in range(200, 200 + args.optimizers):
            one(i, path)
        seconds = time.perf_counter() - t0
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
        tracemalloc.stop()
    after = containers()
    changed = {k: [before.get(k), v] for k, v in after.items() if before.get(k) != v}
    print(f"{args.optimizers} optimizers with schedules of their own (update, save, load, update each, "
          f"{seconds:.0f} s): traced memory {grown / 2**20:+.2f} MiB; module containers that changed size: "
          f"{changed or 'none'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python benchmarks/cache_growth.py " + " ".join(argv), "commit": commit(),
                       "xopt": xopt.__file__, "optimizers": args.optimizers, "seconds": seconds,
                       "traced_growth_bytes": grown, "containers_changed": changed}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
