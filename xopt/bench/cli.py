"""``xopt-bench``: time every optimizer step against the seed, torch.optim and the memory roofline, and the
training loop users run (forward + backward + update of a NumPy MLP)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import time

from . import loop, muon, report, roofline, runner

# --quick: Adam alone (one rule to compile, for float32 and the book net's float64), one tensor in cache and one
# past it (on several threads), 500 small tensors, 3 rounds; xopt against the seed and torch's two fast paths.
QUICK = dict(optimizers=["Adam"], dtypes=["float32"], sizes=[2**16, 2**22], tensors=[500], repeat=3,
             impls=["xopt", "seed", "torch-foreach", "torch-fused"])
FULL = dict(optimizers=list(runner.OPTIMIZERS), dtypes=["float32"], sizes=[2**10, 2**14, 2**18, 2**22, 2**25],
            tensors=[2000], repeat=9, impls=list(runner.IMPLS))


def _int(text):
    text = text.strip().replace("^", "**")
    if "**" in text:
        base, exp = text.split("**")
        return int(base) ** int(exp)
    return int(text)


def _list(convert):
    """A comma-separated list of ``convert``'s values; "none" (or nothing) is the empty list."""

    def parse(text):
        if text.strip().lower() == "none":
            return []
        try:
            return [convert(x) for x in text.split(",") if x.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"invalid value {text!r} ({exc})") from None

    return parse


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="xopt-bench", description=__doc__)
    ap.add_argument("--quick", action="store_true",
                    help="a small sweep (Adam; 2^16, 2^22 and 500 small tensors; 3 rounds; xopt, the seed, torch "
                         "foreach and fused): about a minute on a 2-core CPU, compilation included")
    ap.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                    help="gpu: CuPy arrays (and torch on CUDA); auto: gpu when CuPy sees one, else cpu")
    ap.add_argument("--optimizers", type=_list(str), help=f"comma-separated, of {', '.join(runner.OPTIMIZERS)}")
    ap.add_argument("--dtypes", type=_list(str), help="comma-separated: float16, float32, float64")
    ap.add_argument("--sizes", type=_list(_int), help="elements of the one-tensor cases, e.g. 2^20,2^25")
    ap.add_argument("--tensors", type=_list(_int), help="tensor counts of the many-small-tensors cases (64-4096 "
                                                        "elements each), e.g. 2000; none to skip them")
    ap.add_argument("--impls", type=_list(str), help=", ".join(runner.IMPLS) + " (default: all; with --quick, "
                                                    + ", ".join(QUICK["impls"]) + ")")
    ap.add_argument("--repeat", type=int, help="interleaved rounds; each row is the median")
    ap.add_argument("--scenario", choices=["all", "step", "loop", "muon"], default="all",
                    help="step: one optimizer step on random arrays; loop: forward + backward + update of a NumPy "
                         "MLP (CPU only); muon: a Muon step's FLOP/s beside the matmul peak; all (default): the "
                         "three (muon not with --quick)")
    ap.add_argument("--muon", type=_list(muon.parse_shape), default=[muon.DEFAULT],
                    help="Muon cases, COUNTxROWSxCOLS same-shaped matrices (default "
                         + "x".join(map(str, muon.DEFAULT)) + "; GPT-2 small's attention: 12x768x768)")
    ap.add_argument("--nets", type=_list(str), default=list(loop.NETS),
                    help="nets of the loop scenario: " + "; ".join(f"{k}: {n.label}" for k, n in loop.NETS.items()))
    ap.add_argument("--block", type=int, help="loop iterations per implementation per round (default: the net's, "
                                              + ", ".join(f"{k} {n.block}" for k, n in loop.NETS.items()) + ")")
    ap.add_argument("--out", default="xopt-bench-results", help="folder for results.json and the PNGs")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    args.optimizers_given = args.optimizers is not None
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [o for o in args.optimizers if o not in runner.OPTIMIZERS]
    unknown += [i for i in args.impls if i not in runner.IMPLS]
    unknown += [n for n in args.nets if n not in loop.NETS]
    if unknown:
        ap.error(f"unknown: {', '.join(unknown)}")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.block is not None and args.block < 1:
        ap.error("--block must be at least 1")
    return args


def _gpu_available():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device
        return False


def run(args):
    gpu = args.device == "gpu" or (args.device == "auto" and _gpu_available())
    if gpu and not _gpu_available():
        raise SystemExit("xopt-bench: --device gpu, but CuPy finds no usable GPU")
    if gpu:
        import cupy as xp
    else:
        import numpy as xp
    backend = "cupy" if gpu else "numpy"
    result = report.environment(backend)
    result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result["command"] = "xopt-bench " + " ".join(sys.argv[1:])

    cases = runner.make_cases(args.optimizers, args.dtypes, args.sizes, args.tensors) if args.scenario in (
        "all", "step") else []
    loop_cases = loop_cases_of(args) if args.scenario in ("all", "loop") else []
    muon_cases = [(shape, dtype) for shape in args.muon for dtype in args.dtypes if dtype != "float16"] if (
        args.scenario == "muon" or (args.scenario == "all" and not args.quick)) else []
    if loop_cases and gpu:
        print("xopt-bench: the loop scenario is a NumPy (CPU) loop: not run with --device gpu", file=sys.stderr)
        loop_cases = []

    compile_seconds = 0.0
    if gpu:
        from ..engines import fused_cuda

        compile_seconds = fused_cuda.compile_all()
    else:
        from .. import _numba

        if not _numba.usable():
            print(f"{_numba.why_not()}: xopt runs its reference rule", file=sys.stderr)
        else:
            compile_seconds = compile_cpu(kernels_of(args, cases, loop_cases))
    result["compile_seconds"] = compile_seconds  # JIT or disk-cache load, outside every figure below
    variants = roofline.copy_bandwidth_gpu() if gpu else roofline.copy_bandwidth_cpu()
    result["copy_variants_GBps"] = variants
    result["copy_GBps"] = max(variants.values())
    cache = 0 if gpu else roofline.cache_bytes()
    result["cache_bytes"] = cache
    rows = []
    progress = _progress(len(cases) + len(loop_cases) + len(muon_cases))
    for case in cases:
        progress.set_description(f"{case.optimizer} {case.dtype} {case.numel} x{case.tensors}")
        samples, warmup_rounds = runner.measure_case_samples(case, args.impls, xp, args.repeat, gpu=gpu)
        for impl, times in samples.items():
            seconds = statistics.median(times)
            nbytes = case.numel * roofline.bytes_per_element(case.optimizer, case.dtype,
                                                             runner.STATE_DTYPES.get(impl))
            gbps = nbytes / seconds / 1e9
            rows.append({"scenario": "step", "optimizer": case.optimizer, "impl": impl, "dtype": case.dtype,
                         "numel": case.numel, "tensors": case.tensors, "seconds": seconds,
                         "state_bytes_per_param": roofline.state_bytes_per_element(
                             case.optimizer, case.dtype, runner.STATE_DTYPES.get(impl)),
                         "seconds_spread": runner.spread(times), "rounds": len(times),
                         "warmup_rounds": warmup_rounds, "GBps": gbps,
                         "roofline_fraction": gbps / result["copy_GBps"],
                         "fits_in_cache": bool(cache and nbytes <= cache)})
        progress.update()
    loop_impls = [i for i in loop.LOOP_IMPLS if i in args.impls or (i == "torch" and any(
        x.startswith("torch") for x in args.impls))]
    for net, optimizer in loop_cases:
        progress.set_description(f"loop {net.name} {optimizer}")
        rows += loop.loop_rows(optimizer, net, loop_impls, args.repeat, warmup_seconds=1.0 if args.quick else 2.0)
        progress.update()
    for shape, dtype in muon_cases:
        progress.set_description(f"Muon {dtype} " + "x".join(map(str, shape)))
        rows += muon.muon_rows(xp, shape, dtype, args.impls, args.repeat, gpu=gpu)
        progress.update()
    progress.close()
    result["rows"] = rows
    result["threads"] = loop.threads_info()  # after the kernels ran: numba's threading layer is chosen by then
    return result


def kernels_of(args, cases, loop_cases):
    """The CPU kernels the run calls: (optimizer, dtype, state dtype or None) of every step case an xopt impl
    runs on the fused path, and of every loop case xopt runs (its default path: the fused one on NumPy)."""
    import xopt

    kernels = set()
    for case in cases:
        if "xopt" in args.impls:
            kernels.add((case.optimizer, case.dtype, None))
        for impl, state_dtype in runner.STATE_DTYPES.items():
            if impl in args.impls and runner.takes_state_dtype(case, state_dtype):
                kernels.add((case.optimizer, case.dtype, state_dtype))
    if "xopt" in args.impls:
        kernels |= {(optimizer, net.dtype, None) for net, optimizer in loop_cases}
    return sorted(kernels, key=str)


def compile_cpu(kernels):
    """Compile (or load from numba's disk cache) the CPU kernels of ``kernels`` (from :func:`kernels_of`), and no
    others: a rule's code is compiled when a step of it first runs, per dtype.  Returns seconds."""
    import numpy as np

    import xopt

    t0 = time.perf_counter()
    for optimizer, dtype, state_dtype in kernels:
        # 8-bit state: min_8bit_size 0, so that these small params take the 8-bit kernel (compiled for good)
        storage = {"state_dtype": state_dtype, **({"min_8bit_size": 0} if state_dtype == "8bit" else {})}
        opt = getattr(xopt, optimizer)(impl="fused", **(storage if state_dtype else {}))
        for _ in range(2):  # the first step makes the state; the second takes the path of every later one
            opt.update({"p": np.ones(4, dtype=dtype)}, {"p": np.ones(4, dtype=dtype)})
    return time.perf_counter() - t0


def loop_cases_of(args):
    """(net, optimizer) pairs of the loop scenario: each net's own optimizers among those asked for, or every
    loop optimizer asked for when --optimizers was given."""
    cases = []
    for name in args.nets:
        net = loop.NETS[name]
        if args.block is not None:
            net = dataclasses.replace(net, block=args.block)
        elif args.quick:  # a short loop run: half the iterations per round
            net = dataclasses.replace(net, block=max(1, net.block // 2))
        mine = loop.LOOP_OPTIMIZERS if args.optimizers_given else net.optimizers
        cases += [(net, o) for o in mine if o in args.optimizers]
    return cases


def _progress(total):
    try:
        from tqdm import tqdm
    except ImportError:
        class _Silent:
            def set_description(self, _):
                pass

            def update(self):
                pass

            def close(self):
                pass

        return _Silent()
    return tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    result = run(args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    report.write_json(result, path)
    try:
        pngs = report.plot(result, args.out)
    except ImportError:
        pngs = []
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
    print(report.table(result))
    print(f"\nJIT compile / cache load: {result['compile_seconds']:.2f} s (not in any figure above)")
    print(f"wrote {path}" + "".join(f", {p}" for p in pngs) + f" in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
