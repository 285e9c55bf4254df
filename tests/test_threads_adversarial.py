"""The CPU engine's steps while other threads fork or copy the optimizer: a child process and a copy hold whole
steps, never part of one.

Every step here is checked against itself: grads that move each element by the same amount, or twin params that
every whole write leaves equal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import xopt

pytest.importorskip("xopt.engines.fused_cpu", reason="numba is not installed")

ROOT = Path(__file__).resolve().parents[1]


def _child(script, timeout=120):
    """Run ``script`` in a fresh interpreter on this checkout; return its stdout (it must exit 0)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"child exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


_FORK_DURING_A_CLIPPED_STEP = """
import os, threading, time
import numpy as np
import xopt

xopt.set_num_threads(2)
n = 1 << 20  # below PARALLEL_MIN: the kernel runs on the calling thread, outside the GIL
params, grads = {"w": np.zeros(n, np.float32)}, {"w": -np.ones(n, np.float32)}
opt = xopt.SGD(lr=1.0, clip_grad_norm=1e30)  # each step adds exactly 1 to every element
opt.update(params, grads)
stop = threading.Event()

def train():
    while not stop.is_set():
        opt.update(params, grads)

worker = threading.Thread(target=train)
worker.start()
torn = 0
for _ in range(40):
    time.sleep(0.002)
    pid = os.fork()
    if pid == 0:  # the child: one step's writes all there or none of them
        w = params["w"]
        os._exit(0 if w.min() == w.max() == opt.iter == opt.state["w"]["step"] else 1)
    torn += os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0
stop.set()
worker.join()
print("torn", torn, "steps", opt.iter)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "fork"), reason="os.fork on Linux only")
def test_a_fork_never_sees_half_a_clipped_step_on_one_thread():
    """A clipped step below PARALLEL_MIN (or any clipped step on one thread) runs its kernel on the calling thread,
    which releases the GIL.  Before: its writes were not held against ``os.fork`` (only a step split over
    threads was), so a thread that forked meanwhile made a child whose params were half stepped and whose
    counts were not (about one fork in two).  Now every step run from ``cpu_arrays.run`` waits for no fork."""
    out = _child(_FORK_DURING_A_CLIPPED_STEP)
    torn, steps = int(out.split()[1]), int(out.split()[3])
    assert steps > 40, f"the stepping thread hardly ran: {out}"
    assert torn == 0, f"{torn} of 40 forked children saw half a step"


_FORK_DURING_EVAL_AND_TRAIN = """
import os, threading, time
import numpy as np
import xopt

rng = np.random.default_rng(0)
w = rng.standard_normal(1 << 20).astype(np.float32)
params = {"a": w.copy(), "b": w.copy()}  # twins: every write leaves them equal, half of one does not
opt = xopt.ScheduleFreeAdamW(lr=0.1)
for _ in range(3):
    g = rng.standard_normal(w.shape).astype(np.float32)
    opt.update(params, {"a": g, "b": g.copy()})
stop = threading.Event()

def switch():
    while not stop.is_set():
        opt.eval(params)
        opt.train(params)

worker = threading.Thread(target=switch)
worker.start()
torn = 0
for _ in range(40):
    time.sleep(0.001)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if np.array_equal(params["a"], params["b"]) else 1)
    torn += os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0
stop.set()
worker.join()
print("torn", torn, "x != y", int((params["a"] != opt.state["a"]["z"]).sum()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "fork"), reason="os.fork on Linux only")
def test_a_fork_never_sees_half_an_eval_or_train_switch():
    """``ScheduleFreeAdamW.eval``/``train`` rewrite every param (x from y, y from x) in one C-level call, but NumPy's
    copies release the GIL.  Before: the switch used ``together``, so a thread that forked meanwhile made a child
    with some params switched and others not (about one fork in four).  Now it uses ``together_unforked``."""
    out = _child(_FORK_DURING_EVAL_AND_TRAIN)
    torn, moved = int(out.split()[1]), int(out.split()[-1])
    assert moved > 0, f"x and y are the same point: a switch writes nothing ({out})"
    assert torn == 0, f"{torn} of 40 forked children saw half a switch"


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_an_optimizer_copied_while_another_thread_steps_it_holds_a_whole_step(how):
    """AdaGrad's ``h`` grows by exactly 1 an element a step (grads of -1), so a copy of it taken between two
    steps is one number.  Before: ``copy.deepcopy`` and ``pickle`` read the buffers without the optimizer's lock,
    while a large step on another thread wrote them outside the GIL: the copy held part of a step (most copies).
    Now both copy the buffers while no step runs, as ``state_dict`` does."""
    import copy
    import pickle
    import threading

    from xopt.engines.fused_cpu import PARALLEL_MIN

    dup = {"deepcopy": copy.deepcopy, "pickle": lambda o: pickle.loads(pickle.dumps(o))}[how]
    before = xopt.set_num_threads(2)
    params, grads = {"w": np.zeros(PARALLEL_MIN, np.float32)}, {"w": -np.ones(PARALLEL_MIN, np.float32)}
    opt = xopt.AdaGrad(lr=1.0)
    opt.update(params, grads)
    stop, steps = threading.Event(), [0]

    def train():
        while not stop.is_set():
            opt.update(params, grads)
            steps[0] += 1

    worker = threading.Thread(target=train)
    worker.start()
    torn = []
    try:
        for _ in range(20):
            twin = dup(opt)
            h = twin.state["w"]["h"]
            if not (h.min() == h.max() == twin.state["w"]["step"]):
                torn.append((float(h.min()), float(h.max()), twin.state["w"]["step"]))
    finally:
        stop.set()
        worker.join()
        xopt.set_num_threads(before)
    assert steps[0] > 20, "the stepping thread hardly ran"
    assert torn == [], f"{len(torn)} of 20 copies held part of a step (h min, max, step): {torn[:3]}"


def test_a_shallow_copy_still_shares_the_state_and_a_copy_inside_a_step_is_taken():
    """``copy.copy`` keeps sharing the state dicts; a deep copy taken from inside a step of the same optimizer (an
    lr schedule), before its writes, is taken at once, not refused as a step inside a step."""
    import copy

    params, grads = {"w": np.ones(5)}, {"w": np.full(5, 0.5)}
    twins, made = [], []
    opt = xopt.Adam(lr=lambda count: (made and twins.append(copy.deepcopy(made[0]))) or 0.1)  # called at once too
    made.append(opt)
    opt.update(params, grads)
    shallow = copy.copy(opt)
    assert shallow.state is opt.state and shallow.state["w"]["m"] is opt.state["w"]["m"]
    assert twins and twins[0].iter == 0 and twins[0].state.get("w", {}).get("step", 0) == 0


def test_set_num_threads_under_a_threads_cap_returns_the_process_number():
    """Inside ``_threads.limit(1)`` (a Dask task's cap) ``set_num_threads`` returned the capped 1, so
    ``set_num_threads(set_num_threads(k))`` left the process at 1 thread instead of restoring it."""
    from xopt import _threads

    before = xopt.set_num_threads(4)
    try:
        with _threads.limit(1):
            assert xopt.get_num_threads() == 1
            old = xopt.set_num_threads(2)
            assert old == 4
            xopt.set_num_threads(old)
        assert xopt.get_num_threads() == 4
    finally:
        xopt.set_num_threads(before)


def test_a_threads_cap_holds_in_its_own_thread_alone_and_ends_with_its_block():
    """``_threads.limit`` caps the thread inside the block, nested blocks the innermost's cap, never another
    thread (a Dask worker's other tasks), and nothing once every block has ended, also one left by an error."""
    import threading

    from xopt import _threads

    before = xopt.set_num_threads(4)
    seen, inside, leave = [], threading.Event(), threading.Event()

    def capped():
        with _threads.limit(1):
            seen.append(xopt.get_num_threads())
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=capped)
    try:
        t.start()
        assert inside.wait(10)
        assert xopt.get_num_threads() == 4  # this thread: no cap while the other is inside its block
        with _threads.limit(3):
            with _threads.limit(2):
                assert xopt.get_num_threads() == 2
            assert xopt.get_num_threads() == 3
        leave.set()
        t.join(10)
        assert seen == [1]
        with pytest.raises(KeyError):
            with _threads.limit(1):
                raise KeyError("a task's error")
        with pytest.raises(ValueError, match="positive int"):
            with _threads.limit(0):
                pass
        assert _threads._capped == [0] and xopt.get_num_threads() == 4
    finally:
        leave.set()
        t.join(10)
        xopt.set_num_threads(before)
