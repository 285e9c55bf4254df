"""Why an 8-bit Adam step is not 0.7x of a float32 one here: its arithmetic, measured in parts, against the target.

A float32 Adam step of a large param is memory traffic (28 bytes an element); with 8-bit state it moves 16.06
(``xopt.bench.roofline.bytes_per_element``), so if it stayed memory-bound it would take about 0.57x the time.  It does not: the 8-bit step also
decodes two codes and encodes two values an element, and that arithmetic, not memory, sets its time.  This
times, on one thread, in interleaved rounds (medians, ns per element):

- the float32 and the 8-bit step of one param of 2^``--log2`` elements (memory-bound size), and of 2^``--small``
  (in the caches: what the arithmetic alone costs), less a call's own cost (a step of 16 elements);
- the codec alone over 2^``--small`` elements: the codes of float32 values on the signed map (m) and on the
  unsigned one (v), and the values of codes (``xopt.engines.cpu_codes``: the kernel's own code, 16 at a time);

and reports the target (0.7x the large float32 step), and a floor: the in-cache float32 step (Adam's element
math, its loads and stores) plus the four codec passes.  The kernel runs the codec inside its one pass, so the
floor is a sum of parts, not a measurement of a possible kernel; it says how far below the target the
arithmetic already is.

The clock is the thread's CPU time (``time.thread_time``: every case runs on the calling thread), which other
work on a shared machine moves less than the wall time; ``--clock wall`` for the wall time.

    python benchmarks/state_8bit_floor.py [--log2 25] [--small 18] [--rounds 15] [--clock thread] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import xopt
from xopt.bench.report import commit, machine
from xopt.engines import cpu_codes


def _step(n, state_dtype, rng):
    kw = {} if state_dtype is None else {"state_dtype": state_dtype}
    opt = xopt.Adam(lr=1e-3, eps_hat=False, eps=1e-8, **kw)
    params = {"w": rng.standard_normal(n).astype(np.float32)}
    grads = {"w": (rng.standard_normal(n) * 1e-2).astype(np.float32)}
    for _ in range(3):
        opt.update(params, grads)
    return lambda: opt.update(params, grads)


def _codec(n, rng):
    y = np.clip(rng.standard_normal(n).astype(np.float32) * 0.3, -1, 1)
    codes, out = np.empty(n, np.uint8), np.empty(n, np.float32)
    cases = {}
    for signed, label in ((True, "m (signed map)"), (False, "v (unsigned map)")):
        values = y if signed else np.abs(y)
        cases[f"encode {label}"] = (lambda v=values, s=signed: cpu_codes._codes_of(v, codes, s))
        cases[f"decode {label}"] = (lambda s=signed: cpu_codes._values_of(codes, out, s))
    for f in cases.values():
        f()
    return cases


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--log2", type=int, default=25)
    ap.add_argument("--small", type=int, default=18)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--clock", choices=("thread", "wall"), default="thread")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    xopt.set_num_threads(1)
    rng = np.random.default_rng(0)
    big, small = 1 << args.log2, 1 << args.small
    cases = {("float32 step", big): _step(big, None, rng), ("8-bit step", big): _step(big, "8bit", rng),
             ("float32 step", small): _step(small, None, rng), ("8-bit step", small): _step(small, "8bit", rng)}
    cases.update({(name, small): f for name, f in _codec(small, rng).items()})
    cases["float32 step", 16] = _step(16, None, rng)  # a call's own cost, taken off the in-cache steps
    times = {key: [] for key in cases}
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    for r in range(args.rounds + 1):
        keys = list(cases)
        keys = keys[r % len(keys):] + keys[:r % len(keys)]
        for key in keys:
            n = key[1]
            reps = max(1, (1 << 24) // n)  # about 2^24 elements a timing
            t0 = clock()
            for _ in range(reps):
                cases[key]()
            if r:  # the first round warms up
                times[key].append((clock() - t0) / reps / n * 1e9)
    ns = {key: statistics.median(v) for key, v in times.items()}
    call = ns.pop(("float32 step", 16)) * 16  # ns a call
    for name in ("float32 step", "8-bit step"):
        ns[name, small] -= call / small
    codec = sum(v for (name, n), v in ns.items() if name.startswith(("encode", "decode")))
    target = 0.7 * ns["float32 step", big]
    floor = ns["float32 step", small] + codec
    print(f"ns per element, one thread ({args.clock} clock), medians of {args.rounds} rounds:")
    for (name, n), v in ns.items():
        print(f"  {name:28s} 2^{n.bit_length() - 1:<3d} {v:7.3f}")
    print(f"target (0.7x the float32 step of 2^{args.log2}): {target:.3f}; 8-bit step there: "
          f"{ns['8-bit step', big]:.3f} ({ns['8-bit step', big] / ns['float32 step', big]:.2f}x float32)")
    print(f"a call's own cost: {call / 1e3:.1f} us (taken off the 2^{args.small} steps); the codec alone is "
          f"{codec / target:.2f}x the target")
    print(f"floor of the arithmetic (in-cache float32 step {ns['float32 step', small]:.3f} + codec {codec:.3f}): "
          f"{floor:.3f} = {floor / target:.2f}x the target")
    if args.out:
        result = {"command": "python benchmarks/state_8bit_floor.py " + " ".join(argv or []), "commit": commit(),
                  "machine": machine(), "rounds": args.rounds, "clock": args.clock,
                  "ns_per_element": {f"{name}, 2^{n.bit_length() - 1}": v for (name, n), v in ns.items()},
                  "call_us": call / 1e3, "target_ns": target, "codec_ns": codec, "floor_ns": floor, "floor_over_target": floor / target,
                  "ratio_8bit_to_float32": ns["8-bit step", big] / ns["float32 step", big]}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])  # recorded in the JSON's "command"
