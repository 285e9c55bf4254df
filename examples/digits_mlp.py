"""A two-layer network in the seed's style, trained on scikit-learn's digits with every optimizer.

The network is a dict ``W1, b1, W2, b2``; forward and backward are array-API code, so the same script runs
on NumPy or, with ``--device gpu``, on CuPy.  The data (1,797 8x8 images) ship with scikit-learn: nothing
is downloaded.  Writes a PNG of the training-loss curves; the last line names the best test accuracy.

    python examples/digits_mlp.py [--epochs 40] [--device cpu|gpu] [--out digits_loss.png]
"""

import argparse
import time

import numpy as np
from array_api_compat import array_namespace

import xopt

OPTIMIZERS = {
    "SGD": lambda: xopt.SGD(lr=0.1),
    "Momentum": lambda: xopt.Momentum(lr=0.05),
    "Nesterov": lambda: xopt.Nesterov(lr=0.05),
    "AdaGrad": lambda: xopt.AdaGrad(lr=0.05),
    "RMSprop": lambda: xopt.RMSprop(lr=0.002),
    "Adam": lambda: xopt.Adam(lr=0.002),
    "AdamW": lambda: xopt.AdamW(lr=0.002),
    "Lion": lambda: xopt.Lion(lr=1e-3),
    "LAMB": lambda: xopt.LAMB(lr=0.01),
    "Adafactor": lambda: xopt.Adafactor(lr=0.01),
    "Muon": lambda: xopt.Muon(lr=0.005, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"),  # AdamW for b1, b2
    "ScheduleFreeAdamW": lambda: xopt.ScheduleFreeAdamW(lr=0.005, warmup_steps=50),
}


def init_params(xp, rng, n_in, n_hidden, n_out, device):
    """He initialisation, as the seed's book does for ReLU layers."""
    def arr(a):
        return xp.asarray(a, dtype=xp.float32, device=device)

    return {
        "W1": arr(rng.standard_normal((n_in, n_hidden)) * np.sqrt(2.0 / n_in)),
        "b1": arr(np.zeros(n_hidden)),
        "W2": arr(rng.standard_normal((n_hidden, n_out)) * np.sqrt(2.0 / n_hidden)),
        "b2": arr(np.zeros(n_out)),
    }


def loss_and_grads(params, x, t):
    """Softmax cross-entropy of a ReLU layer and a linear layer; t one-hot.  Returns (loss, grads)."""
    xp = array_namespace(x)
    a1 = x @ params["W1"] + params["b1"]
    z1 = xp.maximum(a1, 0.0)
    a2 = z1 @ params["W2"] + params["b2"]
    a2 = a2 - xp.max(a2, axis=1, keepdims=True)
    e = xp.exp(a2)
    y = e / xp.sum(e, axis=1, keepdims=True)
    n = x.shape[0]
    loss = -xp.sum(t * xp.log(y + 1e-7)) / n
    dy = (y - t) / n
    dz1 = (dy @ params["W2"].T) * xp.astype(a1 > 0, x.dtype)
    grads = {"W1": x.T @ dz1, "b1": xp.sum(dz1, axis=0), "W2": z1.T @ dy, "b2": xp.sum(dy, axis=0)}
    return float(loss), grads


def accuracy(params, x, labels):
    xp = array_namespace(x)
    a2 = xp.maximum(x @ params["W1"] + params["b1"], 0.0) @ params["W2"] + params["b2"]
    return float(xp.mean(xp.astype(xp.argmax(a2, axis=1) == labels, xp.float32)))


def load(xp, device, seed=0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0
    labels = digits.target
    order = np.random.default_rng(seed).permutation(len(x))
    x, labels = x[order], labels[order]
    cut = int(0.8 * len(x))
    onehot = np.eye(10, dtype=np.float32)[labels]

    def arr(a):
        return xp.asarray(a, device=device)

    return (arr(x[:cut]), arr(onehot[:cut]), arr(labels[:cut])), (arr(x[cut:]), arr(labels[cut:]))


def train(name, xp, device, data, epochs, batch, seed=0):
    (x, t, _), (x_test, l_test) = data
    rng = np.random.default_rng(seed)
    params = init_params(xp, rng, 64, 100, 10, device)
    optimizer = OPTIMIZERS[name]()
    losses = []
    n = x.shape[0]
    for _ in range(epochs):
        order = xp.asarray(rng.permutation(n), device=device)
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            loss, grads = loss_and_grads(params, xp.take(x, idx, axis=0), xp.take(t, idx, axis=0))
            optimizer.update(params, grads)
            losses.append(loss)
    if hasattr(optimizer, "eval"):
        optimizer.eval(params)  # Schedule-Free: evaluate at x, the average, not at y where it stepped
    return losses, accuracy(params, x_test, l_test)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--out", default="digits_loss.png")
    args = ap.parse_args(argv)
    if args.device == "gpu":
        import cupy

        xp = array_namespace(cupy.empty(0))
    else:
        xp = array_namespace(np.empty(0))
    device = None
    data = load(xp, device)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    results = {}
    t0 = time.perf_counter()
    for name in args.optimizers.split(","):
        losses, acc = train(name, xp, device, data, args.epochs, args.batch)
        results[name] = acc
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(smooth, label=f"{name} (test accuracy {acc:.3f})")
        print(f"{name:<17} final training loss {np.mean(losses[-window:]):.4f}  test accuracy {acc:.4f}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (moving average)")
    ax.set_yscale("log")
    ax.set_title(f"digits, 64-100-10 ReLU network, {args.epochs} epochs, batch {args.batch}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.1f} s)")
    best = max(results, key=results.get)
    print(f"best test accuracy: {results[best]:.4f} ({best})")


if __name__ == "__main__":
    main()
