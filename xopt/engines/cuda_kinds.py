"""What a CUDA step of one optimizer class on one param dtype runs (:class:`Kind`), and which optimizers the CUDA
source has a rule for (:func:`supports`): facts of the class and dtype, found once and kept."""

from __future__ import annotations

import operator
import struct

import numpy as np

from .. import _backend
from .cuda_device import CHUNK, N_SCALARS, PTYPES, STATE_TYPES, _scalar_bytes, case_name
from .kernels import KeptSlots, lookup

__all__ = ["STATE_RULES", "supports", "Kind", "kind"]

STATE_RULES = (4,)  # the rules whose optimizers take a state_dtype of STATE_TYPES: Adam's, AdamW's


def supports(opt) -> bool:
    """Whether the source has ``opt``'s rule: not one that reads its tensors' norms first (LAMB: the reference
    rule runs it on the GPU, see ``kernels.NORMS``), its state in the math type or in a type of
    :data:`STATE_TYPES` (Adam's ``state_dtype="bfloat16"``), or ``state_dtype="8bit"`` (this kernel steps the params
    below ``min_8bit_size``, whose state is in the math type; :mod:`xopt.engines.cuda_blockwise` the others)."""
    found = lookup(opt)
    low = opt._hyper.get("state_dtype")
    return found is not None and not found.norms and (low is None or low == "8bit"
                                                      or low in STATE_TYPES and found.rule in STATE_RULES)


class Kind(KeptSlots):
    """What a step of one optimizer class on one param dtype runs: its rule, the order of its scalars, its state
    slots, the params' dtype, the math dtype and the state's (the math's, or bfloat16: ``low`` names it); and,
    for a one-part step, the constant numbers of the compiled reader's head after n (``tail``, less the
    kept-slot flags) and how its scalars' row is packed."""

    __slots__ = ("rule", "order", "slots", "dtype", "math", "state", "low", "case", "getters", "tail", "row",
                 "_keeps")

    def __init__(self, rule, order, slots, dtype, math, low=None):
        self.rule, self.order, self.slots, self.dtype, self.math = rule, order, slots, dtype, math
        self.low = low
        self.state = math if low is None else np.dtype(_backend.low_precision_dtype(np, low))
        self.case = case_name(dtype, low)  # what the self-check's verdicts name
        state = self.state
        self.getters = [operator.itemgetter(name) for name in slots]
        self.tail = (id(dtype), id(state), dtype.itemsize, state.itemsize, 1, _scalar_bytes(1, math), CHUNK)
        self.row = struct.Struct(f"{N_SCALARS}{math.char}")
        self._keeps = {}


_KINDS = {}  # (optimizer class, param dtype, state_dtype) -> its Kind, or None: no kernel


def kind(opt, dtype):
    """The :class:`Kind` of a step of ``opt`` on params of ``dtype`` (float16, bfloat16, float32 or float64), or
    None."""
    key = (type(opt), dtype, opt._hyper.get("state_dtype"))
    found = _KINDS.get(key, False)
    if found is False:
        found = _KINDS[key] = _new_kind(opt, dtype)
    return found


def _new_kind(opt, dtype):
    found = lookup(opt)
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        return None
    if not supports(opt) or dtype.name not in PTYPES:
        return None
    dtype = np.dtype(dtype.name)  # native byte order
    math, low = np.dtype(_backend.compute_dtype(np, dtype)), opt._hyper.get("state_dtype")
    if low == "8bit":  # the params below min_8bit_size: state in the math type (the others: cuda_blockwise)
        low = None
    if low is not None and math != np.float32:  # a lower state for float math only (float64: the reference)
        return None
    return Kind(found.rule, found.order, found.slots, dtype, math, low)
