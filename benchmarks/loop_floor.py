"""How far below the seed's update a fused update can go in the book's training loop: its floor.

In the loop of ``xopt-bench --scenario loop`` (the book's MultiLayerNet, 10 float64 tensors, 37,810
params; a forward and a backward pass with OpenBLAS matmuls before each update), this times the
update call of:

- ``seed``: the seed's code (the book's ``common/optimizer.py``);
- ``xopt``: xopt's default path (``impl="auto"``: the plan's quick step);
- ``xopt kernel alone``: the same compiled call xopt's step ends in (``Table.run``'s: vouch for every
  array, then the element loop over all tensors), with the grads' ids and the scalars packed by the
  caller and none of the plan's checks: what xopt would cost if its checks were free;
- ``bare loop`` (SGD only): a numba loop ``p[i] -= lr * g[i]`` over the 10 tensors, no checks at all.

The last two are not safe to use (they trust their caller); they are here to show where the time goes.
``xopt kernel alone`` computes its scalars once: right for optimizers whose scalars are steady
(``steady_from()``: SGD, Momentum, AdaGrad); for Adam it would time the same work with stale scalars.
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
    """An update that packs the grads' ids and the kernel's scalars and makes the table's compiled call."""
    opt = getattr(xopt, optimizer)()
    trainer.update = opt.update
    trainer.run(3)  # the plan is built and its table packed
    plan = opt._plan
    table = plan.tables[0][1]
    values = table.scalar_order(opt, opt.scalars(plan.step + 1)) + (1.0,)  # steady for these optimizers

    def update(params, grads):
        table.tail.pack_into(table.packed, table.tail_at, *map(id, grads.values()), *values)
        if fused_cpu._serial_step(table.rule, fused_cpu._OFFSETS, table.packed, *table.counts, False, 0, table.s,
                                  fused_cpu._BITS):
            raise RuntimeError("loop_floor: the table declined a step (nothing written): the timing would be void")
    return update


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
