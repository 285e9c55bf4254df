"""state_dtype='8bit' beyond Adam: Lion, RMSprop, AdaGrad, SGD with momentum, Momentum and Nesterov.

The fused kernel against the reference on every optimizer and dtype is in tests/test_state_8bit.py; here the sizes
around min_8bit_size, the clip scale, hyperparameter overrides and threads, state files and state_dicts, the
conversions on load, the refusals, and how close 8-bit state keeps a run to float32 state.
"""

from __future__ import annotations

import numpy as np
import pytest

import xopt
from xopt.engines import blockwise
from xopt.engines.blockwise import SIGNED, UNSIGNED

from test_state_8bit import same_bits

NEW = {
    "Lion": (xopt.Lion, dict(lr=0.01, weight_decay=0.1)),
    "RMSprop": (xopt.RMSprop, dict(lr=0.01, momentum=0.5, weight_decay=0.01)),
    "AdaGrad": (xopt.AdaGrad, dict(lr=0.1, initial_accumulator_value=0.1)),
    "SGD": (xopt.SGD, dict(lr=0.01, momentum=0.9, dampening=0.1)),
    "Momentum": (xopt.Momentum, dict(lr=0.01)),
    "Nesterov": (xopt.Nesterov, dict(lr=0.01)),
}
MAPS = {"m": SIGNED, "h": UNSIGNED, "b": SIGNED, "v": SIGNED}  # each buffer's map, written out


def _steps(cls, hyper, params, grads, **options):
    opt = cls(state_dtype="8bit", **hyper, **options)
    params = {k: v.copy() for k, v in params.items()}
    with np.errstate(all="ignore"):
        for g in grads:
            opt.update(params, g)
    return opt, params


def _same_runs(a, b):
    (opt_a, p_a), (opt_b, p_b) = a, b
    for key in p_a:
        assert same_bits(p_a[key], p_b[key]), key
        assert set(opt_a.state[key]) == set(opt_b.state[key])
        for name, buf in opt_a.state[key].items():
            assert np.array_equal(buf, opt_b.state[key][name], equal_nan=True), (key, name)


@pytest.mark.parametrize("name", NEW)
def test_the_maps_are_the_declared_ones(name):
    cls, hyper = NEW[name]
    opt = cls(state_dtype="8bit", **hyper)
    assert opt.buffers()
    for buf in opt.buffers():
        assert blockwise.map_of(opt, buf) is MAPS[buf]


@pytest.mark.parametrize("name", NEW)
def test_params_below_at_and_above_min_8bit_size(name):
    # 4095 elements keep float32 state, 4096 and 4097 (a tail of one) 8-bit; fused and reference bit-equal, and a
    # float32-state param below the size steps as a plain float32-state optimizer's
    cls, hyper = NEW[name]
    rng = np.random.default_rng(5)
    params = {f"p{n}": rng.standard_normal(n).astype(np.float32) for n in (4095, 4096, 4097)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()} for _ in range(3)]
    fused, reference = (_steps(cls, hyper, params, grads, impl=impl) for impl in ("fused", "reference"))
    _same_runs(fused, reference)
    opt, _ = fused
    for buf in opt.buffers():
        assert opt.state["p4095"][buf].dtype == np.float32 and buf + "_absmax" not in opt.state["p4095"]
        assert opt.state["p4096"][buf].dtype == np.uint8 and opt.state["p4096"][buf + "_absmax"].shape == (16,)
        assert opt.state["p4097"][buf + "_absmax"].shape == (17,)
    plain = cls(**hyper)
    small = {"p4095": params["p4095"].copy()}
    for g in grads:
        plain.update(small, {"p4095": g["p4095"]})
    assert np.array_equal(small["p4095"], fused[1]["p4095"])


@pytest.mark.parametrize("name", ["Lion", pytest.param("RMSprop", marks=pytest.mark.slow),
                                  pytest.param("SGD", marks=pytest.mark.slow)])  # each compiles its float64 kernel
def test_clip_overrides_and_threads_keep_the_kernel_equal_to_the_reference(name):
    # the clip scale (grads scaled a block at a time), an override's own lr (a second hyperparameter set), and a
    # param above PARALLEL_MIN split over two threads
    from xopt.engines.fused_cpu import PARALLEL_MIN

    cls, hyper = NEW[name]
    rng = np.random.default_rng(6)
    params = {"big": rng.standard_normal(PARALLEL_MIN + 300).astype(np.float32),
              "other": rng.standard_normal((70, 90)).astype(np.float64)}
    grads = [{k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()} for _ in range(2)]
    options = dict(clip_grad_norm=1.0, overrides={"other": {"lr": 0.003}})
    before = xopt.set_num_threads(2)
    try:
        fused = _steps(cls, hyper, params, grads, impl="fused", **options)
    finally:
        xopt.set_num_threads(before)
    _same_runs(fused, _steps(cls, hyper, params, grads, impl="reference", **options))
    assert fused[0].last_grad_norm > 1.0  # the clip scaled the grads


@pytest.mark.parametrize("name", NEW)
def test_save_load_and_state_dict_resume_bit_identical(name, tmp_path):
    cls, hyper = NEW[name]
    rng = np.random.default_rng(7)
    p0 = {"w": rng.standard_normal((80, 70)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p0.items()} for _ in range(4)]
    straight, resumed = _steps(cls, hyper, p0, grads[:2]), _steps(cls, hyper, p0, grads[:2])
    resumed[0].save(tmp_path / "s.npz")
    from_file = cls(state_dtype="8bit", **hyper)
    from_file.load(tmp_path / "s.npz", params=resumed[1])
    from_dict = cls(state_dtype="8bit", **hyper)
    from_dict.load_state_dict(resumed[0].state_dict(), params=resumed[1])
    runs = [straight, (from_file, {k: v.copy() for k, v in resumed[1].items()}),
            (from_dict, {k: v.copy() for k, v in resumed[1].items()})]
    for opt, params in runs:
        assert opt.state["w"][opt.buffers()[0]].dtype == np.uint8
        for g in grads[2:]:
            opt.update(params, g)
    _same_runs(runs[0], runs[1])
    _same_runs(runs[0], runs[2])


@pytest.mark.parametrize("name", NEW)
def test_a_float32_state_converts_to_8bit_and_back(name):
    cls, hyper = NEW[name]
    rng = np.random.default_rng(8)
    n = 5000 + 77
    params = {"w": rng.standard_normal(n).astype(np.float32)}
    full = cls(**hyper)
    for _ in range(5):
        full.update(params, {"w": rng.standard_normal(n).astype(np.float32)})
    eight = cls(state_dtype="8bit", **hyper)
    eight.load_state_dict(full.state_dict(), params=params)
    back = cls(**hyper)
    back.load_state_dict(eight.state_dict(), params=params)
    assert back.state_dtype is None
    for buf in full.buffers():
        exact, codes, kept = full.state["w"][buf], eight.state["w"][buf], back.state["w"][buf]
        assert codes.dtype == np.uint8 and kept.dtype == np.float32
        absmax = eight.state["w"][buf + "_absmax"]
        assert np.array_equal(kept, blockwise.dequantize(np, codes, absmax, MAPS[buf], 256, np.float32))
        # at most half the map's gap around the value (1/16 of it with 3 fraction bits), or half the subnormal
        # step (2**-18 of the absmax signed, 2**-34 unsigned); the absmax itself is exact
        floor = 2.0**-18 if MAPS[buf] is SIGNED else 2.0**-34
        blocks = np.repeat(np.abs(np.pad(exact, (0, -n % 256))).reshape(-1, 256).max(axis=1), 256)[:n]
        assert np.all(np.abs(kept - exact) <= np.abs(exact) / 16 * (1 + 1e-5) + floor * blocks)
        assert np.array_equal(absmax, blocks[::256].astype(np.float32))
    eight.update(params, {"w": np.ones(n, np.float32)})  # steps on from the converted state


def test_a_state_saved_before_state_dtype_existed_loads_as_float_state():
    rng = np.random.default_rng(9)
    params = {"w": rng.standard_normal(5000).astype(np.float32)}
    opt = xopt.Lion()
    opt.update(params, {"w": np.ones(5000, np.float32)})
    old = opt.state_dict()
    for name in ("state_dtype", "block_size", "min_8bit_size"):
        del old["hyperparameters"][name]
    same, eight = xopt.Lion(), xopt.Lion(state_dtype="8bit")
    same.load_state_dict(old, params=params)
    eight.load_state_dict(old, params=params)
    assert np.array_equal(same.state["w"]["m"], opt.state["w"]["m"])
    assert eight.state["w"]["m"].dtype == np.uint8 and eight.state_dtype == "8bit"


def test_requests_the_math_does_not_allow_are_refused_naming_them():
    with pytest.raises(ValueError, match="state_dtype='8bit' requires momentum > 0"):
        xopt.SGD(state_dtype="8bit")
    with pytest.raises(ValueError, match="state_dtype='8bit' does not take centered=True"):
        xopt.RMSprop(state_dtype="8bit", centered=True)
    with pytest.raises(ValueError, match=r"state_dtype must be one of None, '8bit', got 'bfloat16'"):
        xopt.Lion(state_dtype="bfloat16")
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        xopt.AdaGrad(state_dtype="8bit", block_size=0)
    with pytest.raises(TypeError, match="Adamax.*state_dtype.*Lion, RMSprop, AdaGrad, SGD"):
        xopt.Adamax(state_dtype="8bit")
    opt = xopt.SGD(momentum=0.9, state_dtype="8bit")
    with pytest.raises(ValueError, match="requires momentum > 0"):
        opt.momentum = 0.0
    assert opt.momentum == 0.9
    with pytest.raises(ValueError, match="requires momentum > 0"):
        xopt.SGD(momentum=0.9, state_dtype="8bit", overrides={"b*": {"momentum": 0.0}}).update(
            {"bias": np.ones(3)}, {"bias": np.ones(3)})


def test_a_wrong_state_is_refused_before_any_write():
    opt = xopt.RMSprop(momentum=0.5, state_dtype="8bit")
    params = {"w": np.ones(5000, np.float32)}
    opt.update(params, {"w": np.ones(5000, np.float32)})
    opt.state["w"]["b_absmax"] = opt.state["w"]["b_absmax"][:-1]
    before = params["w"].copy()
    with pytest.raises(ValueError, match="'w'.*'b_absmax'.*shape"):
        opt.update(params, {"w": np.ones(5000, np.float32)})
    assert np.array_equal(params["w"], before) and opt.state["w"]["step"] == 1
    torch = pytest.importorskip("torch")
    opt = xopt.Lion(state_dtype="8bit")
    with pytest.raises(TypeError, match="'w'.*8bit.*NumPy and CuPy arrays only, not torch"):
        opt.update({"w": torch.ones(5000)}, {"w": torch.ones(5000)})
    assert opt.state == {}


# -- 8-bit state against float32 state: a noisy quadratic, 300 steps -------------------------------------------
# Each optimizer with an lr at which its float32-state run gets most of the way down.  The bound is the largest
# distance between the two runs' params over the steps, relative to the float32 run's; measured
# (benchmarks/state_8bit_parity.py): SGD, Momentum and Nesterov 1.5-2.2 %, AdaGrad 1.5 %, RMSprop 3.6 %, Adam
# 3.6 %, Lion with beta2=0.9 2.4 %.  Lion with its default beta2=0.99 departs (41-58 %; its m moves 1 % of g - m
# a step, less than half a step of the map, 1/16-1/8 of m): not held to a bound, see docs/training.md.
PARITY = {
    "SGD": (xopt.SGD, dict(lr=0.02, momentum=0.9)),
    "SGD-nesterov": (xopt.SGD, dict(lr=0.02, momentum=0.9, nesterov=True)),
    "Momentum": (xopt.Momentum, dict(lr=0.02)),
    "Nesterov": (xopt.Nesterov, dict(lr=0.02)),
    "AdaGrad": (xopt.AdaGrad, dict(lr=0.3)),
    "RMSprop": (xopt.RMSprop, dict(lr=0.01)),
    "Adam": (xopt.Adam, dict(lr=0.03)),
    "Lion-beta2-0.9": (xopt.Lion, dict(lr=0.01, beta2=0.9)),
}


def _quadratic_run(cls, hyper, state_dtype, n=8192, steps=300):
    rng = np.random.default_rng(0)
    c = np.exp(rng.uniform(np.log(0.1), np.log(10.0), n)).astype(np.float32)  # curvatures over two decades
    target = rng.standard_normal(n).astype(np.float32)
    noise = np.random.default_rng(1)
    opt, params = cls(state_dtype=state_dtype, **hyper), {"w": np.zeros(n, np.float32)}
    path = []
    for _ in range(steps):
        g = c * (params["w"] - target) + 0.1 * noise.standard_normal(n).astype(np.float32)
        opt.update(params, {"w": g})
        path.append(params["w"].copy())
    return path, float(0.5 * np.sum(c * (params["w"] - target) ** 2)), float(0.5 * np.sum(c * target**2))


@pytest.mark.parametrize("name", PARITY)
def test_8bit_state_keeps_a_run_close_to_float32_state(name):
    cls, hyper = PARITY[name]
    (exact, loss, start), (eight, loss8, _) = (_quadratic_run(cls, hyper, sd) for sd in (None, "8bit"))
    assert loss < 0.2 * start  # the float32 run gets somewhere
    apart = max(np.linalg.norm(a - b) / np.linalg.norm(a) for a, b in zip(exact, eight))
    assert 0.0 < apart < 0.06
    assert loss8 < 1.6 * loss


@pytest.mark.parametrize("start", [0.0, 0.1])
def test_the_start_state_is_the_quantized_start_value(start):
    # made one block's worth and repeated (no param-sized temporaries); a zero grad keeps h = start through a step
    n = 5000 + 77
    opt = xopt.AdaGrad(state_dtype="8bit", initial_accumulator_value=start)
    params = {"w": np.ones(n, np.float32)}
    opt.update(params, {"w": np.zeros(n, np.float32)})
    codes, absmax = blockwise.quantize(np, np.full(n, start, np.float32), UNSIGNED, 256)
    assert np.array_equal(opt.state["w"]["h"], codes) and np.array_equal(opt.state["w"]["h_absmax"], absmax)
    assert opt.state["w"]["h_absmax"][0] == np.float32(start)


_ONE_STEP = """
import numpy as np, xopt
opt = xopt.Lion(state_dtype="8bit", impl="fused")
opt.update({"w": np.ones(5000, np.float32)}, {"w": np.ones(5000, np.float32)})
"""


@pytest.mark.slow
def test_a_second_process_loads_the_kernel_from_the_disk_cache(tmp_path):
    # the kernel of a rule is a closure over plain numbers, so numba's cache key (a hash of them) is the same in
    # every process: a dispatcher in the closure pickles with a new uuid each time, a new entry each process
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    counts = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", _ONE_STEP], capture_output=True, text=True, env=env,
                             cwd=Path(__file__).parent.parent, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        counts.append(len(list(tmp_path.rglob("cpu_blockwise._make_claim*.nbc"))))
    assert counts == [1, 1]
