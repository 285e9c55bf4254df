"""A step's writes run in one call into C: no Python code (so no Python signal handler) runs among them.

``xopt._atomic.together`` is where every path makes its writes and counts its step.  These tests watch a
step with ``sys.setprofile``: every Python function that starts while ``together`` runs is a place where a
signal handler could run in the middle of a step, so there must be none; and the step must have made
its writes there (its arrays and counts change only inside ``together``).
"""

from __future__ import annotations

import sys
import threading
import warnings

import numpy as np
import pytest

import xopt
from xopt import _atomic


def _compiled_codes():
    """The code objects of the numba functions xopt calls: numba reports a call of one to a profiler as if it
    were Python (a frame it makes up), though no bytecode runs."""
    from numba.core.dispatcher import Dispatcher
    from xopt.engines import cpu_drivers, cpu_memory, cpu_rules, cpu_step, cpu_table, fused_cpu

    codes = [f.py_func.__code__ for m in (cpu_drivers, cpu_memory, cpu_rules, cpu_step, cpu_table, fused_cpu)
             for f in vars(m).values()
             if isinstance(f, Dispatcher)]
    return {_where(code) for code in codes}


def _where(code):
    return code.co_filename, code.co_firstlineno, code.co_name


# numba builds the exception of a compiled call with this Python function: xopt's kernels raise only where
# they wrote nothing (fused_cpu.NotRun), so it runs before any write of the step.
_BEFORE_ANY_WRITE = {"_numba_unpickle"}


def _watch(step):
    """Run ``step()``; return (Python functions started inside together, together's calls, what changed
    outside it: names of the arrays and counts seen to change between two profile events outside)."""
    inside = []
    calls = [0]
    depth = [0]
    code = _atomic.together.__code__
    compiled = _compiled_codes()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is code:
            depth[0] += 1
            calls[0] += 1
        elif event == "return" and frame.f_code is code:
            depth[0] -= 1
        elif (event == "call" and depth[0] and _where(frame.f_code) not in compiled
              and frame.f_code.co_name not in _BEFORE_ANY_WRITE):
            inside.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        step()
    finally:
        sys.setprofile(None)
    return inside, calls[0]


def _params(n, size, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {f"w{i}": rng.standard_normal(size).astype(dtype) for i in range(n)}


CASES = {
    "lane, small": (lambda: xopt.Adam(), 3, 100, np.float32),
    "lane, clip and skip": (lambda: xopt.Adam(clip_grad_norm=0.5, skip_nonfinite=True), 3, 100, np.float32),
    "lane, overrides": (lambda: xopt.AdamW(overrides={"w1": {"lr": 0.1}}), 3, 100, np.float32),
    "lane, several threads": (lambda: xopt.Adam(), 1, 1 << 22, np.float32),
    "checked, float16": (lambda: xopt.Adam(), 2, 100, np.float16),
    "reference": (lambda: xopt.Adam(impl="reference"), 2, 100, np.float32),
    "reference, chunked": (lambda: xopt.RMSprop(impl="reference"), 1, 1 << 17, np.float32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_step_runs_no_python_code_among_its_writes(case):
    make, n, size, dtype = CASES[case]
    before = xopt.set_num_threads(2)
    warm, params = make(), _params(n, size, dtype)
    for k in range(2):  # the kernels compiled or loaded (Python code, before any write) outside the watch
        warm.update(params, _params(n, size, dtype, seed=k + 1))
    opt = make()
    params = _params(n, size, dtype)
    try:
        for k in range(3):
            grads = _params(n, size, dtype, seed=k + 1)
            old = {key: p.copy() for key, p in params.items()}
            inside, calls = _watch(lambda: opt.update(params, grads))
            assert calls >= 1, "the step made no writes through together"
            assert not inside, f"Python code ran among a step's writes: {inside[:8]}"
            assert opt.iter == k + 1 and all(st["step"] == k + 1 for st in opt.state.values())
            assert any(not np.array_equal(old[key], params[key]) for key in params)
    finally:
        xopt.set_num_threads(before)


def test_float_params_are_rebound_inside_the_writes():
    xopt.SGD(lr=0.5).update({"x": 1.0, "y": np.float32(2.0)}, {"x": 1.0, "y": np.float32(1.0)})  # compiled
    params = {"x": 1.0, "y": np.float32(2.0)}
    opt = xopt.SGD(lr=0.5)
    inside, calls = _watch(lambda: opt.update(params, {"x": 1.0, "y": np.float32(1.0)}))
    assert not inside and calls >= 1
    assert params == {"x": 0.5, "y": np.float32(1.5)} and type(params["y"]) is np.float32


def test_torch_reference_writes_are_c_calls():
    torch = pytest.importorskip("torch")
    params = {"w": torch.nn.Parameter(torch.ones(5)), "b": torch.ones(3)}
    opt = xopt.Adam()
    inside, calls = _watch(lambda: opt.update(params, {"w": torch.full((5,), 0.5), "b": torch.ones(3)}))
    assert not inside and calls >= 1
    assert opt.state["w"]["step"] == 1 and float(params["w"].detach()[0]) < 1.0


def test_a_skipped_first_step_leaves_no_state():
    opt = xopt.Adam(skip_nonfinite=True)
    params = {"a": np.ones(3, np.float32)}
    inside, _ = _watch(lambda: opt.update(params, {"a": np.array([1.0, np.nan, 1.0], np.float32)}))
    assert not inside
    assert opt.state == {} and opt.skipped_steps == 1 and opt.iter == 0
    np.testing.assert_array_equal(params["a"], 1.0)


def test_together_stops_at_the_first_call_that_raises():
    done = []
    with pytest.raises(ZeroDivisionError):
        _atomic.together([lambda: done.append(1), lambda: 1 / 0, lambda: done.append(2)])
    assert done == [1]


def test_a_guard_of_a_forked_child_is_free():
    """A fork while another thread holds the optimizer's lock: the child's step does not wait for ever."""
    import os

    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    guard = _atomic.StepGuard()
    held, release = threading.Event(), threading.Event()

    def hold():
        guard.run(lambda: (held.set(), release.wait()))

    t = threading.Thread(target=hold)
    t.start()
    held.wait()
    try:
        with warnings.catch_warnings():  # JAX, if a test before imported it, warns at every fork
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            pid = os.fork()
        if pid == 0:  # the child: the lock was held by a thread it does not have
            ok = guard.lock.acquire(timeout=0) is False and guard.run(lambda: 7) == 7
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        t.join()
    assert os.waitstatus_to_exitcode(status) == 0


_FIRST_STEPS = """
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np, xopt
from xopt import _atomic
import test_atomic

at = {"call": 0}
def counted(f):  # together's calls, numbered: Python may run only inside the first (a kernel's own dispatch,
    at["call"] += 1  # which types its arguments before it writes anything)
    return f()
_atomic.CALL = counted
found = []
compiled = test_atomic._compiled_codes()  # numba's made-up frames of compiled calls: no bytecode
def profile(frame, event, arg):
    code = frame.f_code
    if event == "call" and at["call"] > 1 and code.co_name not in ("counted", "numbered", "together") \
            and test_atomic._where(code) not in compiled:
        found.append(f"call {at['call']}: {code.co_filename}:{code.co_name}")
xopt.set_num_threads(2)
rng = np.random.default_rng(0)
for dtype in (np.float32, np.float64):  # each dtype's kernels met for the first time inside these steps
    for opt, n in ((xopt.Adam(), 1 << 22), (xopt.Adam(clip_grad_norm=1.0), 1 << 22), (xopt.Adam(), 100)):
        params = {"a": rng.standard_normal(n).astype(dtype), "h": rng.standard_normal(8).astype(np.float16)}
        for _ in range(2):
            grads = {k: np.ones_like(v) for k, v in params.items()}
            real = _atomic.together
            def numbered(calls):
                at["call"] = 0
                real(calls)
                at["call"] = 0
            _atomic.together = numbered
            for module in ("fused_cpu", "_checked", "_lane"):
                m = sys.modules.get("xopt." + module) or sys.modules.get("xopt.engines." + module)
                if hasattr(m, "together"):
                    m.together = numbered
            sys.setprofile(profile)
            try:
                opt.update(params, grads)
            finally:
                sys.setprofile(None)
                _atomic.together = real
print("inside", found[:10])
"""


def _fill_the_disk_cache_as_the_child_steps():
    """The steps of ``_FIRST_STEPS``, here and unwatched: numba's disk cache then holds their kernels, and the
    child's first calls load them (typing the arguments and loading, in Python, where a compile would be)
    instead of compiling them under ``sys.setprofile``, which makes numba's compiler many times slower."""
    before = xopt.set_num_threads(2)
    try:
        rng = np.random.default_rng(0)
        for dtype in (np.float32, np.float64):
            for opt, n in ((xopt.Adam(), 1 << 22), (xopt.Adam(clip_grad_norm=1.0), 1 << 22), (xopt.Adam(), 100)):
                params = {"a": rng.standard_normal(n).astype(dtype), "h": rng.standard_normal(8).astype(np.float16)}
                for _ in range(2):
                    opt.update(params, {k: np.ones_like(v) for k, v in params.items()})
    finally:
        xopt.set_num_threads(before)


def test_a_processes_first_steps_load_their_kernels_before_any_write():
    """numba types a compiled function's arguments in Python at its first call with new types (and loads or
    compiles it): for every kernel of a step that is done before the step's writes, not among them.  The child
    loads them: a compile happens at the same place as a load (the dispatcher's, at the first call), so where
    it runs is checked either way, without numba's compiler under the child's profiler."""
    import pathlib
    import subprocess

    _fill_the_disk_cache_as_the_child_steps()
    run = subprocess.run([sys.executable, "-c", _FIRST_STEPS, str(pathlib.Path(__file__).parent)],
                         capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "inside []", run.stdout[-3000:] + run.stderr[-3000:]


# -- a load is all or nothing too ---------------------------------------------------------------------------
def _seen(opt):
    """Everything a load sets, comparable: hyperparameters, overrides, counts, every buffer's bytes, and the
    subclasses' own fields (NAdam's products of μ, ScheduleFreeAdamW's mode and sums)."""
    state = {k: {n: (v if n == "step" else np.asarray(v).tobytes()) for n, v in st.items()}
             for k, st in opt.state.items()}
    own = {n: repr(opt.__dict__.get(n)) for n in ("_mu_products", "training", "_averages")}
    return dict(opt._hyper), repr(opt._overrides), opt.iter, opt.skipped_steps, state, own


def _stepped(cls, lr, steps, seed):
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    opt = cls(lr=lr, overrides={"b": {"lr": lr / 2}})
    for _ in range(steps):
        opt.update(params, {k: rng.standard_normal(v.shape) for k, v in params.items()})
    return opt


class _Interrupt(BaseException):
    pass


@pytest.mark.parametrize("cls", [xopt.Adam, xopt.NAdam, xopt.ScheduleFreeAdamW])
def test_a_load_interrupted_at_any_line_leaves_the_optimizer_as_it_was_or_loaded(cls):
    """A load made its writes in several statements (the hyperparameters, then the overrides, the state, the
    counts; a subclass's fields after them): a signal handler raising between two of them (Ctrl-C) left an
    optimizer with the new hyperparameters and the old state.  CPython runs a handler where a Python function
    starts (as ``xopt._atomic`` says): here an exception is raised as each Python function of the load starts
    in turn, but not inside the check of the state dict (``state_check.checked_state``), which writes nothing
    and would take a thousand calls.  Each time the optimizer is as it was or as loaded, and free for the next
    call."""
    source = _stepped(cls, 0.2, 3, seed=1)
    if cls is xopt.ScheduleFreeAdamW:
        source.eval({"w": np.zeros((4, 3)), "b": np.zeros(3)})  # the mode travels with the state
    sd = source.state_dict()
    loaded = _stepped(cls, 0.1, 2, seed=0)
    loaded.load_state_dict(sd)
    after = _seen(loaded)
    lines = interrupted = 0
    while True:
        opt = _stepped(cls, 0.1, 2, seed=0)
        before = _seen(opt)
        assert before != after
        count, checking = [0], [0]

        def trace(frame, event, arg, at=lines):
            code = frame.f_code
            if code.co_name == "checked_state" and code.co_filename.endswith("state_check.py"):
                checking[0] += {"call": 1, "return": -1}.get(event, 0)
            if event == "call" and not checking[0]:
                count[0] += 1
                if count[0] == at + 1:
                    raise _Interrupt
            return trace

        sys.settrace(trace)
        try:
            opt.load_state_dict(sd)
        except _Interrupt:
            interrupted += 1
        finally:
            sys.settrace(None)
        seen = _seen(opt)
        assert seen == before or seen == after, f"interrupted at call {lines + 1} of the load"
        assert not opt._guard.held(), f"call {lines + 1}: the guard is held"
        if count[0] <= lines:  # the load ran whole: every call was tried
            break
        lines += 1
    assert interrupted >= 3 and _seen(opt) == after
