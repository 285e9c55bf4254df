"""Does 8-bit state train as float32 state does?  Adam (or ``--optimizer``: Lion, RMSprop, AdaGrad, SGD with momentum)
on scikit-learn's digits, float32 vs bfloat16 (Adam only) vs 8-bit state.

Two networks: the digits example's 64-100-10 (``examples/digits_mlp.py``: W1 has 6,400 elements, so its state is
8-bit; W2 and the biases are below ``min_8bit_size`` and keep float32 state) and a wider 64-512-512-10 ReLU MLP
(every weight 8-bit).  Three seeds each (the seed sets the initial weights and the batch order; the data split is
the example's); the final training loss (the mean over the last epoch) and the test accuracy, side by side, to
``benchmarks/results/state-8bit-accuracy.json``.

    python benchmarks/state_8bit_accuracy.py [--epochs 40] [--seeds 0,1,2]

``--maps NAME`` runs the 8-bit state on other maps, through the reference rule (the fused kernel computes the
state's own maps only): ``dynamic`` (bitsandbytes'), ``e4m3/e4m4`` (v with 4 fraction bits, 2^-18 .. 1),
``pow2/pow2`` and ``pow2/pow4`` (m as ``sign(q) (|q|/127)^2``, v as ``(q/255)^2`` or ``^4``); ``--nets`` and
``--states`` pick some of the rows, e.g. the comparison of maps in docs/training.md:

    python benchmarks/state_8bit_accuracy.py --maps dynamic --nets wide-64-512-512-10 --states 8bit --out ...
    python benchmarks/state_8bit_accuracy.py --optimizer Lion --nets wide-64-512-512-10 --states float32,8bit --out ...
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

import xopt
from xopt.engines import blockwise

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
from digits_mlp import load  # noqa: E402  (the example's data and split)

STATES = {"float32": None, "bfloat16": "bfloat16", "8bit": "8bit"}
NETS = {"digits-64-100-10": (64, 100, 10), "wide-64-512-512-10": (64, 512, 512, 10)}
OPTIMIZERS = {  # each with an lr that trains the nets well with float32 state
    "Adam": (xopt.Adam, dict(lr=0.002)),
    "Lion": (xopt.Lion, dict(lr=2e-4)),
    "RMSprop": (xopt.RMSprop, dict(lr=1e-3)),
    "AdaGrad": (xopt.AdaGrad, dict(lr=0.02)),
    "SGD": (xopt.SGD, dict(lr=0.05, momentum=0.9)),
}


def power_map(signed, power):
    """256 sorted float32 values: sign(q) (|q| / 127)^power for q in -127..128 (signed), (q / 255)^power (unsigned)."""
    q = np.arange(-127, 129) if signed else np.arange(256)
    return (np.sign(q) * (np.abs(q) / (127.0 if signed else 255.0)) ** power).astype(np.float32)


MAPS = {
    "float": lambda: (blockwise.SIGNED, blockwise.UNSIGNED),
    "dynamic": lambda: (blockwise.dynamic_map(True), blockwise.dynamic_map(False)),
    "e4m3/e4m4": lambda: (blockwise.SIGNED, blockwise.float_map(False, 4, -14)),
    "pow2/pow2": lambda: (power_map(True, 2), power_map(False, 2)),
    "pow2/pow4": lambda: (power_map(True, 2), power_map(False, 4)),
}


def use_maps(name):
    """The 8-bit state's maps (m's, v's) set to those of ``name``; returns the impl to run them with."""
    signed, unsigned = MAPS[name]()
    if signed is blockwise.SIGNED and unsigned is blockwise.UNSIGNED:
        return "auto"
    blockwise.SIGNED, blockwise.UNSIGNED = signed, unsigned  # what map_of hands the reference rule
    return "reference"


def init(rng, sizes):
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"W{i}"] = (rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(np.float32)
        params[f"b{i}"] = np.zeros(b, np.float32)
    return params


def forward(params, x, layers):
    acts = [x]
    for i in range(layers):
        z = acts[-1] @ params[f"W{i}"] + params[f"b{i}"]
        acts.append(np.maximum(z, 0.0) if i < layers - 1 else z)
    return acts


def loss_and_grads(params, x, t, layers):
    acts = forward(params, x, layers)
    a = acts[-1] - acts[-1].max(axis=1, keepdims=True)
    e = np.exp(a)
    y = e / e.sum(axis=1, keepdims=True)
    n = x.shape[0]
    loss = float(-np.sum(t * np.log(y + 1e-7)) / n)
    d = (y - t) / n
    grads = {}
    for i in reversed(range(layers)):
        grads[f"W{i}"] = acts[i].T @ d
        grads[f"b{i}"] = d.sum(axis=0)
        if i:
            d = (d @ params[f"W{i}"].T) * (acts[i] > 0)
    return loss, grads


def run(sizes, state_dtype, seed, data, epochs, batch, impl="auto", optimizer="Adam"):
    (x, t, _), (x_test, l_test) = data
    rng = np.random.default_rng(seed)
    params = init(rng, sizes)
    layers = len(sizes) - 1
    cls, hyper = OPTIMIZERS[optimizer]
    opt = cls(**hyper, state_dtype=state_dtype, impl=impl if state_dtype == "8bit" else "auto")
    n = x.shape[0]
    for _ in range(epochs):
        order = rng.permutation(n)
        losses = []
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            loss, grads = loss_and_grads(params, x[idx], t[idx], layers)
            opt.update(params, grads)
            losses.append(loss)
    accuracy = float(np.mean(np.argmax(forward(params, x_test, layers)[-1], axis=1) == l_test))
    return float(np.mean(losses)), accuracy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--maps", default="float", choices=sorted(MAPS))
    ap.add_argument("--optimizer", default="Adam", choices=list(OPTIMIZERS))
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--states", default=",".join(STATES))
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "state-8bit-accuracy.json"))
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    impl = use_maps(a.maps)
    nets, states = a.nets.split(","), a.states.split(",")
    data = load(np, None)
    results = {"command": f"python benchmarks/state_8bit_accuracy.py --epochs {a.epochs} --batch {a.batch} "
                          f"--seeds {a.seeds} --maps {a.maps} --optimizer {a.optimizer} --nets {a.nets} "
                          f"--states {a.states}",
               "optimizer": f"{a.optimizer}({OPTIMIZERS[a.optimizer][1]})", "maps": a.maps, "nets": {}}
    t0 = time.perf_counter()
    for net in nets:
        sizes = NETS[net]
        table = {}
        for state in states:
            state_dtype = STATES[state]
            runs = [run(sizes, state_dtype, seed, data, a.epochs, a.batch, impl, a.optimizer) for seed in seeds]
            table[state] = {"final_loss": [r[0] for r in runs], "test_accuracy": [r[1] for r in runs],
                            "mean_final_loss": float(np.mean([r[0] for r in runs])),
                            "mean_test_accuracy": float(np.mean([r[1] for r in runs]))}
            print(f"{net:<20} {state:<9} loss {table[state]['mean_final_loss']:.4g}  "
                  f"accuracy {table[state]['mean_test_accuracy']:.4f}  {[round(r[1], 4) for r in runs]}", flush=True)
        base = table.get("float32")
        for state in ("bfloat16", "8bit"):
            if base is None or state not in table:
                continue
            table[state]["accuracy_minus_float32_pp"] = 100 * (table[state]["mean_test_accuracy"]
                                                               - base["mean_test_accuracy"])
            table[state]["loss_over_float32"] = table[state]["mean_final_loss"] / base["mean_final_loss"]
        results["nets"][net] = table
    results["seconds"] = time.perf_counter() - t0
    path = pathlib.Path(a.out)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
