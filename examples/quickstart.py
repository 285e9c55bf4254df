"""The README's example: linear regression with a dict of params, trained by xopt's Adam.

    python examples/quickstart.py
"""

import numpy as np

from xopt import Adam

rng = np.random.default_rng(0)
x, t = rng.standard_normal((100, 3)), rng.standard_normal((100, 1))
params = {"W": np.zeros((3, 1)), "b": np.zeros(1)}
optimizer = Adam(lr=0.1)
for i in range(200):
    err = x @ params["W"] + params["b"] - t
    grads = {"W": 2 * x.T @ err / len(x), "b": 2 * err.mean(0)}
    optimizer.update(params, grads)  # in place: params["W"] is the same array
print(f"mean squared error after {optimizer.iter} steps: {float((err**2).mean()):.4f}")
