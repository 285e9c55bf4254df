"""Stateful differential test: the default path against the reference, through everything a user may do.

Two twins of every optimizer configuration take the same calls on copies of the same NumPy arrays:
``impl="reference"`` (the array-API rule, the oracle) and the default ``impl="auto"`` (the numba kernel
and its plan, the checked-once fast path of a step that repeats).  Between steps hypothesis mixes in
what a user may do to the arrays, the state and the hyperparameters: replace, reset or delete state,
reshape/resize/retype a param in place or in the dict, alias arrays, make a param read-only, pass
non-contiguous or big-endian arrays, change hyperparameters or ``impl``, round-trip the state through
``state_dict`` and a file; and the training features: per-param ``overrides`` (drawn at construction, and
changed by loading a state_dict that holds others), ``lr`` set to a float or a schedule (built in or the
user's function), ``clip_grad_norm`` switched on, off or changed.

After every rule both twins must agree: the same exception type or none, params and every state buffer
close (NaN and Inf in the same places), the same step counts, ``iter`` and hyperparameters.  A call that
raises must change nothing.  Grads are never written.  And no array outside the optimizer's params and
state changes: "bystander" arrays allocated after each rule (so they reuse memory the rule freed) keep
their contents, which catches a kernel writing through a stale pointer.

Aliasing (a param that overlaps another, a grad that overlaps a param) must raise ValueError naming
both, on both paths; disjoint views of one buffer (a flat parameter vector cut in pieces) must work.

``python -m pytest`` runs each configuration for 2 examples of up to 30 rules (``Test_*``); ``-m slow`` (CI runs
both) for 6 more (``TestLong_*``).  Heavier runs:
``XOPT_STATEFUL_EXAMPLES=500 XOPT_STATEFUL_STEPS=80 python -m pytest tests/test_stateful.py``.
``XOPT_STATEFUL_SKIP=rule,rule`` switches rules off (to look past a known failure).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import os
import shutil
import signal
import tempfile
import threading
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import xopt
from xopt import schedules

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)

try:
    from xopt.engines.fused_cpu import CHUNK
except ImportError:  # no numba: auto is the reference, and the test still checks the rest
    CHUNK = 1 << 15

EXAMPLES = int(os.environ.get("XOPT_STATEFUL_EXAMPLES", "0"))
STEPS = int(os.environ.get("XOPT_STATEFUL_STEPS", "0"))
NO_SHRINK = bool(os.environ.get("XOPT_STATEFUL_NO_SHRINK"))  # report failures as found, unshrunk (faster)
TRACE = os.environ.get("XOPT_STATEFUL_TRACE")  # a file to append every action to
SKIP = {s.strip() for s in os.environ.get("XOPT_STATEFUL_SKIP", "").split(",") if s.strip()}

SIDES = ("ref", "dut")  # impl="reference" and the default impl="auto"

# Every optimizer, with its options switched on in some configuration.
CONFIGS = {
    "SGD": ("SGD", dict(lr=0.1)),
    "SGD-momentum": ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "SGD-nesterov": ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "Momentum": ("Momentum", dict()),
    "Nesterov": ("Nesterov", dict()),
    "AdaGrad": ("AdaGrad", dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01)),
    "RMSprop": ("RMSprop", dict()),
    "RMSprop-centered-momentum": ("RMSprop", dict(momentum=0.5, centered=True, weight_decay=0.01)),
    "Adam": ("Adam", dict()),
    "Adam-amsgrad-wd": ("Adam", dict(amsgrad=True, weight_decay=0.01, eps_hat=False)),
    "AdamW": ("AdamW", dict()),
    "AdamW-amsgrad-bf16": ("AdamW", dict(amsgrad=True, state_dtype="bfloat16")),
    "AdaDelta": ("AdaDelta", dict(weight_decay=0.01)),
    "Adamax": ("Adamax", dict(weight_decay=0.01)),
    "NAdam": ("NAdam", dict(weight_decay=0.01)),
    "RAdam-decoupled": ("RAdam", dict(weight_decay=0.01, decoupled_weight_decay=True)),
    "Lion": ("Lion", dict(lr=1e-3, weight_decay=0.01)),
    "LAMB": ("LAMB", dict(lr=0.01, weight_decay=0.01)),
    # 8-bit state in blocks of 4, every param but the empty ones quantized: the 8-bit lane and the checked path
    "Adam-8bit": ("Adam", dict(state_dtype="8bit", min_8bit_size=1, block_size=4, weight_decay=0.01)),
    "SGD-momentum-8bit": ("SGD", dict(lr=0.1, momentum=0.9, state_dtype="8bit", min_8bit_size=1, block_size=4)),
    "RMSprop-momentum-8bit": ("RMSprop", dict(momentum=0.5, state_dtype="8bit", min_8bit_size=1, block_size=4)),
    "AdaGrad-8bit": ("AdaGrad", dict(lr=0.1, state_dtype="8bit", min_8bit_size=6, block_size=4)),
    "Lion-8bit": ("Lion", dict(lr=1e-3, beta2=0.9, state_dtype="8bit", min_8bit_size=1, block_size=4)),
}


def _custom_schedule(count):
    """A user's schedule: a function, which a file cannot hold (the same object on both twins)."""
    return 0.05 / (1.0 + count)


# What lr (the optimizer's or an override's) may be set to besides numbers: every built-in kind, and a function.
SCHEDULES = [
    schedules.linear_schedule(0.1, 0.0, 5),
    schedules.cosine_decay_schedule(0.05, 8, alpha=0.1),
    schedules.exponential_decay(0.1, 2, 0.5, staircase=True),
    schedules.warmup_cosine_decay_schedule(0.0, 0.1, 2, 10),
    schedules.join_schedules([schedules.constant_schedule(0.05), schedules.linear_schedule(0.05, 0.01, 3)], [4]),
    _custom_schedule,
]
CLIP = [None, 1.0, 1e-3, 50.0]  # clip_grad_norm: off, clipping some steps, every step, hardly ever

# Values each hyperparameter may be set to between steps (the first is the usual one).
_ADAM = {"lr": [0.001, 0.01, 0.0], "beta1": [0.9, 0.0, 0.5], "beta2": [0.999, 0.9], "amsgrad": [False, True],
         "eps_hat": [True, False], "weight_decay": [0.0, 0.01], "state_dtype": [None, "bfloat16"],
         "eps": [1e-7, 1e-3]}
_MOMENTUM = {"lr": [0.01, 0.1, 0.0], "momentum": [0.9, 0.0, 0.5]}
HYPER = {
    "SGD": {"lr": [0.1, 0.05, 0.0], "momentum": [0.0, 0.9, 0.5], "nesterov": [False, True],
            "dampening": [0.0, 0.1], "weight_decay": [0.0, 0.01]},
    "Momentum": _MOMENTUM,
    "Nesterov": _MOMENTUM,
    "AdaGrad": {"lr": [0.1, 0.01], "lr_decay": [0.0, 0.01], "weight_decay": [0.0, 0.01], "eps": [1e-7, 1e-3],
                "initial_accumulator_value": [0.0, 0.1]},
    "RMSprop": {"lr": [0.01, 0.1], "decay_rate": [0.99, 0.9], "momentum": [0.0, 0.5], "centered": [False, True],
                "weight_decay": [0.0, 0.01], "eps": [1e-7, 1e-3]},
    "Adam": _ADAM,
    "AdamW": _ADAM,
    "AdaDelta": {"lr": [1.0, 0.1], "rho": [0.9, 0.5], "eps": [1e-6, 1e-3], "weight_decay": [0.0, 0.01]},
    "Adamax": {"lr": [0.002, 0.01], "beta1": [0.9, 0.0], "beta2": [0.999, 0.9], "eps": [1e-8, 1e-3],
               "weight_decay": [0.0, 0.01]},
    "NAdam": {"lr": [0.002, 0.01], "beta1": [0.9, 0.5], "beta2": [0.999, 0.9], "eps": [1e-8, 1e-3],
              "weight_decay": [0.0, 0.01], "momentum_decay": [0.004, 0.5], "decoupled_weight_decay": [False, True]},
    "RAdam": {"lr": [0.001, 0.01], "beta1": [0.9, 0.5], "beta2": [0.999, 0.8], "eps": [1e-8, 1e-3],
              "weight_decay": [0.0, 0.01], "decoupled_weight_decay": [False, True]},
    "Lion": {"lr": [1e-3, 1e-2], "beta1": [0.9, 0.0], "beta2": [0.99, 0.5], "weight_decay": [0.0, 0.1]},
    "LAMB": {"lr": [0.01, 0.001], "beta1": [0.9, 0.0], "beta2": [0.999, 0.9], "eps": [1e-6, 1e-3],
             "eps_root": [0.0, 1e-8], "weight_decay": [0.01, 0.0]},
}

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)]
SHAPES = [(7,), (), (0,), (1,), (3, 4), (2, 3, 2), (1, 5, 1), (CHUNK + CHUNK // 2 + 7,)]  # the last: 2 chunks
NAMES = "abcdefgh"
MAX_PARAMS = 4
# Relative tolerance per dtype; atol is a tenth of it times the array's largest finite magnitude (at least 1).
TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2, "uint8": 0.0}  # uint8: 8-bit codes

GRAD_KINDS = ["normal"] * 6 + ["none", "nan", "inf", "zero", "large"]
GRAD_LAYOUTS = ["c"] * 6 + ["strided", "fortran", "bigendian", "otherdtype"]


# -- arrays ---------------------------------------------------------------------------
class _Interrupted(Exception):
    pass


def _raise_interrupted(signum, frame):
    raise _Interrupted(signum)


_KILL = ctypes.CDLL(None).kill  # C's kill(): os.kill and signal.raise_signal run the handler before they return


@contextlib.contextmanager
def _signal_among_writes(signum, on):
    """While on: every C-level run of a step's writes (``xopt._atomic.together``) sends ``signum`` to this
    process from its middle, between two of its calls (a kill() from C: the handler waits for a bytecode)."""
    if not on:
        yield
        return
    from xopt import _atomic

    def calls_with_a_kill(f, *iterables):  # together's map(CALL, writes), lazy: a kill() after the first write
        calls = map(f, *iterables)
        if f is not _atomic.CALL:
            return calls
        return itertools.chain(itertools.islice(calls, 1), map(_KILL, [os.getpid()], [signum]), calls)

    _atomic.map = calls_with_a_kill  # found before the builtin by together (and each, which it passes by)
    try:
        yield
    finally:
        del _atomic.map


def _native(dtype):
    dtype = np.dtype(dtype)
    return dtype if dtype == BF16 else dtype.newbyteorder("=")


def _other_float(dtype):
    return np.dtype(np.float64) if _native(dtype) != np.float64 else np.dtype(np.float32)


def _build(values, dtype, layout):
    """A fresh array holding ``values`` as ``dtype``, laid out as ``layout``; returns (array, extra bystander)."""
    dtype = _native(dtype)
    values = np.asarray(values)
    if layout == "strided" and values.ndim > 0:
        base = np.full(values.shape[:-1] + (2 * values.shape[-1],), 3.5, dtype=dtype)
        view = base[..., ::2]
        view[...] = values
        mask = np.ones(base.shape, dtype=bool)
        mask[..., ::2] = False
        return view, (base, mask, base[mask].tobytes())  # the elements between must stay as they are
    if layout == "fortran" and values.ndim >= 2:  # (asfortranarray makes a 0-d array 1-d)
        return np.asfortranarray(values.astype(dtype)), None
    if layout == "bigendian" and dtype != BF16:
        return values.astype(dtype.newbyteorder(">")), None
    if layout == "otherdtype":
        return values.astype(_other_float(dtype)), None
    return np.array(values, dtype=dtype), None


def _as64(a):
    return np.asarray(a).astype(np.float64)


def _close(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {got.shape} (default) vs {want.shape} (reference)"
    assert _native(got.dtype).name == _native(want.dtype).name, \
        f"{what}: dtype {got.dtype} (default) vs {want.dtype} (reference)"
    g, w = _as64(got), _as64(want)
    finite = np.isfinite(w)
    scale = max(1.0, float(np.abs(w[finite]).max(initial=0.0)))
    tol = TOL[_native(want.dtype).name]
    np.testing.assert_allclose(g, w, rtol=tol, atol=0.1 * tol * scale, equal_nan=True,
                               err_msg=f"{what}: default path (actual) vs reference (desired)")


def _snapshot(opt, params):
    """Everything a call that raises must leave as it was, byte for byte."""
    return (
        [(k, id(v), v.dtype.str, v.shape, np.array(v, copy=True).tobytes()) for k, v in params.items()],
        {k: {n: (v if n == "step" else (v.dtype.str, v.shape, np.array(v, copy=True).tobytes()))
             for n, v in st.items()} for k, st in opt.state.items()},
        opt.iter, opt.skipped_steps, dict(opt._hyper), opt.overrides, repr(opt.last_grad_norm),
    )


def _describe(grads):
    return {k: None if g is None else g.dtype.str + ("" if g.flags.c_contiguous else " non-contiguous")
            for k, g in grads.items()}


def _name(key):
    return repr(key)


# -- the machine ------------------------------------------------------------------------

def _has_custom(opt):
    """Whether the optimizer's lr or an override's is the user's function (which no file holds)."""
    values = [opt._hyper.get("lr")] + [v.get("lr") for v in opt.overrides.values()]
    return any(callable(v) and not isinstance(v, schedules.Schedule) for v in values)


def _all_checked(grads):
    """Whether a call with these grads checked every param: a None grad skips its param, whose state may
    then be left unfit (reshaped since, say), and a later call's first error may name it instead."""
    return all(g is not None for g in grads["ref"].values())

class Twins(RuleBasedStateMachine):
    CONFIG = "Adam"  # set per subclass

    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="xopt-stateful-")
        self.opt = None
        self.params = {side: {} for side in SIDES}
        self.last_grads = None
        self.bystanders = []  # (array or bytes, index or None, the bytes it must keep)
        self.log = []  # what the machine did
        self.clean = False
        self.corrupted = False  # a buffer of another dtype was put into the state: a load may refuse it

    def _note(self, line):
        self.clean = False  # set again by a step that succeeded: nothing changed since a valid call
        self.log.append(line)
        if TRACE:  # a crash (segfault) leaves no hypothesis report: the trace file shows the last example
            with open(TRACE, "a") as f:
                f.write(line + "\n")

    def teardown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------------
    def _make(self, side, **extra):
        cls_name, kwargs = CONFIGS[self.CONFIG]
        impl = "reference" if side == "ref" else "auto"
        return getattr(xopt, cls_name)(impl=impl, **{**kwargs, **extra})

    @property
    def family(self):
        return CONFIGS[self.CONFIG][0]

    def _keys(self):
        return sorted(self.params["ref"])

    def _state_keys(self, with_buffers=False):
        return sorted(k for k, st in self.opt["ref"].state.items() if not with_buffers or len(st) > 1)

    def _put_param(self, key, values, dtype, layout="c"):
        for side in SIDES:
            arr, extra = _build(values, dtype, layout)
            self.params[side][key] = arr
            if extra is not None:
                self.bystanders.append(extra)

    def _both(self, what, fn):
        """fn(side) on both twins: the same exception type or none.  Returns the outcomes."""
        out = {}
        for side in SIDES:
            try:
                with np.errstate(all="ignore"):
                    fn(side)
            except Exception as exc:  # noqa: BLE001 - compared below
                out[side] = exc
            else:
                out[side] = None
        ref, dut = out["ref"], out["dut"]
        assert type(ref) is type(dut), (f"{what}: reference {'raised ' + repr(ref) if ref else 'succeeded'}, "
                                        f"default path {'raised ' + repr(dut) if dut else 'succeeded'}")
        return out

    def _update(self, grads, params=None, what="update", guard=True):
        """One update(params, grads) on both twins; checks that a raising call changed nothing."""
        params = params or self.params
        out = {}
        for side in SIDES:
            opt = self.opt[side]
            before = _snapshot(opt, params[side])
            kept = {k: g.tobytes() for k, g in grads[side].items() if g is not None} if guard else {}
            try:
                with np.errstate(all="ignore"):
                    opt.update(params[side], grads[side])
            except Exception as exc:  # noqa: BLE001 - compared below
                out[side] = exc
                after = _snapshot(opt, params[side])
                assert after == before, (f"{what}: the {side} twin raised {exc!r} but changed params, state or "
                                         "counters")
            else:
                out[side] = None
            for k, b in kept.items():
                assert grads[side][k].tobytes() == b, f"{what}: the {side} twin wrote into the grad of {k!r}"
        ref, dut = out["ref"], out["dut"]
        assert type(ref) is type(dut), (f"{what}: reference {'raised ' + repr(ref) if ref else 'succeeded'}, "
                                        f"default path {'raised ' + repr(dut) if dut else 'succeeded'}")
        self._note(f"{what} {_describe(grads['ref'])}: {type(ref).__name__ if ref else 'ok'}")
        return out

    def _fresh_grads(self, data, allow_none=True):
        grads = {side: {} for side in SIDES}
        # Mostly plain steps (contiguous finite grads for every param: what the plan takes), else mixed.
        plain = data.draw(st.sampled_from([True, True, False]), label="plain grads")
        for k in self._keys():
            p = self.params["ref"][k]
            kinds = GRAD_KINDS if allow_none else [k_ for k_ in GRAD_KINDS if k_ != "none"]
            kind = "normal" if plain else data.draw(st.sampled_from(kinds), label=f"grad {k}")
            if kind == "none":
                for side in SIDES:
                    grads[side][k] = None
                continue
            layout = "c" if plain else data.draw(st.sampled_from(GRAD_LAYOUTS), label=f"layout of grad {k}")
            values = self.rng.standard_normal(p.shape)
            if kind == "zero":
                values[...] = 0.0
            elif kind == "large":
                values *= 1e4
            elif kind in ("nan", "inf") and values.size:
                values.reshape(-1)[self.rng.integers(values.size)] = np.nan if kind == "nan" else -np.inf
            for side in SIDES:
                grads[side][k], _ = _build(values, p.dtype, layout)
        return grads

    def _add_bystanders(self):
        """Arrays the size of everything in play, allocated now: they get the blocks a rule just freed."""
        like = []
        for side in SIDES:
            like += list(self.params[side].values())
            for st_ in self.opt[side].state.values():
                like += [v for n, v in st_.items() if n != "step"]
        seen = set()
        for a in like:
            sig = (a.nbytes, _native(a.dtype).name)
            if sig in seen or len(seen) >= 6:
                continue
            seen.add(sig)
            for _ in range(2):
                b = np.empty(a.size, dtype=_native(a.dtype))
                b[...] = (np.arange(b.size) % 251 - 125).astype(b.dtype)
                self.bystanders.append((b, None, b.tobytes()))
        del self.bystanders[:-60]

    # -- rules ----------------------------------------------------------------------------
    def _hyper_choices(self):
        """What each hyperparameter an override may hold can be: the family's values, lr a schedule too."""
        choices = {k: v for k, v in HYPER[self.family].items() if k != "state_dtype"}
        choices["lr"] = choices["lr"] + SCHEDULES
        return choices

    def _draw_overrides(self, data):
        """One or two patterns that match params there are now, each with one or two hyperparameters."""
        choices = self._hyper_choices()
        overrides = {}
        for _ in range(data.draw(st.integers(1, 2), label="patterns")):
            pattern = data.draw(st.sampled_from(self._keys() + ["*", "[a-c]", "?"]), label="pattern")
            names = data.draw(st.lists(st.sampled_from(sorted(choices)), min_size=1, max_size=2, unique=True),
                              label="overridden")
            overrides[pattern] = {n: data.draw(st.sampled_from(choices[n]), label=n) for n in names}
        return overrides

    @initialize(dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1),
                shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3), data=st.data())
    def setup(self, dtype, seed, shapes, data):
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        for name, shape in zip(NAMES, shapes):
            self._put_param(name, self.rng.standard_normal(shape), dtype)
        clip = data.draw(st.sampled_from(CLIP), label="clip_grad_norm")
        overrides = self._draw_overrides(data) if data.draw(st.booleans(), label="with overrides") else None
        try:
            self.opt = {side: self._make(side, clip_grad_norm=clip, overrides=overrides) for side in SIDES}
        except ValueError:  # values that cannot go together (SGD's nesterov without momentum): no overrides
            overrides = None
            self.opt = {side: self._make(side, clip_grad_norm=clip) for side in SIDES}
        self._note(f"setup {self.CONFIG} {dtype} {shapes} clip_grad_norm={clip} overrides={overrides}")

    @precondition(lambda self: "step" not in SKIP)
    @rule(data=st.data(), n=st.integers(1, 4))
    def step(self, data, n):
        """n steps with fresh grads (the plan takes the second and later ones)."""
        for _ in range(n):
            grads = self._fresh_grads(data)
            out = self._update(grads, what="step")
            self.last_grads = grads
        self._add_bystanders()
        self.clean = out["ref"] is None and _all_checked(grads)

    @precondition(lambda self: "interrupted_step" not in SKIP and threading.current_thread() is threading.main_thread())
    @rule(data=st.data(), where=st.sampled_from(["before", "among the writes"]),
          handler=st.sampled_from(["SIGINT default", "SIGTERM raising", "SIGALRM raising"]))
    def interrupted_step(self, data, where, handler):
        """A step of the default twin with a signal whose handler raises: sent just before update() (the step
        must not happen) or from inside its one C-level call of writes (the step must be whole, then raise).
        The reference twin then takes the step, or not, as the default one did."""
        grads = self._fresh_grads(data)
        signum = {"SIGINT default": signal.SIGINT, "SIGTERM raising": signal.SIGTERM,
                  "SIGALRM raising": signal.SIGALRM}[handler]
        before_handler = signal.getsignal(signum)
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else _raise_interrupted)
        dut = self.opt["dut"]
        counts = {k: st["step"] for k, st in dut.state.items()}
        done, raised = (dut.iter, dut.skipped_steps), None
        collecting = gc.isenabled()
        gc.disable()  # the handler raises where the signal lands: not in a GC callback of the harness (unraisable)
        try:
            with np.errstate(all="ignore"), _signal_among_writes(signum, where == "among the writes"):
                if where == "before":
                    _KILL(os.getpid(), signum)  # C's kill(): the handler runs at the next bytecode
                dut.update(self.params["dut"], grads["dut"])
        except (KeyboardInterrupt, _Interrupted) as exc:
            raised = exc
        except Exception:  # noqa: BLE001 - the step itself was refused: the reference twin must refuse it too
            raised = None
        finally:
            signal.signal(signum, before_handler)
            if collecting:
                gc.enable()
        took = (dut.iter, dut.skipped_steps) != done  # a step taken, or skipped (skip_nonfinite) whole
        self._note(f"interrupted step ({handler}, {where}) {_describe(grads['ref'])}: took={took} "
                   f"raised={type(raised).__name__ if raised else None}")
        if where == "before":
            assert raised is not None and not took, "a signal before update(): the step must not happen"
        if took:  # the reference twin takes the same step; the invariants compare them whole
            ref = self.opt["ref"]
            with np.errstate(all="ignore"):
                ref.update(self.params["ref"], grads["ref"])
        else:
            assert {k: st["step"] for k, st in dut.state.items()} == counts, "a step not taken changed counts"
        self._add_bystanders()

    @precondition(lambda self: "fork_step" not in SKIP and hasattr(os, "fork") and self.opt["dut"].state)
    @rule(data=st.data())
    def fork_step(self, data):
        """A forked child steps the default twin (its lock and workers made again there) while the parent does
        too: the child's result equals the parent's."""
        grads = self._fresh_grads(data, allow_none=False)
        read, write = os.pipe()
        with warnings.catch_warnings():  # JAX, if an earlier test imported it, warns of a fork in its fork hook
            warnings.simplefilter("ignore", RuntimeWarning)
            pid = os.fork()
        if pid == 0:  # the child: step, send back params, and exit whatever happens
            code = 1
            try:
                signal.alarm(60)
                with np.errstate(all="ignore"):
                    self.opt["dut"].update(self.params["dut"], grads["dut"])
                os.write(write, b"".join(np.ascontiguousarray(self.params["dut"][k]).tobytes() for k in self._keys()))
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            child = f.read()
        _, status = os.waitpid(pid, 0)
        outcome = self._update(grads, what="step beside a forked child")
        self._note("fork")
        if outcome["dut"] is None:
            assert os.waitstatus_to_exitcode(status) == 0, "the forked child could not step"
            mine = b"".join(np.ascontiguousarray(self.params["dut"][k]).tobytes() for k in self._keys())
            assert child == mine, "the forked child's step differs from the parent's"
        self._add_bystanders()

    @precondition(lambda self: "set_threads" not in SKIP)
    @rule(n=st.sampled_from([1, 2, 3]))
    def set_threads(self, n):
        """The number of threads a CPU step uses: nothing a step computes depends on it."""
        xopt.set_num_threads(n)
        self._note(f"set_num_threads({n})")

    @precondition(lambda self: "step_same_grads" not in SKIP and self.last_grads is not None)
    @rule(n=st.integers(1, 3))
    def step_same_grads(self, n):
        """Steps with the very grad arrays of the last step (whatever happened to the params since)."""
        for _ in range(n):
            out = self._update(self.last_grads, what="step with the same grads")
        self._add_bystanders()
        self.clean = out["ref"] is None and _all_checked(self.last_grads)

    @precondition(lambda self: "add_param" not in SKIP and len(self.params["ref"]) < MAX_PARAMS)
    @rule(data=st.data(), shape=st.sampled_from(SHAPES), layout=st.sampled_from(["c", "strided", "fortran"]))
    def add_param(self, data, shape, layout):
        key = next(n for n in NAMES if n not in self.params["ref"])
        dtype = data.draw(st.sampled_from([self.dtype] + DTYPES))
        self._put_param(key, self.rng.standard_normal(shape), dtype, layout)
        self._note(f"add param {key!r} {shape} {dtype} {layout}")

    @precondition(lambda self: "remove_param" not in SKIP and len(self.params["ref"]) > 1)
    @rule(data=st.data())
    def remove_param(self, data):
        key = data.draw(st.sampled_from(self._keys()))
        for side in SIDES:
            del self.params[side][key]
        self._note(f"remove param {key!r}")
        self._add_bystanders()

    @precondition(lambda self: "split_param" not in SKIP and len(self.params["ref"]) <= MAX_PARAMS - 2)
    @rule(size=st.sampled_from([10, 7, 2 * CHUNK + 2]), interleaved=st.booleans())
    def split_param(self, size, interleaved):
        """Two params that are disjoint views of one buffer (a flat parameter vector): legitimate, must work."""
        free = [n for n in NAMES if n not in self.params["ref"]]
        values = self.rng.standard_normal(size)
        for side in SIDES:
            flat = values.astype(self.dtype)
            halves = (flat[0::2], flat[1::2]) if interleaved else (flat[: size // 2], flat[size // 2:])
            self.params[side][free[0]], self.params[side][free[1]] = halves
        self._note(f"split a buffer of {size} into {free[0]!r}, {free[1]!r} (interleaved={interleaved})")

    @precondition(lambda self: "replace_state" not in SKIP and self._state_keys(with_buffers=True))
    @rule(data=st.data(), kind=st.sampled_from(["zeros", "random", "same", "bigendian", "readonly", "strided",
                                                  "fortran", "otherdtype"]))
    def replace_state(self, data, kind):
        """opt.state[k][name] = a new array, the same on both twins."""
        key = data.draw(st.sampled_from(self._state_keys(with_buffers=True)))
        name = data.draw(st.sampled_from(sorted(n for n in self.opt["ref"].state[key] if n != "step")))
        old = self.opt["ref"].state[key][name]
        dtype = _native(old.dtype)
        if kind == "zeros":
            values = np.zeros(old.shape)
        elif kind == "random":
            values = np.abs(self.rng.standard_normal(old.shape))
        else:
            values = _as64(old)
        for side in SIDES:
            if kind == "readonly":  # backed by an immutable bytes object, which must never change
                raw = np.array(values, dtype=dtype).tobytes()
                new = np.frombuffer(raw, dtype=dtype).reshape(old.shape)
                self.bystanders.append((raw, None, bytes(bytearray(raw))))
            else:
                new, extra = _build(values, dtype, {"zeros": "c", "random": "c", "same": "c"}.get(kind, kind))
                if extra is not None:
                    self.bystanders.append(extra)
            self.opt[side].state[key][name] = new
        del old
        self.corrupted |= kind == "otherdtype"
        self._note(f"replace state[{key!r}][{name!r}] ({kind})")
        self._add_bystanders()

    @precondition(lambda self: "reset_step" not in SKIP and self._state_keys())
    @rule(data=st.data(), value=st.sampled_from([0, 1, 2, 5, 1000]))
    def reset_step(self, data, value):
        key = data.draw(st.sampled_from(self._state_keys()))
        for side in SIDES:
            self.opt[side].state[key]["step"] = value
        self._note(f"state[{key!r}]['step'] = {value}")

    @precondition(lambda self: "delete_state" not in SKIP and self._state_keys())
    @rule(data=st.data())
    def delete_state(self, data):
        key = data.draw(st.sampled_from(self._state_keys()))
        for side in SIDES:
            del self.opt[side].state[key]
        self._note(f"del state[{key!r}]")
        self._add_bystanders()

    @precondition(lambda self: "reshape_param" not in SKIP and self.params["ref"])
    @rule(data=st.data(), form=st.sampled_from(["flat", "column", "reversed", "leading1"]))
    def reshape_param(self, data, form):
        """p.shape = ... in place (same object, same size)."""
        key = data.draw(st.sampled_from(self._keys()))
        shape = self.params["ref"][key].shape
        new = {"flat": (int(np.prod(shape)),), "column": (int(np.prod(shape)), 1), "reversed": shape[::-1],
               "leading1": (1,) + shape}[form]

        def reshape(side):
            with warnings.catch_warnings():  # deprecated since NumPy 2.5 (it warns), still done
                warnings.simplefilter("ignore", DeprecationWarning)
                self.params[side][key].shape = new

        self._both(f"p.shape = {new}", reshape)
        self._note(f"{key!r}.shape = {new}")

    @precondition(lambda self: "resize_param" not in SKIP and self.params["ref"])
    @rule(data=st.data(), form=st.sampled_from(["shrink", "grow", "empty", "one", "double"]))
    def resize_param(self, data, form):
        """p.resize(n, refcheck=False): the same object, with new (reallocated) data."""
        key = data.draw(st.sampled_from(self._keys()))
        size = self.params["ref"][key].size
        n = {"shrink": max(size - 1, 0), "grow": size + 1, "empty": 0, "one": 1, "double": 2 * size + 3}[form]

        def resize(side):
            p = self.params[side][key]
            writeable = p.flags.writeable
            p.resize((n,), refcheck=False)
            if n > size:  # NumPy leaves the new tail of a read-only array uninitialised: same values on both
                p.flags.writeable = True
                p[size:] = 0
                p.flags.writeable = writeable

        self._both(f"p.resize({n})", resize)
        self._note(f"{key!r}.resize({n})")
        self._add_bystanders()

    @precondition(lambda self: "retype_param" not in SKIP and self.params["ref"])
    @rule(data=st.data(), dtype=st.sampled_from(DTYPES))
    def retype_param(self, data, dtype):
        """params[k] = params[k].astype(another dtype)."""
        key = data.draw(st.sampled_from(self._keys()))
        for side in SIDES:
            self.params[side][key] = self.params[side][key].astype(dtype)
        self._note(f"params[{key!r}] = astype({dtype})")
        self._add_bystanders()

    @precondition(lambda self: "relayout_param" not in SKIP and self.params["ref"])
    @rule(data=st.data(), layout=st.sampled_from(["strided", "fortran", "bigendian", "c"]))
    def relayout_param(self, data, layout):
        """params[k] = the same values in a new array: strided view, Fortran order, big-endian or plain."""
        key = data.draw(st.sampled_from(self._keys()))
        p = self.params["ref"][key]
        self._put_param(key, _as64(p), p.dtype, layout)
        self._note(f"params[{key!r}] relaid out as {layout}")
        self._add_bystanders()

    @precondition(lambda self: "readonly" not in SKIP and self.params["ref"])
    @rule(data=st.data(), writeable=st.booleans())
    def set_writeable(self, data, writeable):
        key = data.draw(st.sampled_from(self._keys()))

        def flip(side):
            self.params[side][key].flags.writeable = writeable

        self._both(f"writeable = {writeable}", flip)
        self._note(f"params[{key!r}].flags.writeable = {writeable}")

    @precondition(lambda self: "set_hyper" not in SKIP)
    @rule(data=st.data())
    def set_hyper(self, data):
        choices = {**HYPER[self.family], "skip_nonfinite": [False, True], "clip_grad_norm": CLIP}
        name = data.draw(st.sampled_from(sorted(choices)))
        value = data.draw(st.sampled_from(choices[name]))
        self._both(f"opt.{name} = {value!r}", lambda side: setattr(self.opt[side], name, value))
        self._note(f"opt.{name} = {value!r}")

    @precondition(lambda self: "set_lr" not in SKIP)
    @rule(value=st.sampled_from(sorted({x for h in HYPER.values() for x in h["lr"]}) + SCHEDULES))
    def set_lr(self, value):
        """opt.lr = a number or a schedule (a plan made for a number must read the schedule, and back)."""
        self._both(f"opt.lr = {value!r}", lambda side: setattr(self.opt[side], "lr", value))
        self._note(f"opt.lr = {value!r}")

    @precondition(lambda self: "set_overrides" not in SKIP)
    @rule(data=st.data())
    def set_overrides(self, data):
        """Other overrides (or none), by loading the optimizer's own state_dict with them in it."""
        overrides = self._draw_overrides(data) if data.draw(st.booleans(), label="any") else {}

        def load(side):
            opt = self.opt[side]
            opt.load_state_dict({**opt.state_dict(), "overrides": overrides})

        out = self._both(f"load_state_dict with overrides={overrides!r}", load)
        self._note(f"overrides = {overrides!r}: {type(out['ref']).__name__ if out['ref'] else 'ok'}")

    @precondition(lambda self: "set_impl" not in SKIP)
    @rule(impl=st.sampled_from(["auto", "reference"]))
    def set_impl(self, impl):
        """Only the default twin's impl changes: the reference stays the oracle."""
        self.opt["dut"].impl = impl
        self._note(f"default twin: impl = {impl!r}")

    # Only right after a step that succeeded, so that the overlap is the one thing wrong with the call.
    @precondition(lambda self: "alias" not in SKIP and self.clean
                  and any(p.size for p in self.params["ref"].values())
                  and all(p.flags.writeable for p in self.params["ref"].values()))
    @rule(data=st.data(), form=st.sampled_from(["same", "view", "flat_view", "half_overlap", "grad_is_param",
                                                  "grad_view_of_param", "grad_is_other_param"]))
    def alias(self, data, form):
        """Overlapping arrays in one call: a ValueError naming both, on both paths, and nothing changed."""
        key = data.draw(st.sampled_from([k for k in self._keys() if self.params["ref"][k].size]))
        shape = self.params["ref"][key].shape
        other = key
        if form == "grad_is_other_param":
            other = data.draw(st.sampled_from([k for k in self._keys() if self.params["ref"][k].shape == shape]))
        grads = self._fresh_grads(data, allow_none=False)
        params, names = {}, {key, other}
        for side in SIDES:
            p = self.params[side][key]
            params[side] = dict(self.params[side])
            alias = None
            if form == "same":
                alias = p
            elif form == "view":
                alias = p[...]
            elif form == "flat_view":
                alias = p.reshape(-1) if p.flags.c_contiguous else p.T
            elif form == "half_overlap":
                alias = p.reshape(-1)[p.size // 2:] if p.flags.c_contiguous else p[...]
            elif form == "grad_is_param":
                grads[side][key] = p
            elif form == "grad_view_of_param":
                grads[side][key] = p[...]
            else:
                grads[side][key] = self.params[side][other]
            if alias is not None:
                params[side]["alias"] = alias
                grads[side]["alias"] = np.ones(alias.shape, dtype=_native(alias.dtype))
                names.add("alias")
        out = self._update(grads, params, what=f"update with aliased arrays ({form})", guard=False)
        for side, exc in out.items():
            assert isinstance(exc, ValueError), (f"{form}: the {side} twin "
                                                 f"{'raised ' + repr(exc) if exc else 'succeeded'}, not ValueError")
            for n in names:
                assert _name(n) in str(exc), f"{form}: the {side} twin's error does not name {n!r}: {exc}"
        self.clean = True  # the call changed nothing

    @precondition(lambda self: "roundtrip" not in SKIP)
    @rule(kind=st.sampled_from(["state_dict", "file", "fresh_optimizer", "with_params"]))
    def roundtrip(self, kind):
        """state_dict()/load_state_dict() and save()/load(): the optimizer's own state must come back whole."""
        before = {side: self.opt[side].state_dict() for side in SIDES}
        custom = _has_custom(self.opt["ref"])  # a fresh optimizer has not got the user's schedule: refused

        def go(side):
            opt = self.opt[side]
            if kind == "state_dict":
                opt.load_state_dict(opt.state_dict())
            elif kind == "file":
                path = os.path.join(self.tmp, f"{side}.npz")
                opt.save(path)
                opt.load(path)
            elif kind == "fresh_optimizer":
                path = os.path.join(self.tmp, f"{side}.npz")
                opt.save(path)
                # made as the saved one stores its state now (a load keeps the loading optimizer's storage)
                fresh = self._make(side, **{k: opt._hyper[k] for k in ("state_dtype", "block_size", "min_8bit_size")
                                            if k in opt._hyper})
                fresh.load(path)
                self.opt[side] = fresh
            else:
                opt.load_state_dict(opt.state_dict(), params=self.params[side])

        out = self._both(f"round trip ({kind})", go)
        self._note(f"round trip ({kind}): {type(out['ref']).__name__ if out['ref'] else 'ok'}")
        if kind != "with_params" and not self.corrupted and not (custom and kind == "fresh_optimizer"):
            assert out["ref"] is None, f"round trip ({kind}) of the optimizer's own state was refused: {out['ref']!r}"
        if out["ref"] is not None:
            return
        for side in SIDES:
            opt, sd = self.opt[side], before[side]
            assert (opt.iter, opt.skipped_steps) == (sd["iter"], sd["skipped_steps"])
            assert opt._hyper == sd["hyperparameters"]
            assert opt.overrides == sd["overrides"]
            assert set(opt.state) == set(sd["state"])
            for k, st_ in sd["state"].items():
                assert opt.state[k]["step"] == st_["step"]
                for n in opt.buffers():
                    if n in st_:
                        got, want = opt.state[k][n], st_[n]
                        expect = _native(want.dtype).name
                        p = self.params[side].get(k) if isinstance(self.params[side], dict) else None
                        if (kind == "with_params" and expect == "float32" and getattr(p, "dtype", None) is not None
                                and _native(p.dtype) == np.float64
                                and opt._hyper.get("state_dtype") in (None, "8bit") and n + "_absmax" not in st_):
                            # a float64 param's float32 state is widened by a load with params= (also an 8-bit
                            # optimizer's float state of a param below min_8bit_size, as its step widens it)
                            expect = "float64"
                        assert _native(got.dtype).name == expect, f"{side}: state {k}/{n} dtype"
                        np.testing.assert_array_equal(_as64(got), _as64(want),
                                                      err_msg=f"{side}: state {k}/{n} after the round trip")
        self._add_bystanders()

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def twins_agree(self):
        if self.opt is None:
            return
        ref, dut = self.opt["ref"], self.opt["dut"]
        assert (dut.iter, dut.skipped_steps) == (ref.iter, ref.skipped_steps), \
            f"iter/skipped_steps: default {dut.iter}/{dut.skipped_steps}, reference {ref.iter}/{ref.skipped_steps}"
        assert dut._hyper == ref._hyper
        assert dut.overrides == ref.overrides
        for k in ref.state:  # the value each param's next step reads (its override's, its schedule's)
            out = self._both(f"current_lr({k!r})", lambda side: self.opt[side].current_lr(k))
            if out["ref"] is None:
                assert dut.current_lr(k) == ref.current_lr(k), f"current_lr({k!r})"
        if ref.last_grad_norm is None or dut.last_grad_norm is None:
            assert ref.last_grad_norm is dut.last_grad_norm, \
                f"last_grad_norm: default {dut.last_grad_norm}, reference {ref.last_grad_norm}"
        else:
            np.testing.assert_allclose(dut.last_grad_norm, ref.last_grad_norm, rtol=1e-9, equal_nan=True,
                                       err_msg="last_grad_norm: default (actual) vs reference (desired)")
        assert list(self.params["dut"]) == list(self.params["ref"])
        for k, want in self.params["ref"].items():
            _close(self.params["dut"][k], want, f"param {k!r}")
        assert sorted(dut.state) == sorted(ref.state), \
            f"state keys: default {sorted(dut.state)}, reference {sorted(ref.state)}"
        for k, st_ref in ref.state.items():
            st_dut = dut.state[k]
            assert st_dut["step"] == st_ref["step"], \
                f"state[{k!r}]['step']: default {st_dut['step']}, reference {st_ref['step']}"
            assert sorted(st_dut) == sorted(st_ref), f"state[{k!r}] buffers: {sorted(st_dut)} vs {sorted(st_ref)}"
            for n, want in st_ref.items():
                if n != "step":
                    for side, buf in (("reference", want), ("default", st_dut[n])):
                        assert isinstance(buf, np.ndarray), \
                            f"{side} twin: state[{k!r}][{n!r}] is a {type(buf).__name__}, not a NumPy array"
                    _close(st_dut[n], want, f"state[{k!r}][{n!r}]")

    @invariant()
    def bystanders_unchanged(self):
        for obj, index, expected in self.bystanders:
            now = obj if isinstance(obj, bytes) else (obj.tobytes() if index is None else obj[index].tobytes())
            assert now == expected, ("an array outside the optimizer's params and state changed (a write through "
                                     f"a stale or aliased pointer): {type(obj).__name__} of {len(expected)} bytes")


# -- two TestCases per configuration: a short run by default, a longer one marked slow --------------------
def _settings(examples):
    return settings(
        max_examples=EXAMPLES or examples,
        phases=[p for p in Phase if not (NO_SHRINK and p is Phase.shrink)],
        stateful_step_count=STEPS or 30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


SHORT_SETTINGS = _settings(2)  # python -m pytest: 2 runs of up to 30 rules per configuration
LONG_SETTINGS = _settings(6)  # python -m pytest -m slow (CI runs both): 6 more

for _config in CONFIGS:  # (not _name: a function of this module)
    _suffix = _config.replace("-", "_")
    _machine = type(f"Twins_{_suffix}", (Twins,), {"CONFIG": _config})
    globals()[f"Test_{_suffix}"] = type(f"Test_{_suffix}", (_machine.TestCase,), {"settings": SHORT_SETTINGS})
    globals()[f"TestLong_{_suffix}"] = type(f"TestLong_{_suffix}", (_machine.TestCase,),
                                            {"settings": LONG_SETTINGS, "pytestmark": [pytest.mark.slow]})
del _config, _suffix, _machine
