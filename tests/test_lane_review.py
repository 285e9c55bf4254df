"""Adversarial cases for the exact-type lane: what broke earlier fast paths, and what they held against.

The default path next to a twin with ``impl="reference"`` on copies of the same arrays, the
twin's numbers or the twin's error asked for, and the lane's steps counted where a test is
about them (a test that never reaches the lane proves nothing).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Mapping

import numpy as np
import pytest

import xopt
from test_safety import copies, grads_like, net, same, steps


def _counting(monkeypatch):
    """How many steps the lane took, and declined."""
    from xopt import _lane

    counts = {"quick": 0, "declined": 0}
    real = _lane.take

    def take(opt, params, grads):
        first = not opt.state
        took = real(opt, params, grads)
        if opt.impl != "reference" and not first:  # a twin's steps and first steps are the checked path's
            counts["quick" if took else "declined"] += 1
        return took

    monkeypatch.setattr(_lane, "take", take)
    return counts


def _twin_errors(fast, ref, p_fast, p_ref, g_fast, g_ref):
    """One step of each twin; their errors, the impl named in them left out."""
    errors = []
    for opt, params, grads in ((ref, p_ref, g_ref), (fast, p_fast, g_fast)):
        try:
            opt.update(params, grads)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}".replace("impl='reference'", "").replace("'reference'", ""))
    return errors


# -- found: a hyperparameter that makes the scalars step-dependent, set mid-run ---------------------------
@pytest.mark.parametrize("cls, kw", [(xopt.AdaGrad, dict(lr_decay=0.1)),
                                     (xopt.AdaGrad, dict(lr_decay=0.1, overrides={"*": {"eps": 1e-9}}))],
                         ids=["AdaGrad-lr_decay", "AdaGrad-lr_decay-one-override-for-all"])
def test_a_hyperparameter_set_mid_run_that_unsettles_the_scalars_is_followed(cls, kw, rng, monkeypatch):
    """A plan once kept ``steady_from()`` as it was when built (AdaGrad: 1, lr_decay 0): set lr_decay
    later and it computed the decayed lr once and kept it for every later step."""
    counts = _counting(monkeypatch)
    decay = {k: v for k, v in kw.items() if k != "overrides"}
    fast, ref = cls(overrides=kw.get("overrides")), cls(impl="reference", overrides=kw.get("overrides"))
    p_ref = net(rng)
    p_fast = copies(p_ref)
    steps(fast, ref, p_fast, p_ref, rng, n=3)
    for opt in (fast, ref):
        for name, value in decay.items():
            setattr(opt, name, value)
    steps(fast, ref, p_fast, p_ref, rng, n=5)
    same(fast, ref, p_fast, p_ref)
    assert counts["quick"] >= 5, counts  # the steps after the set were quick ones


# -- found: grads the general path refuses (np.matrix, masked arrays) taken by the fused plan -------------
@pytest.mark.parametrize("kind", ["masked", "matrix"])
def test_a_grad_the_general_path_refuses_is_refused_once_a_plan_runs(kind, rng):
    """Table.run took any ndarray subclass; the general path refuses masked arrays (the kernel would read
    the masked values) and np.matrix (not an array-API array): with a plan running they were stepped."""
    fast, ref = xopt.Adam(), xopt.Adam(impl="reference")
    shapes = ((5, 7), (3, 4))
    p_ref = net(rng, sizes=shapes)
    p_fast = copies(p_ref)
    steps(fast, ref, p_fast, p_ref, rng)
    g = grads_like(p_ref, rng)
    wrap = (lambda a: np.ma.masked_array(a, mask=a > 1)) if kind == "masked" else np.asmatrix
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)  # np.matrix's own
        g_ref = {k: wrap(v) for k, v in g.items()}
        g_fast = {k: wrap(v.copy()) for k, v in g.items()}
    before = copies(p_fast)
    errors = _twin_errors(fast, ref, p_fast, p_ref, g_fast, g_ref)
    assert len(errors) == 2 and errors[0] == errors[1], errors
    for k in before:
        np.testing.assert_array_equal(p_fast[k], before[k])
    same(fast, ref, p_fast, p_ref)


# -- found: Ctrl-C between taking the lock and the step's try left the lock held ----------------------
_BARRAGE = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    import numpy as np, xopt
    signal.signal(signal.SIGINT, signal.default_int_handler)
    params = {"a": np.ones(10), "b": np.ones(3)}
    grads = {"a": np.ones(10), "b": np.ones(3)}
    opt = xopt.Adam()
    for _ in range(3):  # the plan, then quick steps
        opt.update(params, grads)
    inside = False
    def interrupt(signum, frame):  # the default handler's KeyboardInterrupt, while the loop below steps
        global inside
        if inside:
            inside = False
            raise KeyboardInterrupt
    signal.signal(signal.SIGINT, interrupt)
    # Ctrl-C from outside, at any moment (a signal sent by a thread of ours lands only where it drops the GIL)
    killer = subprocess.Popen([sys.executable, "-c", "import os, sys, time, random\\n"
                               "while True:\\n    os.kill(int(sys.argv[1]), 2)\\n    time.sleep(random.random() * 1e-4)",
                               str(os.getpid())])
    interrupts, end = 0, time.monotonic() + float(sys.argv[1])
    while time.monotonic() < end and not opt._guard.held():
        try:
            inside = True
            for _ in range(1000):
                opt.update(params, grads)
            inside = False
        except KeyboardInterrupt:
            interrupts += 1
    killer.kill()
    killer.wait()
    inside = False
    steps = {st["step"] for st in opt.state.values()}
    print(interrupts, opt._guard.held(), steps == {opt.iter}, flush=True)
""")


@pytest.mark.parametrize("seconds", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_ctrl_c_at_any_moment_never_leaves_the_optimizer_locked(seconds):
    """``attempt`` took the lock with ``acquire(False)`` outside any ``with``/``try``: a KeyboardInterrupt
    raised right after it (at the call's own check for signals) left the lock held, and the next update
    (or a state_dict() in the handler that saves a checkpoint) waited forever.  A barrage of real
    SIGINTs from another process hit that window within a few hundred interrupts (a 1 s barrage lands
    thousands; the slow stage runs 4 s)."""
    run = subprocess.run([sys.executable, "-c", _BARRAGE, str(seconds)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    interrupts, locked, counted = run.stdout.split()
    assert int(interrupts) > 100, run.stdout  # the barrage landed
    assert locked == "False", f"the lock was left held after {interrupts} interrupts"
    assert counted == "True", run.stdout  # every step whole: its step counts with it


# -- held: what the review tried that the quick step got right (kept as tests) ----------------------------
class _Grads(Mapping):
    def __init__(self, d):
        self.d = d

    def __getitem__(self, k):
        return self.d[k]

    def __iter__(self):
        return iter(self.d)

    def __len__(self):
        return len(self.d)


class _ZeroingDict(dict):
    """A dict subclass whose [] is not what items() says: the quick step must not read it its own way."""

    def __getitem__(self, k):
        return np.zeros_like(dict.__getitem__(self, k))


class _Sub(np.ndarray):
    pass


def _same_grad_twice(g):
    shared = g["p1"]
    return {**g, "p3": shared}


GRADS = {  # how the grads of every step are passed, from the plan's first step on
    "Mapping": _Grads, "dict-subclass": _ZeroingDict,
    "ndarray-subclass": lambda g: {k: v.view(_Sub) for k, v in g.items()},
    "one-grad-for-two-params": _same_grad_twice,
    "numpy-scalar-for-0-d": lambda g: {k: (v[()] if v.ndim == 0 else v) for k, v in g.items()},
    "float-for-0-d": lambda g: {k: (float(v) if v.ndim == 0 else v) for k, v in g.items()},
    "float32-for-float64": lambda g: {k: v.astype(np.float32) for k, v in g.items()},
    "read-only": lambda g: {k: np.lib.stride_tricks.as_strided(v, writeable=False) for k, v in g.items()},
}


@pytest.mark.parametrize("how", list(GRADS))
def test_grads_of_every_kind_give_the_reference_numbers(how, rng):
    fast, ref = xopt.Adam(), xopt.Adam(impl="reference")
    p_ref = net(rng, sizes=((5, 7), (7,), (), (7,), (0,), (1, 0, 2)))
    p_fast = copies(p_ref)
    for _ in range(5):
        g = grads_like(p_ref, rng)
        errors = _twin_errors(fast, ref, p_fast, p_ref, GRADS[how](copies(g)), GRADS[how](g))
        assert not errors, errors
    same(fast, ref, p_fast, p_ref)


@pytest.mark.parametrize("container", [list, dict])
def test_a_list_of_params_and_int_keys_step_quick(container, rng, monkeypatch):
    counts = _counting(monkeypatch)
    fast, ref = xopt.Adam(), xopt.Adam(impl="reference")
    arrays = [rng.standard_normal(s) for s in ((4, 5), (3,), ())]
    keyed = (lambda xs: list(xs)) if container is list else (lambda xs: dict(enumerate(xs)))
    p_ref, p_fast = keyed(arrays), keyed(a.copy() for a in arrays)
    for _ in range(4):
        g = [rng.standard_normal(a.shape) for a in arrays]
        assert not _twin_errors(fast, ref, p_fast, p_ref, keyed(x.copy() for x in g), keyed(g))
    for k in range(3):
        np.testing.assert_array_equal(p_fast[k], p_ref[k])
    assert counts == {"quick": 3, "declined": 0}, counts


STEPS = {  # a step count set between steps to an equal value of another type, or back
    "np.int64": np.int64, "np.int32": np.int32, "one-less": lambda s: s - 1, "zero": lambda s: 0,
}


@pytest.mark.parametrize("how", list(STEPS))
def test_a_step_count_of_another_int_type_or_value_counts_as_the_reference_does(how, rng):
    fast, ref = xopt.SGD(momentum=0.9, dampening=0.5), xopt.SGD(momentum=0.9, dampening=0.5, impl="reference")
    p_ref = net(rng)
    p_fast = copies(p_ref)
    steps(fast, ref, p_fast, p_ref, rng)
    for opt in (fast, ref):
        for st in opt.state.values():
            st["step"] = STEPS[how](st["step"])
    steps(fast, ref, p_fast, p_ref, rng, n=4)
    same(fast, ref, p_fast, p_ref)


def test_buffers_swapped_between_two_params_of_one_shape_are_followed(rng, monkeypatch):
    counts = _counting(monkeypatch)
    fast, ref = xopt.Adam(), xopt.Adam(impl="reference")
    p_ref = net(rng, sizes=((6,), (6,)))
    p_fast = copies(p_ref)
    steps(fast, ref, p_fast, p_ref, rng)
    for opt in (fast, ref):
        a, b = opt.state["p0"], opt.state["p1"]
        a["m"], b["m"] = b["m"], a["m"]
    steps(fast, ref, p_fast, p_ref, rng)
    same(fast, ref, p_fast, p_ref)
    assert counts == {"quick": 5, "declined": 0}, counts  # the lane reads each step's buffers where they are


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "copy"])
def test_an_optimizer_copied_mid_run_steps_as_the_reference(how, rng):
    """A copy gets no plan (it names this process's arrays); a shallow copy shares the state dicts, so the
    original's plan must see the steps the copy counted in them."""
    import pickle

    dup = {"deepcopy": copy.deepcopy, "pickle": lambda o: pickle.loads(pickle.dumps(o)), "copy": copy.copy}[how]
    fast, ref = xopt.Adam(), xopt.Adam(impl="reference")
    p_ref = net(rng)
    p_fast = copies(p_ref)
    steps(fast, ref, p_fast, p_ref, rng)
    fast2, ref2 = dup(fast), dup(ref)
    p_fast2, p_ref2 = (p_fast, p_ref) if how == "copy" else (copies(p_fast), copies(p_ref))
    for _ in range(3):
        g = grads_like(p_ref, rng)
        for f, r, pf, pr in ((fast, ref, p_fast, p_ref), (fast2, ref2, p_fast2, p_ref2)):
            assert not _twin_errors(f, r, pf, pr, copies(g), copies(g))
    same(fast, ref, p_fast, p_ref)
    same(fast2, ref2, p_fast2, p_ref2)


def test_threads_stepping_small_params_lose_no_step_and_double_none():
    """Small tensors, so steps are quick ones (the lock taken at once) or wait for it: identical grads,
    so whatever the order, 4 x N steps must give 4N sequential steps, exactly."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can
    try:
        params = {"a": np.linspace(-1, 1, 50), "b": np.linspace(1, 2, 7)}
        grads = {k: np.cos(v) for k, v in params.items()}
        serial = copies(params)
        opt, serial_opt = xopt.Adam(), xopt.Adam()
        n = 300
        for _ in range(4 * n):
            serial_opt.update(serial, grads)

        _in_threads([(opt, params, grads)] * 4, n)
    finally:
        sys.setswitchinterval(old)
    assert opt.iter == 4 * n and {st["step"] for st in opt.state.values()} == {4 * n}
    for k in params:
        np.testing.assert_array_equal(params[k], serial[k])


def test_threads_stepping_their_own_optimizers_of_one_kind_keep_their_own_step_buffers():
    """Each thread steps its own Adam on its own params, all float64 (one kernel kind), switching threads as
    often as Python can: a step's head and scalars are packed in Python, then read by the compiled call, so
    threads sharing them would step one another's arrays or scalars.  Each ends as its serial twin."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    n, runs = 200, []
    for i in range(4):
        params = {"a": np.linspace(-1, 1, 30 + i), "b": np.full(3 + i, 0.5 + i)}
        grads = {k: np.cos(v) * (i + 1) for k, v in params.items()}
        serial = copies(params)
        serial_opt = xopt.Adam(lr=0.01 * (i + 1))
        for _ in range(n):
            serial_opt.update(serial, grads)
        runs.append((xopt.Adam(lr=0.01 * (i + 1)), params, grads, serial))

    try:
        _in_threads([run[:3] for run in runs], n)
    finally:
        sys.setswitchinterval(old)
    for opt, params, _, serial in runs:
        assert opt.iter == n
        for k in params:
            np.testing.assert_array_equal(params[k], serial[k])


@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("torch_tensors", [False, True])
def test_a_step_run_between_another_steps_packing_and_its_call_leaves_it_its_own_scalars(torch_tensors, parts,
                                                                                          monkeypatch, lane):
    """A signal handler runs between bytecodes: one that steps another optimizer of the same kind on this thread
    after a step packed its head and scalars and before its one call must not step that call with its own.
    Simulated: the first engine call into C runs the other optimizer's step first.  Both end as their serial
    twins.  ``parts``: 2, steps of two hyperparameter sets (overrides), whose call block was the thread's one
    (the outer step then ran the nested one's freed head: a crash)."""
    from xopt.engines import fused_cpu

    torch = pytest.importorskip("torch") if torch_tensors else None
    if torch_tensors:
        from xopt.engines import cpu_tensors  # imports torch: only where the test runs on tensors
    make = (lambda a: torch.tensor(a)) if torch_tensors else (lambda a: a)
    outer = {"a": make(np.linspace(-1, 1, 40)), "b": make(np.full(3, 0.5))}
    inner = {"x": make(np.linspace(2, 3, 7)), "y": make(np.full(5, -1.0))}
    g_outer = {k: make(np.cos(np.asarray(v))) for k, v in outer.items()}
    g_inner = {"x": make(np.full(7, 3.0)), "y": make(np.full(5, 0.25))}
    plain = (lambda v: v.numpy()) if torch_tensors else (lambda v: v)
    twins = [{k: plain(v).copy() for k, v in d.items()} for d in (outer, inner)]
    over = ({"b": {"lr": 0.01}}, {"y": {"lr": 0.5}}) if parts == 2 else (None, None)
    a, b = xopt.Adam(lr=0.1, overrides=over[0]), xopt.Adam(lr=0.001, beta1=0.5, beta2=0.6, overrides=over[1])
    ra = xopt.Adam(lr=0.1, overrides=over[0], impl="reference")
    rb = xopt.Adam(lr=0.001, beta1=0.5, beta2=0.6, overrides=over[1], impl="reference")
    for opt, params, grads in ((a, outer, g_outer), (b, inner, g_inner)):
        opt.update(params, grads)  # the state exists: the next steps are the lane's one-part ones
    for ref, params, grads in ((ra, twins[0], g_outer), (rb, twins[1], g_inner)):
        ref.update(params, {k: plain(v) for k, v in grads.items()})
    module = cpu_tensors if torch_tensors else fused_cpu
    real, nested, checked_again = module.together, [], []

    def together(calls):
        if not nested:
            nested.append(True)
            b.update(inner, g_inner)  # "the handler's" step, in the window
        return real(calls)

    monkeypatch.setattr(module, "together", together)
    if not torch_tensors:  # the small step's one call refused (it ran another step's freed head) goes there
        arrays = fused_cpu._cpu_arrays
        monkeypatch.setattr(fused_cpu, "_cpu_arrays", lambda: checked_again.append(True) or arrays())
    del lane[:]
    a.update(outer, g_outer)
    monkeypatch.setattr(module, "together", real)
    assert lane == [True, True], lane  # both steps the lane's (the handler's first): none declined and redone
    assert not checked_again  # each ran in its own one call
    rb.update(twins[1], {k: plain(v) for k, v in g_inner.items()})
    ra.update(twins[0], {k: plain(v) for k, v in g_outer.items()})
    assert nested and a.iter == 2 and b.iter == 2
    for params, twin in ((outer, twins[0]), (inner, twins[1])):
        for k in params:
            np.testing.assert_allclose(plain(params[k]), twin[k], rtol=1e-12, atol=1e-15)


def _in_threads(jobs, n):
    """One thread per (optimizer, params, grads) of ``jobs``, each updating n times; all joined."""

    def work(opt, params, grads):
        for _ in range(n):
            opt.update(params, grads)

    threads = [threading.Thread(target=work, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- found (before 3a97ab6 too): an optimizer lived until the cyclic GC ran -------------------------------
LIVES = {  # optimizer, how its steps run
    "no-step": (lambda: xopt.Adam(), 0), "fused-lane": (lambda: xopt.Adam(), 4),
    "reference": (lambda: xopt.Adam(impl="reference"), 4),
    "override-for-some": (lambda: xopt.Adam(overrides={"b": {"lr": 0.1}}), 4),
    "lr-schedule": (lambda: xopt.Adam(lr=xopt.schedules.linear_schedule(0.01, 0.001, 10)), 4),
    "clipped": (lambda: xopt.Adam(clip_grad_norm=0.5), 4),
}


@pytest.mark.parametrize("how", list(LIVES))
def test_an_optimizer_and_its_state_are_freed_without_the_cyclic_gc(how):
    """The optimizer's hyperparameter sets held the optimizer itself (group 0's view is ``self``), and so did
    its plan (each table's view, each reference entry's ``opt``): opt -> ... -> opt, so its state buffers
    (as large as the model) stayed until a full collection."""
    import gc
    import weakref

    make, n = LIVES[how]
    params = {"a": np.ones(100), "b": np.ones(3)}
    was = gc.isenabled()
    gc.disable()
    try:
        opt = make()
        for _ in range(n):
            opt.update(params, {"a": np.ones(100), "b": np.ones(3)})
        alive = [weakref.ref(opt)] + [weakref.ref(b) for st in opt.state.values() for k, b in st.items() if k != "step"]
        del opt
        left = [r() for r in alive if r() is not None]
        assert not left, [type(x).__name__ for x in left]
    finally:
        if was:
            gc.enable()


# -- the lane's first step: it makes the state, and takes it back when it declines ------------------------
@pytest.mark.parametrize("bad", ["shape", "read-only", "int-grad", "overlap"])
def test_a_first_step_the_lane_declines_leaves_no_state(bad, rng, lane):
    opt = xopt.Adam()
    params = {"a": rng.standard_normal(5), "b": rng.standard_normal(3)}
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    if bad == "shape":
        grads["b"] = rng.standard_normal(4)
    elif bad == "read-only":
        params["b"].flags.writeable = False
    elif bad == "int-grad":
        grads["b"] = np.ones(3, dtype=np.int64)
    else:
        grads["b"] = params["a"][:3]
    before = copies(params)
    with pytest.raises((ValueError, TypeError)):
        opt.update(params, grads)
    assert lane == [False] and opt.state == {} and opt.iter == 0
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])


def test_params_added_mid_run_start_their_state_in_the_lane(rng, lane):
    """A new param joins at step 3: its state is made, and its step 1 and the others' step 4 are one call."""
    fast, ref = xopt.Adam(), xopt.Adam(impl="reference")
    p_ref = net(rng)
    p_fast = copies(p_ref)
    steps(fast, ref, p_fast, p_ref, rng)
    p_ref["new"] = rng.standard_normal(11)
    p_fast["new"] = p_ref["new"].copy()
    steps(fast, ref, p_fast, p_ref, rng, n=2)
    same(fast, ref, p_fast, p_ref)
    assert fast.state["new"]["step"] == 2 and all(lane[1::2])


def test_a_first_step_with_overrides_takes_the_lane_its_patterns_checked(rng, lane):
    """The lane checks the override patterns until a step is taken, and takes every step, the first too."""
    fast, ref = (xopt.Adam(overrides={"p1": {"lr": 0.1}}, impl=impl) for impl in ("auto", "reference"))
    p_ref = net(rng)
    p_fast = copies(p_ref)
    steps(fast, ref, p_fast, p_ref, rng, n=3)
    same(fast, ref, p_fast, p_ref)
    assert lane[1::2] == [True, True, True]
    with pytest.raises(ValueError, match="matches no param"):
        xopt.Adam(overrides={"nothing*": {"lr": 0.1}}).update(copies(p_fast), grads_like(p_fast, rng))


def test_a_copied_optimizers_hyperparameters_are_its_own(rng):
    """Hyperparameters are plain attributes mirrored in ``_hyper``: a copy that shared the dict would read one
    value and save another."""
    import pickle

    opt = xopt.Adam(lr=0.1)
    for other in (copy.copy(opt), copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        other.lr = 0.5
        assert (opt.lr, opt._hyper["lr"], opt.state_dict()["hyperparameters"]["lr"]) == (0.1, 0.1, 0.1)
        assert (other.lr, other._hyper["lr"]) == (0.5, 0.5)
    opt.lr = 0.2
    assert opt._at(0, 0).lr == 0.2 and opt.current_lr("nothing") == 0.2


def test_a_skipped_first_step_makes_no_state(rng, lane):
    """skip_nonfinite skips a first step with a NaN grad: no state is left, as on the checked path."""
    for clip in (None, 1.0):
        fast, ref = (xopt.Adam(skip_nonfinite=True, clip_grad_norm=clip, impl=impl) for impl in ("auto", "reference"))
        for opt in (fast, ref):
            opt.update({"w": np.ones(3), "x": np.ones(2)}, {"w": np.array([1.0, np.nan, 0.0]), "x": np.ones(2)})
            assert opt.state == {} and opt.skipped_steps == 1 and opt.iter == 0 and opt.m is None
    assert lane[0::2] == [True, True]


@pytest.mark.parametrize("bad", [[1], "array", None])
def test_a_malformed_step_count_gets_the_checked_paths_error(bad, rng, lane):
    opt = xopt.Adam()
    params = {"a": np.ones(3), "b": np.ones(2)}
    opt.update(params, grads_like(params, rng))
    opt.state["b"]["step"] = np.array([1, 1]) if bad == "array" else bad
    with pytest.raises((ValueError, TypeError), match="'b'"):
        opt.update(params, grads_like(params, rng))
    assert lane[-1] is False and opt.state["a"]["step"] == 1


def test_a_first_step_whose_schedule_raises_makes_no_state(rng):
    """New params mid-run, one in an override group whose lr schedule raises: no state is left for either."""
    def schedule(count):
        if count == 0 and armed:
            raise RuntimeError("schedule refused")
        return 0.1

    armed = False
    opt = xopt.Adam(overrides={"b*": {"lr": schedule}})
    params = {"a": np.ones(3), "b": np.ones(2)}
    opt.update(params, grads_like(params, rng))
    armed = True
    params.update({"a2": np.ones(4), "b2": np.ones(5)})
    with pytest.raises(RuntimeError, match="schedule refused"):
        opt.update(params, grads_like(params, rng))
    assert sorted(opt.state) == ["a", "b"]


def test_a_0d_param_whose_state_has_another_shape_is_refused():
    """A param replaced by a 0-d array keeps its old state (shape (7,)): the lane read a 0-d array's NULL dims
    pointer as "any shape" and stepped it; now every path refuses it, naming it, and nothing is written."""
    opt = xopt.Nesterov()
    params = {"a": np.ones(7, np.float32), "b": np.ones(3, np.float32)}
    for _ in range(2):
        opt.update(params, {"a": np.ones(7, np.float32), "b": np.ones(3, np.float32)})
    params["a"] = np.ones((), np.float32)
    before = {k: v.copy() for k, v in opt.state["b"].items() if k != "step"}
    with pytest.raises(ValueError, match="param 'a' has shape \\(\\) but its optimizer state 'v'"):
        opt.update(params, {"a": np.ones((), np.float32), "b": np.ones(3, np.float32)})
    assert opt.iter == 2 and opt.state["b"]["step"] == 2
    np.testing.assert_array_equal(opt.state["b"]["v"], before["v"])


def test_a_users_subclass_reads_its_own_attributes_under_a_schedule_and_overrides():
    """A hyperparameter set of a user's subclass carries the subclass's own attributes (not the state)."""

    class ScaledSGD(xopt.SGD):
        def __init__(self, scale=2.0, **kw):
            super().__init__(**kw)
            self.scale = scale

        def scalars(self, step):
            s = super().scalars(step)
            s["lr"] *= self.scale
            return s

    for opt in (ScaledSGD(lr=lambda t: 0.1), ScaledSGD(lr=0.1, overrides={"a": {"lr": 0.1}})):
        params = {"a": np.ones(3)}
        opt.update(params, {"a": np.ones(3)})
        np.testing.assert_array_equal(params["a"], np.full(3, 0.8))


def test_impl_fused_refusing_a_param_under_a_schedule_names_it():
    xps = pytest.importorskip("array_api_strict")
    opt = xopt.Adam(impl="fused", lr=lambda t: 1e-3)
    with pytest.raises(TypeError, match="no fused kernel takes param 'w'"):
        opt.update({"w": xps.ones(3, dtype=xps.float64)}, {"w": xps.ones(3, dtype=xps.float64)})


def test_momentum_has_no_switch_that_only_its_kernel_reads():
    with pytest.raises(AttributeError):
        xopt.Momentum().nesterov_flag = 1.0


def test_forgetting_ended_threads_buffers_while_other_threads_step():
    """Past its size, the pool of step buffers drops ended threads' entries while other threads take and give
    back theirs: the walk over its keys must not see the dict change size (it raised out of a valid update)."""
    from xopt.engines import cpu_step

    saved = dict(cpu_step.SCRATCH)
    stop, errors = threading.Event(), []

    def churn(i):
        while not stop.is_set():
            key = (threading.get_ident(), i)
            cpu_step.SCRATCH[key] = None
            for _ in range(3):  # a loop's jump back: where a thread switch can come, the entry held meanwhile
                pass
            cpu_step.SCRATCH.pop(key, None)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for r in range(300):
            for k in range(300):
                cpu_step.SCRATCH[(-1 - k, r)] = None  # an ended thread's (no thread has a negative ident)
            try:
                cpu_step._prune()
            except RuntimeError as e:
                errors.append(e)
                break
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(old)
        cpu_step.SCRATCH.clear()
        cpu_step.SCRATCH.update(saved)
    assert not errors, errors
