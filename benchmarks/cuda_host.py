"""Host time of a CUDA step through the exact-type lane: what ``update()`` costs the CPU before the GPU works.

Target: at most 30 us + 1 us per tensor a step, with new grad arrays every step.  No GPU is needed:
the params, grads and state are real ``cupy.ndarray`` objects, made over host memory
(``cupy.cuda.UnownedMemory`` + ``cupy.cuda.MemoryPointer`` over NumPy buffers, which builds them
without a driver), so xopt reads CuPy's own structs and attributes as it does on a GPU.  Only the
CUDA calls are stubbed: ``fused_cuda.DEVICE`` is replaced by no-ops that count calls (``upload``
hands back the host table, ``scratch`` a host buffer, ``launch`` and ``function`` do nothing, the
``cupy.cuda.Device`` context is a null one).  So the figures leave out what those calls cost on a
real GPU (CuPy's ``asarray`` of the table through page-locked memory, a ``cupy.empty``, the kernel
launches: some microseconds each, a few per step) and anything the GPU itself does.

Each optimizer's state is made by hand at step 1 (a first step would make it with CuPy kernels):
Adam on N float32 tensors of 256 elements (10, 1,000, 10,000), plain, with ``clip_grad_norm=1.0``
(one more launch: the norm pass) and with ``overrides={"b*": {"lr": 0.1}}`` (half the tensors
named b*: two parts in the one launch).  A step's grads are a set of arrays other than the step
before's (three sets in turn).  ``--reader python`` also times the lane's fallback reader (Python
attribute lookups, where the compiled reader of CuPy's structs is not available).  The "floor" rows
time the same plain updates with the engine's ``step`` replaced by one that returns at once: what
``update()`` and the lane (``xopt/_lane.py``) cost around the engine, which it cannot lower.
The stub's own work (reading the table's address from its ``__array_interface__``) is in the figures.

Rounds interleave every case; each figure is the median over rounds of the median of ``--steps``
updates, in microseconds.  Prints a table and writes JSON with --out, with the load average and
the time of a Python call that does nothing (the machine's speed at the time: compare with
``benchmarks/cold_call.py``'s figures).

``--dtype`` sets the params' and grads' dtype (float32; float16, bfloat16: ml_dtypes', CuPy 14's), ``--state-dtype
bfloat16`` Adam's state_dtype (m and v stored as bfloat16).

    python benchmarks/cuda_host.py [--rounds 30] [--steps 5] [--sizes 10,1000,10000] [--reader both]
        [--dtype float32] [--state-dtype none] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import time

import numpy as np

import xopt
from xopt.bench.report import commit, machine
from xopt.engines import fused_cuda

ELEMENTS = 256


def _cupy_host(cupy, values):
    """A CuPy array over (a copy of) ``values`` in host memory, on "GPU 0"."""
    host = np.array(values, copy=True)
    memory = cupy.cuda.UnownedMemory(host.ctypes.data, host.nbytes, host, device_id=0)
    return cupy.ndarray(host.shape, host.dtype, cupy.cuda.MemoryPointer(memory, 0))


class StubDevice(fused_cuda.CupyDevice):
    """CupyDevice with every CUDA call a no-op that counts."""

    calls = {"upload": 0, "launch": 0, "scratch": 0, "download": 0}
    _null = contextlib.nullcontext()

    @staticmethod
    def address(a):  # a host array's address as cheaply as CuPy's attribute read (not ndarray.ctypes: ~10 us)
        return a.__array_interface__["data"][0] if type(a) is np.ndarray else a.data.ptr

    @classmethod
    def on(cls, device_id):
        return cls._null

    @classmethod
    def current_device(cls):
        return 0

    @classmethod
    def upload(cls, host):
        cls.calls["upload"] += 1
        return host

    @classmethod
    def scratch(cls, nbytes):
        cls.calls["scratch"] += 1
        return np.zeros(nbytes, dtype=np.uint8)

    @classmethod
    def download(cls, a):
        cls.calls["download"] += 1
        return np.asarray(a)

    @staticmethod
    def function(rule, dtype, state=None):
        return None

    @staticmethod
    def norm_function(dtype):
        return None

    @classmethod
    def launcher(cls, function, n_blocks, args):
        return functools.partial(cls.launch, function, n_blocks, args)

    select = staticmethod(lambda device_id: functools.partial(int))  # one device: nothing to switch
    last = {}

    @classmethod
    def ordered(cls, device_id):  # one stream: no wait; the event's record stubbed, its bookkeeping kept
        last = cls.last.get(device_id)
        if last is not None and last[0] != 0:
            cls.calls["wait"] += 1
        return [functools.partial(int), functools.partial(cls.last.__setitem__, device_id, (0, None))]

    @classmethod
    def launch(cls, function, n_blocks, args):
        cls.calls["launch"] += 1


CASES = {"plain": {}, "clip_grad_norm=1.0": dict(clip_grad_norm=1.0),
         'overrides={"b*": {"lr": 0.1}}': dict(overrides={"b*": {"lr": 0.1}})}


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def setup(cupy, n, extra, rng, dtype="float32", state_dtype=None):
    """(optimizer at step 1, params, three sets of grads) for ``n`` tensors of ``dtype``, the state float32 or
    ``state_dtype``."""
    names = [("b" if i % 2 else "w") + str(i) for i in range(n)]
    dtype, state = _dtype(dtype), _dtype(state_dtype or "float32")
    params = {k: _cupy_host(cupy, rng.standard_normal(ELEMENTS).astype(dtype)) for k in names}
    grads = [{k: _cupy_host(cupy, rng.standard_normal(ELEMENTS).astype(dtype)) for k in names}
             for _ in range(3)]
    opt = xopt.Adam(impl="fused", state_dtype=state_dtype, **extra)
    opt.state = {k: {"step": 1, "m": _cupy_host(cupy, np.zeros(ELEMENTS, state)),
                     "v": _cupy_host(cupy, np.zeros(ELEMENTS, state))} for k in names}
    opt.iter = 1
    opt._check_patterns(params)  # what the first (checked) step does
    return opt, params, grads


def _nothing():
    pass


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=5, help="updates timed per case in a round")
    ap.add_argument("--sizes", default="10,1000,10000")
    ap.add_argument("--reader", choices=["compiled", "python", "both"], default="both")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ap.add_argument("--state-dtype", choices=["none", "bfloat16"], default="none")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    import cupy

    from xopt.engines import cuda_memory

    fused_cuda.DEVICE = StubDevice
    compiled = fused_cuda.cuda_memory
    if cuda_memory.layout(cupy.ndarray) is None:
        raise SystemExit("CuPy's array struct was not found: the compiled reader is not used here")
    readers = ["compiled", "python"] if args.reader == "both" else [args.reader]
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    kinds = (args.dtype, None if args.state_dtype == "none" else args.state_dtype)
    setups = {(r, n, case): setup(cupy, n, extra, rng, *kinds) for r in readers for n in sizes
              for case, extra in CASES.items()}
    setups.update({("floor", n, "plain"): setup(cupy, n, {}, rng, *kinds) for n in sizes})
    real_step = fused_cuda.step

    def no_step(*args):
        StubDevice.calls["upload"] += 1  # counted as the step would
        return True  # taken (and not counted: the commit is not run)
    times = {key: [] for key in setups}
    calls = {}
    clock = time.perf_counter
    for key, (opt, params, grads) in setups.items():  # warm: compiled code loaded, every path run once
        fused_cuda.cuda_memory = None if key[0] == "python" else compiled
        fused_cuda.step = no_step if key[0] == "floor" else real_step
        opt.update(params, grads[0])
    for _ in range(args.rounds):
        for key, (opt, params, grads) in setups.items():
            fused_cuda.cuda_memory = None if key[0] == "python" else compiled
            fused_cuda.step = no_step if key[0] == "floor" else real_step
            before = dict(StubDevice.calls)
            laps = []
            for s in range(args.steps):
                g = grads[(opt.iter + s) % 3]
                t0 = clock()
                opt.update(params, g)
                laps.append(clock() - t0)
            times[key].append(statistics.median(laps))
            calls[key] = {k: (StubDevice.calls[k] - before[k]) / args.steps for k in before}
            if calls[key]["upload"] != 1:  # the checked path would have failed here: it runs CuPy kernels
                raise SystemExit(f"not one upload a step: {key} {calls[key]}")
    fused_cuda.cuda_memory, fused_cuda.step = compiled, real_step
    warm_up = max(1, args.rounds // 10)
    nothing = []
    for _ in range(2000):
        t0 = clock()
        _nothing()
        nothing.append(clock() - t0)
    rows = []
    for (reader, n, case), laps in times.items():
        us = statistics.median(laps[warm_up:]) * 1e6
        target = 30 + n
        rows.append({"reader": reader, "tensors": n, "case": case, "us_per_step": us, "us_per_tensor": us / n,
                     "target_us": target, "within_target": us <= target,
                     "calls_per_step": calls[reader, n, case]})
    print(f"{'reader':9s} {'tensors':>8s} {'case':32s} {'us/step':>10s} {'us/tensor':>10s} {'target us':>10s} "
          f"{'uploads':>8s} {'launches':>9s}")
    for r in rows:
        print(f"{r['reader']:9s} {r['tensors']:8d} {r['case']:32s} {r['us_per_step']:10.1f} {r['us_per_tensor']:10.3f} "
              f"{r['target_us']:10d}{'' if r['within_target'] else ' (over)':7s} {r['calls_per_step']['upload']:>2.0f} "
              f"{r['calls_per_step']['launch']:>9.0f}")
    if args.out:
        result = {"command": "python benchmarks/cuda_host.py " + " ".join(argv or []), "commit": commit(),
                  "machine": machine(), "cupy": cupy.__version__,
                  "elements_per_tensor": ELEMENTS, "dtype": args.dtype, "state_dtype": args.state_dtype,
                  "rounds": args.rounds, "steps": args.steps,
                  "load_average": os.getloadavg(), "python_call_us": statistics.median(nothing) * 1e6, "rows": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])  # recorded in the JSON's "command"
