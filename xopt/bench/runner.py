"""Cases, implementations and timing: one step of each implementation, interleaved, medians.

Every implementation gets its own copy of the same random params and grads (never
zeros) and a function that runs one optimizer step.  Rounds go over all
implementations in turn (in an order rotated from round to round), so a slow
phase of a shared machine hits them alike; each row reports the median over
rounds and their spread.  Warm-up rounds run first, until two in a row agree.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

from .. import _backend
from ..engines.blockwise import MIN_8BIT_SIZE
from . import seed

__all__ = ["IMPLS", "Case", "make_cases", "make_step", "measure_case", "measure_case_samples", "spread"]

IMPLS = ("xopt", "xopt-reference", "xopt-bf16-state", "xopt-8bit-state", "seed", "torch-forloop", "torch-foreach",
         "torch-fused")
STATE_DTYPES = {"xopt-bf16-state": "bfloat16", "xopt-8bit-state": "8bit"}  # impls that keep a lower-precision state
OPTIMIZERS = ("SGD", "Momentum", "Nesterov", "AdaGrad", "RMSprop", "Adam", "AdamW", "AdaDelta", "Adamax", "NAdam",
              "RAdam", "Lion", "ScheduleFreeAdamW", "LAMB")
SMALL_TENSOR_SIZES = (64, 4096)  # the many-tensors case draws sizes from this range

# torch.optim equivalents (same rule, each library's defaults otherwise).
TORCH = {
    "SGD": ("SGD", dict(lr=0.01)),
    "Momentum": ("SGD", dict(lr=0.01, momentum=0.9)),
    "Nesterov": ("SGD", dict(lr=0.01, momentum=0.9, nesterov=True)),
    "AdaGrad": ("Adagrad", dict(lr=0.01)),
    "RMSprop": ("RMSprop", dict(lr=0.01)),
    "Adam": ("Adam", dict(lr=0.001)),
    "AdamW": ("AdamW", dict(lr=0.001)),
    "AdaDelta": ("Adadelta", dict()),
    "Adamax": ("Adamax", dict()),
    "NAdam": ("NAdam", dict()),
    "RAdam": ("RAdam", dict()),
}  # torch.optim has no Lion, no Schedule-Free AdamW and no LAMB


@dataclass(frozen=True)
class Case:
    optimizer: str
    dtype: str
    sizes: tuple  # elements of each tensor

    @property
    def numel(self):
        return int(sum(self.sizes))

    @property
    def tensors(self):
        return len(self.sizes)


def make_cases(optimizers, dtypes, sizes, tensors, seed_=0):
    """One single-tensor case per size, and one many-tensors case per count in ``tensors``."""
    rng = np.random.default_rng(seed_)
    shapes = [(int(n),) for n in sizes]
    shapes += [tuple(int(x) for x in rng.integers(SMALL_TENSOR_SIZES[0], SMALL_TENSOR_SIZES[1] + 1, int(t)))
               for t in tensors if int(t) > 1]
    return [Case(o, d, s) for o in optimizers for d in dtypes for s in shapes]


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def make_step(impl, case, xp, rng):
    """A function that runs one step of ``impl`` on fresh arrays, or None if ``impl`` can't run here."""
    host = {f"p{i}": rng.standard_normal(n).astype(case.dtype) for i, n in enumerate(case.sizes)}
    grads_host = {k: rng.standard_normal(v.shape).astype(case.dtype) for k, v in host.items()}
    if impl.startswith("torch"):
        return _torch_step(impl, case, xp, host, grads_host)
    params = {k: xp.asarray(v) for k, v in host.items()}
    grads = {k: xp.asarray(v) for k, v in grads_host.items()}
    if impl == "seed":
        if not hasattr(seed, case.optimizer):
            return None
        opt = getattr(seed, case.optimizer)()
    else:
        import xopt

        cls = getattr(xopt, case.optimizer)
        # "xopt" is the fused path: what impl="auto" runs (for CuPy arrays once the kernel's self-check passed)
        options = {"impl": "reference" if impl == "xopt-reference" else "fused"}
        if impl in STATE_DTYPES:
            if not takes_state_dtype(case, STATE_DTYPES[impl], _backend.library_name(xp.empty(0))):
                return None
            options["state_dtype"] = STATE_DTYPES[impl]
        opt = cls(**options)
    return lambda: opt.update(params, grads)


def takes_state_dtype(case, state_dtype, library="numpy") -> bool:
    """Whether a lower-precision state impl has a row for ``case``: bfloat16 state for Adam and AdamW on NumPy
    float16/32 params; 8-bit state for its optimizers on NumPy (or CuPy) params, one tensor of at least
    ``min_8bit_size`` elements (smaller ones keep float32 state: the row would not be 8-bit state's)."""
    import xopt

    cls = getattr(xopt, case.optimizer)
    if state_dtype not in getattr(cls, "state_dtypes", ()):
        return False
    if state_dtype == "8bit":
        return library in ("numpy", "cupy") and case.tensors == 1 and case.numel >= MIN_8BIT_SIZE and (
            case.optimizer != "SGD")  # SGD's bench case has no momentum: no state to keep
    return library == "numpy" and case.dtype != "float64"


def _torch_step(impl, case, xp, host, grads_host):
    torch = _torch()
    if torch is None:
        return None
    device = "cuda" if _backend.library_name(xp.empty(0)) == "cupy" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        return None
    if case.optimizer not in TORCH:
        return None
    name, kwargs = TORCH[case.optimizer]
    tensors = [torch.asarray(v, device=device) for v in host.values()]
    for t, g in zip(tensors, grads_host.values()):
        t.grad = torch.asarray(g, device=device)
    flavour = impl.split("-")[1]
    options = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[flavour]
    try:
        opt = getattr(torch.optim, name)(tensors, **kwargs, **options)
        opt.step()  # an unsupported flavour (a fused RMSprop, say) raises here
    except (RuntimeError, TypeError, ValueError):
        return None
    return opt.step


class _Timer:
    """Seconds of ``fn``: host clock on the CPU; CUDA events on the GPU."""

    def __init__(self, gpu):
        self.gpu = gpu
        if gpu:
            import cupy

            self.cupy = cupy
            self.start, self.end = cupy.cuda.Event(), cupy.cuda.Event()

    def __call__(self, fn, calls):
        if self.gpu:  # CuPy's events on its default stream: CUDA's legacy default one, torch's too
            self.start.record()
            for _ in range(calls):
                fn()
            self.end.record()
            self.end.synchronize()
            return self.cupy.cuda.get_elapsed_time(self.start, self.end) / 1e3 / calls
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls


def spread(values):
    """min, quartiles and max of a list of timings (the quartiles of one value are that value)."""
    values = sorted(values)
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"min": values[0], "q1": q[0], "q3": q[2], "max": values[-1]}


def settled(history, tolerance=0.10):
    """The last two timings agree within ``tolerance`` (of the smaller)."""
    return len(history) >= 2 and abs(history[-1] - history[-2]) <= tolerance * min(history[-1], history[-2])


def measure_case_samples(case, impls, xp, repeat, gpu=False, min_seconds=2e-3, seed_=0, warmup_seconds=1.0,
                         warmup_rounds=(2, 10), tolerance=0.10):
    """({impl: [seconds per step, one per round]}, warm-up rounds run); an impl that can't run here is left out.

    Warm-up, outside the figures: interleaved rounds like the measured ones, at least ``warmup_rounds[0]``, until
    every impl's last two rounds agree within ``tolerance``, or ``warmup_rounds[1]`` rounds or ``warmup_seconds``
    have passed: a case is not measured while the machine (clock, caches, page tables, thread pools) settles.
    """
    steps = {}
    for impl in impls:
        fn = make_step(impl, case, xp, np.random.default_rng(seed_))  # the same draws for each: the same inputs
        if fn is not None:
            steps[impl] = fn
    timer = _Timer(gpu)
    calls = {}
    for impl, fn in steps.items():  # first call (allocations, plans); sets calls per round to last >= min_seconds
        fn()
        once = timer(fn, 1)
        calls[impl] = max(1, min(1000, int(min_seconds / max(once, 1e-9))))
    history = {impl: [] for impl in steps}
    t_end = time.perf_counter() + warmup_seconds
    done = 0
    while steps and done < warmup_rounds[1]:
        for impl, fn in steps.items():
            history[impl].append(timer(fn, calls[impl]))
        done += 1
        if done >= warmup_rounds[0] and (all(settled(h, tolerance) for h in history.values())
                                         or time.perf_counter() > t_end):
            break
    samples = {impl: [] for impl in steps}
    order = list(steps)
    for r in range(repeat):
        k = r % len(order)
        for impl in order[k:] + order[:k]:  # rotated: no impl always runs right after the same one
            # One step untimed first: the impl before may leave threads spinning (torch's OpenMP pool spins
            # after its steps), which would slow whatever runs next, not what a user's own loop of steps sees.
            steps[impl]()
            samples[impl].append(timer(steps[impl], calls[impl]))
    return samples, done


def measure_case(case, impls, xp, repeat, gpu=False, min_seconds=2e-3, seed_=0, **warmup):
    """{impl: median seconds per step}; an impl that can't run here is left out."""
    samples, _ = measure_case_samples(case, impls, xp, repeat, gpu, min_seconds, seed_, **warmup)
    return {impl: statistics.median(s) for impl, s in samples.items()}
