"""Adam on Dask arrays: xopt against the same math in plain dask.array and against one process.

    python benchmarks/dask_steps.py [--numel 2^22 2^24 2^26] [--chunks 4 8 16 32] [--rounds 9] [--out FILE]

For every size and chunk count, on one LocalCluster of 2 worker processes with 1 thread each: a step
of xopt on a Dask array, a step of Adam written as plain dask.array expressions (what a Dask user
would write; one task per chunk for each of p, m and v), and a step of xopt on NumPy arrays in this
process, beside the cluster.  All chunk counts of a size are set up at once; each round times one
step of every (chunk count, Dask path) and one in-process step, in an order that rotates from round
to round (the machine is shared: interleaving spreads the same noise over all of them), after two
untimed steps each; medians over rounds, and the median of each round's xopt/plain ratio.  A Dask
step is timed until its chunks are persisted on the workers (``distributed.wait``), grads already
there.  Tasks per step are counted in one more step of each, outside the timed rounds.  Then a
least-squares fit, in relative error, of each Dask path's median step time to

    t = fixed + per_chunk * chunks + per_byte * bytes     (bytes = 28 * elements: Adam float32's traffic)

Prints a table and the fits; ``--out`` writes them as JSON.  The measured code is this checkout's
``xopt`` (the workers import it too).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's xopt, here and (by the spawned workers' sys.path) on the workers

import numpy as np  # noqa: E402

import xopt  # noqa: E402
from xopt.bench import report, roofline  # noqa: E402
from xopt.bench.cli import _int  # noqa: E402

IMPLS = ("xopt-dask", "plain-dask", "xopt")
LR, BETA1, BETA2, EPS = 1e-3, 0.9, 0.999, 1e-8


def plain_adam(p, g, m, v, step):
    """The seed's Adam as dask.array expressions, as a Dask user writes it: persisted p, m, v."""
    import dask
    import dask.array as da

    m = BETA1 * m + (1 - BETA1) * g
    v = BETA2 * v + (1 - BETA2) * g * g
    p = p - LR * (m / (1 - BETA1 ** step)) / (da.sqrt(v / (1 - BETA2 ** step)) + EPS)
    return dask.persist(p, m, v)


class Paths:
    """The three ways to take a step from the same p0 and g; ``step(impl)`` takes one, waits, returns what ran."""

    def __init__(self, numel, chunks):
        import dask.array as da
        import distributed

        chunk = numel // chunks
        self.g = da.random.default_rng(1).standard_normal(numel, chunks=chunk, dtype=np.float32).persist()
        p0 = da.random.default_rng(0).standard_normal(numel, chunks=chunk, dtype=np.float32).persist()
        distributed.wait([self.g, p0])
        self.xopt, self.params = xopt.Adam(), {"W": p0}
        zeros = da.zeros_like(p0)
        self.plain = {"p": p0, "m": zeros, "v": zeros, "step": 0}
        self.local, self.local_params, self.local_grads = xopt.Adam(), {"W": p0.compute()}, {"W": self.g.compute()}

    def step(self, impl):
        import distributed

        if impl == "xopt-dask":
            self.xopt.update(self.params, {"W": self.g})
            out = [self.params["W"], *(self.xopt.state["W"][n] for n in self.xopt.buffers())]
        elif impl == "plain-dask":
            pl = self.plain
            pl["step"] += 1
            out = pl["p"], pl["m"], pl["v"] = plain_adam(pl["p"], self.g, pl["m"], pl["v"], pl["step"])
        else:
            self.local.update(self.local_params, self.local_grads)
            return
        distributed.wait(list(out))

    def tasks(self, client, impl):
        import distributed

        with distributed.get_task_stream(client) as stream:
            self.step(impl)
        return len(stream.data)


def measure(client, numel, chunk_counts, rounds):
    """Every chunk count of one size set up at once and timed in the same rounds: a round times one step of
    each (chunks, Dask path) and one in-process step (which has no chunks), in an order that rotates."""
    paths = {chunks: Paths(numel, chunks) for chunks in chunk_counts}
    jobs = [(chunks, impl) for chunks in chunk_counts for impl in IMPLS[:2]] + [(chunk_counts[0], "xopt")]
    for chunks, impl in jobs:
        for _ in range(2):  # warm-up: kernels loaded on the workers, state made
            paths[chunks].step(impl)
    times = {job: [] for job in jobs}
    for r in range(rounds):
        for chunks, impl in jobs[r % len(jobs):] + jobs[:r % len(jobs)]:
            t0 = time.perf_counter()
            paths[chunks].step(impl)
            times[chunks, impl].append(time.perf_counter() - t0)
    tasks = {(chunks, impl): paths[chunks].tasks(client, impl) for chunks in chunk_counts for impl in IMPLS[:2]}
    graph = {chunks: len(paths[chunks].params["W"].__dask_graph__()) for chunks in chunk_counts}
    del paths
    return times, tasks, graph


def fit(rows, impl):
    """Least squares in relative error (each row weighted by 1/t, so the small steps count as much as the
    big ones): median step seconds t = fixed + per_chunk * chunks + per_byte * bytes."""
    sel = [r for r in rows if r["impl"] == impl]
    a = np.array([[1.0, r["chunks"], r["bytes"]] for r in sel])
    t = np.array([r["seconds"] for r in sel])
    coef, *_ = np.linalg.lstsq(a / t[:, None], np.ones_like(t), rcond=None)
    residual = (a @ coef - t) / t
    fixed, per_chunk, per_byte = map(float, coef)
    return {"impl": impl, "fixed_s": fixed, "per_chunk_s": per_chunk, "per_byte_s": per_byte,
            "per_GB_s": per_byte * 1e9, "relative_residuals": [float(x) for x in residual],
            "rows": [(r["numel"], r["chunks"]) for r in sel]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=_int, nargs="+", default=[2**22, 2**24, 2**26])
    ap.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import distributed

    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                       silence_logs=50)
    client = distributed.Client(cluster)
    rows = []
    try:
        where = set(client.run(lambda: xopt.__file__).values())
        if where != {xopt.__file__}:
            raise SystemExit(f"the workers import xopt from {where}, this process from {xopt.__file__}")
        print(f"{'numel':>9} {'chunks':>6} {'xopt-dask ms':>12} {'plain ms':>9} {'one proc ms':>11} "
              f"{'xopt/plain':>10} {'tasks x/plain':>13}")
        for numel in args.numel:
            times, tasks, graph = measure(client, numel, args.chunks, args.rounds)
            local = statistics.median(times[args.chunks[0], "xopt"])
            rows.append({"optimizer": "Adam", "impl": "xopt", "dtype": "float32", "numel": numel, "tensors": 1,
                         "chunks": None, "bytes": 28 * numel, "seconds": local,
                         "per_round_seconds": times[args.chunks[0], "xopt"]})
            for chunks in args.chunks:
                med = {impl: statistics.median(times[chunks, impl]) for impl in IMPLS[:2]}
                ratios = [x / p for x, p in zip(times[chunks, "xopt-dask"], times[chunks, "plain-dask"])]
                for impl in IMPLS[:2]:
                    rows.append({"optimizer": "Adam", "impl": impl, "dtype": "float32", "numel": numel,
                                 "tensors": 1, "chunks": chunks, "bytes": 28 * numel, "seconds": med[impl],
                                 "per_round_seconds": times[chunks, impl], "tasks_per_step": tasks[chunks, impl],
                                 "graph_keys_after_step": graph[chunks] if impl == "xopt-dask" else None,
                                 "vs_plain_dask_median_of_round_ratios": statistics.median(ratios)
                                 if impl == "xopt-dask" else None})
                print(f"{numel:>9} {chunks:>6} {med['xopt-dask'] * 1e3:12.1f} {med['plain-dask'] * 1e3:9.1f} "
                      f"{local * 1e3:11.1f} {statistics.median(ratios):10.2f} "
                      f"{tasks[chunks, 'xopt-dask']:>6}/{tasks[chunks, 'plain-dask']:<6}", flush=True)
    finally:
        client.close()
        cluster.close()

    fits = [fit(rows, impl) for impl in IMPLS[:2]]
    for f in fits:
        print(f"{f['impl']:>10}: {f['fixed_s'] * 1e3:.1f} ms fixed + {f['per_chunk_s'] * 1e3:.2f} ms per chunk + "
              f"{f['per_GB_s'] * 1e3:.0f} ms per GB moved (residuals "
              f"{min(f['relative_residuals']):+.0%} to {max(f['relative_residuals']):+.0%})")
    copy = roofline.copy_bandwidth_cpu()
    result = {**report.environment("numpy"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/dask_steps.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cluster": {"workers": 2, "threads_per_worker": 1, "processes": True},
              "rounds": args.rounds, "note": "shared 2-core machine: other jobs ran; ratios are of interleaved rounds",
              "copy_GBps": max(copy.values()), "copy_variants_GBps": copy, "fits": fits, "rows": rows}
    if args.out:
        report.write_json(result, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
