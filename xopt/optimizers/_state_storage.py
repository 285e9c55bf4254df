"""How an optimizer's state is stored: ``state_dtype``, ``block_size`` and ``min_8bit_size``, the hyperparameters
of the optimizers that can keep 8-bit state (:mod:`xopt.engines.blockwise`)."""

from __future__ import annotations

from .._hyper import Hyper, non_negative_int, one_of, positive_int
from ..engines.blockwise import BLOCK_SIZE, MIN_8BIT_SIZE

__all__ = ["StateStorage", "BLOCK_SIZE", "MIN_8BIT_SIZE"]

class StateStorage:
    """Mixin of an optimizer class that can keep 8-bit state: its storage hyperparameters.  Its ``__init__``
    takes ``state_dtype=None, block_size=BLOCK_SIZE, min_8bit_size=MIN_8BIT_SIZE`` and passes them on; the
    class names the state buffers that are never negative in ``nonnegative_buffers`` (they take the unsigned
    map, the others the signed one)."""

    state_dtypes = (None, "8bit")  # what state_dtype takes (Adam: bfloat16 too)
    state_dtype = Hyper(one_of(*state_dtypes))
    block_size = Hyper(positive_int)
    min_8bit_size = Hyper(non_negative_int)
    nonnegative_buffers = ()
