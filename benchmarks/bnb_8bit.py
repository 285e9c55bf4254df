"""xopt's 8-bit Adam beside bitsandbytes' (``bnb.optim.Adam8bit``) on the CPU: step time, state bytes, trajectories.

Both keep Adam's m and v as uint8 codes with a float32 absmax per block of 256 (bitsandbytes on its dynamic
maps, xopt on its own: ``docs/training.md``), tensors under 4,096 elements in float32.  Two parts:

- speed: one float32 param of ``--sizes`` elements, a step of xopt's 8-bit Adam, xopt's float32-state Adam,
  bitsandbytes' Adam8bit and torch's fused Adam (CPU tensors), interleaved rounds, medians; the state's bytes
  per param of each 8-bit optimizer.
- trajectories: a noisy quadratic of ``--n`` params (curvatures log-uniform over four decades, a fixed noise
  sequence), ``--steps`` steps of each optimizer from the same start, every one fed the grad of its own params
  with the same noise; the loss along the way and each final param vector's distance from float32 Adam's
  (torch's), relative to that run's distance travelled.

    pip install bitsandbytes   # 0.50: CPU 8-bit optimizers
    python benchmarks/bnb_8bit.py [--sizes 2^22,2^25] [--rounds 9] [--n 65536] [--steps 500] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

import xopt

LR, BETAS, EPS = 1e-2, (0.9, 0.999), 1e-8


def _int(text):
    text = text.replace("^", "**")
    if "**" in text:
        base, exp = text.split("**")
        return int(base) ** int(exp)
    return int(text)


def bnb():
    import bitsandbytes

    return bitsandbytes


def state_bytes_bnb(opt, param):
    return sum(v.numel() * v.element_size() for k, v in opt.state[param].items()
               if torch.is_tensor(v) and k != "step" and not k.startswith("qmap"))


def state_bytes_xopt(opt, key):
    return sum(v.nbytes for name, v in opt.state[key].items() if name != "step" and hasattr(v, "nbytes"))


def speed(n, rounds):
    """Median ms of a step of each, and the 8-bit optimizers' state bytes per param."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n).astype(np.float32)
    g0 = rng.standard_normal(n).astype(np.float32)
    steps = {}
    states = {}
    for name, kwargs in (("xopt 8-bit", {"state_dtype": "8bit"}), ("xopt float32 state", {})):
        params, grads = {"w": p0.copy()}, {"w": g0.copy()}
        opt = xopt.Adam(lr=LR, **kwargs)
        steps[name] = (lambda o=opt, p=params, g=grads: o.update(p, g))
        if kwargs:
            opt.update(params, grads)
            states[name] = state_bytes_xopt(opt, "w") / n
    for name, make in (("bitsandbytes Adam8bit", lambda ps: bnb().optim.Adam8bit(ps, lr=LR, betas=BETAS, eps=EPS)),
                       ("torch fused Adam", lambda ps: torch.optim.Adam(ps, lr=LR, betas=BETAS, eps=EPS, fused=True))):
        t = torch.nn.Parameter(torch.from_numpy(p0.copy()))
        t.grad = torch.from_numpy(g0.copy())
        opt = make([t])
        steps[name] = opt.step
        if "bitsandbytes" in name:
            opt.step()
            states[name] = state_bytes_bnb(opt, t) / n
    names = list(steps)
    for name in names:
        steps[name]()
        steps[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    return {"elements": n, "median_ms": ms, "state_bytes_per_param": states,
            "xopt 8-bit / bitsandbytes": ms["xopt 8-bit"] / ms["bitsandbytes Adam8bit"],
            "xopt 8-bit / torch fused": ms["xopt 8-bit"] / ms["torch fused Adam"],
            "xopt 8-bit / xopt float32 state": ms["xopt 8-bit"] / ms["xopt float32 state"]}


def trajectories(n, steps, noise=1.0):
    """Loss along ``steps`` steps of each optimizer on the same noisy quadratic, and the final params' distance
    from float32 Adam's (torch's)."""
    rng = np.random.default_rng(1)
    h = np.exp(rng.uniform(np.log(1e-2), np.log(1e2), n)).astype(np.float32)
    target = rng.standard_normal(n).astype(np.float32)
    start = np.zeros(n, np.float32)
    noises = np.random.default_rng(2)
    noise_seq = [noise * noises.standard_normal(n).astype(np.float32) for _ in range(steps)]

    def loss(p):
        return float(0.5 * np.mean(h * (p.astype(np.float64) - target) ** 2))

    def grad(p, k):
        return (h * (p - target) + noise_seq[k]).astype(np.float32)

    marks = sorted({0, 10, 50, 100, steps // 2, steps})
    runs = {}

    def torch_run(name, make):
        t = torch.nn.Parameter(torch.from_numpy(start.copy()))
        opt = make([t])
        curve = {0: loss(t.detach().numpy())}
        for k in range(steps):
            t.grad = torch.from_numpy(grad(t.detach().numpy(), k))
            opt.step()
            if k + 1 in marks:
                curve[k + 1] = loss(t.detach().numpy())
        runs[name] = (t.detach().numpy().copy(), curve)

    def xopt_run(name, **kwargs):
        params = {"w": start.copy()}
        opt = xopt.Adam(lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, eps_hat=False, **kwargs)  # torch's Adam
        curve = {0: loss(params["w"])}
        for k in range(steps):
            opt.update(params, {"w": grad(params["w"], k)})
            if k + 1 in marks:
                curve[k + 1] = loss(params["w"])
        runs[name] = (params["w"].copy(), curve)

    torch_run("torch Adam (float32 state)", lambda ps: torch.optim.Adam(ps, lr=LR, betas=BETAS, eps=EPS, foreach=False))
    torch_run("bitsandbytes Adam8bit", lambda ps: bnb().optim.Adam8bit(ps, lr=LR, betas=BETAS, eps=EPS))
    xopt_run("xopt Adam (float32 state)")
    xopt_run("xopt Adam 8-bit", state_dtype="8bit")
    ref = runs["torch Adam (float32 state)"][0]
    travelled = float(np.linalg.norm(ref - start))
    out = {"n": n, "steps": steps, "lr": LR, "noise": noise, "loss": {}, "distance_from_float32_relative": {}}
    for name, (p, curve) in runs.items():
        out["loss"][name] = {str(k): v for k, v in curve.items()}
        out["distance_from_float32_relative"][name] = float(np.linalg.norm(p - ref)) / travelled
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2^22")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2, help="torch's threads (xopt uses the machine's cores)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"command": "python benchmarks/bnb_8bit.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "bitsandbytes": bnb().__version__, "torch": torch.__version__, "numpy": np.__version__,
              "torch_threads": args.threads, "speed": [], "trajectories": None}
    for n in map(_int, args.sizes.split(",")):
        row = speed(n, args.rounds)
        result["speed"].append(row)
        print(f"{n} elements: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row["median_ms"].items()))
        print(f"  xopt 8-bit / bitsandbytes {row['xopt 8-bit / bitsandbytes']:.3f}, / torch fused "
              f"{row['xopt 8-bit / torch fused']:.2f}, / xopt float32 state {row['xopt 8-bit / xopt float32 state']:.2f};"
              f" state bytes per param: " + ", ".join(f"{k} {v:.3f}" for k, v in row["state_bytes_per_param"].items()))
    tr = trajectories(args.n, args.steps)
    result["trajectories"] = tr
    for name, curve in tr["loss"].items():
        print(f"{name:28s} loss " + " ".join(f"{k}:{v:.4g}" for k, v in curve.items())
              + f"  distance from float32 / travelled {tr['distance_from_float32_relative'][name]:.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
