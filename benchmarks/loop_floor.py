"""How far below the seed's update a fused update can go in the book's training loop: its floor.

In the loop of ``xopt-bench --scenario loop`` (the book's MultiLayerNet, 10 float64 tensors, 37,810
params; a forward and a backward pass with OpenBLAS matmuls before each update), this times the
update call of:

- ``seed``: the seed's code (the book's ``common/optimizer.py``);
- ``xopt``: xopt's default path (``impl="auto"``: the exact-type lane);
- ``xopt kernel alone``: the engine call xopt's step ends in (``fused_cpu.step``: its lists of buffers, one
  compiled call that checks every array, then the element loop over all tensors), with the scalars computed
  once by the caller and none of the lane's own work: what xopt would cost if gathering a step were free;
- ``bare loop`` (SGD only): a numba loop ``p[i] -= lr * g[i]`` over the 10 tensors, no checks at all.

The last two are not safe to use (they trust their caller); they are here to show where the time goes.
``xopt kernel alone`` computes its scalars once: right for optimizers whose scalars do not change from
step to step (SGD after its first, Momentum, AdaGrad); for Adam it would time the same work with stale scalars.
Every case trains its own copy of the net; rounds rotate through the cases (medians over rounds of the
mean per block).  Prints a table, writes JSON with --out.

    python benchmarks/loop_floor.py [--optimizers SGD,Momentum,AdaGrad] [--rounds 21] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import numba
import numpy as np

import xopt
from xopt.bench import loop, seed
from xopt.bench.report import commit
from xopt.engines import fused_cpu

NET = loop.NETS["book"]


def _trainer(update):
    rng = np.random.default_rng(0)
    return loop.Trainer(NET, loop.init_params(NET, rng), loop.make_batches(NET, rng), update)


@numba.njit(nogil=True, cache=True)
def _bare_sgd(ps, gs, lr):
    for t in range(len(ps)):
        p, g = ps[t], gs[t]
        for i in range(p.shape[0]):
            p[i] -= lr * g[i]


def _kernel_alone(trainer, optimizer):
    """An update that hands the engine the step's lists with scalars computed once: its one compiled call."""
    opt = getattr(xopt, optimizer)()
    trainer.update = opt.update
    trainer.run(3)  # the state exists
    kind = fused_cpu.kind(opt, np.dtype(np.float64))
    states = list(opt.state.values())
    values = [kind.order(opt.scalars(states[0]["step"] + 1))]  # steady for these optimizers
    steps = [st["step"] for st in states]

    def update(params, grads):
        if fused_cpu.step(opt, kind, [opt], values, list(params.values()), list(grads.values()), states, steps,
                          None, _no_commit) is None:
            raise RuntimeError("loop_floor: the engine declined a step (nothing written): the timing would be void")
    return update


def _no_commit(norm, skipped):
    return []  # the step counts stay: the scalars above are computed once


def cases(optimizer):
    out = {"seed": _trainer(getattr(seed, optimizer)().update), "xopt": _trainer(getattr(xopt, optimizer)().update)}
    alone = _trainer(None)
    alone.update = _kernel_alone(alone, optimizer)
    out["xopt kernel alone"] = alone
    if optimizer == "SGD":
        def bare(params, grads):
            _bare_sgd(tuple(a.reshape(-1) for a in params.values()), tuple(a.reshape(-1) for a in grads.values()),
                      0.01)
        out["bare loop"] = _trainer(bare)
    for t in out.values():
        t.run(3)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", default="SGD,Momentum,AdaGrad")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--block", type=int, default=20, help="iterations per case per round")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = []
    for optimizer in args.optimizers.split(","):
        trainers = cases(optimizer)
        times = {k: [] for k in trainers}
        names = list(trainers)
        for r in range(args.rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                update_s, _ = trainers[k].run(args.block)
                times[k].append(update_s / args.block * 1e6)
        seed_us = statistics.median(times["seed"])
        for k, v in times.items():
            us = statistics.median(v)
            rows.append({"optimizer": optimizer, "case": k, "update_us": us, "vs_seed": us / seed_us,
                         "q1_us": statistics.quantiles(v, n=4)[0], "q3_us": statistics.quantiles(v, n=4)[2]})
            print(f"{optimizer:9s} {k:18s} {us:7.1f} us  ({us / seed_us:.2f} of the seed's time)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python benchmarks/loop_floor.py " + " ".join(argv or []), "commit": commit(), "net": NET.label,
                       "machine": platform.machine(), "rounds": args.rounds, "block": args.block, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
