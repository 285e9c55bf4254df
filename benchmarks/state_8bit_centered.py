"""Why ``RMSprop(centered=True)`` refuses ``state_dtype="8bit"``: the step divides by √(h − ḡ²), and h and ḡ
rounded each on its own make h − ḡ² negative where the variance is small against the mean.

RMSprop(lr=1e-3, centered=True) with the refusal lifted (a subclass), one float32 param of 5,120 elements, grads
``scale * (1 + 0.01 * noise)`` with a per-element scale in [0.1, 1], 300 steps: how many params are NaN, and from
which step, with float32 state and with 8-bit state.

    python benchmarks/state_8bit_centered.py
"""

from __future__ import annotations

import numpy as np

import xopt


class Unchecked(xopt.RMSprop):
    def _check_hyperparameters(self):
        pass


def main():
    rng = np.random.default_rng(0)
    n = 5120
    scale = rng.uniform(0.1, 1, n).astype(np.float32)
    for state_dtype in (None, "8bit"):
        opt, params = Unchecked(lr=1e-3, centered=True, state_dtype=state_dtype), {"w": np.zeros(n, np.float32)}
        first = None
        with np.errstate(all="ignore"):
            for t in range(300):
                opt.update(params, {"w": scale * (1 + 0.01 * rng.standard_normal(n).astype(np.float32))})
                if first is None and np.isnan(params["w"]).any():
                    first = t + 1
        print(f"state_dtype={state_dtype!r}: {int(np.isnan(params['w']).sum())} of {n} params NaN after 300 steps "
              f"(the first at step {first})")


if __name__ == "__main__":
    main()
