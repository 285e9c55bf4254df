"""The CUDA engine (its kernel's CPU build, as in tests/test_cuda_source.py) with what a training step adds:
overrides, schedules, clip_grad_norm, skip_nonfinite, mixed dtypes; bit for bit against the reference rule."""

from __future__ import annotations

import numpy as np
import pytest

import xopt
from xopt import schedules
from xopt.engines import cuda_check, fused_cuda
from test_cuda_source import ALL_CONFIGS, HostDevice, _assert_same, _placed, cuda_on_cpu, host_kernel  # noqa: F401
from test_edges import make

pytestmark = pytest.mark.cuda_source
DTYPES = [np.float16, np.float32, np.float64]


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


def _grads(rng, params, steps, scale=1.0):
    return [{k: np.array(rng.standard_normal(v.shape) * scale + 0.1, dtype=v.dtype) for k, v in params.items()}
            for _ in range(steps)]


def _steps(config):
    return 8 if "RAdam" in str(config) else 4  # RAdam rectifies from step 6


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", ALL_CONFIGS, ids=str)
def test_clipped_steps_equal_the_reference_bit_for_bit(config, dtype, cuda_on_cpu, rng):
    """The kernel scales each grad by the clip scale in the math type, as the reference does (a float16 grad in
    float32: scaled copies of float16 grads were rounded to float16 first), reading the caller's grads, unwritten."""
    params = _params(rng, dtype)
    grads_seq = _grads(rng, params, _steps(config), scale=3.0)
    kept = [{k: v.copy() for k, v in g.items()} for g in grads_seq]
    read = []
    launch = HostDevice.launch.__func__

    def watch(cls, function, n_blocks, args):
        read.append(sorted(args[0][1].tolist()))  # the grad row of the table: the addresses the kernel reads
        launch(cls, function, n_blocks, args)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(HostDevice, "launch", classmethod(watch))
        ref, a, ours, b = _both(config, params, grads_seq, clip_grad_norm=1.0)
    _assert_same(ref, ours, a, b, f"{config} clipped")
    assert ref.last_grad_norm > 1.0 and ours.last_grad_norm == ref.last_grad_norm
    assert read == [sorted(g.ctypes.data for g in gs.values()) for gs in grads_seq], "the kernel read copies"
    for g, k in zip(grads_seq, kept):
        for name in g:
            np.testing.assert_array_equal(g[name], k[name])


@pytest.mark.parametrize("config", ["Adam-amsgrad-wd", "NAdam-decoupled-wd", "RAdam-wd", "RMSprop-all", "Lion-wd"])
def test_mixed_dtypes_clipped_one_launch_per_dtype(config, cuda_on_cpu, rng):
    """float16, float32 and float64 params in one step: one norm over all of them, one launch per dtype."""
    params = {f"{np.dtype(d).name}-{i}": np.array(rng.standard_normal(n), dtype=d)
              for d in DTYPES for i, n in enumerate([9, 2 * fused_cuda.CHUNK + 1])}
    grads_seq = _grads(rng, params, _steps(config), scale=2.0)
    ref, a, ours, b = _both(config, params, grads_seq, clip_grad_norm=2.0)
    _assert_same(ref, ours, a, b, "mixed dtypes")
    assert cuda_on_cpu.launches == 3 * len(grads_seq)


@pytest.mark.parametrize("config", ["Adam-amsgrad-wd", "NAdam", "RAdam-decoupled-wd", "AdaDelta-wd", "SGD-nesterov-wd"])
def test_overrides_and_schedules_one_launch_per_hyperparameter_set(config, cuda_on_cpu, rng):
    """Two sets (the bias's and the rest's), each scheduled: two launches a step, each with its set's numbers."""
    params = _params(rng, np.float32)
    grads_seq = _grads(rng, params, _steps(config))
    lr = 1.0 if config.startswith("AdaDelta") else 0.01
    extra = dict(lr=schedules.cosine_decay_schedule(lr, 6),
                 overrides={"bias": {"lr": schedules.linear_schedule(lr, 0.0, 5), "weight_decay": 0.0}})
    ref, a, ours, b = _both(config, params, grads_seq, **extra)
    _assert_same(ref, ours, a, b, "overrides and schedules")
    assert cuda_on_cpu.launches == 2 * len(grads_seq)
    assert [sizes for _, sizes in cuda_on_cpu.launched_on[:2]] == [[5, 300, 2 * fused_cuda.CHUNK + 3], [7]]


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
    grads_seq = _grads(rng, params, 4)
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
        launch(cls, function, n_blocks, (*args[:5], np.uint64(0), *args[6:]))
    monkeypatch.setattr(HostDevice, "launch", classmethod(no_clip))
    result = fused_cuda.self_check(rule, np.float32)
    assert not result.passed and "clip_grad_norm=1.0" in result.mismatch and "step 1" in result.mismatch, str(result)


def test_a_failed_self_check_beside_a_working_kernel(cuda_on_cpu, monkeypatch, rng):
    """float32 params under impl="auto" (their self-check passed); a float16 param joins the same dict and its
    kernel fails the self-check: one warning, the float16 param on the reference rule, the float32 ones on the
    kernel (one launch a step); every number the reference's."""
    launch = HostDevice.launch.__func__

    def broken_half(cls, function, n_blocks, args):
        if function[1] == 16:
            args = (*args[:6], np.nextafter(args[6], np.inf), *args[7:])
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
