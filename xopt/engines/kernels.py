"""What every fused engine needs to know of an optimizer: its rule, its scalars in order, its buffers' slots.

Shared by the CPU (numba) and CUDA (CuPy) kernels, which number their element rules alike
and cut tensors into chunks alike (:func:`cut`).  An optimizer class names its element rule in
its ``kernel`` attribute (``Adam.kernel = "adam"``; AdamW inherits it); :func:`lookup` finds it.
The scalars come from the optimizer's own ``scalars(step)``, read by name, so host-side math lives in one place.
"""

import operator
from typing import Callable, NamedTuple

import numpy as np

__all__ = ["KERNELS", "Kernel", "cut", "kernel_of", "lookup"]


def cut(sizes, chunk):
    """Every tensor cut into pieces of at most ``chunk`` elements: (tensor, piece number), int64, one per piece."""
    sizes = np.asarray(sizes, dtype=np.int64)
    counts = -(-sizes // chunk)
    tensor = np.repeat(np.arange(len(sizes), dtype=np.int64), counts)
    piece = np.arange(len(tensor), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return tensor, piece


# Each kernel's scalars, by name, in the order its engines' element rule reads them: keys of the dict its
# optimizer's ``scalars(step)`` returns (flags as 0.0 or 1.0).  Adam, NAdam and RAdam: one_minus_beta1, beta2,
# one_minus_beta2 first and l2, decay at 6 and 7, where the engines' shared moment update (weight decay, m, v)
# reads them.
KERNELS = {  # kernel name -> (index into the engines' rules, its scalars' names in order, its buffers' slots)
    "sgd": (0, ("lr", "weight_decay", "momentum", "b_decay", "b_scale", "has_momentum", "nesterov"), ("b",)),
    "momentum": (1, ("lr", "momentum", "nesterov"), ("v",)),
    "nesterov": (1, ("lr", "momentum", "nesterov"), ("v",)),
    "adagrad": (2, ("clr", "eps", "weight_decay"), ("h",)),
    "rmsprop": (3, ("lr", "decay_rate", "one_minus_decay", "eps", "momentum", "weight_decay", "centered",
                    "has_momentum"), ("h", "g_avg", "b")),
    "adam": (4, ("one_minus_beta1", "beta2", "one_minus_beta2", "eps", "step_size", "sqrt_bc2", "l2", "decay",
                 "amsgrad"), ("m", "v", "v_max")),
    "adadelta": (5, ("lr", "rho", "one_minus_rho", "eps", "weight_decay"), ("msg", "msdx")),
    "adamax": (6, ("one_minus_beta1", "beta2", "eps", "clr", "weight_decay"), ("m", "u")),
    "nadam": (7, ("one_minus_beta1", "beta2", "one_minus_beta2", "eps", "bias_correction2", "g_step", "l2",
                  "decay", "m_step"), ("m", "v")),
    "radam": (8, ("one_minus_beta1", "beta2", "one_minus_beta2", "eps", "step_size", "rectified", "l2", "decay"),
              ("m", "v")),
    "lion": (9, ("lr", "beta1", "one_minus_beta1", "one_minus_beta2", "beta2", "weight_decay"), ("m",)),
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


class Kernel(NamedTuple):
    """An optimizer's kernel as its engines take it."""

    rule: int  # index into the engines' element rules
    order: Callable  # the dict opt.scalars(step) -> the kernel's scalars, a tuple in its order (a C function)
    slots: tuple  # the buffers that fill its three state slots
    size: int  # how many scalars


def lookup(opt):
    """The :class:`Kernel` of ``opt``, or None."""
    cls = type(opt)
    found = _KERNELS_OF.get(cls, False)
    if found is False:
        name = kernel_of(opt)
        if name is not None:
            rule, names, slots = KERNELS[name]
            found = Kernel(rule, operator.itemgetter(*names), slots, len(names))
        else:
            found = None
        _KERNELS_OF[cls] = found
    return found


_KERNELS_OF = {}  # optimizer class -> its Kernel, or None (a fact of the class)
