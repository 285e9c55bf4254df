"""Where a large step's state lies, and what it costs: xopt's placed state buffers against NumPy's own allocations.

One float32 Adam step over one tensor of 2^``--log2`` elements, interleaved rounds, medians, on ``--threads``
threads (xopt and torch alike):

- ``xopt, placed state``: ``xopt.Adam``'s step with its state as xopt makes it (:mod:`xopt._pages`: each large
  buffer in a mapping of its own, advised for huge pages, a quarter of a huge page past its param's offset per
  slot);
- ``xopt, NumPy's state``: the same step with its m and v made by NumPy (``np.zeros``, one after the other, as
  before :mod:`xopt._pages`);
- ``torch fused``: ``torch.optim.Adam(fused=True)`` on its own state (torch's allocator), when torch is installed;
- ``loop, NumPy's arrays`` / ``loop, placed m and v``: a plain numba loop of Adam's arithmetic over four arrays, all
  four NumPy's (allocated one after the other) or m and v placed as xopt places them: the effect without xopt.

The params and grads are NumPy's own in every case.  Each case's offsets of its arrays within their 2 MiB pages
are printed with it.  Writes JSON with --out.

    python benchmarks/state_placement.py [--log2 25] [--rounds 11] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
from numba import njit

import xopt
from xopt import _pages
from xopt.bench.report import commit

_PAGE = 1 << 21


@njit(error_model="numpy")
def _adam_loop(p, g, m, v, s):
    b1, b2, ob2, eps, step = s[0], s[1], s[2], s[3], s[4]
    for i in range(p.shape[0]):
        gi = g[i]
        mi = m[i] + b1 * (gi - m[i])
        vi = b2 * v[i] + ob2 * gi * gi
        p[i] = p[i] - step * (mi / (np.sqrt(vi) + eps))
        m[i] = mi
        v[i] = vi


def _offsets(arrays):
    return [int(a.__array_interface__["data"][0] % _PAGE) >> 10 for a in arrays]  # KiB into its huge page


def cases(n, rng):
    """{name: (step, [its arrays])}."""
    out = {}
    p, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    placed = xopt.Adam(lr=1e-3)
    placed.update({"w": p}, {"w": g})
    mine = placed.state["w"]
    out["xopt, placed state"] = (lambda: placed.update({"w": p}, {"w": g}), [p, g, mine["m"], mine["v"]])
    p2, g2 = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    numpys = xopt.Adam(lr=1e-3)
    numpys.state["w"] = {"step": 0, "m": np.zeros(n, np.float32), "v": np.zeros(n, np.float32)}
    numpys.update({"w": p2}, {"w": g2})
    st = numpys.state["w"]
    out["xopt, NumPy's state"] = (lambda: numpys.update({"w": p2}, {"w": g2}), [p2, g2, st["m"], st["v"]])
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        tp = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(n).astype(np.float32)))
        tp.grad = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
        topt = torch.optim.Adam([tp], lr=1e-3, fused=True)
        topt.step()
        tst = topt.state[tp]
        out["torch fused"] = (topt.step, [tp.detach().numpy(), tp.grad.numpy(), tst["exp_avg"].numpy(),
                                          tst["exp_avg_sq"].numpy()])
    s = np.array([0.1, 0.999, 0.001, 1e-8, 1e-3], np.float32)
    arrays = [rng.standard_normal(n).astype(np.float32) for _ in range(2)] + [np.zeros(n, np.float32) for _ in range(2)]
    out["loop, NumPy's arrays"] = (lambda: _adam_loop(*arrays, s), arrays)
    lp, lg = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    laid = [lp, lg, _pages.full(n, 0.0, np.float32, lp, 0), _pages.full(n, 0.0, np.float32, lp, 1)]
    out["loop, placed m and v"] = (lambda: _adam_loop(*laid, s), laid)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log2", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    n = 1 << args.log2
    xopt.set_num_threads(args.threads)
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    found = cases(n, np.random.default_rng(0))
    for step, _ in found.values():
        step()
    times = {k: [] for k in found}
    names = list(found)
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            found[k][0]()
            times[k].append(time.perf_counter() - t0)
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(f"Adam, {n:,} float32 elements, {args.threads} thread(s), {args.rounds} interleaved rounds (medians):")
    for k in names:
        print(f"  {k:22s} {medians[k] * 1e3:8.2f} ms  {medians[k] * 1e9 / n:.3f} ns/element  "
              f"offsets in their 2 MiB pages (KiB): {_offsets(found[k][1])}")
    ratios = {"placed / NumPy's state": medians["xopt, placed state"] / medians["xopt, NumPy's state"],
              "loop placed / loop NumPy's": medians["loop, placed m and v"] / medians["loop, NumPy's arrays"]}
    if "torch fused" in medians:
        ratios["xopt placed / torch fused"] = medians["xopt, placed state"] / medians["torch fused"]
        ratios["xopt NumPy's state / torch fused"] = medians["xopt, NumPy's state"] / medians["torch fused"]
    for k, v in ratios.items():
        print(f"  {k}: {v:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python benchmarks/state_placement.py " + " ".join(argv or []), "commit": commit(),
                       "machine": platform.machine(), "elements": n, "threads": args.threads, "rounds": args.rounds,
                       "median_ms": {k: v * 1e3 for k, v in medians.items()}, "ratios": ratios,
                       "offsets_kib": {k: _offsets(v[1]) for k, v in found.items()},
                       "all_ms": {k: [x * 1e3 for x in v] for k, v in times.items()}}, f, indent=1)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
