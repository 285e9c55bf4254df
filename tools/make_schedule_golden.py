"""Write tests/golden/schedules.json: optax's schedule formulas, transcribed a second time, vectorized.

An independent transcription of ``optax/schedules/_schedule.py`` and ``_join.py`` (google-deepmind/optax):
NumPy arrays over all counts at once with ``np.clip``/``np.where``/``np.minimum`` where optax uses their
``jnp`` forms, float64 throughout.  ``xopt/schedules.py`` is the other transcription (scalar Python);
``tests/test_schedules.py`` holds it to these numbers.

    python tools/make_schedule_golden.py
"""

import json
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
COUNTS = np.arange(0, 130, dtype=np.float64)


def polynomial(init_value, end_value, power, transition_steps, transition_begin=0):
    if transition_steps <= 0:
        return np.full_like(COUNTS, init_value)
    transition_begin = max(transition_begin, 0)
    count = np.clip(COUNTS - transition_begin, 0, transition_steps)
    frac = 1 - count / transition_steps
    return (init_value - end_value) * frac**power + end_value


def linear(init_value, end_value, transition_steps, transition_begin=0):
    return polynomial(init_value, end_value, 1, transition_steps, transition_begin)


def cosine(init_value, decay_steps, alpha=0.0, exponent=1.0, counts=COUNTS):
    count = np.minimum(counts, float(decay_steps))
    decay = 0.5 * (1 + np.cos(np.pi * count / float(decay_steps)))
    return init_value * ((1 - alpha) * decay**exponent + alpha)


def exponential(init_value, transition_steps, decay_rate, transition_begin=0, staircase=False, end_value=None):
    if transition_steps <= 0 or decay_rate == 0:
        return np.full_like(COUNTS, init_value)
    transition_begin = max(transition_begin, 0)
    decreased = COUNTS - transition_begin
    p = decreased / transition_steps
    if staircase:
        p = np.floor(p)
    value = np.where(decreased <= 0, init_value, init_value * np.power(decay_rate, p))
    if end_value is not None:
        value = (np.maximum if decay_rate < 1.0 else np.minimum)(value, end_value)
    return value


def warmup_cosine(init_value, peak_value, warmup_steps, decay_steps, end_value=0.0, exponent=1.0):
    alpha = 0.0 if peak_value == 0.0 else end_value / peak_value
    warm = linear(init_value, peak_value, warmup_steps)
    after = cosine(peak_value, decay_steps - warmup_steps, alpha, exponent, counts=COUNTS - warmup_steps)
    return np.where(COUNTS < warmup_steps, warm, after)


CASES = [  # (xopt.schedules name, keyword arguments, values)
    ("constant_schedule", {"value": 0.3}, np.full_like(COUNTS, 0.3)),
    ("linear_schedule", {"init_value": 1.0, "end_value": 0.01, "transition_steps": 100}, None),
    ("linear_schedule", {"init_value": 0.1, "end_value": 0.5, "transition_steps": 37, "transition_begin": 11}, None),
    ("linear_schedule", {"init_value": 0.2, "end_value": 0.5, "transition_steps": 0}, None),
    ("cosine_decay_schedule", {"init_value": 0.1, "decay_steps": 100}, None),
    ("cosine_decay_schedule", {"init_value": 2e-3, "decay_steps": 77, "alpha": 0.1, "exponent": 2.0}, None),
    ("exponential_decay", {"init_value": 0.5, "transition_steps": 10, "decay_rate": 0.9}, None),
    ("exponential_decay", {"init_value": 0.5, "transition_steps": 7, "decay_rate": 0.5, "transition_begin": 5,
                           "staircase": True, "end_value": 0.01}, None),
    ("exponential_decay", {"init_value": 0.01, "transition_steps": 10, "decay_rate": 1.5, "end_value": 0.1}, None),
    ("warmup_cosine_decay_schedule", {"init_value": 0.0, "peak_value": 1e-3, "warmup_steps": 10,
                                      "decay_steps": 100}, None),
    ("warmup_cosine_decay_schedule", {"init_value": 1e-4, "peak_value": 0.1, "warmup_steps": 25,
                                      "decay_steps": 90, "end_value": 1e-3, "exponent": 1.5}, None),
]
FUNCTIONS = {"linear_schedule": linear, "cosine_decay_schedule": cosine, "exponential_decay": exponential,
             "warmup_cosine_decay_schedule": warmup_cosine}


def main():
    out = []
    for name, kwargs, values in CASES:
        if values is None:
            values = FUNCTIONS[name](**kwargs)
        out.append({"schedule": name, "args": kwargs, "values": values.tolist()})
    # join_schedules: a constant, a linear ramp from count 20, a cosine from 60 (each told the count since its boundary)
    ramp = (0.05 - 0.2) * (1 - np.clip(COUNTS - 20, 0, 30) / 30) + 0.2
    joined = np.where(COUNTS < 20, 0.05, np.where(COUNTS < 60, ramp, cosine(0.2, 40, counts=COUNTS - 60)))
    out.append({"schedule": "join_schedules",
                "args": {"schedules": [{"schedule": "constant_schedule", "args": {"value": 0.05}},
                                       {"schedule": "linear_schedule", "args": {"init_value": 0.05, "end_value": 0.2,
                                                                                "transition_steps": 30}},
                                       {"schedule": "cosine_decay_schedule", "args": {"init_value": 0.2,
                                                                                      "decay_steps": 40}}],
                         "boundaries": [20, 60]},
                "values": joined.tolist()})
    path = ROOT / "tests" / "golden" / "schedules.json"
    path.write_text(json.dumps({"counts": COUNTS.tolist(), "cases": out}, indent=1) + "\n")
    print(f"wrote {path} ({len(out)} schedules, {len(COUNTS)} counts each)")


if __name__ == "__main__":
    main()
