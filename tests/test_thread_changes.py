"""Thread-count changes take effect between steps: a step keeps the workers it started with, whatever another
thread sets meanwhile, and is applied whole."""

import threading

import numpy as np
import pytest

import xopt

pytest.importorskip("numba")


def test_set_num_threads_from_another_thread_never_cuts_a_step(rng):
    """One thread flips the count between 3 and 4 as fast as it can while the main thread takes large steps (split
    over the workers): every update returns, and the arrays equal a serial replay of as many steps, bit for bit."""
    from xopt.engines.fused_cpu import PARALLEL_MIN

    n, steps = PARALLEL_MIN + 12_345, 40
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    before = xopt.set_num_threads(4)
    stop = threading.Event()
    flips = [0]

    def flip():
        while not stop.is_set():
            xopt.set_num_threads(3 + flips[0] % 2)
            flips[0] += 1

    params, opt = {"w": p0.copy()}, xopt.Adam(lr=1e-3)
    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        for i in range(steps):
            opt.update(params, {"w": grads[i % 4]})
    finally:
        stop.set()
        flipper.join()
        xopt.set_num_threads(1)
    try:
        assert flips[0] > steps, "the other thread hardly ran"
        replay, ref = {"w": p0.copy()}, xopt.Adam(lr=1e-3)
        for i in range(steps):
            ref.update(replay, {"w": grads[i % 4]})
        assert opt.iter == ref.iter == steps
        np.testing.assert_array_equal(params["w"], replay["w"])
        for name in ("m", "v"):
            np.testing.assert_array_equal(opt.state["w"][name], ref.state["w"][name])
    finally:
        xopt.set_num_threads(before)
