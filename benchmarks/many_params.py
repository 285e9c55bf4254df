"""What saving and loading an optimizer's state costs with many tiny params.

A model with many small tensors (biases, norms, embeddings kept per row) gives the optimizer one
state entry per tensor.  This makes ``--params`` float32 params of ``--min-size`` to ``--max-size``
elements each (uniform, seeded), takes one Adam update (two buffers per param, m and v), then
times, in rounds that interleave the cases:

- ``state_dict``: ``opt.state_dict()`` (a copy of every buffer);
- ``save``: ``opt.save(path)`` (state_dict, then the file, written atomically and fsynced);
- ``load``: ``Adam().load(path)`` into a new optimizer;
- ``load with params``: ``Adam().load(path, params=params)`` (every param's shape and dtype checked too);
- ``load_state_dict with params``: the checks and copies of ``load`` without the file.

Each figure is a median (and min, max) in seconds.  For comparison it prints the bytes-moved floor:
the state's buffer bytes over the bandwidth of ``np.copyto`` between two 64 MiB arrays on this
machine (one pass over the bytes; a save or a load moves them a few times).  The first update is
timed once and reported too, but it is not what this script measures.  Prints a table and writes
JSON with --out.

    python benchmarks/many_params.py [--params 100000] [--min-size 1] [--max-size 16] [--rounds 5]
                                     [--dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

import xopt
from xopt.bench.report import commit, machine


def copy_bandwidth(repeat=9, nbytes=64 * 2**20):
    """Bytes per second np.copyto moves between two ``nbytes`` arrays (best of ``repeat``)."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return src.nbytes / best


def setup(n, low, high, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(low, high + 1, n)
    params = [rng.standard_normal(s).astype(np.float32) for s in sizes]
    grads = [rng.standard_normal(s).astype(np.float32) for s in sizes]
    opt = xopt.Adam()
    t0 = time.perf_counter()
    opt.update(params, grads)
    return opt, params, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=int, default=100_000)
    ap.add_argument("--min-size", type=int, default=1)
    ap.add_argument("--max-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", help="where the state file is written (default: a temporary directory)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    opt, params, update_s = setup(args.params, args.min_size, args.max_size)
    state_bytes = sum(b.nbytes for st in opt.state.values() for k, b in st.items() if k != "step")
    bandwidth = copy_bandwidth()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "state.npz")
        opt.save(path)  # the file the loads read, before the first round
        cases = {
            "state_dict": opt.state_dict,
            "save": lambda: opt.save(path),
            "load": lambda: xopt.Adam().load(path),
            "load with params": lambda: xopt.Adam().load(path, params=params),
            "load_state_dict with params": lambda: xopt.Adam().load_state_dict(sd, params=params),
        }
        sd = opt.state_dict()
        times = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, f in cases.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
        file_bytes = os.path.getsize(path)
        back = xopt.Adam()
        back.load(path, params=params)
        for k, st in opt.state.items():  # what was timed gives the state back
            assert all(back.state[k][n].tobytes() == b.tobytes() for n, b in st.items() if n != "step"), k
    floor = state_bytes / bandwidth
    rows = [{"case": name, "seconds": statistics.median(t), "min": min(t), "max": max(t),
             "vs_floor": statistics.median(t) / floor} for name, t in times.items()]
    print(f"{args.params:,} float32 params of {args.min_size}-{args.max_size} elements, Adam: "
          f"{state_bytes / 1e6:.1f} MB of buffers, file {file_bytes / 1e6:.1f} MB; np.copyto "
          f"{bandwidth / 1e9:.1f} GB/s, so one pass over the buffers takes {floor * 1e3:.2f} ms")
    print(f"first update (not this script's subject): {update_s:.2f} s")
    print(f"{'case':30s} {'median s':>9s} {'min s':>8s} {'max s':>8s} {'x floor':>9s}")
    for r in rows:
        print(f"{r['case']:30s} {r['seconds']:9.3f} {r['min']:8.3f} {r['max']:8.3f} {r['vs_floor']:9.0f}")
    if args.out:
        result = {"command": "python benchmarks/many_params.py " + " ".join(argv or []), "commit": commit(),
                  "machine": machine(), "cpus": os.cpu_count(),
                  "params": args.params, "min_size": args.min_size, "max_size": args.max_size,
                  "rounds": args.rounds, "state_bytes": state_bytes, "file_bytes": file_bytes,
                  "copy_Bps": bandwidth, "floor_seconds": floor, "first_update_seconds": update_s, "rows": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])  # recorded in the JSON's "command"
