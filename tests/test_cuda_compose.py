"""The CUDA engine (its kernel's CPU build, as in tests/test_cuda_source.py) with what a training step adds:
overrides, schedules, clip_grad_norm, skip_nonfinite, mixed dtypes; bit for bit against the reference rule."""

from __future__ import annotations

import numpy as np
import pytest

import xopt
from xopt import schedules
from xopt.engines import cuda_check, fused_cuda
from test_cuda_source import (ALL_CONFIGS, HostDevice, _assert_same, _placed, at, cuda_on_cpu,  # noqa: F401
                              grads_read, nudge_first_scalar)
from test_edges import make

pytestmark = pytest.mark.cuda_source
ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float16, BF16, np.float32, np.float64]


def _opt(config, **extra):
    return make(config, **extra) if isinstance(config, str) else getattr(xopt, config[0])(**config[1], **extra)


def _both(config, params, grads_seq, **extra):
    """The same steps by the reference rule and by the CUDA engine: (ref, a, ours, b)."""
    out = []
    for impl in ("reference", "fused"):
        opt = _opt(config, impl=impl, **extra)
        ps = {k: _placed(v) for k, v in params.items()}
        with np.errstate(all="ignore"):
            for g in grads_seq:
                opt.update(ps, g)
        out += [opt, ps]
    return out


def _params(rng, dtype, sizes=(5, 300, 2 * fused_cuda.CHUNK + 3)):
    return {f"w{i}": np.array(rng.standard_normal(n), dtype=dtype) for i, n in enumerate(sizes)} | {
        "bias": np.array(rng.standard_normal(7), dtype=dtype)}


def _grads(rng, params, steps, scale=1.0, exact_norm=False):
    """``steps`` dicts of fresh grads; ``exact_norm``: multiples of 1/64, whose sum of squares is exact in float64
    whatever the order of the additions (the kernel's norm pass and the reference's add in different orders)."""
    out = [{k: rng.standard_normal(v.shape) * scale + 0.1 for k, v in params.items()} for _ in range(steps)]
    if exact_norm:
        out = [{k: np.round(v * 64) / 64 for k, v in g.items()} for g in out]
    return [{k: np.array(v, dtype=params[k].dtype) for k, v in g.items()} for g in out]


def _steps(config):
    return 8 if "RAdam" in str(config) else 4  # RAdam rectifies from step 6


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", ALL_CONFIGS, ids=str)
def test_clipped_steps_equal_the_reference_bit_for_bit(config, dtype, cuda_on_cpu, lane, rng):
    """The kernel scales each grad by the clip scale in the math type, as the reference does (a float16 grad in
    float32: scaled copies of float16 grads were rounded to float16 first), reading the caller's grads, unwritten.
    From the second step the lane takes the steps: the norm pass, then the step."""
    params = _params(rng, dtype)
    grads_seq = _grads(rng, params, _steps(config), scale=3.0, exact_norm=True)
    kept = [{k: v.copy() for k, v in g.items()} for g in grads_seq]
    read = []
    launch = HostDevice.launch.__func__

    def watch(cls, function, n_blocks, args):
        if function[0] != "norm":
            read.append(sorted(grads_read(args)))  # the addresses the kernel reads its grads from
        launch(cls, function, n_blocks, args)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(HostDevice, "launch", classmethod(watch))
        ref, a, ours, b = _both(config, params, grads_seq, clip_grad_norm=1.0)
    _assert_same(ref, ours, a, b, f"{config} clipped")
    steps = len(grads_seq)
    assert lane == [False] * steps + [False] + [True] * (steps - 1)
    assert (cuda_on_cpu.launches, cuda_on_cpu.norms, len(cuda_on_cpu.uploads)) == (steps, steps - 1, steps)
    assert ref.last_grad_norm > 1.0 and ours.last_grad_norm == ref.last_grad_norm
    assert read == [sorted(g.ctypes.data for g in gs.values()) for gs in grads_seq], "the kernel read copies"
    for g, k in zip(grads_seq, kept):
        for name in g:
            np.testing.assert_array_equal(g[name], k[name])


@pytest.mark.parametrize("config", ["Adam-amsgrad-wd", "NAdam-decoupled-wd", "RAdam-wd", "RMSprop-all", "Lion-wd"])
def test_mixed_dtypes_clipped_one_launch_per_dtype(config, cuda_on_cpu, rng):
    """float16, bfloat16, float32 and float64 params in one step: one norm over all of them, one launch per dtype."""
    params = {f"{np.dtype(d).name}-{i}": np.array(rng.standard_normal(n), dtype=d)
              for d in DTYPES for i, n in enumerate([9, 2 * fused_cuda.CHUNK + 1])}
    grads_seq = _grads(rng, params, _steps(config), scale=2.0)
    ref, a, ours, b = _both(config, params, grads_seq, clip_grad_norm=2.0)
    _assert_same(ref, ours, a, b, "mixed dtypes")
    assert cuda_on_cpu.launches == len(DTYPES) * len(grads_seq)


@pytest.mark.parametrize("config", ["Adam-amsgrad-wd", "NAdam", "RAdam-decoupled-wd", "AdaDelta-wd", "SGD-nesterov-wd"])
def test_overrides_and_schedules_one_launch_a_step(config, cuda_on_cpu, lane, rng):
    """Two sets (the bias's and the rest's), each scheduled: the first step (the checked path) launches once per
    set; from the second on the lane takes both parts in one launch, each tensor reading its part's row."""
    params = _params(rng, np.float32)
    grads_seq = _grads(rng, params, _steps(config))
    lr = 1.0 if config.startswith("AdaDelta") else 0.01
    extra = dict(lr=schedules.cosine_decay_schedule(lr, 6),
                 overrides={"bias": {"lr": schedules.linear_schedule(lr, 0.0, 5), "weight_decay": 0.0}})
    ref, a, ours, b = _both(config, params, grads_seq, **extra)
    _assert_same(ref, ours, a, b, "overrides and schedules")
    steps = len(grads_seq)
    assert lane[steps:] == [False] + [True] * (steps - 1)
    assert cuda_on_cpu.launches == 2 + steps - 1 and len(cuda_on_cpu.uploads) == cuda_on_cpu.launches
    sizes = [5, 300, 2 * fused_cuda.CHUNK + 3]
    assert [s for _, s in cuda_on_cpu.launched_on] == [sizes, [7]] + [sizes + [7]] * (steps - 1)


@pytest.mark.parametrize("config", ["NAdam", "RAdam-wd", "Adam"])
def test_params_at_different_step_counts(config, cuda_on_cpu, rng):
    """A param that joins later has its own count: its own schedule value, NAdam's product, RAdam's rectification."""
    params = _params(rng, np.float64)
    late = {k: v for k, v in params.items() if k != "bias"}
    grads_seq = _grads(rng, params, 9)
    runs = []
    for impl in ("reference", "fused"):
        opt = _opt(config, impl=impl, lr=schedules.exponential_decay(0.01, 2, 0.5))
        ps = {k: _placed(v) for k, v in params.items()}
        for i, g in enumerate(grads_seq):
            if i < 3:  # the bias joins at the fourth step
                opt.update({k: ps[k] for k in late}, {k: g[k] for k in late})
            else:
                opt.update(ps, g)
        runs += [opt, ps]
    _assert_same(*runs[0::2], *runs[1::2], "different counts")
    assert runs[2].state["bias"]["step"] == 6 and runs[2].state["w0"]["step"] == 9


@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_skipped_step_launches_nothing(clip, cuda_on_cpu, rng):
    params = _params(rng, np.float32)
    grads_seq = _grads(rng, params, 4, exact_norm=True)
    grads_seq[1]["w1"][17] = np.inf
    ref, a, ours, b = _both("Adam", params, grads_seq, skip_nonfinite=True, clip_grad_norm=clip)
    _assert_same(ref, ours, a, b, "skipped")
    assert (ours.iter, ours.skipped_steps) == (ref.iter, ref.skipped_steps) == (3, 1)
    assert cuda_on_cpu.launches == 3


@pytest.mark.parametrize("rule", sorted(cuda_check.CONFIGS))
def test_self_check_covers_the_clip_scale(rule, cuda_on_cpu, monkeypatch):
    """A kernel that ignored the clip scale fails each rule's self-check, naming the clipped configuration."""
    launch = HostDevice.launch.__func__

    def no_clip(cls, function, n_blocks, args):
        launch(cls, function, n_blocks, args if function[0] == "norm" else (*args[:4], np.uint64(0), *args[5:]))
    monkeypatch.setattr(HostDevice, "launch", classmethod(no_clip))
    result = cuda_check.self_check(rule, np.float32)
    assert not result.passed and "clip_grad_norm=1.0" in result.mismatch and "step 1" in result.mismatch, str(result)


def test_a_failed_self_check_beside_a_working_kernel(cuda_on_cpu, monkeypatch, rng):
    """float32 params under impl="auto" (their self-check passed); a float16 param joins the same dict and its
    kernel fails the self-check: one warning, the float16 param on the reference rule, the float32 ones on the
    kernel (one launch a step); every number the reference's."""
    launch = HostDevice.launch.__func__

    def broken_half(cls, function, n_blocks, args):
        if function[1] == 16 and function[0] != "norm":
            nudge_first_scalar(function, n_blocks, args)
        launch(cls, function, n_blocks, args)
    monkeypatch.setattr(HostDevice, "launch", classmethod(broken_half))
    params = _params(rng, np.float32)
    ref, ours = xopt.Adam(impl="reference"), xopt.Adam()
    a, b = ({k: _placed(v) for k, v in params.items()} for _ in range(2))
    for g in _grads(rng, params, 3):
        ref.update(a, g)
        ours.update(b, g)
    assert cuda_check.RESULTS[(0, 4, "float32")].passed
    half = np.array(rng.standard_normal(33), dtype=np.float16)
    a["h"], b["h"] = _placed(half), _placed(half)
    before = cuda_on_cpu.launches
    for i, g in enumerate(_grads(rng, a, 3)):
        ref.update(a, g)
        if i == 0:
            with pytest.warns(cuda_check.SelfCheckWarning, match=r"xopt_step<4, unsigned short, float>"):
                ours.update(b, g)
            before = cuda_on_cpu.launches
        else:
            ours.update(b, g)
    assert cuda_on_cpu.launches == before + 2, "float32 params: one launch a step; float16: none"
    _assert_same(ref, ours, a, b, "half on the reference, the rest on the kernel")


# -- the exact-type lane: one upload and one launch a step, every check before any write ------------------------
@pytest.fixture(params=["compiled", "python"])
def reader(request, monkeypatch):
    """The lane's two ways to read a step's arrays: one compiled call over their structs (cuda_memory), or Python's
    attribute lookups (where numba is missing or a probe of the structs disagreed)."""
    if request.param == "python":
        monkeypatch.setattr(fused_cuda, "cuda_memory", None)
    return request.param


def _lane_twins(config, params, grads_seq, lane, inplace=False, **extra):
    """The reference's steps, then the engine's on copies of the same params; ``lane`` left holding the engine's
    answers alone.  ``inplace``: the engine's grads are one set of arrays, rewritten before each step."""
    ref, ours = _opt(config, impl="reference", **extra), _opt(config, impl="fused", **extra)
    a = {k: _placed(v) for k, v in params.items()}
    b = {k: _placed(v) for k, v in params.items()}
    with np.errstate(all="ignore"):
        for g in grads_seq:
            ref.update(a, g)
        lane.clear()
        held = {k: v.copy() for k, v in grads_seq[0].items()}
        for g in grads_seq:
            if inplace:
                for k, v in g.items():
                    held[k][...] = v
            ours.update(b, held if inplace else {k: v.copy() for k, v in g.items()})
    return ref, a, ours, b


CASES = {"plain": {}, "clip": dict(clip_grad_norm=1.0), "overrides": dict(overrides={"b*": {"lr": 0.1}}),
         "skip": dict(skip_nonfinite=True), "clip-skip": dict(clip_grad_norm=1.0, skip_nonfinite=True),
         "in place": {}}


def _case_inputs(case, dtype, rng):
    """(hyperparameters, config, params, steps, grads of each step) of a lane case; "skip" cases get an Inf at step 3."""
    params = _params(rng, dtype)
    grads_seq = _grads(rng, params, 5, scale=3.0, exact_norm=True)
    if "skip" in case:
        grads_seq[2]["w1"][17] = np.inf
    return CASES[case], "Adam-amsgrad-wd", params, 5, grads_seq


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_lane_steps_equal_the_reference(case, dtype, reader, cuda_on_cpu, lane, rng):
    """Every step after the first taken by the lane (the first makes the state: the checked path): params and every
    buffer the reference's, bit for bit; one table upload and one step launch a step (and one norm pass before it
    with clip_grad_norm or skip_nonfinite); a step skip_nonfinite skips launches no step and writes nothing."""
    extra, config, params, steps, grads_seq = _case_inputs(case, dtype, rng)
    ref, a, ours, b = _lane_twins(config, params, grads_seq, lane, inplace=case == "in place", **extra)
    _assert_same(ref, ours, a, b, case)
    assert lane == [False] + [True] * (steps - 1), "the lane took every step after the first"
    assert (ours.iter, ours.skipped_steps) == (ref.iter, ref.skipped_steps) == ((4, 1) if "skip" in case else (5, 0))
    norm_pass = "clip" in case or "skip" in case
    skipped = "skip" in case
    first = 2 if case == "overrides" else 1  # the checked path's first step: a launch per hyperparameter set
    assert cuda_on_cpu.launches == first + steps - 1 - skipped
    assert len(cuda_on_cpu.uploads) == cuda_on_cpu.launches + skipped, "one table upload a step"
    assert cuda_on_cpu.norms == (steps - 1 if norm_pass else 0)
    if "clip" in case:
        assert ours.last_grad_norm == ref.last_grad_norm and ref.last_grad_norm > 1.0


def test_lane_reads_the_grads_where_they_are(cuda_on_cpu, lane, rng):
    """New grad arrays each step: each table holds that step's addresses (nothing kept from the step before)."""
    params = _params(rng, np.float32)
    grads_seq = _grads(rng, params, 4)
    read = []
    launch = HostDevice.launch.__func__

    def watch(cls, function, n_blocks, args):
        read.append(grads_read(args))
        launch(cls, function, n_blocks, args)
    opt = xopt.Adam(impl="fused")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(HostDevice, "launch", classmethod(watch))
        for g in grads_seq:
            opt.update(params, g)
    assert lane == [False, True, True, True]
    assert read == [[g[k].ctypes.data for k in params] for g in grads_seq]


def test_lane_norm_is_close_where_the_order_of_the_sum_matters(cuda_on_cpu, lane, rng):
    """Grads whose sum of squares rounds: the norm pass adds in another order than NumPy's, so the norm may differ
    in its last bits, and no more."""
    params = _params(rng, np.float64)
    grads_seq = _grads(rng, params, 3, scale=3.0)
    ref, a, ours, b = _lane_twins("Adam", params, grads_seq, lane, clip_grad_norm=1.0)
    assert lane == [False, True, True]
    assert float(ours.last_grad_norm) == pytest.approx(ref.last_grad_norm, rel=1e-14)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-12)


def _general_path_only(monkeypatch):
    monkeypatch.setattr(xopt._dispatch, "lane_engine", lambda opt, array_type: None)


class _GradSubclass(np.ndarray):
    pass


def _bad_grads(kind, params, state, rng):
    """One bad step's grads: the lane must refuse them."""
    g = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    if kind == "the param itself":
        g["w1"] = params["w1"]
    elif kind == "part of a param":
        g["w1"] = params["w2"][3:3 + params["w1"].size]
    elif kind == "a state buffer":
        g["w0"] = state["w0"]["v"]
    elif kind == "another dtype":
        g["w1"] = g["w1"].astype(np.float32)
    elif kind == "another shape":
        g["w1"] = g["w1"][:-1]
    elif kind == "not contiguous":
        g["w1"] = np.repeat(g["w1"], 2)[::2]
    elif kind == "another array type":
        g["w1"] = g["w1"].view(_GradSubclass)
    elif kind == "a step count not an int":
        state["w1"]["step"] = np.int64(state["w1"]["step"])
    return g


BAD = ["the param itself", "part of a param", "a state buffer", "another dtype", "another shape", "not contiguous",
       "another array type", "a step count not an int"]


@pytest.mark.parametrize("kind", BAD)
def test_lane_refuses_whole_and_the_checked_path_answers(kind, reader, cuda_on_cpu, lane, monkeypatch, rng):
    """A grad that shares memory with a param or a state buffer, of another dtype, shape or array type, or not
    contiguous: the lane declines having written nothing (no upload, no launch), and the checked path answers
    what it answers without the lane: the same error, or (dtype, contiguity) the step through copies."""
    params = _params(rng, np.float64)
    grads_seq = _grads(rng, params, 2)
    twins = []
    for _ in range(2):
        opt, ps = xopt.Adam(impl="fused"), {k: _placed(v) for k, v in params.items()}
        for g in grads_seq:
            opt.update(ps, g)
        twins.append((opt, ps))
    (ours, b), (theirs, c) = twins
    before = {k: v.copy() for k, v in b.items()}
    state = {k: {n: v.copy() for n, v in st.items() if n != "step"} for k, st in ours.state.items()}
    bad = _bad_grads(kind, b, ours.state, np.random.default_rng(1))
    launches, uploads = cuda_on_cpu.launches, len(cuda_on_cpu.uploads)
    lane.clear()
    outcome = []
    for opt, ps, grads in [(ours, b, bad), (theirs, c, _bad_grads(kind, c, theirs.state, np.random.default_rng(1)))]:
        if opt is theirs:
            _general_path_only(monkeypatch)
        try:
            opt.update(ps, grads)
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001
            outcome.append((type(exc), str(exc)))
    assert lane[0] is False, "the lane took a step it must refuse"
    assert outcome[0] == outcome[1], "not the checked path's answer"
    if outcome[0] is not None:  # refused: nothing written
        assert (cuda_on_cpu.launches, len(cuda_on_cpu.uploads)) == (launches, uploads)
        for k in b:
            np.testing.assert_array_equal(b[k], before[k])
            for n, v in state[k].items():
                np.testing.assert_array_equal(ours.state[k][n], v)
        assert ours.iter == 2
    else:
        assert kind in ("another dtype", "not contiguous", "a step count not an int")
        for k in b:
            np.testing.assert_array_equal(b[k], c[k])


def test_lane_refuses_params_on_two_gpus(cuda_on_cpu, lane, monkeypatch, rng):
    """Params on two GPUs: the lane declines, the checked path launches once per GPU."""
    monkeypatch.setattr(HostDevice, "device_of", staticmethod(lambda a: a.size % 2))
    params = {f"w{i}": rng.standard_normal(n) for i, n in enumerate([10, 11, 12])}
    opt = xopt.Adam(impl="fused")
    for g in _grads(rng, params, 3):
        opt.update(params, g)
    assert lane == [False, False, False] and cuda_on_cpu.launches == 6


def test_lane_waits_for_the_self_check_under_auto(cuda_on_cpu, lane, rng):
    """impl="auto": the lane declines until the checked path's self-check passed for that GPU, rule and dtype; then
    it takes the steps; another dtype waits for its own check."""
    params = _params(rng, np.float32)
    opt = xopt.Adam(impl="fused")
    grads_seq = _grads(rng, params, 4)
    opt.update(params, grads_seq[0])  # the state, without a self-check
    opt.impl = "auto"
    lane.clear()
    opt.update(params, grads_seq[1])
    assert lane[0] is False, "the lane ran the kernel before its self-check under auto"
    assert cuda_check.passed(0, 4, "float32") and not cuda_check.passed(0, 4, "float16")
    lane.clear()
    for g in grads_seq[2:]:
        opt.update(params, g)
    assert lane == [True, True]
    half = {k: v.astype(np.float16) for k, v in params.items()}
    opt16 = xopt.Adam(impl="fused")
    halves = _grads(rng, half, 3)
    opt16.update(half, halves[0])
    opt16.impl = "auto"
    lane.clear()
    opt16.update(half, halves[1])
    assert lane[0] is False and cuda_check.passed(0, 4, "float16")
    lane.clear()
    opt16.update(half, halves[2])
    assert lane == [True]


# -- the lane on CuPy arrays: CuPy's own structs read (arrays made over host memory, run by the CPU build) -------
def _cupy_host(values, device=0):
    """A CuPy array over a copy of ``values`` in host memory (16-byte aligned) that says it is on GPU ``device``."""
    cupy = pytest.importorskip("cupy")
    host = _placed(values)
    memory = cupy.cuda.UnownedMemory(host.ctypes.data, host.nbytes, host, device_id=device)
    return cupy.ndarray(host.shape, host.dtype, cupy.cuda.MemoryPointer(memory, 0))


def _host(a):
    """What a CuPy array over host memory holds, as NumPy."""
    return at(a.data.ptr, a.dtype, a.size).reshape(a.shape).copy()


def _cupy_twin(config, params, first_grads, **extra):
    """An engine optimizer on CuPy arrays (over host memory) as the reference stands after its first step: its
    params and state copied from a NumPy reference run (a first step would make the state with CuPy kernels)."""
    seed = _opt(config, impl="reference", **extra)
    ps = {k: _placed(v) for k, v in params.items()}
    seed.update(ps, first_grads)
    ours = _opt(config, impl="fused", **extra)
    b = {k: _cupy_host(v) for k, v in ps.items()}
    ours.state = {k: {n: (v if n == "step" else _cupy_host(v)) for n, v in st.items()} for k, st in seed.state.items()}
    ours.iter = 1
    ours._check_patterns(b)
    return ours, b


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_lane_on_cupy_arrays_equals_the_reference(case, dtype, reader, cuda_on_cpu, lane, rng):
    """CuPy arrays, read from CuPy's structs (or, under the Python reader, by their attributes): every step after
    the first the lane's, bit for bit the reference's (on NumPy copies), one upload and one launch a step."""
    _lane_on_cupy_arrays(case, dtype, cuda_on_cpu, lane, rng)


@pytest.mark.parametrize("case", ["plain", "clip", "overrides"])
@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32], ids=lambda d: np.dtype(d).name)
def test_lane_on_cupy_arrays_with_bfloat16_state(case, dtype, reader, cuda_on_cpu, lane, rng):
    """Adam's state_dtype="bfloat16" on CuPy arrays (CuPy 14's bfloat16 is ml_dtypes'): the lane reads the state's
    dtype from CuPy's structs as the kernel's state type, and every step after the first is the lane's."""
    _lane_on_cupy_arrays(case, dtype, cuda_on_cpu, lane, rng, state_dtype="bfloat16")


def _lane_on_cupy_arrays(case, dtype, cuda_on_cpu, lane, rng, **more):
    """The lane's steps on CuPy arrays over host memory against the reference's on NumPy copies (``more``: more
    hyperparameters)."""
    extra, config, params, steps, grads_seq = _case_inputs(case, dtype, rng)
    extra = {**extra, **more}
    ref = _opt(config, impl="reference", **extra)
    a = {k: _placed(v) for k, v in params.items()}
    with np.errstate(all="ignore"):
        for g in grads_seq:
            ref.update(a, g)
    ours, b = _cupy_twin(config, params, grads_seq[0], **extra)
    lane.clear()
    held = {k: _cupy_host(v) for k, v in grads_seq[0].items()}
    for g in grads_seq[1:]:
        if case == "in place":
            for k, v in g.items():
                at(held[k].data.ptr, v.dtype, v.size)[...] = v.reshape(-1)
            ours.update(b, held)
        else:
            ours.update(b, {k: _cupy_host(v) for k, v in g.items()})
    assert lane == [True] * (steps - 1)
    skipped = "skip" in case
    assert (ours.iter, ours.skipped_steps) == (ref.iter, ref.skipped_steps)
    assert cuda_on_cpu.launches == steps - 1 - skipped and len(cuda_on_cpu.uploads) == steps - 1
    for k in a:
        np.testing.assert_array_equal(_host(b[k]), a[k], err_msg=f"{case}: param {k}")
        for name in ref.buffers():
            np.testing.assert_array_equal(_host(ours.state[k][name]), ref.state[k][name], err_msg=f"{case}: {name}")
    if "clip" in case:
        assert float(ours.last_grad_norm) == ref.last_grad_norm


class _CheckedPath(Exception):
    pass


def _cupy_bad(kind, b, state, rng):
    g = {k: _cupy_host(rng.standard_normal(v.shape)) for k, v in b.items()}
    if kind == "the param itself":
        g["w1"] = b["w1"]
    elif kind == "part of a param":
        g["w1"] = b["w2"][3:3 + b["w1"].size]
    elif kind == "a state buffer":
        g["w0"] = state["w0"]["v"]
    elif kind == "another dtype":
        g["w1"] = _cupy_host(rng.standard_normal(b["w1"].shape).astype(np.float32))
    elif kind == "another shape":
        g["w1"] = g["w1"][:-1]
    elif kind == "not contiguous":
        g["w1"] = _cupy_host(rng.standard_normal(2 * b["w1"].size))[::2]
    elif kind == "another array type":
        g["w1"] = rng.standard_normal(b["w1"].shape)
    elif kind == "on another GPU":
        g["w1"] = _cupy_host(rng.standard_normal(b["w1"].shape), device=1)
    elif kind == "a step count not an int":
        state["w1"]["step"] = np.int64(state["w1"]["step"])
    return g


@pytest.mark.parametrize("kind", BAD + ["on another GPU"])
def test_lane_on_cupy_arrays_refuses_whole(kind, reader, cuda_on_cpu, lane, monkeypatch, rng):
    """Whatever the checked path must see, the lane refuses on CuPy arrays too, having written nothing; the checked
    path is entered (here it stops at once: without a GPU it could not run)."""
    params = _params(rng, np.float64)
    ours, b = _cupy_twin("Adam", params, _grads(rng, params, 1)[0])
    before = {k: _host(v) for k, v in b.items()}
    state = {k: {n: _host(v) for n, v in st.items() if n != "step"} for k, st in ours.state.items()}
    bad = _cupy_bad(kind, b, ours.state, rng)
    monkeypatch.setattr(xopt._checked, "collect", lambda params, grads: (_ for _ in ()).throw(_CheckedPath()))
    lane.clear()
    with pytest.raises(_CheckedPath):
        ours.update(b, bad)
    assert lane == [False]
    assert (cuda_on_cpu.launches, len(cuda_on_cpu.uploads)) == (0, 0)
    for k in b:
        np.testing.assert_array_equal(_host(b[k]), before[k])
        for n, v in state[k].items():
            np.testing.assert_array_equal(_host(ours.state[k][n]), v)


def test_cupy_layout_is_probed(reader):
    """CuPy's array struct found where the compiled reader looks (or the Python reader, with none)."""
    cupy = pytest.importorskip("cupy")
    from xopt.engines import cuda_memory

    off = cuda_memory.layout(cupy.ndarray)
    assert off is not None, "CuPy's array struct is not laid out as xopt.engines.cuda_memory expects"
    assert cuda_memory.layout(np.ndarray) is not None
    assert cuda_memory.layout(_GradSubclass) is None


def test_a_step_on_another_stream_waits_for_the_last_launch_on_its_gpu(cuda_on_cpu, lane, rng):
    """Each step's launch is followed by its event's record; a step on another stream than the last launch's
    queues a wait for that event before it writes anything (the checked path's first step and the lane's later
    ones alike); a step on the same stream waits for nothing."""
    params = _params(rng, np.float32)
    grads = _grads(rng, params, 5)
    opt = xopt.Adam(impl="fused")
    opt.update(params, grads[0])  # the checked path (a first step)
    assert cuda_on_cpu.last == {0: 0} and cuda_on_cpu.waits == []
    opt.update(params, grads[1])
    assert cuda_on_cpu.waits == []
    cuda_on_cpu.stream = 7
    opt.update(params, grads[2])
    assert cuda_on_cpu.waits == [(0, 7, 0)] and cuda_on_cpu.last == {0: 7}
    opt.update(params, grads[3])
    assert cuda_on_cpu.waits == [(0, 7, 0)]
    cuda_on_cpu.stream = 0
    other = xopt.Adam(impl="fused")  # another optimizer's first step: the checked path, the same GPU's order
    other.update({"q": _placed(np.ones(9, np.float32))}, {"q": _placed(np.ones(9, np.float32))})
    assert cuda_on_cpu.waits == [(0, 7, 0), (0, 0, 7)]
    assert lane == [False, True, True, True, False]


def test_cupy_devices_ordered_waits_only_across_streams(monkeypatch):
    """``CupyDevice.ordered`` with CuPy's stream and event stubbed: the current stream waits for the last launch's
    event only where that ran on another stream; one event per stream, recorded again; the calls it returns record
    it on the current stream and remember it."""
    cupy = pytest.importorskip("cupy")
    from xopt.engines import cuda_device

    log = []

    class Stream:
        def __init__(self, ptr):
            self.ptr = ptr

        def wait_event(self, event):
            log.append(("wait", self.ptr, event.name))

    class Event:
        made = 0

        def __init__(self, disable_timing=False):
            assert disable_timing
            Event.made += 1
            self.name = f"e{Event.made}"

        def record(self, stream):
            log.append(("record", stream.ptr, self.name))

    current = [Stream(0)]
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: current[0])
    monkeypatch.setattr(cupy.cuda, "Event", Event)
    monkeypatch.setattr(cuda_device, "_LAST", {})
    monkeypatch.setattr(cuda_device, "_EVENTS", {})

    def step():
        for call in cuda_device.CupyDevice.ordered(0):
            call()

    step()
    step()
    assert log == [("record", 0, "e1"), ("record", 0, "e1")]
    current[0] = Stream(5)
    step()
    assert log[2:] == [("wait", 5, "e1"), ("record", 5, "e2")]
    current[0] = Stream(0)
    step()
    assert log[4:] == [("wait", 0, "e2"), ("record", 0, "e1")] and Event.made == 2
