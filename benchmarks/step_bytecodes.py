"""How much Python one small ``update`` runs, in one checkout against another: bytecodes and Python calls.

A count, not a time: the same on a loaded machine as on a quiet one, so it shows what a change to the step's
Python does where timings of a few microseconds drown in noise (``benchmarks/call_overhead.py`` times the same
cases).  Each checkout runs in its own process; after 5 warm-up updates, one update of each case runs under
``sys.settrace`` with opcode events, counting every bytecode executed and every Python function called (C
functions, numba's compiled code included, count nothing).

    git worktree add /tmp/base <commit>
    python benchmarks/step_bytecodes.py /tmp/base . [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np, xopt

assert xopt.__file__.startswith(sys.argv[1].rstrip("/")) or sys.argv[1] == ".", xopt.__file__


def count(opt, params, grads):
    return count_call(lambda: opt.update(params, grads))


def count_call(f):
    for _ in range(5):
        f()
    n = {"bytecodes": 0, "python_calls": 0}

    def trace(frame, event, arg):
        frame.f_trace_opcodes = True
        if event == "call":
            n["python_calls"] += 1
        elif event == "opcode":
            n["bytecodes"] += 1
        return trace

    sys.settrace(trace)
    f()
    sys.settrace(None)
    return n


def arrays(n, size):
    return {f"w{i}": np.zeros(size) for i in range(n)}, {f"w{i}": np.ones(size) for i in range(n)}


out = {
    "SGD, 1 param of 10": count(xopt.SGD(), *arrays(1, 10)),
    "Adam, 1 param of 10": count(xopt.Adam(), *arrays(1, 10)),
    "Adam, 10 params of 100": count(xopt.Adam(), *arrays(10, 100)),
    "Adam clip_grad_norm, 10 params of 100": count(xopt.Adam(clip_grad_norm=1.0), *arrays(10, 100)),
    "SGD, 2 Python floats": count(xopt.SGD(lr=1e-4), {"x": 1.0, "y": 2.0}, {"x": 1.0, "y": 1.0}),
    "SGD, 2 0-d arrays, NumPy-scalar grads": count(xopt.SGD(lr=1e-4), {"x": np.array(1.0), "y": np.array(2.0)},
                                                   {"x": np.float64(1.0), "y": np.float64(1.0)}),
    "Adam overrides, 10 params of 100": count(xopt.Adam(overrides={"w1*": {"lr": 0.1}}), *arrays(10, 100)),
}
try:
    import torch
except ImportError:
    torch = None
if torch is not None:  # torch tensors: xopt.torch's step, update on tensors, and torch's own fused step
    import xopt.torch

    def tensors():
        made = [torch.nn.Parameter(torch.zeros(10)) for _ in range(4)]
        for t in made:
            t.grad = torch.ones(10)
        return made

    ours, theirs, plain = tensors(), tensors(), tensors()
    named = {f"w{i}": t for i, t in enumerate(plain)}
    out["xopt.torch.Adam step, 4 tensors of 10"] = count_call(xopt.torch.Adam(ours, lr=1e-3).step)
    out["update on torch tensors, Adam, 4 of 10"] = count(xopt.Adam(), named, {k: t.grad for k, t in named.items()})
    out["torch.optim.Adam fused step, 4 tensors of 10"] = count_call(torch.optim.Adam(theirs, lr=1e-3, fused=True).step)
print(json.dumps(out))
"""


def run(root):
    done = subprocess.run([sys.executable, "-c", CHILD, root], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="checkout A (the base)")
    ap.add_argument("b", help="checkout B")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    a, b = run(args.a), run(args.b)
    print(f"{'case':42s} {'A bytecodes':>12s} {'B bytecodes':>12s} {'B / A':>6s} {'A calls':>8s} {'B calls':>8s}")
    for case in a:
        print(f"{case:42s} {a[case]['bytecodes']:12d} {b[case]['bytecodes']:12d} "
              f"{b[case]['bytecodes'] / a[case]['bytecodes']:6.2f} {a[case]['python_calls']:8d} {b[case]['python_calls']:8d}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"a": args.a, "b": args.b, "a_counts": a, "b_counts": b}, f, indent=1)


if __name__ == "__main__":
    main()
