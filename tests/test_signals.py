"""A step is all or nothing whatever signal arrives, and xopt installs no signal handler.

Every case runs in a child process of its own (signals, timers and fork never touch the test
runner): :data:`HEADER` is the start of every child's script, :func:`run_child` runs one.

Consistency is checked one way everywhere (:class:`Attempts`, in the header): attempt ``i``
of a run applies ``grads_of(i)`` (a seeded generator's, by attempt index); the child logs
``opt.iter`` before each attempt and which attempts returned.  Afterwards a fresh optimizer
with the same impl applies, in order, exactly the grads of the attempts that moved the count
from k to k + 1, to copies of the initial params; its params, every state buffer, every
param's step count and ``opt.iter`` must equal the interrupted run's bit for bit.  An attempt
that raised moved the count by 0 or 1; one that returned, by exactly 1.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ["auto", "reference"]
# The hunts (random signals at random moments) run on the default path by default; on the reference path too
# with -m slow (CI runs both).
HUNT_IMPLS = ["auto", pytest.param("reference", marks=pytest.mark.slow)]

# The start of every child's script (after ``SEED = ...`` and ``WATCHDOG = ...``).
HEADER = r'''
import faulthandler, itertools, json, os, random, signal, sys, threading, time
faulthandler.dump_traceback_later(WATCHDOG, exit=True)  # a hang prints every thread's stack, then exits
import numpy as np

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)
CAUGHT = (KeyboardInterrupt, SystemExit)
QUIET = {}  # signal number -> arrivals while a non-raising handler was installed


class Alarm(Exception):
    """What the SIGALRM handlers raise."""


CAUGHT += (Alarm,)


def raise_alarm(signum, frame):
    raise Alarm


def quiet(signum, frame):
    QUIET[signum] = QUIET.get(signum, 0) + 1


def copies(arrays):
    return {k: np.array(v, copy=True) for k, v in arrays.items()}


def report(**facts):
    print("RESULT " + json.dumps(facts), flush=True)


def same_run(opt, params, ref, ref_params, where):
    """The run's params, state (every buffer, every step count) and opt.iter equal the replay's, bit for bit."""
    problems = []
    if opt.iter != ref.iter:
        problems.append(f"opt.iter is {opt.iter}, the replay's {ref.iter}")
    for k in ref_params:
        try:
            np.testing.assert_array_equal(params[k], ref_params[k])
        except AssertionError:
            bad = int(np.count_nonzero(params[k] != ref_params[k]))
            problems.append(f"param {k!r}: {bad} of {params[k].size} elements differ from the replay's")
    if set(opt.state) != set(ref.state):
        problems.append(f"state keys {sorted(opt.state)}, the replay's {sorted(ref.state)}")
    for k in set(opt.state) & set(ref.state):
        st, rs = opt.state[k], ref.state[k]
        if set(st) != set(rs):
            problems.append(f"state[{k!r}] holds {sorted(st)}, the replay's {sorted(rs)}")
            continue
        if st["step"] != rs["step"]:
            problems.append(f"state[{k!r}]['step'] is {st['step']}, the replay's {rs['step']}")
        for name in rs:
            if name == "step":
                continue
            if st[name].dtype != rs[name].dtype:
                problems.append(f"state[{k!r}][{name!r}] is {st[name].dtype}, the replay's {rs[name].dtype}")
                continue
            try:
                np.testing.assert_array_equal(st[name], rs[name])
            except AssertionError:
                bad = int(np.count_nonzero(st[name] != rs[name]))
                problems.append(f"state[{k!r}][{name!r}]: {bad} of {st[name].size} elements differ from the replay's")
    assert not problems, f"{where}: the run is not a replay of its counted steps: " + "; ".join(problems)


class Attempts:
    """A run's attempted steps and their replay (see the test module's docstring).

    ``log``: (attempt, opt.iter just before it); ``ok``: the attempts whose update() returned.
    Attempt indices come from ``counter`` (next() is one call: an exception cannot land inside it).
    """

    def __init__(self, make_opt, params, grads_of):
        self.make_opt, self.grads_of = make_opt, grads_of
        self.counter = itertools.count()
        self.log, self.ok = [], []
        self.replay, self.replay_params = make_opt(), copies(params)
        self.checked = 0  # log entries replayed so far
        self.advanced = self.returned = self.interrupted = 0

    def run(self, opt, params, seconds):
        """Attempts, one after the other, until something raises (or ``seconds`` pass: returns False)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            i = next(self.counter)
            g = self.grads_of(i)
            self.log.append((i, opt.iter))
            opt.update(params, g)
            self.ok.append(i)
        return False

    def check(self, opt, params, where):
        """Each attempt logged since the last check moved the count by 0 or 1 (exactly 1 if it returned);
        the replay of those that moved it equals the run."""
        ok = set(self.ok)
        new = self.log[self.checked:]
        after = [before for _, before in new[1:]] + [opt.iter]
        raised = []
        for (i, before), end in zip(new, after):
            moved = end - before
            if i in ok:
                self.returned += 1
                assert moved == 1, f"{where}: attempt {i} returned but moved opt.iter by {moved}"
            else:
                self.interrupted += 1
                raised.append(moved)
                assert moved in (0, 1), f"{where}: attempt {i} raised and moved opt.iter by {moved}"
            if moved == 1:
                self.advanced += 1
                self.replay.update(self.replay_params, self.grads_of(i))
        self.checked = len(self.log)
        where += f" ({len(new)} attempts, {len(raised)} of them raised, {sum(raised)} of those counted)"
        same_run(opt, params, self.replay, self.replay_params, where)

    def facts(self):
        return {"attempts": len(self.log), "advanced": self.advanced, "returned": self.returned,
                "interrupted": self.interrupted}


def big_run(impl, n, seed, pool=4):
    """An Adam run on one float32 param of n elements: (optimizer, params, Attempts); attempt i's grad is
    one of ``pool`` arrays made once, picked by a generator seeded with (seed, i)."""
    import xopt

    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal(n, dtype=np.float32)}
    grads = [rng.standard_normal(n, dtype=np.float32) for _ in range(pool)]

    def grads_of(i):
        return {"w": grads[int(np.random.default_rng([seed, i]).integers(pool))]}

    make = lambda: xopt.Adam(lr=0.01, impl=impl)
    warm = make()  # kernels loaded before the first signal
    warm.update(copies(params), grads_of(0))
    t0 = time.perf_counter()
    warm.update(copies(params), grads_of(1))
    attempts = Attempts(make, params, grads_of)
    attempts.step_s = time.perf_counter() - t0  # what one step takes here: signals land within a few
    return make(), params, attempts
'''


def script(body, seed=0, watchdog=60):
    """A child's whole script: the header, then ``body``."""
    return f"SEED = {int(seed)}\nWATCHDOG = {watchdog}\n" + HEADER + textwrap.dedent(body)


def child_env(**extra):
    """The environment of a child: this checkout's xopt first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


def outcome(stdout):
    """The facts a child reported (its last RESULT line)."""
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the child reported nothing:\n{stdout[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def run_child(body, *args, seed=0, timeout=60, env=None):
    """Run a child to its end; fail with its output unless it exits 0; return what it reported."""
    proc = subprocess.run([sys.executable, "-c", script(body, seed, timeout - 5), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env or child_env(), cwd=ROOT)
    assert proc.returncode == 0, (f"child exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                                  f"--- stderr\n{proc.stderr[-8000:]}")
    facts = outcome(proc.stdout)
    print("child:", facts)
    return facts


@pytest.fixture
def seed(rng):
    return int(rng.integers(2**31))


# -- 1. a notebook: SIGINT's handler reset to the default around every cell -----------------------------------
_JUPYTER = """
impl = sys.argv[1]
opt, params, attempts = big_run(impl, 2**22, SEED)
rnd = random.Random(SEED)
between = lambda signum, frame: None  # what the kernel installs between cells
for cell in range(4):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as ipykernel does before each cell
    timer = threading.Timer(rnd.uniform(0.5, 3.0) * attempts.step_s, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        attempts.run(opt, params, 20)
        raise AssertionError(f"cell {cell}: no KeyboardInterrupt within 20 s of a SIGINT")
    except KeyboardInterrupt:
        pass
    timer.join()
    signal.signal(signal.SIGINT, between)  # and a handler of its own after it
    attempts.check(opt, params, f"cell {cell} ({impl})")
report(**attempts.facts())
"""


@pytest.mark.parametrize("impl", HUNT_IMPLS)
def test_ctrl_c_in_notebook_cells_never_splits_a_step(impl, seed):
    """Four notebook cells, each interrupted by a SIGINT at a random moment while Adam steps a 2^22 float32
    param; SIGINT's handler is Python's default inside each cell and another one between cells (ipykernel).
    After each cell the run must be the replay of its counted steps."""
    facts = run_child(_JUPYTER, impl, seed=seed)
    assert facts["advanced"] >= 1, facts


# -- 2. SIGTERM and SIGALRM handlers that raise ---------------------------------------------------------------
_RAISING = """
impl = sys.argv[1]
opt, params, attempts = big_run(impl, 2**22, SEED)
rnd = random.Random(SEED)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
signal.signal(signal.SIGALRM, raise_alarm)
for round in range(6):
    delay = rnd.uniform(0.5, 3.0) * attempts.step_s  # at any moment of the first few steps
    if round % 2 == 0:
        expected, timer = SystemExit, threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
    else:
        expected, timer = Alarm, None
        signal.setitimer(signal.ITIMER_REAL, delay)
    try:
        attempts.run(opt, params, 20)
        raise AssertionError(f"round {round}: nothing raised within 20 s of the signal")
    except expected:
        pass
    if timer is not None:
        timer.join()
    attempts.check(opt, params, f"after {expected.__name__} in round {round} ({impl})")
report(**attempts.facts())
"""


@pytest.mark.parametrize("impl", HUNT_IMPLS)
def test_raising_sigterm_and_sigalrm_handlers_never_split_a_step(impl, seed):
    """A SIGTERM handler that calls sys.exit(0) and a SIGALRM one (setitimer) that raises, each landing at a
    random moment while Adam steps a 2^22 float32 param: after each, the run is the replay of its counted
    steps."""
    facts = run_child(_RAISING, impl, seed=seed)
    assert facts["advanced"] >= 1, facts


# -- 3. a barrage of signals from another process --------------------------------------------------------------
_BARRAGE = """
import xopt
impl, size = sys.argv[1], sys.argv[2]
if size == "small":
    steps, shapes = 2000, {"W": (64, 32), "b": (32,), "k": (7, 3), "s": (1,)}
    rng = np.random.default_rng(SEED)
    params = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}

    def grads_of(i):
        r = np.random.default_rng([SEED, i])
        return {k: r.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}

    make = lambda: xopt.Adam(lr=0.01, impl=impl)
    opt, attempts = make(), Attempts(make, params, grads_of)
    for _ in range(2):
        make().update(copies(params), grads_of(0))  # kernels loaded before the first signal
else:
    steps = 150
    opt, params, attempts = big_run(impl, 2**20, SEED)
    for _ in range(2):  # steps of a param with state: a first step takes longer than the signals' spacing
        i = next(attempts.counter)
        attempts.log.append((i, opt.iter))
        opt.update(params, attempts.grads_of(i))
        attempts.ok.append(i)

armed = [False]  # SIGTERM's and SIGALRM's handlers raise only while a step is attempted


def term(signum, frame):
    if armed[0]:
        sys.exit(0)
    quiet(signum, frame)


def alarm(signum, frame):
    if armed[0]:
        raise Alarm
    quiet(signum, frame)


def enter():  # before each step, as a notebook's kernel does before each cell
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, term)
    signal.signal(signal.SIGALRM, alarm)


def leave():  # and other handlers after it
    for s in SIGNALS:
        signal.signal(s, quiet)


leave()
print("ready", flush=True)
finished = False
while not finished:
    try:
        while True:
            i = next(attempts.counter)
            if i >= steps:
                finished = True
                break
            g = attempts.grads_of(i)
            try:
                enter()
                armed[0] = True
                attempts.log.append((i, opt.iter))
                opt.update(params, g)
                attempts.ok.append(i)
            finally:
                armed[0] = False
                leave()
    except CAUGHT:
        pass
for s in SIGNALS:
    signal.signal(s, signal.SIG_IGN)
print("done", flush=True)
attempts.check(opt, params, f"after the barrage ({impl}, {size})")
report(quiet=sum(QUIET.values()), **attempts.facts())
"""

_BARRAGE_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)


def barrage(body, args, seed, timeout=90):
    """Run a child while this process sends it SIGINT, SIGTERM and SIGALRM at random moments (0-3 ms apart),
    from its "ready" line to its "done" line; return what it reported."""
    with tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([sys.executable, "-c", script(body, seed, timeout - 10), *map(str, args)],
                                 stdout=subprocess.PIPE, stderr=err, text=True, env=child_env(), cwd=ROOT)
        lines, done = [], threading.Event()

        def read():
            for line in child.stdout:
                lines.append(line)
                if line.strip() == "done":
                    done.set()
            done.set()  # the child's output ended

        with child:
            ready = child.stdout.readline()
            reader = threading.Thread(target=read, daemon=True)
            sent = 0
            if ready.strip() == "ready":
                reader.start()
                rnd, end = random.Random(seed), time.monotonic() + timeout - 15
                while not done.is_set() and time.monotonic() < end:
                    time.sleep(rnd.uniform(0, 0.003))
                    os.kill(child.pid, rnd.choice(_BARRAGE_SIGNALS))  # not reaped before wait(): still our child
                    sent += 1
            try:
                rc = child.wait(timeout=max(1.0, end - time.monotonic() + 10) if sent else timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                rc = child.wait()
            if reader.is_alive():
                reader.join(timeout=5)
        err.seek(0)
        out = ready + "".join(lines)
        assert rc == 0, (f"child exited {rc} after {sent} signals\n--- stdout\n{out[-4000:]}\n"
                         f"--- stderr\n{err.read()[-8000:]}")
    facts = outcome(out)
    facts["sent"] = sent
    print("barrage:", facts)
    return facts


@pytest.mark.parametrize("size", ["small", pytest.param("large", marks=pytest.mark.slow)])
@pytest.mark.parametrize("impl", HUNT_IMPLS)
def test_signal_barrage_with_handlers_reset_around_each_step(impl, size, seed):
    """Another process sends SIGINT, SIGTERM and SIGALRM every 0-3 ms while Adam runs 2,000 steps on four
    small float32 params ("small") or 150 steps on one 2^20 one ("large"); before each step SIGINT gets
    Python's default handler and SIGTERM/SIGALRM raising ones, after it handlers that do not raise.  Every
    attempt moved the count by 0 or 1 (1 if it returned), and the run is the replay of its counted steps."""
    facts = barrage(_BARRAGE, (impl, size), seed)
    assert facts["sent"] >= 20, facts
    assert facts["interrupted"] >= 1, f"no step was interrupted: {facts}"


# -- 4. no handler installed -----------------------------------------------------------------------------------
_NO_HANDLER = """
def handlers():
    found = {}
    for s in signal.valid_signals():
        try:
            found[int(s)] = signal.getsignal(s)
        except (ValueError, OSError):
            pass
    return found


def changed(before, after):
    return {signal.Signals(s).name if s in signal.Signals._value2member_map_ else s: repr(after.get(s))
            for s in before if after.get(s) != before[s]}


start = handlers()
import xopt
at_import = changed(start, handlers())
errors = []


def steps():
    try:
        rng = np.random.default_rng(SEED)
        for impl in ("auto", "reference"):
            for clip in (None, 1.0):
                for n in (10, 2**22):
                    opt = xopt.Adam(impl=impl, clip_grad_norm=clip)
                    params = {"w": rng.standard_normal(n, dtype=np.float32), "b": np.zeros(3, np.float32)}
                    grads = {"w": rng.standard_normal(n, dtype=np.float32), "b": np.ones(3, np.float32)}
                    for _ in range(3):
                        opt.update(params, grads)
                    assert opt.iter == 3
    except BaseException as exc:
        errors.append(repr(exc))


steps()
on_main = changed(start, handlers())
worker = threading.Thread(target=steps)
worker.start()
worker.join()
in_thread = changed(start, handlers())
report(at_import=at_import, on_main=on_main, in_thread=in_thread, errors=errors)
"""


def test_import_and_update_install_no_signal_handler(seed):
    """Every signal's handler (signal.getsignal) is the same after ``import xopt`` and after updates (small and
    2^22 float32 params, impl auto and reference, with and without clip_grad_norm, on the main thread and
    on another) as before."""
    facts = run_child(_NO_HANDLER, seed=seed)
    assert facts["errors"] == [], facts["errors"]
    assert facts["at_import"] == {}, f"import xopt changed signal handlers: {facts['at_import']}"
    assert facts["on_main"] == {}, f"update() on the main thread changed signal handlers: {facts['on_main']}"
    assert facts["in_thread"] == {}, f"update() on another thread changed signal handlers: {facts['in_thread']}"


# -- 5. fork while another thread steps -------------------------------------------------------------------------
_FORK = """
import select, traceback
import xopt
n = 2**22
rng = np.random.default_rng(SEED)
params = {"w": rng.standard_normal(n, dtype=np.float32)}
grads = {"w": rng.standard_normal(n, dtype=np.float32)}
opt = xopt.Adam()
opt.update(params, grads)  # a first step on the main thread, as a training loop takes it
stop, errors = threading.Event(), []


def train():
    try:
        while not stop.is_set():
            opt.update(params, grads)
    except BaseException as exc:
        errors.append(repr(exc))


CHILD_SECONDS = 6


def in_child(say):
    say("forked")
    fresh = xopt.Adam()
    p = {"w": np.zeros(n, np.float32), "b": np.zeros(10, np.float32)}
    g = {"w": np.ones(n, np.float32), "b": np.ones(10, np.float32)}
    fresh.update(p, g)
    fresh.update(p, g)
    assert fresh.iter == 2 and fresh.state["w"]["step"] == 2 and fresh.state["b"]["step"] == 2, fresh.state
    say("new optimizer stepped")
    count, step = opt.iter, opt.state["w"]["step"]
    opt.update(params, grads)
    assert (opt.iter, opt.state["w"]["step"]) == (count + 1, step + 1), (count, step, opt.iter, opt.state["w"]["step"])
    say("same optimizer stepped")
    try:
        say("sleeping")
        time.sleep(CHILD_SECONDS)
        say("slept through a SIGINT")
    except KeyboardInterrupt:
        say("KeyboardInterrupt")


worker = threading.Thread(target=train)
worker.start()
rnd, children = random.Random(SEED), []
for _ in range(3):
    time.sleep(rnd.uniform(0.01, 0.06))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only this thread, whatever the others held
        os.close(r)
        code = 1
        try:
            in_child(lambda stage: os.write(w, (stage + "\\n").encode()))
            code = 0
        except BaseException:
            os.write(w, ("error: " + traceback.format_exc().replace("\\n", " | ") + "\\n").encode())
        finally:
            os._exit(code)
    os.close(w)
    out, end, interrupted, ended = b"", time.monotonic() + CHILD_SECONDS, False, False
    while time.monotonic() < end:
        if select.select([r], [], [], 0.05)[0]:
            chunk = os.read(r, 65536)
            if not chunk:
                ended = True
                break
            out += chunk
            if b"sleeping\\n" in out and not interrupted:
                os.kill(pid, signal.SIGINT)
                interrupted = True
    os.close(r)
    if not ended:
        os.kill(pid, signal.SIGKILL)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    children.append({"stages": out.decode().splitlines(), "hung": not ended, "status": status})
    if not ended:
        break  # one hung child says enough
stop.set()
worker.join()
report(children=children, errors=errors)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "fork"), reason="os.fork on Linux only")
def test_fork_while_another_thread_steps(seed):
    """A thread steps Adam on a 2^22 float32 param while the main thread forks (three times): each child
    steps a new optimizer and the same one (each update completes, counted once, within a few seconds),
    then a SIGINT sent while it sleeps raises KeyboardInterrupt there."""
    facts = run_child(_FORK, seed=seed, timeout=60)
    assert facts["errors"] == [], facts["errors"]
    want = ["forked", "new optimizer stepped", "same optimizer stepped", "sleeping", "KeyboardInterrupt"]
    for child in facts["children"]:
        assert not child["hung"], f"a forked child hung after {child['stages']}"
        assert child["stages"] == want and child["status"] == 0, child


# -- 6. params made to overlap after some steps ---------------------------------------------------------------
_OVERLAP = """
from numpy.lib.stride_tricks import as_strided
import xopt
problems, messages = [], []
for impl in ("auto", "reference"):
    for start in (2, 0):  # the new view overlaps half of 'left', or all of it
        memory = np.arange(1, 9, dtype=np.float32)  # one flat buffer
        view = lambda at: as_strided(memory[at:], shape=(4,), strides=(memory.itemsize,))
        params = {"left": view(0), "right": view(4)}
        grads = {"left": np.full(4, 0.5, np.float32), "right": np.full(4, -0.25, np.float32)}
        opt = xopt.Adam(impl=impl)
        opt.update(params, grads)
        opt.update(params, grads)
        before, state, count = memory.copy(), {k: copies(st) for k, st in opt.state.items()}, opt.iter
        params["right"] = view(start)  # now it shares memory with 'left'
        case = f"{impl}, right = memory[{start}:{start + 4}]"
        try:
            opt.update(params, grads)
            problems.append(f"{case}: no error")
        except ValueError as exc:
            messages.append(str(exc))
            if "'left'" not in str(exc) or "'right'" not in str(exc):
                problems.append(f"{case}: the ValueError does not name both params: {exc}")
        except Exception as exc:
            problems.append(f"{case}: {exc!r}, not a ValueError")
        if not np.array_equal(memory, before):
            problems.append(f"{case}: the params' memory changed: {before} -> {memory}")
        if opt.iter != count or set(opt.state) != set(state):
            problems.append(f"{case}: opt.iter {count} -> {opt.iter}, "
                            f"state keys {sorted(state)} -> {sorted(opt.state)}")
        for k, st in state.items():
            now = opt.state.get(k, {})
            if set(now) != set(st) or any(not np.array_equal(now[b], st[b]) for b in st):
                problems.append(f"{case}: state[{k!r}] changed")
report(problems=problems, messages=messages)
"""


def test_params_made_to_overlap_after_some_steps_are_refused_whole(seed):
    """Two params are as_strided views of one flat buffer, side by side; after two steps the dict's second
    value is replaced by a view overlapping the first (half of it, or all of it): update() raises ValueError
    naming both params, and no param, state buffer or count changes (impl auto and reference)."""
    facts = run_child(_OVERLAP, seed=seed)
    assert facts["problems"] == [], facts


# -- 7. a subclass that keeps float64 state for float32 params -----------------------------------------------
_BUFFER_DTYPE = """
import xopt


class A(xopt.Adam):
    def buffer_dtype(self, e):
        import numpy
        return numpy.float64


impl, path = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(SEED)
shapes = {"W": (33, 5), "b": (7,)}
params = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
steps = [{k: rng.uniform(0.5, 1.5, s).astype(np.float32) for k, s in shapes.items()} for _ in range(6)]
opt = A(impl=impl)
for g in steps[:5]:
    opt.update(params, g)
problems = []
b1, b2 = opt.beta1, opt.beta2
for k, s in shapes.items():
    m = np.zeros(s)
    v = np.zeros(s)
    for g in steps[:5]:
        g = g[k].astype(np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
    st = opt.state[k]
    for name, want in (("m", m), ("v", v)):
        if st[name].dtype != np.float64:
            problems.append(f"state[{k!r}][{name!r}] is {st[name].dtype}, not float64")
        elif not np.allclose(st[name], want, rtol=1e-6, atol=0):
            problems.append(f"state[{k!r}][{name!r}] is not Adam's float64 moment (rtol 1e-6): "
                            f"max relative error {np.max(np.abs(st[name] / want - 1)):.3g}")
sd = opt.state_dict()
for k in shapes:
    for name in ("m", "v"):
        got = np.asarray(sd["state"][k][name])
        if got.dtype != opt.state[k][name].dtype or not np.array_equal(got, opt.state[k][name]):
            problems.append(f"state_dict()['state'][{k!r}][{name!r}] ({got.dtype}) is not the state's")
opt.save(path)
loaded = A(impl=impl)
try:
    loaded.load(path)
except Exception as exc:
    problems.append(f"load: {exc!r}")
else:
    for k in shapes:
        if loaded.state[k]["step"] != 5:
            problems.append(f"loaded state[{k!r}]['step'] is {loaded.state[k]['step']}")
        for name in ("m", "v"):
            got = loaded.state[k][name]
            if got.dtype != opt.state[k][name].dtype or not np.array_equal(got, opt.state[k][name]):
                problems.append(f"loaded state[{k!r}][{name!r}] ({got.dtype}) is not the saved one")
    again = copies(params)
    try:
        opt.update(params, steps[5])
        loaded.update(again, steps[5])
        for k in shapes:
            if not np.array_equal(params[k], again[k]):
                problems.append(f"a step after load moves param {k!r} otherwise than one without")
    except Exception as exc:
        problems.append(f"a step after load: {exc!r}")
report(problems=problems)
"""


@pytest.mark.parametrize("impl", IMPLS)
def test_subclass_buffer_dtype_float64_state(impl, seed, tmp_path):
    """A subclass whose buffer_dtype gives float64 for float32 params: after 5 steps m and v are float64 arrays
    equal (rtol 1e-6) to Adam's moments computed in float64 on the same grads; state_dict(), save() and
    load() carry the same numbers, and a step after load() moves the params as one without."""
    facts = run_child(_BUFFER_DTYPE, impl, tmp_path / "state.npz", seed=seed)
    assert facts["problems"] == [], facts["problems"]


# -- 8. a bad XOPT_NUM_THREADS --------------------------------------------------------------------------------
_BAD_ENV = """
try:
    import xopt
except ValueError as exc:
    report(raised_at="import", message=str(exc), written=False)
    sys.exit(0)
rng = np.random.default_rng(SEED)
params = {"w": rng.standard_normal(2**22, dtype=np.float32), "b": rng.standard_normal(16, dtype=np.float32)}
grads = {k: np.ones_like(v) for k, v in params.items()}
before = copies(params)
opt = xopt.Adam()
try:
    opt.update(params, grads)
    facts = {"raised_at": None, "message": None}
except Exception as exc:
    facts = {"raised_at": "update", "message": f"{type(exc).__name__}: {exc}"}
written = opt.iter != 0 or bool(opt.state) or any(not np.array_equal(params[k], before[k]) for k in params)
report(written=written, **facts)
"""

_OVERRIDDEN_ENV = """
try:
    import xopt
except Exception as exc:
    report(problem=f"import xopt raised {exc!r}: set_num_threads cannot override the variable")
    sys.exit(0)
rng = np.random.default_rng(SEED)
params = {"w": rng.standard_normal(2**22, dtype=np.float32), "b": rng.standard_normal(16, dtype=np.float32)}
grads = {k: np.ones_like(v) for k, v in params.items()}
try:
    xopt.set_num_threads(2)
    opt = xopt.Adam()
    opt.update(params, grads)
    opt.update(params, grads)
    found = (opt.iter, xopt.get_num_threads())
    problem = None if found == (2, 2) else f"opt.iter {found[0]} after 2 updates, get_num_threads() {found[1]}"
except Exception as exc:
    problem = f"{type(exc).__name__}: {exc}"
report(problem=problem)
"""


def test_bad_num_threads_env_is_named_and_writes_nothing(seed):
    """XOPT_NUM_THREADS=abc: ``import xopt`` or the first update (a 2^22 float32 param and a small one) raises
    ValueError naming XOPT_NUM_THREADS, and that update writes nothing."""
    facts = run_child(_BAD_ENV, seed=seed, env=child_env(XOPT_NUM_THREADS="abc"))
    assert facts["raised_at"] is not None, "neither import xopt nor the first update raised"
    assert facts["message"] is not None and "XOPT_NUM_THREADS" in facts["message"], facts
    if facts["raised_at"] == "update":
        assert facts["message"].startswith("ValueError"), facts
    assert not facts["written"], f"the update that raised wrote something: {facts}"


def test_set_num_threads_overrides_a_bad_num_threads_env(seed):
    """XOPT_NUM_THREADS=abc, then xopt.set_num_threads(2) before the first update: updates work, on 2 threads."""
    facts = run_child(_OVERRIDDEN_ENV, seed=seed, env=child_env(XOPT_NUM_THREADS="abc"))
    assert facts["problem"] is None, facts["problem"]
