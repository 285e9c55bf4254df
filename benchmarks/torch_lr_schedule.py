"""What a learning rate changed every step (any per-step scheduler) costs xopt.torch's step, beside torch fused's.

AdamW on a 784-64-10 MLP (float32 CPU tensors, grads set once), two param groups (weight decay on the
matrices, none on the biases), one torch thread.  Each round times ``--calls`` steps of each case in turn:
xopt.torch.AdamW and torch.optim.AdamW(fused=True), each with the lr fixed and with every group's lr set to a
new value before each step (what a scheduler's ``step()`` does).  Figures: medians over rounds, microseconds a
step, and each optimizer's time with the lr changed over its time without.

    python benchmarks/torch_lr_schedule.py [--rounds 15] [--calls 200] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import xopt.torch as xt
from xopt.bench.report import commit, machine

from _timing import write_json


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    decay = [p for p in model.parameters() if p.dim() >= 2]
    plain = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.01}, {"params": plain, "weight_decay": 0.0}]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    optimizers = {"xopt.torch": xt.AdamW(_model(), lr=1e-3),
                  "torch fused": torch.optim.AdamW(_model(), lr=1e-3, fused=True)}
    count = [0]

    def run(opt, change):
        t0 = time.perf_counter()
        for _ in range(args.calls):
            if change:
                count[0] += 1
                for group in opt.param_groups:
                    group["lr"] = 1e-3 * (1 + count[0] * 1e-7)
            opt.step()
        return (time.perf_counter() - t0) / args.calls * 1e6

    cases = [(name, change) for name in optimizers for change in (False, True)]
    for name, change in cases:  # warm-up
        run(optimizers[name], change)
    times = {case: [] for case in cases}
    for r in range(args.rounds):
        for name, change in cases[r % len(cases):] + cases[:r % len(cases)]:
            times[name, change].append(run(optimizers[name], change))
    result = {"command": "python benchmarks/torch_lr_schedule.py " + " ".join(argv or []), "commit": commit(),
              "machine": machine(), "rounds": args.rounds, "calls": args.calls, "median_us": {}, "lr_changed_over_fixed": {}}
    for name in optimizers:
        fixed, changed = statistics.median(times[name, False]), statistics.median(times[name, True])
        result["median_us"][name] = {"lr fixed": fixed, "lr changed each step": changed}
        result["lr_changed_over_fixed"][name] = changed / fixed
        print(f"{name:12s} lr fixed {fixed:7.1f} us   lr changed each step {changed:7.1f} us   ({changed / fixed:.2f}x)")
    if args.out:
        write_json(result, args.out)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
