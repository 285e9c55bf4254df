"""Validated hyperparameters.

A hyperparameter is a class attribute (``lr = Hyper(non_negative)``) that checks
every value given to it, in the constructor and later (a schedule that sets
``opt.lr`` each epoch), so a bad value fails where it is written, naming it.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["Hyper", "non_negative", "unit_interval", "closed_unit_interval", "flag", "one_of", "positive_int", "non_negative_int", "optional_positive",
           "SCHEDULABLE", "GLOBAL", "check_value", "check_overrides", "publish", "set_fields"]

SCHEDULABLE = ("lr",)  # may be a schedule: a callable f(count) -> value
GLOBAL = ("skip_nonfinite", "clip_grad_norm", "state_dtype", "block_size", "min_8bit_size")  # one value for the whole step: no override


def _real(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def non_negative(name, value) -> float:
    value = _real(name, value)
    if value < 0.0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def unit_interval(name, value) -> float:
    """[0, 1): decay rates (beta1, beta2, decay_rate), where 1 would never forget."""
    value = _real(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


def closed_unit_interval(name, value) -> float:
    value = _real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def flag(name, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def optional_positive(name, value):
    """None (off) or a real number > 0."""
    if value is None:
        return None
    value = _real(name, value)
    if value <= 0.0:
        raise ValueError(f"{name} must be None or > 0, got {value!r}")
    return value


def positive_int(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def non_negative_int(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def one_of(*choices):
    def check(name, value):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    return check


class Hyper:
    """A hyperparameter checked by ``check(name, value)`` whenever it is set.

    The value lives in the optimizer's ``_hyper`` (all of them, as the state_dict and the views read them) and,
    for reading, in its ``__dict__`` under its own name: this descriptor has no ``__get__``, so ``opt.lr`` is a
    plain attribute read (a step reads several; a Python-level ``__get__`` call each would cost more than the
    rest of a small step's scalars).  Whatever replaces ``_hyper`` puts the values in ``__dict__`` too
    (:func:`publish`)."""

    def __init__(self, check):
        self.check = check
        self.name = None

    def __set_name__(self, owner, name):
        self.name = name

    def __set__(self, obj, value):
        value = check_value(self, value)
        obj.__dict__["_version"] = obj.__dict__.get("_version", 0) + 1  # cached override sets are rebuilt
        hyper = obj.__dict__.setdefault("_hyper", {})
        old = hyper.get(self.name, _MISSING)
        hyper[self.name] = obj.__dict__[self.name] = value
        if not obj.__dict__.get("_constructing", False):
            try:
                obj._check_hyperparameters()
                if obj.__dict__.get("_overrides"):
                    obj._groups()  # each override's set with the new value: refused here, not at the next step
            except Exception:
                if old is _MISSING:
                    hyper.pop(self.name, None)
                    obj.__dict__.pop(self.name, None)
                else:
                    hyper[self.name] = obj.__dict__[self.name] = old
                obj.__dict__["_version"] += 1  # the sets cached with the refused value are dropped
                raise


def publish(obj, hyper):
    """``hyper`` as ``obj``'s hyperparameters: its ``_hyper`` and, for reading, its attributes (see Hyper)."""
    obj.__dict__["_hyper"] = hyper
    obj.__dict__.update(hyper)


_MISSING = object()


def check_value(hyper, value, where=""):
    """``value`` checked for the hyperparameter ``hyper``; a schedule where one is allowed (its value at count 0
    is checked: a schedule that cannot give a first value fails here, not at the first step)."""
    name = where + hyper.name
    if hyper.name in SCHEDULABLE and callable(value):
        hyper.check(f"{name}(0)", value(0))
        return value
    return hyper.check(name, value)


def check_overrides(opt, overrides) -> dict:
    """``overrides`` (pattern -> {hyperparameter: value}) checked as constructor arguments are: a new dict."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise TypeError(f"overrides must be a dict (pattern -> {{hyperparameter: value}}), got "
                        f"{type(overrides).__name__}")
    cls = type(opt)
    allowed = [n for n in opt._hyper if n not in GLOBAL]
    checked = {}
    for pattern, values in overrides.items():
        if isinstance(pattern, bool) or not isinstance(pattern, (str, int)):
            raise TypeError(f"overrides: a pattern is a str (an fnmatch glob over dict keys) or an int (a list "
                            f"index), got {pattern!r}")
        if not isinstance(values, dict):
            raise TypeError(f"overrides[{pattern!r}] must be a dict of hyperparameters, got {type(values).__name__}")
        out = {}
        for name, value in values.items():
            if name in GLOBAL:
                raise ValueError(f"overrides[{pattern!r}]: {name} applies to the whole step, not per param; "
                                 f"pass it to {cls.__name__}() itself")
            if name not in allowed:
                raise TypeError(f"overrides[{pattern!r}]: {cls.__name__} has no hyperparameter {name!r} "
                                f"(it has {', '.join(allowed)})")
            out[name] = check_value(getattr(cls, name), value, where=f"overrides[{pattern!r}].")
        checked[pattern] = out
    return checked


def set_fields(state_dict, head: str) -> list:
    """(suffix, set) of each field of ``state_dict`` a hyperparameter set keeps under ``head``: ``head`` itself for
    the optimizer's own set (0), ``head.i`` for the override in place i (i >= 1); raises naming any other field
    that starts with ``head``."""
    found = []
    for field in state_dict:
        if isinstance(field, str) and field.startswith(head):
            suffix = field[len(head):]
            index = suffix[1:]
            if suffix and not (suffix[0] == "." and index.isdigit() and index.isascii() and index[0] != "0"):
                raise ValueError(f"state_dict has {field!r}: a hyperparameter set's field is {head} or {head}.i, "
                                 "i >= 1 the place of its override")
            found.append((suffix, int(index) if suffix else 0))
    return found


def kept_text(values) -> str:
    """{count: (float, ...)} as one plain field of a state_dict (a state file's fields are numbers and strings):
    ``"t:x:y;t:x:y"``, each float as ``float.hex``, exact."""
    return ";".join(":".join([str(t), *(float(x).hex() for x in xs)]) for t, xs in sorted(values.items()))


def kept_values(state_dict, field, width) -> dict:
    """:func:`kept_text`'s field ``field`` of ``state_dict`` read back: {count: (float, ...)}, ``width`` floats
    each; raises naming the field where it is not that."""
    text = state_dict[field]
    try:
        if type(text) is not str:
            raise ValueError
        out = {}
        for item in filter(None, text.split(";")):
            t, *xs = item.split(":")
            if len(xs) != width or not t.isdigit() or int(t) < 1:
                raise ValueError
            values = tuple(float.fromhex(x) for x in xs)
            if not all(math.isfinite(x) for x in values):
                raise ValueError
            out[int(t)] = values
        return out
    except ValueError:
        raise TypeError(f"state_dict's {field} must be counts and their {width} finite floats as "
                        f"'t:{':'.join(['x'] * width)};...' (float.hex), got {text!r}") from None
