"""The seed's optimizers, ``parameter_optimize.py``, as it stands (comments translated, code unchanged).

Two uses: the baseline the benchmark measures xopt against ("seed" rows), and an
oracle the tests check xopt's defaults against.  One fix: the seed's Momentum
reads ``self.grads[key]``, which does not exist; it reads ``grads[key]`` here.
The only other change is ``xp`` for ``np`` so the same code runs on CuPy.
"""

import numpy as np

__all__ = ["SGD", "Momentum", "AdaGrad", "RMSprop", "Adam", "Nesterov"]


class SGD:
    def __init__(self, lr=0.01):
        self.lr = lr

    def update(self, params, grads):
        for key in params.keys():
            params[key] -= self.lr * grads[key]


class Momentum:
    def __init__(self, lr=0.01, momentum=0.9):
        self.lr = lr
        self.momentum = momentum
        self.v = None

    def update(self, params, grads):
        if self.v is None:
            self.v = {}
            for key, val in params.items():
                self.v[key] = _xp(val).zeros_like(val)
        for key in params.keys():
            self.v[key] = self.momentum * self.v[key] - self.lr * grads[key]  # seed: self.grads[key]
            params[key] += self.v[key]


class Nesterov:
    """Not in the seed: the same book's Nesterov, in its corrected form (p moves with the old v)."""

    def __init__(self, lr=0.01, momentum=0.9):
        self.lr = lr
        self.momentum = momentum
        self.v = None

    def update(self, params, grads):
        if self.v is None:
            self.v = {}
            for key, val in params.items():
                self.v[key] = _xp(val).zeros_like(val)
        for key in params.keys():
            params[key] += self.momentum * self.momentum * self.v[key]
            params[key] -= (1 + self.momentum) * self.lr * grads[key]
            self.v[key] *= self.momentum
            self.v[key] -= self.lr * grads[key]


class AdaGrad:
    def __init__(self, lr=0.01):
        self.lr = lr
        self.h = None

    def update(self, params, grads):
        if self.h is None:
            self.h = {}
            for key, val in params.items():
                self.h[key] = _xp(val).zeros_like(val)
        for key in params.keys():
            self.h[key] += grads[key] * grads[key]
            params[key] -= self.lr * grads[key] / (_xp(params[key]).sqrt(self.h[key]) + 1e-7)


class RMSprop:
    def __init__(self, lr=0.01, decay_rate=0.99):
        self.lr = lr
        self.decay_rate = decay_rate
        self.h = None

    def update(self, params, grads):
        if self.h is None:
            self.h = {}
            for key, val in params.items():
                self.h[key] = _xp(val).zeros_like(val)
        for key in params.keys():
            self.h[key] *= self.decay_rate
            self.h[key] += (1 - self.decay_rate) * grads[key] * grads[key]
            params[key] -= self.lr * grads[key] / (_xp(params[key]).sqrt(self.h[key]) + 1e-7)


class Adam:
    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999):
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.iter = 0
        self.m = None
        self.v = None

    def update(self, params, grads):
        if self.m is None:
            self.m, self.v = {}, {}
            for key, val in params.items():
                self.m[key] = _xp(val).zeros_like(val)
                self.v[key] = _xp(val).zeros_like(val)
        self.iter += 1
        lr_t = self.lr * np.sqrt(1.0 - self.beta2**self.iter) / (1.0 - self.beta1**self.iter)
        for key in params.keys():
            self.m[key] += (1 - self.beta1) * (grads[key] - self.m[key])
            self.v[key] += (1 - self.beta2) * (grads[key] ** 2 - self.v[key])
            params[key] -= lr_t * self.m[key] / (_xp(params[key]).sqrt(self.v[key]) + 1e-7)


def _xp(x):
    """NumPy for NumPy arrays, CuPy for CuPy arrays: the seed's ``np`` on either device."""
    module = type(x).__module__.split(".")[0]
    if module == "cupy":
        import cupy

        return cupy
    return np
