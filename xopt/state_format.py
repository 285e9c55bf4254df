"""What a state file's reader and writer share: the format names, the table's columns, the metadata.

The format itself is described in :mod:`xopt.state_io`.
"""

from __future__ import annotations

import json

import numpy as np

from .schedules import Schedule, from_spec
from .state_check import SavedCustomSchedule

FORMAT = "xopt-state-2"  # what save_state writes
FORMAT_1 = "xopt-state-1"  # what xopt wrote before, which load_state reads too
INT64_MAX = 2**63 - 1
COLUMNS = 4  # a format-2 table's columns before the dims: param, buffer name, dtype (indices), ndim
BLOCK = 4 * 2**20  # bytes moved at a time between a file and the buffers (small buffers are gathered up to it)


class StateFileError(ValueError):
    """A refusal whose message is already final (not wrapped as 'not an xopt state file')."""


def foreign(path, why) -> StateFileError:
    return StateFileError(f"{path} is not an xopt state file ({why})")


def encode(value):
    """A hyperparameter as JSON: a built-in schedule by name and arguments, a custom one by its repr only."""
    if isinstance(value, Schedule):
        return value.spec()
    if callable(value):
        return {"custom_schedule": repr(value)}
    return value


def decode(value):
    if isinstance(value, dict) and "schedule" in value:
        return from_spec(value)
    if isinstance(value, dict) and "custom_schedule" in value:
        return SavedCustomSchedule(str(value["custom_schedule"]))
    return value


def meta_array(state_dict, form, **fields) -> np.ndarray:
    """The 'meta' member: the optimizer's name, hyperparameters, overrides and counters, and ``fields``, as
    JSON text in a uint8 array."""
    meta = {
        "format": form,
        "optimizer": state_dict["optimizer"],
        "hyperparameters": {k: encode(v) for k, v in state_dict["hyperparameters"].items()},
        "overrides": [[pattern, {k: encode(v) for k, v in values.items()}]
                      for pattern, values in state_dict.get("overrides", {}).items()],
        "iter": _counter(state_dict, "iter"),
        "skipped_steps": _counter(state_dict, "skipped_steps"),
        **fields,
    }
    extra = {k: v for k, v in state_dict.items() if k not in STANDARD_FIELDS}
    if extra:  # an optimizer's own plain fields (ScheduleFreeAdamW's "training")
        bad = [k for k, v in extra.items() if type(v) not in (bool, int, float, str)]
        if bad:
            raise TypeError(f"state_dict field {bad[0]!r} cannot be saved: a bool, int, float or str is")
        meta["extra"] = extra
    return np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)


def _counter(state_dict, field) -> int:
    """``iter`` or ``skipped_steps``: an int64, as a load takes it (JSON would hold a larger one, which no load takes)."""
    value = int(state_dict[field])
    if not 0 <= value <= INT64_MAX:
        raise ValueError(f"state_dict[{field!r}] cannot be saved: {value} is not a count below 2**63")
    return value


STANDARD_FIELDS = frozenset({"optimizer", "hyperparameters", "overrides", "iter", "skipped_steps", "state"})


def saved_key(key):
    """A param name as a file holds it: a str or an int (a dict's or a list's; a NumPy integer as its int), or
    a tuple of those (a flattened pytree's path) as a JSON list."""
    if type(key) is str or type(key) is int:
        return key
    if isinstance(key, np.integer):
        return int(key)
    if type(key) is tuple:
        return [saved_key(part) for part in key]
    raise TypeError(f"param name {key!r} cannot be saved: names must be str, int or tuples of them")


def loaded_key(key):
    """The param name ``saved_key`` wrote (a list back to a tuple), or None where it is not one."""
    if type(key) is str or type(key) is int:
        return key
    if type(key) is list:
        parts = [loaded_key(part) for part in key]
        return None if None in parts else tuple(parts)
    return None
