"""How far 8-bit state takes a run from float32 state: each optimizer on a noisy quadratic, both ways.

One float32 param of 8192 elements, f(w) = Σ c_i (w_i - t_i)² / 2 with curvatures c over two decades, grads
with N(0, 0.1²) noise (the same draws both ways), 300 steps from w = 0.  For each optimizer the largest distance
between the two runs' params over the steps (relative to the float32-state run's norm) and both final losses go
to ``benchmarks/results/state-8bit-parity.json``.  ``tests/test_state_8bit_optimizers.py`` holds the same problem
to a bound.

    python benchmarks/state_8bit_parity.py [--steps 300] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

import xopt

CASES = {  # an lr at which the float32-state run gets most of the way down in 300 steps (Lion: two, and beta2 0.9)
    "SGD(momentum=0.9)": (xopt.SGD, dict(lr=0.02, momentum=0.9)),
    "SGD(momentum=0.9, nesterov)": (xopt.SGD, dict(lr=0.02, momentum=0.9, nesterov=True)),
    "Momentum": (xopt.Momentum, dict(lr=0.02)),
    "Nesterov": (xopt.Nesterov, dict(lr=0.02)),
    "AdaGrad": (xopt.AdaGrad, dict(lr=0.3)),
    "RMSprop": (xopt.RMSprop, dict(lr=0.01)),
    "RMSprop(momentum=0.5)": (xopt.RMSprop, dict(lr=3e-3, momentum=0.5)),
    "Adam": (xopt.Adam, dict(lr=0.03)),
    "Lion(lr=0.01)": (xopt.Lion, dict(lr=0.01)),
    "Lion(lr=0.03)": (xopt.Lion, dict(lr=0.03)),
    "Lion(lr=0.01, beta2=0.9)": (xopt.Lion, dict(lr=0.01, beta2=0.9)),
}


def run(cls, hyper, state_dtype, steps, n=8192):
    rng = np.random.default_rng(0)
    c = np.exp(rng.uniform(np.log(0.1), np.log(10.0), n)).astype(np.float32)
    target = rng.standard_normal(n).astype(np.float32)
    noise = np.random.default_rng(1)
    opt, params = cls(state_dtype=state_dtype, **hyper), {"w": np.zeros(n, np.float32)}
    path = []
    for _ in range(steps):
        g = c * (params["w"] - target) + 0.1 * noise.standard_normal(n).astype(np.float32)
        opt.update(params, {"w": g})
        path.append(params["w"].copy())
    loss = lambda w: float(0.5 * np.sum(c * (w - target) ** 2))  # noqa: E731
    return path, loss(params["w"]), loss(np.zeros(n, np.float32))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "state-8bit-parity.json"))
    a = ap.parse_args()
    rows = {}
    for name, (cls, hyper) in CASES.items():
        (exact, loss, start), (eight, loss8, _) = (run(cls, hyper, sd, a.steps) for sd in (None, "8bit"))
        apart = max(float(np.linalg.norm(x - y) / np.linalg.norm(x)) for x, y in zip(exact, eight))
        rows[name] = {"hyperparameters": hyper, "start_loss": start, "final_loss_float32": loss,
                      "final_loss_8bit": loss8, "max_relative_distance": apart}
        print(f"{name:30s} loss {start:.0f} -> float32 {loss:.4g}, 8-bit {loss8:.4g} ({loss8 / loss:.2f}x); "
              f"largest distance {100 * apart:.1f} %", flush=True)
    path = pathlib.Path(a.out)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"command": f"python benchmarks/state_8bit_parity.py --steps {a.steps}",
                                "cases": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
