"""The fast path keeps every promise of the checked path.

Each test pokes the default path (the exact-type lane and the fused CPU kernel) the
way a user might, next to a twin with ``impl="reference"`` on copies of the same arrays,
and asks for the twin's numbers or the twin's error.  ``tests/test_stateful.py`` hunts
for more of the same by random sequences of such pokes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest

import xopt
from xopt.engines import fused_cpu

TOL = dict(rtol=1e-12, atol=0)


def twins(cls=xopt.Adam, **kw):
    return cls(**kw), cls(impl="reference", **kw)


def net(rng, dtype=np.float64, sizes=((5, 7), (7,), (300,))):
    return {f"p{i}": rng.standard_normal(s).astype(dtype) for i, s in enumerate(sizes)}


def copies(d):
    return {k: v.copy() for k, v in d.items()}


def grads_like(params, rng):
    return {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}


def same(fast, ref, p_fast, p_ref):
    for k in p_ref:
        np.testing.assert_allclose(p_fast[k], p_ref[k], **TOL, err_msg=f"param {k}")
        assert fast.state[k]["step"] == ref.state[k]["step"], k
        for name in ref.buffers():
            np.testing.assert_allclose(fast.state[k][name], ref.state[k][name], **TOL, err_msg=f"{name} of {k}")
    assert fast.iter == ref.iter


def steps(fast, ref, p_fast, p_ref, rng, n=3):
    for _ in range(n):
        g = grads_like(p_ref, rng)
        ref.update(p_ref, g)
        fast.update(p_fast, copies(g))


@pytest.fixture
def pair(rng, lane):
    fast, ref = twins(amsgrad=True)
    p_ref = net(rng)
    p_fast = copies(p_ref)
    steps(fast, ref, p_fast, p_ref, rng)
    assert lane[-1], "the lane should be taking the fast twin's steps"
    return fast, ref, p_fast, p_ref


# -- 1. state replaced between steps -------------------------------------------------------
def test_a_replaced_state_buffer_is_the_one_updated(pair, rng):
    fast, ref, p_fast, p_ref = pair
    for opt in (fast, ref):
        opt.state["p0"]["v"] = np.zeros((5, 7))  # a reset of one buffer
    bystanders = [np.full(35, 7.0) for _ in range(50)]  # memory the old buffer may be reused for
    steps(fast, ref, p_fast, p_ref, rng)
    same(fast, ref, p_fast, p_ref)
    assert all(np.all(b == 7.0) for b in bystanders)


def test_a_reset_step_count_is_honoured(pair, rng):
    fast, ref, p_fast, p_ref = pair
    for opt in (fast, ref):
        opt.state["p2"]["step"] = 0
    steps(fast, ref, p_fast, p_ref, rng, n=2)
    same(fast, ref, p_fast, p_ref)
    assert fast.state["p2"]["step"] == 2


def test_a_deleted_state_starts_afresh(pair, rng):
    fast, ref, p_fast, p_ref = pair
    for opt in (fast, ref):
        del opt.state["p1"]
    steps(fast, ref, p_fast, p_ref, rng)
    same(fast, ref, p_fast, p_ref)


def test_a_state_buffer_of_the_wrong_dtype_is_refused_on_both_paths(pair, rng):
    fast, ref, p_fast, p_ref = pair
    g = grads_like(p_ref, rng)
    for opt, params in ((fast, p_fast), (ref, p_ref)):
        opt.state["p2"]["m"] = np.zeros(300, dtype=np.float16)  # narrower than the param (float32 is widened)
        before = copies(params)
        with pytest.raises(TypeError, match="'p2'.*'m' is float16"):
            opt.update(params, copies(g))
        for k in params:
            np.testing.assert_array_equal(params[k], before[k])


@pytest.mark.parametrize("step", [-1, 1.5, "3", True, 10**400])
def test_a_bad_step_count_is_refused_before_any_write(pair, rng, step):
    fast, ref, p_fast, p_ref = pair
    for opt, params in ((fast, p_fast), (ref, p_ref)):
        opt.state["p0"]["step"] = step
        before = copies(params)
        with pytest.raises(ValueError, match="'p0'.*step"):
            opt.update(params, grads_like(params, rng))
        for k in params:
            np.testing.assert_array_equal(params[k], before[k])


# -- 2. threads ----------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_two_threads_on_one_optimizer_lose_no_step(impl):
    """Identical grads: whatever the order, 2 x N steps must give N + N sequential steps, exactly."""
    size = 3 * fused_cpu.PARALLEL_MIN // 4  # two tensors: the parallel kernel
    params = {"a": np.linspace(-1, 1, size), "b": np.linspace(1, 2, size)}
    grads = {k: np.cos(v) for k, v in params.items()}
    serial = copies(params)
    opt, serial_opt = xopt.Adam(impl=impl), xopt.Adam(impl=impl)
    n = 15
    for _ in range(2 * n):
        serial_opt.update(serial, grads)
    errors = []

    def work():
        try:
            for _ in range(n):
                opt.update(params, grads)
        except BaseException as exc:  # pragma: no cover - shown by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert opt.iter == 2 * n and opt.state["a"]["step"] == 2 * n
    for k in params:
        np.testing.assert_array_equal(params[k], serial[k])
        np.testing.assert_array_equal(opt.state[k]["m"], serial_opt.state[k]["m"])


def test_update_from_inside_update_raises():
    opt = xopt.Adam()
    params = {"a": np.ones(3)}

    class Evil(dict):
        def __getitem__(self, key):
            opt.update(params, {"a": np.ones(3)})

    with pytest.raises(RuntimeError, match="inside an update"):
        opt.update(params, Evil(a=np.ones(3)))


# -- 3. byte order -------------------------------------------------------------------------
def test_big_endian_state_and_grads_give_the_reference_numbers(pair, rng):
    fast, ref, p_fast, p_ref = pair
    for opt in (fast, ref):
        for k, st in opt.state.items():
            st["m"] = st["m"].astype(">f8")
    g = {k: v.astype(">f8") for k, v in grads_like(p_ref, rng).items()}
    ref.update(p_ref, g)
    fast.update(p_fast, g)
    steps(fast, ref, p_fast, p_ref, rng)
    same(fast, ref, p_fast, p_ref)


def test_big_endian_params_give_the_reference_numbers(rng):
    fast, ref = twins()
    p_ref = {k: v.astype(">f8") for k, v in net(rng).items()}
    p_fast = copies(p_ref)
    steps(fast, ref, p_fast, p_ref, rng)
    same(fast, ref, p_fast, p_ref)


# -- 5. all or nothing ---------------------------------------------------------------------
def test_a_step_that_fails_on_one_param_writes_no_other(rng, monkeypatch):
    """The reference path (first) fails, as an array library out of memory would: the fused params stay."""
    xps = pytest.importorskip("array_api_strict")
    opt = xopt.Adam()
    params = {"a": rng.standard_normal(4), "s": xps.asarray(rng.standard_normal(3))}
    grads = {"a": np.ones(4), "s": xps.asarray(np.ones(3))}
    from xopt import _dispatch

    def fail(opt, entries):
        raise MemoryError("out of memory in the array library")

    monkeypatch.setattr(_dispatch, "apply_reference", fail)
    before = params["a"].copy()
    with pytest.raises(MemoryError):
        opt.update(params, grads)
    np.testing.assert_array_equal(params["a"], before)
    assert opt.iter == 0 and "a" not in opt.state, "the state this call made for 'a' was taken back"


_INTERRUPT = textwrap.dedent("""
    import ctypes, functools, os, signal, numpy as np, xopt
    from xopt.engines import fused_cpu
    signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever disposition the test runner left us
    real = fused_cpu.together   # a small step's kernel and its counts, one call into C
    calls = []
    kill = ctypes.CDLL(None).kill  # C's kill(): os.kill and signal.raise_signal run the handler before they return
    def together(writes):  # Ctrl-C right after the kernel wrote
        calls.append(1)
        real([writes[0], functools.partial(kill, os.getpid(), signal.SIGINT), *writes[1:]])
    opt = xopt.Adam()
    params = {"a": np.ones(1000), "b": np.ones(10)}
    grads = {"a": np.ones(1000), "b": np.ones(10)}
    opt.update(params, grads)
    fused_cpu.together = together
    for i in range(3):
        try:
            opt.update(params, grads)
        except KeyboardInterrupt:
            print("interrupted", opt.iter, opt.state["a"]["step"], opt.state["b"]["step"], len(calls))
""")


def test_ctrl_c_during_a_step_lands_after_the_step_is_counted():
    run = subprocess.run([sys.executable, "-c", _INTERRUPT], capture_output=True, text=True, check=True)
    out = run.stdout + run.stderr
    # every interrupted step was applied (one kernel call each) and counted, whatever the path
    assert out.split("\n")[:3] == ["interrupted 2 2 2 1", "interrupted 3 3 3 2", "interrupted 4 4 4 3"], out


_INTERRUPT_CHECKED = textwrap.dedent("""
    import ctypes, functools, os, signal, sys, numpy as np, xopt
    from xopt import _checked
    signal.signal(signal.SIGINT, signal.default_int_handler)
    real = _checked.together_unforked  # the checked step's writes and counts, one call into C
    kill = ctypes.CDLL(None).kill
    def together(writes):  # Ctrl-C right after the first write
        real([writes[0], functools.partial(kill, os.getpid(), signal.SIGINT), *writes[1:]])
    _checked.together_unforked = together
    rng = np.random.default_rng(0)
    if sys.argv[1] == "8bit":  # a fresh process: its first 8-bit step loads the kernel's functions
        opt = xopt.Adam(state_dtype="8bit", min_8bit_size=1, block_size=4)
        params = {k: rng.standard_normal(7).astype(np.float32) for k in "bc"}
    else:  # Adafactor on two threads: its passes hand out work, then wait for it
        xopt.set_num_threads(2)
        opt = xopt.Adafactor()
        params = {"w": rng.standard_normal((1024, 2048)).astype(np.float32)}
    grads = {k: np.ones_like(v) for k, v in params.items()}
    before = {k: v.copy() for k, v in params.items()}
    try:
        opt.update(params, grads)
    except KeyboardInterrupt:
        pass
    print(opt.iter, sorted(st["step"] for st in opt.state.values()),
          sorted(bool((params[k] != before[k]).any()) for k in params))
""")


@pytest.mark.parametrize("case", ["8bit", "adafactor-threads"])
def test_ctrl_c_during_a_checked_step_lands_after_the_step_is_counted(case):
    """A compiled function among the checked step's writes has been typed before them: typing it there runs
    Python, where a signal's handler would raise with some params written and the counts not."""
    run = subprocess.run([sys.executable, "-c", _INTERRUPT_CHECKED, case], capture_output=True, text=True, check=True)
    n = 2 if case == "8bit" else 1
    assert run.stdout.split("\n")[0] == f"1 {[1] * n} {[True] * n}", run.stdout + run.stderr


# -- 6. overlap ----------------------------------------------------------------------------
def _refused_alike(params, grads, match):
    for impl in ("auto", "reference"):
        opt = xopt.Adam(impl=impl)
        ps = dict(params)
        before = {k: v.copy() for k, v in ps.items()}
        with pytest.raises(ValueError, match=match):
            opt.update(ps, grads)
        for k in ps:
            np.testing.assert_array_equal(ps[k], before[k])
        assert opt.iter == 0


def test_two_params_that_are_views_of_one_buffer_are_refused():
    base = np.arange(20.0)
    _refused_alike({"a": base[:12], "b": base[8:]}, {"a": np.ones(12), "b": np.ones(12)},
                   "param 'a' and param 'b' share memory")


def test_a_grad_overlapping_its_param_or_another_is_refused():
    a, b = np.arange(10.0), np.arange(5.0)
    _refused_alike({"a": a, "b": b}, {"a": a, "b": np.ones(5)}, "param 'a' and the grad of param 'a' share")
    _refused_alike({"a": a, "b": b}, {"a": np.ones(10), "b": a[2:7]}, "param 'a' and the grad of param 'b'")


def test_interleaved_views_do_not_overlap_and_are_taken(rng):
    base = np.arange(20.0)
    fast = xopt.Adam()
    fast.update({"even": base[::2], "odd": base[1::2]}, {"even": np.ones(10), "odd": np.ones(10)})
    assert np.all(base < np.arange(20.0))


def test_grads_may_share_memory_with_each_other(rng):
    g = rng.standard_normal(10)
    fast, ref = twins()
    p_ref = {"a": np.ones(10), "b": np.ones(10)}
    p_fast = copies(p_ref)
    for _ in range(3):
        ref.update(p_ref, {"a": g, "b": g})
        fast.update(p_fast, {"a": g, "b": g})
    same(fast, ref, p_fast, p_ref)


def test_the_compiled_memory_check_agrees_with_a_pairwise_one(rng):
    """cpu_memory.disjoint (its ranges sorted in place) against every pair compared in Python:
    ranges in order, reversed and shuffled, some overlapping, some starting at one byte, grads in and out."""
    from xopt.engines import cpu_memory

    for trial in range(400):
        m = int(rng.integers(1, 40))
        starts = rng.choice(np.arange(0, 4000, 8), size=m, replace=bool(trial % 3 == 0)).astype(np.int64)
        if trial % 4 == 1:
            starts.sort()
        elif trial % 4 == 2:
            starts = np.sort(starts)[::-1].copy()
        ends = starts + 8 * rng.integers(1, 4 if trial % 2 else 40, size=m)
        n = int(rng.integers(1, 6))
        sizes = rng.integers(1, 6, size=n).astype(np.int64)
        ptrs = np.zeros((n, 5), dtype=np.int64)
        ptrs[:, 1] = rng.choice(np.arange(0, 5000, 8), size=n)
        pairs = sorted(zip(starts.tolist(), ends.tolist()))
        writes_apart = all(a[1] <= b[0] for a, b in zip(pairs, pairs[1:]))
        grads_apart = all(hi <= lo_g or lo >= lo_g + 8 * size for lo_g, size in zip(ptrs[:, 1].tolist(), sizes.tolist())
                          for lo, hi in pairs)
        lo, hi = starts.copy(), ends.copy()
        apart = cpu_memory.disjoint(lo, hi, ptrs, sizes, 8, np.empty((4, m), np.int64))
        assert apart == (writes_apart and grads_apart), trial
        assert sorted(zip(lo.tolist(), hi.tolist())) == pairs and lo.tolist() == sorted(lo.tolist()), trial


@pytest.mark.parametrize("which", ["fused", "reference"])
def test_the_lane_refuses_a_grad_that_overlaps_a_param_or_a_buffer(pair, rng, which):
    fast, ref, p_fast, p_ref = pair
    opt, params = (fast, p_fast) if which == "fused" else (ref, p_ref)
    for culprit, source, what in (("p1", params["p2"][:7], "param 'p2'"),
                                  ("p1", opt.state["p2"]["v"][10:17], "optimizer state 'v' of param 'p2'")):
        g = grads_like(params, rng)
        g[culprit] = source
        before = copies(params)
        with pytest.raises(ValueError, match=f"{what} and the grad of param 'p1' share memory"):
            opt.update(params, g)
        for k in params:
            np.testing.assert_array_equal(params[k], before[k])


def test_a_state_buffer_that_is_a_param_is_refused(pair, rng):
    fast, ref, p_fast, p_ref = pair
    fast.state["p1"]["v"] = p_fast["p2"][:7]
    with pytest.raises(ValueError, match="share memory"):
        fast.update(p_fast, grads_like(p_fast, rng))


# -- 7. the plan re-checks params ----------------------------------------------------------
def set_in_place(a, name, value):
    """``a.shape = value`` or ``a.dtype = value`` on the array itself, as a user may write it (deprecated since
    NumPy 2.5, which warns; still done)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        setattr(a, name, value)


def _changed_in_place(pair, rng, change):
    """The param changes under the plan while the grads keep the layout the plan was built for."""
    fast, ref, p_fast, p_ref = pair
    g = grads_like(p_ref, rng)
    for params in (p_fast, p_ref):
        change(params)
    for opt, params in ((fast, p_fast), (ref, p_ref)):
        with pytest.raises(ValueError, match="'p[02]' has shape"):
            opt.update(params, copies(g))
    assert fast.iter == ref.iter == 3


def test_a_param_reshaped_in_place_goes_back_to_the_checks(pair, rng):
    def change(params):
        set_in_place(params["p0"], "shape", (7, 5))

    _changed_in_place(pair, rng, change)


def test_a_param_retyped_in_place_goes_back_to_the_checks(pair, rng):
    def change(params):
        set_in_place(params["p2"], "dtype", np.float32)  # same bytes, read as 600 float32

    _changed_in_place(pair, rng, change)


def test_a_param_resized_in_place_is_not_written_through_its_old_buffer(pair, rng):
    def change(params):
        params["p2"].resize(100_000, refcheck=False)  # frees the old buffer

    _changed_in_place(pair, rng, change)


def test_state_dtype_set_mid_run_is_honoured(rng):
    # the state is rounded to bfloat16 when the value is set, and the steps after keep it so, on the fast path as
    # on the reference rule
    p0 = rng.standard_normal(50).astype(np.float32)
    runs = []
    for impl in ("auto", "reference"):
        opt, params = xopt.Adam(impl=impl), {"a": p0.copy()}
        for _ in range(3):
            opt.update(params, {"a": np.ones(50, np.float32)})
        before = opt.state["a"]["m"].copy()
        opt.state_dtype = "bfloat16"
        assert opt.state["a"]["m"].dtype.name == "bfloat16"
        np.testing.assert_array_equal(opt.state["a"]["m"], before.astype(opt.state["a"]["m"].dtype))
        for _ in range(2):
            opt.update(params, {"a": np.full(50, 0.5, np.float32)})
        assert opt.state["a"]["m"].dtype.name == "bfloat16"
        runs.append((params["a"], opt.state["a"]["m"], opt.state["a"]["v"]))
    for fast, ref in zip(*runs):
        np.testing.assert_array_equal(fast, ref)


def test_amsgrad_turned_on_mid_run_gets_its_buffer(rng):
    fast, ref = twins()
    p_ref = net(rng)
    p_fast = copies(p_ref)
    steps(fast, ref, p_fast, p_ref, rng)
    fast.amsgrad = ref.amsgrad = True
    steps(fast, ref, p_fast, p_ref, rng)
    same(fast, ref, p_fast, p_ref)


def test_a_read_only_state_buffer_is_not_written_in_place(pair, rng):
    fast, ref, p_fast, p_ref = pair
    for opt in (fast, ref):
        opt.state["p0"]["m"] = opt.state["p0"]["m"].copy()
        opt.state["p0"]["m"].flags.writeable = False
    frozen = fast.state["p0"]["m"].copy()
    steps(fast, ref, p_fast, p_ref, rng)
    same(fast, ref, p_fast, p_ref)
    assert not np.array_equal(fast.state["p0"]["m"], frozen)


# -- minor -------------------------------------------------------------------------------
def test_amsgrad_keeps_a_nan_in_v_max_as_the_reference_does():
    fast, ref = twins(amsgrad=True)
    p_ref = {"a": np.ones(4)}
    p_fast = copies(p_ref)
    g = np.array([1.0, np.nan, 1.0, 1.0])
    with np.errstate(invalid="ignore"):
        ref.update(p_ref, {"a": g})
        fast.update(p_fast, {"a": g.copy()})
        for _ in range(2):
            ref.update(p_ref, {"a": np.ones(4)})
            fast.update(p_fast, {"a": np.ones(4)})
    np.testing.assert_array_equal(np.isnan(fast.state["a"]["v_max"]), np.isnan(ref.state["a"]["v_max"]))
    np.testing.assert_array_equal(np.isnan(p_fast["a"]), np.isnan(p_ref["a"]))


@pytest.mark.parametrize("which", ["param", "grad"])
def test_masked_arrays_are_refused_on_every_path(which):
    for impl in ("auto", "reference"):
        opt = xopt.Adam(impl=impl)
        p, g = np.ones(3), np.ones(3)
        masked = np.ma.masked_array(np.ones(3), mask=[0, 1, 0])
        params, grads = ({"a": masked}, {"a": g}) if which == "param" else ({"a": p}, {"a": masked})
        with pytest.raises(TypeError, match="masked array"):
            opt.update(params, grads)


def test_a_deep_copy_shares_no_state(pair, rng):
    import copy
    import pickle

    fast, ref, p_fast, p_ref = pair
    other = copy.deepcopy(fast)
    assert other.state["p0"]["m"] is not fast.state["p0"]["m"]
    again = pickle.loads(pickle.dumps(fast))
    p_other = copies(p_fast)
    g = grads_like(p_fast, rng)
    for opt, params in ((other, p_other), (again, copies(p_fast))):
        opt.update(params, copies(g))
    fast.update(p_fast, copies(g))
    np.testing.assert_array_equal(p_other["p0"], p_fast["p0"])


def test_the_number_of_threads_can_be_set():
    before = xopt.set_num_threads(1)
    try:
        assert xopt.get_num_threads() == 1
        with pytest.raises(ValueError, match="positive int"):
            xopt.set_num_threads(0)
        xopt.set_num_threads(3)
        params = {"a": np.linspace(0, 1, 2 * fused_cpu.PARALLEL_MIN)}
        ref = copies(params)
        xopt.Adam().update(params, {"a": np.ones_like(params["a"])})
        xopt.Adam(impl="reference").update(ref, {"a": np.ones_like(ref["a"])})
        np.testing.assert_allclose(params["a"], ref["a"], rtol=1e-15)
    finally:
        xopt.set_num_threads(before)
    assert xopt.get_num_threads() == before


def test_numpy_scalar_grads_of_0d_params_are_never_read_as_arrays(rng):
    fast, ref = twins()
    p_ref = {"a": np.array(1.0), "b": np.array(2.0)}
    p_fast = copies(p_ref)
    for _ in range(4):
        g = {"a": np.float64(rng.standard_normal()), "b": np.float64(rng.standard_normal())}
        ref.update(p_ref, g)
        fast.update(p_fast, g)
    same(fast, ref, p_fast, p_ref)


@pytest.mark.parametrize("config", ["SGD", "RMSprop-all", "Adam-amsgrad-wd"])
def test_threads_taking_chunks_give_the_reference_numbers(config, rng, parallel_from, lane):
    """Every step split over 3 threads (the caller and 2 workers claiming chunks): every element once."""
    from test_edges import make

    parallel_from(0)
    before = xopt.set_num_threads(3)
    try:
        sizes = rng.integers(1, 3 * fused_cpu.CHUNK, 25)
        p_ref = {f"t{i}": rng.standard_normal(int(n)) for i, n in enumerate(sizes)}
        p_fast = copies(p_ref)
        fast, ref = make(config), make(config, impl="reference")
        for _ in range(4):
            g = grads_like(p_ref, rng)
            ref.update(p_ref, g)
            fast.update(p_fast, copies(g))
        assert lane[-1]
        for k in p_ref:
            np.testing.assert_allclose(p_fast[k], p_ref[k], rtol=1e-13, atol=1e-15, err_msg=k)
    finally:
        xopt.set_num_threads(before)


@pytest.mark.parametrize("dtype", [">f2", ">f4", ">f8"])
def test_big_endian_params_keep_native_state_of_their_compute_dtype(rng, dtype):
    fast, ref = twins()
    p_ref = {"a": rng.standard_normal(6).astype(dtype)}
    p_fast = copies(p_ref)
    steps(fast, ref, p_fast, p_ref, rng)
    native = np.dtype(dtype).newbyteorder("=")
    want = np.float32 if native == np.float16 else native
    for opt in (fast, ref):
        assert opt.state["a"]["m"].dtype == want and opt.state["a"]["m"].dtype.isnative
    # the same param, its bytes swapped back to native: the state still fits
    for params in (p_fast, p_ref):
        params["a"] = params["a"].astype(native)
    steps(fast, ref, p_fast, p_ref, rng)
    np.testing.assert_allclose(p_fast["a"], p_ref["a"], rtol=2e-3 if native == np.float16 else 1e-6)


@pytest.mark.parametrize("state_dtype", [None, "8bit"])
def test_a_user_errstate_that_raises_does_not_stop_the_writes_halfway(state_dtype):
    """A float16 param's new value is cast from float32 as the step writes it; under np.seterr(all="raise")
    the cast of a value below float16's range would raise between the state's writes and the param's."""
    n = 5000 if state_dtype else 3  # 8-bit state from 4,096 elements
    params = {"w": np.full(n, 2e-3, dtype=np.float16), "u": np.ones(n, dtype=np.float16)}
    grads = {"w": np.ones(n, np.float16), "u": np.ones(n, np.float16)}
    opt = xopt.Adam(lr=1e-3, state_dtype=state_dtype)
    ref = xopt.Adam(lr=1e-3, state_dtype=state_dtype)
    mirror = {k: v.copy() for k, v in params.items()}
    opt.update(params, grads)
    ref.update(mirror, grads)
    params["w"][0] = mirror["w"][0] = np.float16(6e-8)  # a float16 subnormal: its new value underflows
    with np.errstate(all="raise"):
        opt.update(params, grads)  # the whole step, or nothing: here the whole step
    with np.errstate(all="ignore"):
        ref.update(mirror, grads)
    assert opt.state["w"]["step"] == opt.state["u"]["step"] == 2 and opt.iter == 2
    for k in params:
        np.testing.assert_array_equal(params[k], mirror[k])
        for name, buf in opt.state[k].items():
            np.testing.assert_array_equal(buf, ref.state[k][name])


def test_a_step_that_raises_takes_back_the_buffers_it_added(rng):
    """amsgrad turned on between steps adds v_max to each state at the next step; one that raises (an overflow
    under the user's np.seterr, in the reference rule) leaves each state as it was."""
    params = {"w": np.ones(3), "u": np.ones(4)}
    opt = xopt.Adam(impl="reference")
    opt.update(params, {"w": np.ones(3), "u": np.ones(4)})
    opt.amsgrad = True
    before = {k: {n: (v.copy() if hasattr(v, "copy") else v) for n, v in st.items()} for k, st in opt.state.items()}
    with pytest.raises(FloatingPointError), np.errstate(over="raise"):
        opt.update(params, {"w": np.ones(3), "u": np.full(4, 1e200)})
    assert {k: sorted(st) for k, st in opt.state.items()} == {k: sorted(st) for k, st in before.items()}
    for k, st in opt.state.items():
        for n, v in st.items():
            np.testing.assert_array_equal(v, before[k][n])
    opt.update(params, {"w": np.ones(3), "u": np.ones(4)})  # and the next step makes them
    assert all("v_max" in st for st in opt.state.values())


def test_a_sparse_torch_grad_is_refused_naming_its_param():
    torch = pytest.importorskip("torch")
    w = torch.nn.Parameter(torch.randn(10, 3))
    params, opt = {"w": w}, xopt.Adam()
    for _ in range(2):  # the first step on the checked path, the second on the lane
        opt.update(params, {"w": torch.randn(10, 3)})
    before = w.detach().clone()
    with pytest.raises(TypeError, match="grad of param 'w' is a sparse_coo tensor"):
        opt.update(params, {"w": torch.randn(10, 3).to_sparse()})
    assert torch.equal(before, w.detach()) and opt.state["w"]["step"] == 2


def test_8bit_scales_that_share_memory_with_another_array_are_refused(rng):
    """An 8-bit buffer's absmax array is written with its codes: one shared with another buffer's scales, or
    with a param, is refused naming both, nothing written."""
    n = 5000
    params = {"a": rng.standard_normal(n), "b": rng.standard_normal(n), "c": np.zeros(20)}
    grads = {k: np.ones_like(v) for k, v in params.items()}
    opt = xopt.Adam(state_dtype="8bit")
    opt.update({"a": params["a"], "b": params["b"]}, {"a": grads["a"], "b": grads["b"]})
    opt.state["b"]["m_absmax"] = opt.state["b"]["v_absmax"]
    before = {k: v.copy() for k, v in params.items()}
    with pytest.raises(ValueError, match="'m_absmax' of param 'b' and optimizer state 'v_absmax' of param 'b'|"
                                         "'v_absmax' of param 'b' and optimizer state 'm_absmax' of param 'b'"):
        opt.update({"a": params["a"], "b": params["b"]}, {"a": grads["a"], "b": grads["b"]})
    opt.state["b"]["m_absmax"] = opt.state["b"]["m_absmax"].copy()
    params["c"] = opt.state["a"]["m_absmax"]  # a param that is an 8-bit buffer's scales
    with pytest.raises(ValueError, match="'m_absmax' of param 'a' and param 'c' share memory"):
        opt.update(params, grads)
    for k in ("a", "b"):
        np.testing.assert_array_equal(params[k], before[k])
        assert opt.state[k]["step"] == 1


def test_impl_is_checked_when_set():
    opt = xopt.Adam()
    with pytest.raises(ValueError, match="impl must be one of"):
        opt.impl = "fsued"
    assert opt.impl == "auto"
    opt.impl = "reference"
    assert opt.impl == "reference"
