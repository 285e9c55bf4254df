"""What every fused engine needs to know of an optimizer: its rule, its scalars in order, its buffers' slots.

Shared by the CPU (numba) and CUDA (CuPy) kernels, which number their element rules alike
and cut tensors into chunks alike (:func:`cut`):
0 SGD, 1 Momentum/Nesterov, 2 AdaGrad, 3 RMSprop, 4 Adam/AdamW.  The scalars come from
the optimizer's own ``scalars(step)``, so host-side math lives in one place.
"""

import numpy as np

__all__ = ["KERNELS", "cut"]


def cut(sizes, chunk):
    """Every tensor cut into pieces of at most ``chunk`` elements: (tensor, piece number), int64, one per piece."""
    sizes = np.asarray(sizes, dtype=np.int64)
    counts = -(-sizes // chunk)
    tensor = np.repeat(np.arange(len(sizes), dtype=np.int64), counts)
    piece = np.arange(len(tensor), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return tensor, piece


def _sgd_scalars(opt, s):
    return (s["lr"], s["weight_decay"], s["momentum"], s["b_decay"], s["b_scale"],
            float(opt.momentum != 0.0), float(opt.nesterov))


def _momentum_scalars(opt, s):
    return (s["lr"], s["momentum"], float(type(opt).__name__ == "Nesterov"))


def _adagrad_scalars(opt, s):
    return (s["clr"], s["eps"], s["weight_decay"])


def _rmsprop_scalars(opt, s):
    return (s["lr"], s["decay_rate"], 1.0 - s["decay_rate"], s["eps"], s["momentum"], s["weight_decay"],
            float(opt.centered), float(opt.momentum > 0.0))


def _adam_scalars(opt, s):
    return (1.0 - s["beta1"], s["beta2"], 1.0 - s["beta2"], s["eps"], s["step_size"], s["sqrt_bc2"],
            s["l2"], s["decay"], float(opt.amsgrad))


KERNELS = {  # optimizer -> (index into RULES, its scalars in the rule's order, its buffers in the rule's slots)
    "SGD": (0, _sgd_scalars, ("b",)),
    "Momentum": (1, _momentum_scalars, ("v",)),
    "Nesterov": (1, _momentum_scalars, ("v",)),
    "AdaGrad": (2, _adagrad_scalars, ("h",)),
    "RMSprop": (3, _rmsprop_scalars, ("h", "g_avg", "b")),
    "Adam": (4, _adam_scalars, ("m", "v", "v_max")),
    "AdamW": (4, _adam_scalars, ("m", "v", "v_max")),
}
