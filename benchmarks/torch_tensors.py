"""xopt on torch CPU tensors against torch.optim.Adam (fused and foreach) on the same nets: the step alone.

Three float32 MLPs: about 50 k params (784-64-10), about 4.5 M (1024-2048-1024-256-10 with biases) and
about 5.8 M (784-2048-2048-10).  Grads are
set once; each timed call is ``opt.update(params, grads)`` (xopt: a dict of the net's parameters and one of
their grads, made once) or ``step()`` (torch).  Rounds interleave the three, each ``--calls`` timed calls after
a warm-up; figures are medians in microseconds and ratios of medians from this run.  Before timing, 5 steps of
each on float64 copies of the net check xopt's numbers against torch's foreach Adam.

    python benchmarks/torch_tensors.py [--rounds 15] [--calls 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import xopt

NETS = {"50k params (784-64-10)": [784, 64, 10], "4.5M params (1024-2048-1024-256-10)": [1024, 2048, 1024, 256, 10],
        "5.8M params (784-2048-2048-10)": [784, 2048, 2048, 10]}


def mlp(widths, dtype):
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1]).to(dtype)


def with_grads(net, seed):
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    return net


def check(widths):
    """The largest difference between xopt's and torch's Adam after 5 float64 steps (several grads)."""
    torch.manual_seed(0)
    a = mlp(widths, torch.float64)
    b = copy.deepcopy(a)
    ours = xopt.Adam(lr=1e-3, eps=1e-8, eps_hat=False, weight_decay=0.0)
    theirs = torch.optim.Adam(b.parameters(), lr=1e-3, eps=1e-8, foreach=True)
    for step in range(5):
        with_grads(a, step), with_grads(b, step)
        ours.update(dict(a.named_parameters()), {k: p.grad for k, p in a.named_parameters()})
        theirs.step()
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "xopt_threads": xopt.get_num_threads(),
              "nets": {}}
    for name, widths in NETS.items():
        torch.manual_seed(0)
        nets = {k: with_grads(mlp(widths, torch.float32), 1) for k in ("xopt", "torch fused", "torch foreach")}
        n_params = sum(p.numel() for p in nets["xopt"].parameters())
        params = dict(nets["xopt"].named_parameters())
        grads = {k: p.grad for k, p in params.items()}
        ours = xopt.Adam(lr=1e-3, eps=1e-8, eps_hat=False)
        steps = {"xopt": lambda: ours.update(params, grads),
                 "torch fused": torch.optim.Adam(nets["torch fused"].parameters(), lr=1e-3, fused=True).step,
                 "torch foreach": torch.optim.Adam(nets["torch foreach"].parameters(), lr=1e-3, foreach=True).step}
        times = {k: [] for k in steps}
        for _ in range(3):
            for f in steps.values():
                f()
        for r in range(args.rounds):
            order = list(steps)[r % 3:] + list(steps)[:r % 3]
            for k in order:
                for _ in range(args.calls):
                    t = time.perf_counter()
                    steps[k]()
                    times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        report["nets"][name] = {"params": n_params, "tensors": len(params), "median_us": med,
                                "xopt / torch fused": med["xopt"] / med["torch fused"],
                                "xopt / torch foreach": med["xopt"] / med["torch foreach"],
                                "float64 max |xopt - torch| after 5 steps": check(widths)}
        print(f"{name}: {n_params} params, {len(params)} tensors")
        for k, v in med.items():
            print(f"  {k:14s} {v:10.1f} us")
        print(f"  xopt / torch fused {med['xopt'] / med['torch fused']:.2f}x, xopt / torch foreach "
              f"{med['xopt'] / med['torch foreach']:.2f}x; float64 check: "
              f"{report['nets'][name]['float64 max |xopt - torch| after 5 steps']:.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
