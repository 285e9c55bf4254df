"""Learning-rate schedules: optax's, by name, arguments and formulas.

A schedule is a function of ``count``, the number of updates already applied to a param
(0 on its first step), as in optax.  Pass one as ``lr`` (or as an override's ``lr``)::

    >>> from xopt import AdamW
    >>> from xopt.schedules import warmup_cosine_decay_schedule
    >>> opt = AdamW(lr=warmup_cosine_decay_schedule(0.0, 1e-3, warmup_steps=100, decay_steps=1000))

The formulas are optax's (``optax/schedules/_schedule.py`` and ``_join.py``), computed
in Python floats (float64) rather than in float32 as optax's defaults do.  A built-in
schedule is plain data (its name and arguments): it is saved with the optimizer's state,
or pickled, as just those and rebuilt on load, so a resumed run reads the same numbers.
Any other callable ``f(count) -> float`` works too, but is not saved: pass it again to
the optimizer you load into.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["Schedule", "constant_schedule", "linear_schedule", "cosine_decay_schedule", "exponential_decay",
           "warmup_cosine_decay_schedule", "join_schedules", "from_spec"]


class Schedule:
    """A built-in schedule: ``name`` and ``args`` (what it was made with) say everything about it."""

    def __init__(self, name, args, fn):
        self.name, self.args, self._fn = name, args, fn

    def __call__(self, count):
        return float(self._fn(count))

    def __repr__(self):
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.args.items())})"

    def __eq__(self, other):
        return isinstance(other, Schedule) and (self.name, self.args) == (other.name, other.args)

    def __hash__(self):
        return hash(repr(self))

    def __reduce__(self):  # pickle and deepcopy: by spec, its function made again on load
        return from_spec, (self.spec(),)

    def spec(self) -> dict:
        """JSON-ready: {"schedule": name, "args": {...}}, nested schedules as specs too."""
        args = {k: ([s.spec() for s in v] if k == "schedules" else list(v) if isinstance(v, tuple) else v)
                for k, v in self.args.items()}
        return {"schedule": self.name, "args": args}


def from_spec(spec) -> Schedule:
    """The schedule :meth:`Schedule.spec` describes."""
    name, args = spec["schedule"], dict(spec["args"])
    if name not in _BUILT_IN:
        raise ValueError(f"unknown schedule {name!r}; xopt.schedules has {', '.join(sorted(_BUILT_IN))}")
    if name == "join_schedules":
        args["schedules"] = [from_spec(s) for s in args["schedules"]]
    return _BUILT_IN[name](**args)


def _number(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _steps(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def constant_schedule(value) -> Schedule:
    """``value`` at every count."""
    value = _number("value", value)
    return Schedule("constant_schedule", {"value": value}, lambda count: value)


def linear_schedule(init_value, end_value, transition_steps, transition_begin=0) -> Schedule:
    r"""From ``init_value`` to ``end_value`` linearly over ``transition_steps`` counts, starting at ``transition_begin``.

    .. math::
        I \text{ if } t < B, \quad (I - E)\left(1 - \frac{t - B}{T}\right) + E \text{ if } B \le t < B + T,
        \quad E \text{ after}

    ``transition_steps <= 0``: constant ``init_value``; a negative ``transition_begin`` counts as 0 (optax).
    """
    args = {"init_value": _number("init_value", init_value), "end_value": _number("end_value", end_value),
            "transition_steps": _steps("transition_steps", transition_steps),
            "transition_begin": _steps("transition_begin", transition_begin)}
    init, end, steps, begin = args.values()
    if steps <= 0:
        return Schedule("linear_schedule", args, lambda count: init)
    begin = max(begin, 0)

    def schedule(count):
        frac = 1 - min(max(count - begin, 0), steps) / steps
        return (init - end) * frac + end

    return Schedule("linear_schedule", args, schedule)


def cosine_decay_schedule(init_value, decay_steps, alpha=0.0, exponent=1.0) -> Schedule:
    r"""Cosine decay from ``init_value`` to ``alpha * init_value`` over ``decay_steps`` counts.

    .. math::
        I \left((1 - \alpha) \left[\tfrac12 \left(1 + \cos \frac{\pi \min(t, T)}{T}\right)\right]^p + \alpha\right)
    """
    args = {"init_value": _number("init_value", init_value), "decay_steps": _steps("decay_steps", decay_steps),
            "alpha": _number("alpha", alpha), "exponent": _number("exponent", exponent)}
    init, steps, alpha, exponent = args.values()
    if not steps > 0:
        raise ValueError(f"cosine_decay_schedule requires positive decay_steps, got decay_steps={steps}")
    if exponent < 0:  # the cosine reaches 0 at decay_steps: its negative power has no value there
        raise ValueError(f"cosine_decay_schedule requires exponent >= 0, got exponent={exponent}")

    def schedule(count):
        cosine = 0.5 * (1 + math.cos(math.pi * min(float(count), float(steps)) / float(steps)))
        return init * ((1 - alpha) * cosine**exponent + alpha)

    return Schedule("cosine_decay_schedule", args, schedule)


def exponential_decay(init_value, transition_steps, decay_rate, transition_begin=0, staircase=False,
                      end_value=None) -> Schedule:
    r"""``init_value * decay_rate ** ((t - transition_begin) / transition_steps)`` from ``transition_begin`` on.

    ``staircase``: the exponent rounded down.  ``end_value``: a floor when ``decay_rate < 1``,
    else a ceiling.  ``transition_steps <= 0`` or ``decay_rate == 0``: constant ``init_value`` (optax).
    """
    if not isinstance(staircase, bool):
        raise TypeError(f"staircase must be True or False, got {staircase!r}")
    args = {"init_value": _number("init_value", init_value),
            "transition_steps": _steps("transition_steps", transition_steps),
            "decay_rate": _number("decay_rate", decay_rate),
            "transition_begin": _steps("transition_begin", transition_begin), "staircase": staircase,
            "end_value": None if end_value is None else _number("end_value", end_value)}
    init, steps, rate, begin, _, end = args.values()
    if steps <= 0 or rate == 0:
        return Schedule("exponential_decay", args, lambda count: init)
    begin = max(begin, 0)
    clip = max if rate < 1.0 else min

    def schedule(count):
        decreased = count - begin
        p = decreased / steps
        if staircase:
            p = math.floor(p)
        try:
            value = init if decreased <= 0 else init * rate**p
        except OverflowError:  # rate > 1, past the largest float: infinite, as optax's (the ceiling, if any)
            value = math.copysign(math.inf, init) if init else 0.0
        return value if end is None else clip(value, end)

    return Schedule("exponential_decay", args, schedule)


def join_schedules(schedules, boundaries) -> Schedule:
    """``schedules[i]`` from ``boundaries[i - 1]`` on, given the count since that boundary."""
    schedules, boundaries = tuple(schedules), tuple(_steps("boundaries", b) for b in boundaries)
    for s in schedules:
        if not isinstance(s, Schedule):
            raise TypeError(f"join_schedules joins xopt.schedules schedules (so it can be saved), got {s!r}")
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(f"join_schedules needs one boundary fewer than schedules, got {len(schedules)} "
                         f"schedules and {len(boundaries)} boundaries")

    def schedule(count):
        output = schedules[0](count)
        for boundary, s in zip(boundaries, schedules[1:]):
            if count >= boundary:
                output = s(count - boundary)
        return output

    return Schedule("join_schedules", {"schedules": schedules, "boundaries": boundaries}, schedule)


def warmup_cosine_decay_schedule(init_value, peak_value, warmup_steps, decay_steps, end_value=0.0,
                                 exponent=1.0) -> Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value`` over ``warmup_steps``, then cosine decay to
    ``end_value``; ``decay_steps`` counts the warm-up too (optax)."""
    args = {"init_value": _number("init_value", init_value), "peak_value": _number("peak_value", peak_value),
            "warmup_steps": _steps("warmup_steps", warmup_steps), "decay_steps": _steps("decay_steps", decay_steps),
            "end_value": _number("end_value", end_value), "exponent": _number("exponent", exponent)}
    init, peak, warmup, decay, end, exponent = args.values()
    alpha = 0.0 if peak == 0.0 else end / peak
    joined = join_schedules([linear_schedule(init, peak, warmup),
                             cosine_decay_schedule(peak, decay - warmup, alpha, exponent)], [warmup])
    return Schedule("warmup_cosine_decay_schedule", args, joined)


_BUILT_IN = {f.__name__: f for f in (constant_schedule, linear_schedule, cosine_decay_schedule, exponential_decay,
                                     warmup_cosine_decay_schedule, join_schedules)}
