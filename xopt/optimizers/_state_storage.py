"""How an optimizer's state is stored: ``state_dtype``, ``block_size`` and ``min_8bit_size``, the hyperparameters
of the optimizers that can keep 8-bit state (:mod:`xopt.engines.blockwise`)."""

from __future__ import annotations

from .. import _backend
from .._hyper import Hyper, check_value, non_negative_int, one_of, positive_int
from .._inputs import describe
from ..engines.blockwise import BLOCK_SIZE, MIN_8BIT_SIZE

__all__ = ["StateStorage", "StorageHyper", "BLOCK_SIZE", "MIN_8BIT_SIZE"]


class StorageHyper(Hyper):
    """A hyperparameter of how the state is stored (``state_dtype``, ``block_size``, ``min_8bit_size``).  Set on an
    optimizer that has state, that state is converted to the new storage at once, as :meth:`load_state_dict`
    converts a saved one (bfloat16 to float32 exactly, float to 8-bit codes and back, float to bfloat16 rounded;
    without the params, an 8-bit or bfloat16 buffer comes back float32 as it does there, which a float64 param's
    next step widens, exactly): the next step finds state of the dtype it keeps.  A state that
    does not convert raises, and the optimizer keeps its old value and state."""

    def __set__(self, obj, value):
        hyper = obj.__dict__.get("_hyper", {})
        if (obj.__dict__.get("_constructing", False) or obj.__dict__.get("_guard") is None or self.name not in hyper
                or hyper[self.name] == check_value(self, value)):
            super().__set__(obj, value)
            return
        # Between steps: a step under way (its first, which makes the state) is not changed halfway through
        obj._guard.run(self._convert, obj, value)

    def _convert(self, obj, value):
        from ..state_check import checked_state

        if not obj.state:
            super().__set__(obj, value)
            return
        old = obj._hyper[self.name]
        super().__set__(obj, value)  # checked (a refused value raises, nothing changed)
        try:
            saved = obj._state_dict(copy=False)
            if self.name == "block_size":  # the blocks the codes were made in
                saved["hyperparameters"] = {**saved["hyperparameters"], "block_size": old}
            state = checked_state(obj, saved)[2]
            if obj._hyper.get("state_dtype") == "bfloat16":
                _as_bfloat16(state)
        except BaseException:
            super().__set__(obj, old)
            raise
        obj.state = state


def _as_bfloat16(state):
    """The float buffers of ``state`` (checked, its own copies) rounded to bfloat16 in place of them: a float state
    an optimizer set to ``state_dtype='bfloat16'`` keeps from then on (load_state_dict keeps a saved state's
    ``state_dtype`` instead).  A buffer of a library without bfloat16 state raises, naming it."""
    for key, st in state.items():
        for name, buf in st.items():
            if name == "step":
                continue
            xp = _backend.namespace(buf)
            dtype = _backend.low_precision_dtype(xp, "bfloat16")
            if dtype is None:
                raise TypeError(f"state {name!r} of param {describe(key)}: state_dtype='bfloat16' is supported for "
                                f"NumPy and CuPy arrays only, not {_backend.library_name(buf)}")
            if _backend.dtype_name(buf.dtype) != "bfloat16":
                st[name] = xp.astype(buf, dtype)


class StateStorage:
    """Mixin of an optimizer class that can keep 8-bit state: its storage hyperparameters.  Its ``__init__``
    takes ``state_dtype=None, block_size=BLOCK_SIZE, min_8bit_size=MIN_8BIT_SIZE`` and passes them on; the
    class names the state buffers that are never negative in ``nonnegative_buffers`` (they take the unsigned
    map, the others the signed one)."""

    state_dtypes = (None, "8bit")  # what state_dtype takes (Adam: bfloat16 too)
    state_dtype = StorageHyper(one_of(*state_dtypes))
    block_size = StorageHyper(positive_int)
    min_8bit_size = StorageHyper(non_negative_int)
    nonnegative_buffers = ()
