"""Validated hyperparameters.

A hyperparameter is a class attribute (``lr = Hyper(non_negative)``) that checks
every value given to it, in the constructor and later (a schedule that sets
``opt.lr`` each epoch), so a bad value fails where it is written, naming it.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["Hyper", "non_negative", "unit_interval", "closed_unit_interval", "flag", "one_of"]


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


def one_of(*choices):
    def check(name, value):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    return check


class Hyper:
    """A hyperparameter checked by ``check(name, value)`` whenever it is set."""

    def __init__(self, check):
        self.check = check
        self.name = None

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return obj._hyper[self.name]

    def __set__(self, obj, value):
        value = self.check(self.name, value)
        hyper = obj.__dict__.setdefault("_hyper", {})
        old = hyper.get(self.name, _MISSING)
        hyper[self.name] = value
        if not obj.__dict__.get("_constructing", False):
            try:
                obj._check_hyperparameters()
            except Exception:
                hyper[self.name] = old
                raise


_MISSING = object()
