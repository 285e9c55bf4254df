"""The path of every optimizer on f(x, y) = x**2 / 20 + y**2 from (-7, 2): one panel each, contours drawn in.

The seed's comments describe this picture: SGD zigzags across the narrow valley, Momentum rolls like a
ball, AdaGrad damps its steps, Adam does a little of both.

    python examples/optimizer_paths.py [--steps 30] [--out optimizer_paths.png]
"""

import argparse

import numpy as np

import xopt

# The learning rates of the book's picture (ch. 6), and the same for the optimizers it has not.
OPTIMIZERS = {
    "SGD": xopt.SGD(lr=0.95),
    "Momentum": xopt.Momentum(lr=0.1),
    "Nesterov": xopt.Nesterov(lr=0.1),
    "AdaGrad": xopt.AdaGrad(lr=1.5),
    "RMSprop": xopt.RMSprop(lr=0.1),
    "Adam": xopt.Adam(lr=0.3),
    "AdamW": xopt.AdamW(lr=0.3, weight_decay=0.01),
    "AdaDelta": xopt.AdaDelta(lr=100.0, rho=0.95),  # its steps start at sqrt(eps) = 1e-3 times the gradient's
    "Adamax": xopt.Adamax(lr=0.3),
    "NAdam": xopt.NAdam(lr=0.3),
    "RAdam": xopt.RAdam(lr=0.5),  # SGD with momentum for its first 5 steps, then Adam rectified
    "Lion": xopt.Lion(lr=0.3),  # every coordinate moves by exactly lr each step
}


def f(x, y):
    return x**2 / 20.0 + y**2


def grad(x, y):
    return x / 10.0, 2.0 * y


def path(optimizer, steps):
    params = {"x": np.array(-7.0), "y": np.array(2.0)}  # 0-d arrays, updated in place
    points = [(float(params["x"]), float(params["y"]))]
    for _ in range(steps):
        gx, gy = grad(params["x"], params["y"])
        optimizer.update(params, {"x": gx, "y": gy})
        points.append((float(params["x"]), float(params["y"])))
    return np.array(points)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="optimizer_paths.png")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = np.meshgrid(np.linspace(-10, 10, 200), np.linspace(-5, 5, 200))
    rows = -(-len(OPTIMIZERS) // 4)
    fig, axes = plt.subplots(rows, 4, figsize=(16, 3.5 * rows))
    for ax, (name, optimizer) in zip(axes.flat, OPTIMIZERS.items()):
        pts = path(optimizer, args.steps)
        ax.contour(xs, ys, f(xs, ys), levels=np.geomspace(0.05, 30, 12), colors="0.75", linewidths=0.8)
        ax.plot(pts[:, 0], pts[:, 1], "o-", color="tab:red", markersize=3, linewidth=1)
        ax.plot(0, 0, "+", color="k", markersize=10)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-5, 5)
        ax.set_title(f"{name}: f = {f(*pts[-1]):.2g} after {args.steps} steps", fontsize=10)
        print(f"{name:<9} ends at ({pts[-1, 0]:+.4f}, {pts[-1, 1]:+.4f}), f = {f(*pts[-1]):.3g}")
    for ax in axes.flat[len(OPTIMIZERS):]:
        ax.axis("off")
    fig.suptitle("f(x, y) = x²/20 + y² from (-7, 2)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
