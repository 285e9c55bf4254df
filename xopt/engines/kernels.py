"""What every fused engine needs to know of an optimizer: its rule, its scalars in order, its buffers' slots.

Shared by the CPU (numba) and CUDA (CuPy) kernels, which number their element rules alike
and cut tensors into chunks alike (:func:`cut`).  An optimizer class names its element rule in
its ``kernel`` attribute (``Adam.kernel = "adam"``; AdamW inherits it); :func:`lookup` finds it.
The scalars come from the optimizer's own ``scalars(step)``, so host-side math lives in one place.
"""

import numpy as np

__all__ = ["KERNELS", "cut", "kernel_of", "lookup"]


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
    return (s["lr"], s["momentum"], 0.0)


def _nesterov_scalars(opt, s):
    return (s["lr"], s["momentum"], 1.0)


def _adagrad_scalars(opt, s):
    return (s["clr"], s["eps"], s["weight_decay"])


def _rmsprop_scalars(opt, s):
    return (s["lr"], s["decay_rate"], 1.0 - s["decay_rate"], s["eps"], s["momentum"], s["weight_decay"],
            float(opt.centered), float(opt.momentum > 0.0))


# Adam, NAdam and RAdam: 1 - beta1, beta2, 1 - beta2 first and l2, decay at 6 and 7, where the engines'
# shared moment update (weight decay, m, v) reads them.
def _adam_scalars(opt, s):
    return (1.0 - s["beta1"], s["beta2"], 1.0 - s["beta2"], s["eps"], s["step_size"], s["sqrt_bc2"],
            s["l2"], s["decay"], float(opt.amsgrad))


def _adadelta_scalars(opt, s):
    return (s["lr"], s["rho"], s["one_minus_rho"], s["eps"], s["weight_decay"])


def _adamax_scalars(opt, s):
    return (1.0 - s["beta1"], s["beta2"], s["eps"], s["clr"], s["weight_decay"])


def _nadam_scalars(opt, s):
    return (1.0 - s["beta1"], s["beta2"], 1.0 - s["beta2"], s["eps"], s["bias_correction2"], s["g_step"],
            s["l2"], s["decay"], s["m_step"])


def _radam_scalars(opt, s):
    return (1.0 - s["beta1"], s["beta2"], 1.0 - s["beta2"], s["eps"], s["step_size"], float(s["rectified"]),
            s["l2"], s["decay"])


def _lion_scalars(opt, s):
    return (s["lr"], s["beta1"], 1.0 - s["beta1"], 1.0 - s["beta2"], s["beta2"], s["weight_decay"])


KERNELS = {  # kernel name -> (index into the engines' rules, its scalars in the rule's order, its buffers' slots)
    "sgd": (0, _sgd_scalars, ("b",)),
    "momentum": (1, _momentum_scalars, ("v",)),
    "nesterov": (1, _nesterov_scalars, ("v",)),
    "adagrad": (2, _adagrad_scalars, ("h",)),
    "rmsprop": (3, _rmsprop_scalars, ("h", "g_avg", "b")),
    "adam": (4, _adam_scalars, ("m", "v", "v_max")),
    "adadelta": (5, _adadelta_scalars, ("msg", "msdx")),
    "adamax": (6, _adamax_scalars, ("m", "u")),
    "nadam": (7, _nadam_scalars, ("m", "v")),
    "radam": (8, _radam_scalars, ("m", "v")),
    "lion": (9, _lion_scalars, ("m",)),
}

_RULE_METHODS = ("rule", "scalars", "buffers", "buffer_dtype")  # what a kernel is a copy of (and the state it reads)


def kernel_of(opt):
    """The name of ``opt``'s fused element rule, or None if it has none.

    The rule is the ``kernel`` attribute of the nearest class that sets one.  A subclass that
    redefines ``rule``, ``scalars`` or ``buffers`` below that class is not what the kernel
    computes, and one that redefines ``buffer_dtype`` keeps state the kernel does not read: it has
    none (and runs its own rule under ``impl="auto"``).
    """
    cls = type(opt)
    found = _KERNEL_OF.get(cls, False)
    if found is False:
        found = _KERNEL_OF[cls] = _kernel_of(cls)
    return found


_KERNEL_OF = {}  # optimizer class -> its kernel's name (a fact of the class)


def _kernel_of(cls):
    owner = next((c for c in cls.__mro__ if "kernel" in vars(c)), None)
    if owner is None or owner.kernel not in KERNELS:
        return None
    if any(getattr(cls, name) is not getattr(owner, name) for name in _RULE_METHODS):
        return None
    return owner.kernel


def lookup(opt):
    """(rule index, scalar order, buffer slots) of ``opt``'s kernel, or None."""
    name = kernel_of(opt)
    return None if name is None else KERNELS[name]
