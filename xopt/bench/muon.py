"""Muon's rows: a step of ``xopt.Muon`` on same-shaped matrices, its FLOP/s beside the matmul peak.

Muon's work is matmuls, not memory traffic, so its rows report FLOP/s where the others report GB/s: the
nominal flops of the Newton-Schulz iteration (per matrix of R x C, with m = min(R, C) and n = max(R, C), each
of the ``ns_steps`` iterations computes X Xᵀ, A Aᵀ and B X: 4m²n + 2m³) over the step's time, and that
as a fraction of the matmul peak: the FLOP/s of ``xp.matmul`` on a stack of the same matrices (2 m n² per
matrix), measured in the same run.  The flops are nominal: xopt computes the symmetric products X Xᵀ and
A Aᵀ as rank-k updates (NumPy's BLAS does half a general product's work there), so its fraction can pass 1.
Beside them ``torch.optim.Muon`` on CPU tensors of the same values where torch is installed and the run is on
the CPU; torch runs the iteration in bfloat16 (``_zeropower_via_newtonschulz``: ``grad.bfloat16()``), xopt in
the param's dtype, so their times compare the work a user gets done, not the same arithmetic.  Rounds interleave the implementations (the order rotated
from round to round); each row is the median over rounds.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from .runner import spread

__all__ = ["DEFAULT", "parse_shape", "ns_flops", "muon_rows"]

DEFAULT = (12, 256, 256)  # matrices, rows, columns (12 x 768 x 768, GPT-2 small's attention, is 8 s a step here)


def parse_shape(text):
    """``"12x768x768"`` -> (12, 768, 768): how many matrices, and their rows and columns."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"a Muon case is COUNTxROWSxCOLS of positive ints, e.g. 12x768x768, not {text!r}")
    return tuple(int(p) for p in parts)


def ns_flops(rows, cols, steps):
    """Nominal flops of ``steps`` Newton-Schulz iterations on one rows x cols matrix (see the module)."""
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4 * m * m * n + 2 * m**3)


def _sync(xp):
    if xp.__name__.startswith("cupy"):
        xp.cuda.Device().synchronize()


def _steps(xp, count, rows, cols, dtype, impls, gpu):
    """{impl: a function that runs one step and returns its seconds}."""
    import xopt
    from xopt.optimizers.muon import NS_COEFFICIENTS

    rng = np.random.default_rng(0)
    host = rng.standard_normal((count, rows, cols)).astype(dtype)
    grads_host = rng.standard_normal((count, rows, cols)).astype(dtype)
    steps = {}

    def timed(fn):
        def once():
            _sync(xp)
            t0 = time.perf_counter()
            fn()
            _sync(xp)
            return time.perf_counter() - t0
        return once

    stack = xp.asarray(host)
    other = xp.asarray(np.ascontiguousarray(np.swapaxes(host, -1, -2)))  # cols x rows: a product of rows x rows
    steps["matmul"] = timed(lambda: xp.matmul(stack, other))
    if "xopt" in impls:
        params = {f"W{i}": xp.asarray(host[i]) for i in range(count)}
        grads = {f"W{i}": xp.asarray(grads_host[i]) for i in range(count)}
        opt = xopt.Muon(lr=1e-3)
        steps["xopt"] = timed(lambda: opt.update(params, grads))
    if not gpu and any(i.startswith("torch") for i in impls):
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None and hasattr(torch.optim, "Muon"):
            tensors = [torch.tensor(host[i]) for i in range(count)]
            for t, g in zip(tensors, grads_host):
                t.grad = torch.tensor(g)
            topt = torch.optim.Muon(tensors, lr=1e-3, ns_coefficients=NS_COEFFICIENTS)
            steps["torch"] = timed(topt.step)
    return steps


def muon_rows(xp, shape, dtype, impls, repeat, gpu=False):
    """The rows of the Muon case ``shape`` (count, rows, cols) in ``dtype``: one per implementation (``xopt``,
    ``torch`` where it runs) and one for the matmul peak (impl ``matmul``)."""
    count, rows, cols = shape
    from xopt.optimizers.muon import Muon

    ns_steps = Muon().ns_steps
    steps = _steps(xp, count, rows, cols, dtype, impls, gpu)
    names = list(steps)
    for name in names:  # warm-up: the first step makes the state, BLAS starts its threads
        steps[name]()
        steps[name]()
    times = {name: [] for name in names}
    for r in range(repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(steps[name]())
    matmul = count * 2 * rows * rows * cols  # (R x C) @ (C x R), each matrix
    peak = matmul / statistics.median(times["matmul"])
    out = []
    for name in names:
        seconds = statistics.median(times[name])
        work = matmul if name == "matmul" else count * ns_flops(rows, cols, ns_steps)
        out.append({"scenario": "muon", "optimizer": "Muon", "impl": name, "dtype": str(np.dtype(dtype)),
                    "matrices": count, "rows": rows, "cols": cols, "ns_steps": ns_steps, "seconds": seconds,
                    "seconds_spread": spread(times[name]), "rounds": len(times[name]), "GFLOPs": work / seconds / 1e9,
                    "peak_fraction": work / seconds / peak})
    return out


def table(rows) -> str:
    """Muon's rows: time per step, GFLOP/s and the fraction of the matmul peak, and the ratio to torch."""
    lines = ["Muon: Newton-Schulz flops per second of a step, beside a plain matmul of the same matrices (the peak)",
             f"{'matrices':>8} {'rows':>6} {'cols':>6} {'dtype':<8} {'impl':<8} {'ms/step':>10} {'GFLOP/s':>9} "
             f"{'of peak':>8} {'vs torch':>9}"]
    lines.append("-" * len(lines[-1]))
    torch = {(r["matrices"], r["rows"], r["cols"], r["dtype"]): r for r in rows if r["impl"] == "torch"}
    for r in rows:
        t = torch.get((r["matrices"], r["rows"], r["cols"], r["dtype"]))
        vs = f"{t['seconds'] / r['seconds']:.2f}x" if t is not None and r["impl"] == "xopt" else ""
        lines.append(f"{r['matrices']:>8} {r['rows']:>6} {r['cols']:>6} {r['dtype']:<8} {r['impl']:<8} "
                     f"{r['seconds'] * 1e3:>10.2f} {r['GFLOPs']:>9.1f} {r['peak_fraction']:>8.2f} {vs:>9}")
    lines.append("GFLOP/s: Newton-Schulz's nominal flops (matmul: its own) over the median time; of peak: over the "
                 "matmul's GFLOP/s (xopt's symmetric products take half the nominal flops: it can pass 1); vs torch: "
                 "torch.optim.Muon's time / xopt's (above 1: xopt is faster; torch iterates in bfloat16, xopt in the "
                 "param's dtype).")
    return "\n".join(lines)
