"""xopt.torch.Adam.step() against torch.optim.Adam (fused and foreach) on the same params: the step alone.

Four sets of float32 params with grads set once: the three MLPs of ``torch_tensors.py`` and GPT-2 small's
shapes (124M params in 148 tensors: wte 50257x768, wpe 1024x768, 12 blocks of ln_1, attn c_attn 768x2304 +
bias, attn c_proj 768x768 + bias, ln_2, mlp c_fc 768x3072 + bias, mlp c_proj 3072x768 + bias; ln_f).  Each
optimizer steps its own copy; each timed call is ``opt.step()``.  Rounds interleave the three (the order
rotates), each ``--calls`` timed calls after a warm-up; figures are medians in microseconds and ratios of
medians from this run.  torch and xopt get the same thread count (``--threads``).  Before timing, 5 steps of
xopt.torch.Adam and torch.optim.Adam (foreach) on float64 copies of the small MLP are compared.

    taskset -c 1 python benchmarks/torch_optim.py --threads 1 [--rounds 9] [--calls 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import xopt
import xopt.torch

MLPS = {"50k params (784-64-10)": [784, 64, 10], "4.5M params (1024-2048-1024-256-10)": [1024, 2048, 1024, 256, 10],
        "5.8M params (784-2048-2048-10)": [784, 2048, 2048, 10]}
GPT2 = "GPT-2 small (124M params, 148 tensors)"


def gpt2_shapes():
    shapes = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,), (768,), (768,), (768, 3072), (3072,),
                   (3072, 768), (768,)]
    return shapes + [(768,), (768,)]


def mlp_shapes(widths):
    shapes = []
    for a, b in zip(widths, widths[1:]):
        shapes += [(b, a), (b,)]
    return shapes


def params_with_grads(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g, dtype=dtype) * 0.02)
        p.grad = torch.randn(shape, generator=g, dtype=dtype)
        params.append(p)
    return params


def check():
    """The largest difference between xopt.torch.Adam and torch.optim.Adam (foreach) after 5 float64 steps."""
    a, b = params_with_grads(mlp_shapes(MLPS["50k params (784-64-10)"]), torch.float64), None
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours, theirs = xopt.torch.Adam(a, lr=1e-3, weight_decay=0.01), torch.optim.Adam(b, lr=1e-3, weight_decay=0.01,
                                                                                      foreach=True)
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    return max(float((p - q).detach().abs().max()) for p, q in zip(a, b))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--gpt2-calls", type=int, default=2)
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    xopt.set_num_threads(args.threads)
    report = {"command": "python " + " ".join(sys.argv), "cpus": sorted(os.sched_getaffinity(0)),
              "torch": torch.__version__,
              "threads": {"torch": torch.get_num_threads(), "xopt": xopt.get_num_threads()},
              "float64 max |xopt.torch - torch.optim| after 5 Adam steps": check(), "sets": {}}
    sets = {name: mlp_shapes(widths) for name, widths in MLPS.items()}
    if not args.skip_gpt2:
        sets[GPT2] = gpt2_shapes()
    for name, shapes in sets.items():
        calls = args.gpt2_calls if name == GPT2 else args.calls
        makers = {"xopt.torch": lambda ps: xopt.torch.Adam(ps, lr=1e-3),
                  "torch fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
                  "torch foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True)}
        steps = {k: make(params_with_grads(shapes)).step for k, make in makers.items()}
        n_params = sum(torch.Size(s).numel() for s in shapes)
        times = {k: [] for k in steps}
        for _ in range(2):
            for f in steps.values():
                f()
        for r in range(args.rounds):
            order = list(steps)[r % 3:] + list(steps)[:r % 3]
            for k in order:
                for _ in range(calls):
                    t = time.perf_counter()
                    steps[k]()
                    times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        report["sets"][name] = {"params": n_params, "tensors": len(shapes),
                                "timed calls each": len(times["xopt.torch"]),
                                "median_us": med, "xopt.torch / torch fused": med["xopt.torch"] / med["torch fused"],
                                "xopt.torch / torch foreach": med["xopt.torch"] / med["torch foreach"]}
        print(f"{name}: {n_params} params, {len(shapes)} tensors")
        for k, v in med.items():
            print(f"  {k:14s} {v:12.1f} us")
        print(f"  xopt.torch / torch fused {med['xopt.torch'] / med['torch fused']:.3f}x, "
              f"/ torch foreach {med['xopt.torch'] / med['torch foreach']:.3f}x", flush=True)
        del steps
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
