"""An optimizer's fused kernel, declared on its class, and what the engines share about kernels.

An optimizer class with a fused kernel declares it in its ``kernel`` attribute, a :class:`Kernel`: the
engines' element rule it runs (by name: :data:`RULES` numbers them alike for the CPU (numba) and CUDA (CuPy)
kernels), the names of the scalars that rule reads (keys of the dict its ``scalars(step)`` returns, in the
rule's order), the buffers that fill the rule's three state slots, and the hyperparameter sets that together
reach every branch of the rule (what the CUDA self-check runs, and the tests).  ``Adam.kernel = Kernel("adam",
...)``; AdamW declares its own with Adam's rule and its own checks.  :func:`lookup` finds an optimizer's.
The engines also cut tensors into chunks alike (:func:`cut`).

A rule in :data:`NORMS` reads norms of each whole tensor before it writes (LAMB's trust ratio): the CPU
engine runs it in two phases, the norms, then the elements; its row of scalars ends with the tensor's
ratio (-1 where the rule's function, given the whole tensor, computes it itself).  The CUDA source has no
such rule (:data:`CUDA_RULES`): its engine declines them, and their steps on the GPU run the reference rule.
A rule in :data:`FACTORED` (Adafactor) keeps state of other shapes than its param's: the CPU engine runs it
from :mod:`xopt.engines.cpu_factored`, on the checked path only (the exact-type lane declines it).
"""

import operator

import numpy as np

__all__ = ["RULES", "NORMS", "FACTORED", "CUDA_RULES", "Kernel", "KeptSlots", "cut", "kernel_of", "lookup"]

RULES = {"sgd": 0, "momentum": 1, "nesterov": 1, "adagrad": 2, "rmsprop": 3, "adam": 4, "adadelta": 5, "adamax": 6,
         "nadam": 7, "radam": 8, "lion": 9, "schedule_free": 10, "lamb": 11, "adafactor": 12}  # the engines' element rules, numbered as their sources number them
NORMS = frozenset({"lamb", "adafactor"})  # rules that read their tensors' norms first: phases, the CPU engine's alone
FACTORED = frozenset({"adafactor"})  # state not in the param's shape: xopt.engines.cpu_factored, not the lane
CUDA_RULES = tuple(sorted({number for name, number in RULES.items() if name not in NORMS}))  # in cuda/optimizers.cu


class Kernel:
    """An optimizer class's fused kernel (see the module's docstring).

    ``Kernel(name, scalars, slots, checks=({},), steps=2)``: ``checks`` hyperparameter sets (dicts) that
    together reach every branch of the rule, each run for ``steps`` steps by the CUDA self-check.  ``rule``:
    the rule's number; ``order``: a C function of the dict ``scalars(step)`` returns giving the rule's scalars
    as a tuple, in its order (with the ratio's -1 last for a rule in :data:`NORMS`); ``size``: how many;
    ``norms``, ``factored``: whether the rule is in :data:`NORMS`, in :data:`FACTORED`."""

    __slots__ = ("name", "rule", "scalars", "slots", "checks", "steps", "order", "size", "norms", "factored")

    def __init__(self, name, scalars, slots, checks=({},), steps=2):
        if name not in RULES:
            raise ValueError(f"no engine has an element rule named {name!r} (they have {', '.join(RULES)})")
        if len(slots) > 3:
            raise ValueError(f"a kernel has three state slots, not {len(slots)}")
        self.name, self.rule, self.scalars, self.slots = name, RULES[name], tuple(scalars), tuple(slots)
        self.checks, self.steps = tuple(dict(c) for c in checks), steps
        self.order = operator.itemgetter(*self.scalars) if len(self.scalars) > 1 else (
            lambda s, _get=operator.itemgetter(self.scalars[0]): (_get(s),))
        self.norms, self.factored = name in NORMS, name in FACTORED
        if self.norms:  # the tensor's ratio, not known yet
            self.order = lambda s, _get=self.order: (*_get(s), -1.0)
        self.size = len(self.scalars) + self.norms

    def __repr__(self):
        return f"Kernel({self.name!r}, rule {self.rule}, slots {self.slots})"


class KeptSlots:
    """An engine's kind of step: which of its three state slots a hyperparameter set's buffers fill, by the
    set's ``buffers()`` (memoised in ``self._keeps``; ``self.slots`` the kernel's slot names)."""

    __slots__ = ()

    def keeps(self, buffers) -> list:
        """[0 or 1 for each of the three slots]: which the buffers named ``buffers`` fill."""
        try:
            found = self._keeps.get(buffers)
        except TypeError:  # a subclass's buffers() gave a list
            buffers = tuple(buffers)
            found = self._keeps.get(buffers)
        if found is None:
            found = self._keeps[buffers] = [int(name in buffers) for name in self.slots] + [0] * (3 - len(self.slots))
        return found


def cut(sizes, chunk):
    """Every tensor cut into pieces of at most ``chunk`` elements: (tensor, piece number), int64, one per piece."""
    sizes = np.asarray(sizes, dtype=np.int64)
    counts = -(-sizes // chunk)
    tensor = np.repeat(np.arange(len(sizes), dtype=np.int64), counts)
    piece = np.arange(len(tensor), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return tensor, piece


_RULE_METHODS = ("rule", "scalars", "buffers", "buffer_dtype")  # what a kernel is a copy of (and the state it reads)


def kernel_of(opt):
    """The name of ``opt``'s fused element rule, or None if it has none."""
    found = lookup(opt)
    return None if found is None else found.name


def lookup(opt):
    """The :class:`Kernel` of ``opt``'s class (or of ``opt``, a class), or None if it has none.

    It is the ``kernel`` of the nearest class that declares one.  A subclass that redefines ``rule``,
    ``scalars`` or ``buffers`` below that class is not what the kernel computes, and one that redefines
    ``buffer_dtype`` keeps state the kernel does not read: it has none (and runs its own rule under
    ``impl="auto"``)."""
    cls = opt if isinstance(opt, type) else type(opt)
    found = _KERNELS_OF.get(cls, False)
    if found is False:
        found = _KERNELS_OF[cls] = _lookup(cls)
    return found


_KERNELS_OF = {}  # optimizer class -> its Kernel, or None (a fact of the class)


def _lookup(cls):
    owner = next((c for c in cls.__mro__ if "kernel" in vars(c)), None)
    if owner is None or not isinstance(owner.kernel, Kernel):
        return None
    if any(getattr(cls, name) is not getattr(owner, name) for name in _RULE_METHODS):
        return None
    return owner.kernel
