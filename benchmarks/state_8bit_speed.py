"""One float32 param of 2^25 elements: a step with 8-bit state vs with xopt's float32 state, per optimizer (Adam,
Lion, RMSprop, AdaGrad, SGD with momentum), and torch.optim.Adam(fused=True).

Interleaved rounds after a warm-up; each round times every contender once, in an order rotated from round to
round, each after an untimed step of its own (torch's OpenMP threads spin after its step); the medians and the ratios 8-bit /
float32 of each optimizer go to ``benchmarks/results/state-8bit-speed.json``, with the state bytes per param.

    taskset -c 1 python benchmarks/state_8bit_speed.py            # one core
    taskset -c 1 python benchmarks/state_8bit_speed.py --clock thread --optimizers Adam   # CPU time of the thread
    python benchmarks/state_8bit_speed.py --rounds 15 --threads 2 --optimizers Adam,Lion
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import numpy as np
import torch

import xopt
from xopt.bench.report import machine

OPTIMIZERS = {  # what each optimizer runs with
    "Adam": (xopt.Adam, dict(lr=1e-3, eps_hat=False, eps=1e-8)),
    "Lion": (xopt.Lion, dict(lr=1e-4)),
    "RMSprop": (xopt.RMSprop, dict(lr=1e-3)),
    "AdaGrad": (xopt.AdaGrad, dict(lr=1e-2)),
    "SGD": (xopt.SGD, dict(lr=1e-2, momentum=0.9)),
}


def state_bytes(opt, key) -> int:
    return sum(b.nbytes for n, b in opt.state[key].items() if n != "step")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--log2", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="thread: the calling thread's CPU time (one thread), less moved by other work on the machine")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "state-8bit-speed.json"))
    a = ap.parse_args()
    xopt.set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    n = 1 << a.log2
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 1e-2).astype(np.float32)
    names = a.optimizers.split(",")
    runs = {}
    for name in names:
        cls, hyper = OPTIMIZERS[name]
        for state, kw in (("8bit", dict(state_dtype="8bit")), ("float32", {})):
            params = {"w": p0.copy()}
            opt = cls(impl="fused", **hyper, **kw)
            runs[f"{name} {state}"] = (lambda o=opt, p=params: o.update(p, {"w": g}), lambda o=opt: state_bytes(o, "w"))
    if "Adam" in names:
        tp, tg = torch.from_numpy(p0.copy()), torch.from_numpy(g)
        tp.grad = tg
        topt = torch.optim.Adam([tp], lr=1e-3, fused=True)
        runs["torch Adam fused"] = (topt.step, lambda: sum(v.nbytes for k, v in topt.state[tp].items() if k != "step"))
    for step, _ in runs.values():  # warm-up: compile, load, make the state
        step(); step()
    clock = time.thread_time if a.clock == "thread" else time.perf_counter
    times = {k: [] for k in runs}
    order = list(runs)
    for r in range(a.rounds):
        for k in order[r % len(order):] + order[:r % len(order)]:  # rotated: none always follows torch's threads
            step = runs[k][0]
            step()  # untimed: what ran before (torch's spinning OpenMP threads) settles
            t0 = clock()
            step()
            times[k].append(clock() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "command": f"python benchmarks/state_8bit_speed.py --log2 {a.log2} --rounds {a.rounds} --threads {a.threads} "
                   f"--optimizers {a.optimizers} --clock {a.clock}",
        "elements": n, "threads": a.threads, "machine": machine(),
        "hyperparameters": {name: OPTIMIZERS[name][1] for name in names},
        "clock": a.clock,
        "median_ms": {k: v * 1e3 for k, v in med.items()},
        "min_ms": {k: min(v) * 1e3 for k, v in times.items()},
        "ratio_8bit_to_float32": {name: med[f"{name} 8bit"] / med[f"{name} float32"] for name in names},
        "state_bytes_per_param": {k: size() / n for k, (_, size) in runs.items()},
        "all_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
    }
    if "Adam" in names:
        result["ratio_adam_8bit_to_torch_fused"] = med["Adam 8bit"] / med["torch Adam fused"]
    path = pathlib.Path(a.out)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "all_ms"}, indent=1))


if __name__ == "__main__":
    main()
