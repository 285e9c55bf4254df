"""Extra memory of one optimizer step: peak RSS growth, each case in a fresh process.

    python benchmarks/step_memory.py [--log2-numel 26] [--out benchmarks/results/step-memory-<date>.json]

One float32 param of 2^26 elements (256 MiB) with its grad, Adam.  In a fresh process per
case: small warm-up steps load the kernels (numba, torch) on a separate small param, then
the big param takes a first step (which also makes the state: m and v, 2x the param; with
``state_dtype="8bit"`` uint8 codes and a float32 absmax per 256 elements, 0.51x) and a second one.  For each step the growth of the peak RSS over the RSS just before it is reported,
in bytes and in param sizes.  The peak is reset before each step by writing "5" to
/proc/self/clear_refs (Linux); where that is refused, the process's lifetime peak
(getrusage ru_maxrss) is read instead, which only shows growth above every earlier peak,
and the method is recorded.  A step that needs no temporary grows by 0; the seed's Adam
holds about four param-sized temporaries at its peak.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys

CASES = {
    "xopt (default: fused)": "xopt",
    'xopt impl="reference"': "xopt-reference",
    'xopt state_dtype="8bit"': "xopt-8bit",
    'xopt 8bit impl="reference"': "xopt-8bit-reference",
    "seed": "seed",
    "torch foreach=False": "torch-forloop",
    "torch foreach=True": "torch-foreach",
    "torch fused=True": "torch-fused",
}


# -- the child: one case ---------------------------------------------------------------------
def _status_kib():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(step):
    """Peak RSS growth of step() over the RSS before it, in bytes, and how the peak was read."""
    if os.path.exists("/proc/self/status") and _reset_peak():
        before = _status_kib()["VmRSS"]
        step()
        return (_status_kib()["VmHWM"] - before) * 1024, "VmHWM after clear_refs"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, "ru_maxrss (lifetime peak)"


def _make_step(case, numel):
    """(step function on the big param, warm-up function, param bytes)."""
    if case.startswith("torch"):
        import torch

        def adam(params):
            kind = case.split("-")[1]
            return torch.optim.Adam(params, lr=0.001, eps=1e-7, foreach=kind == "foreach", fused=kind == "fused")

        def tensors(n):
            p = torch.nn.Parameter(torch.empty(n).normal_())
            p.grad = torch.empty(n).normal_()
            return p

        small = tensors(1024)
        warm = adam([small])
        p = tensors(numel)
        opt = adam([p])
        return opt.step, warm.step, p.numel() * p.element_size()

    import numpy as np

    rng = np.random.default_rng(0)
    if case == "seed":
        from xopt.bench import seed

        warm_opt, opt = seed.Adam(), seed.Adam()
    else:
        import xopt

        impl = "reference" if case.endswith("-reference") else "auto"
        state = {"state_dtype": "8bit"} if case.startswith("xopt-8bit") else {}
        warm_opt, opt = xopt.Adam(impl=impl, **state), xopt.Adam(impl=impl, **state)
    n_small = 8192 if case.startswith("xopt-8bit") else 1024  # 8-bit state from min_8bit_size (4096) up
    small = {"w": rng.standard_normal(n_small, dtype=np.float32)}, {"w": rng.standard_normal(n_small, dtype=np.float32)}
    params = {"w": rng.standard_normal(numel, dtype=np.float32)}
    grads = {"w": rng.standard_normal(numel, dtype=np.float32)}
    return (lambda: opt.update(params, grads)), (lambda: warm_opt.update(*small)), params["w"].nbytes


def child(case, numel):
    step, warm, nbytes = _make_step(case, numel)
    for _ in range(3):
        warm()
    first, method = _measure(step)
    second, _ = _measure(step)
    third, _ = _measure(step)
    print(json.dumps({"first_step_bytes": first, "second_step_bytes": second, "third_step_bytes": third,
                      "param_bytes": nbytes,
                      "method": method}))


# -- the parent: every case in its own process ---------------------------------------------------
def _available(case):
    if not case.startswith("torch"):
        return None
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log2-numel", type=int, default=26, help="the param has 2^N float32 elements")
    parser.add_argument("--out", default=f"benchmarks/results/step-memory-{datetime.date.today()}.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    numel = 2**args.log2_numel
    if args.child:
        child(args.child, numel)
        return
    rows = {}
    print(f"Adam, one float32 param of 2^{args.log2_numel} elements ({numel * 4 / 2**20:.0f} MiB): "
          "peak RSS growth of a step, in a fresh process per case")
    print(f"{'case':26s} {'1st step (makes state)':>24s} {'2nd step':>22s} {'3rd step':>22s}")
    for label, case in CASES.items():
        why = _available(case)
        if why is None:
            done = subprocess.run([sys.executable, __file__, "--child", case, "--log2-numel", str(args.log2_numel)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                why = f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
            else:
                rows[label] = json.loads(done.stdout.strip().splitlines()[-1])
        if why is not None:
            rows[label] = {"skipped": why}
            print(f"{label:26s} {why}")
            continue
        r = rows[label]
        first, second = r["first_step_bytes"] / r["param_bytes"], r["second_step_bytes"] / r["param_bytes"]
        r["first_step_params"], r["second_step_params"] = first, second
        print(f"{label:26s} {r['first_step_bytes'] / 2**20:9.1f} MiB ({first:4.2f} p) "
              f"{r['second_step_bytes'] / 2**20:9.1f} MiB ({second:4.2f} p) "
              f"{r['third_step_bytes'] / 2**20:9.1f} MiB ({r['third_step_bytes'] / r['param_bytes']:4.2f} p)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"what": "peak RSS growth of one Adam step (bytes; 'p' = the param's bytes)",
                   "numel": numel, "dtype": "float32", "date": str(datetime.date.today()),
                   "machine": platform.platform(), "python": platform.python_version(), "cases": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
