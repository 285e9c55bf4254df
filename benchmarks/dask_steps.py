"""Adam on a Dask array over a local two-worker cluster, against xopt on NumPy in one process.

    python benchmarks/dask_steps.py [--numel 2^24] [--chunks 8] [--steps 20] [--out FILE]

Prints each step's time and graph size (both must stay flat) and writes rows in xopt-bench's schema
(impl "xopt-dask" and "xopt") with the per-step series beside them.  Each Dask step is timed to the
moment its chunks are persisted on the workers (distributed.wait), grads already there.
"""

import argparse
import datetime
import json
import statistics
import time

import numpy as np

import xopt
from xopt.bench import report, roofline
from xopt.bench.cli import _int


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=_int, default=2**24)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import dask.array as da
    import distributed

    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                       silence_logs=50)
    client = distributed.Client(cluster)
    try:
        chunk = args.numel // args.chunks
        w0 = np.random.default_rng(0).standard_normal(args.numel).astype(np.float32)
        g = da.random.default_rng(1).standard_normal(args.numel, chunks=chunk).astype(np.float32).persist()
        params = {"W": da.from_array(w0, chunks=chunk).persist()}
        distributed.wait([g, params["W"]])
        opt = xopt.Adam()
        opt.update(params, {"W": g})  # warm-up: kernels compiled or loaded on the workers
        distributed.wait(params["W"])
        dask_times, graph = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            opt.update(params, {"W": g})
            distributed.wait([params["W"], *(opt.state["W"][n] for n in opt.buffers())])
            dask_times.append(time.perf_counter() - t0)
            graph.append(len(params["W"].__dask_graph__()))

        p, gn = {"W": w0.copy()}, {"W": g.compute()}
        local = xopt.Adam()
        local.update(p, gn)
        numpy_times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            local.update(p, gn)
            numpy_times.append(time.perf_counter() - t0)
    finally:
        client.close()
        cluster.close()

    nbytes = roofline.bytes_per_element("Adam", "float32") * args.numel
    copy = roofline.copy_bandwidth_cpu()
    result = {**report.environment("numpy"), "date": datetime.datetime.now(datetime.timezone.utc)
              .isoformat(timespec="seconds"), "command": "python benchmarks/dask_steps.py",
              "copy_GBps": max(copy.values()), "copy_variants_GBps": copy, "rows": []}
    for impl, times in (("xopt-dask", dask_times), ("xopt", numpy_times)):
        seconds = statistics.median(times)
        result["rows"].append({"optimizer": "Adam", "impl": impl, "dtype": "float32", "numel": args.numel,
                               "tensors": 1, "seconds": seconds, "GBps": nbytes / seconds / 1e9,
                               "roofline_fraction": nbytes / seconds / 1e9 / result["copy_GBps"],
                               "per_step_seconds": times})
    result["dask"] = {"workers": 2, "threads_per_worker": 1, "chunks": args.chunks, "graph_size_per_step": graph}
    print("step  dask ms  graph  numpy ms")
    for k in range(args.steps):
        print(f"{k + 1:>4} {dask_times[k] * 1e3:8.1f} {graph[k]:>6} {numpy_times[k] * 1e3:9.1f}")
    first, last = statistics.median(dask_times[:5]), statistics.median(dask_times[-5:])
    print(f"median: dask {statistics.median(dask_times) * 1e3:.1f} ms, numpy {statistics.median(numpy_times) * 1e3:.1f}"
          f" ms; dask steps 1-5 {first * 1e3:.1f} ms vs {args.steps - 4}-{args.steps} {last * 1e3:.1f} ms")
    if args.out:
        report.write_json(result, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
