"""Dask with what a training step adds: clip_grad_norm, overrides, schedules, skip_nonfinite, the newer optimizers,
float16, a state file; NumPy's numbers bit for bit, the norm's pass run once per step, a bounded graph."""

import numpy as np
import pytest

import xopt
from xopt import schedules
from test_edges import make

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
Callback = pytest.importorskip("dask.callbacks").Callback

SHAPES = {"W": ((40, 12), (10, 5)), "b": ((12,), 5)}  # (shape, chunks): blocks of several sizes
DTYPES = [np.float16, np.float32, np.float64]
CONFIGS = ["SGD-nesterov-wd", "Adam", "AdamW-amsgrad", "AdaDelta-wd", "Adamax-wd", "NAdam-decoupled-wd", "RAdam-wd",
           "Lion-wd"]


def _exact_grads(rng, dtype, steps):
    """Quarters of small integers: every square and every partial sum exact in float64, so the global norm
    has the same bits whichever order the chunks are summed in (NumPy's and Dask's orders differ)."""
    return [{k: (rng.integers(-12, 13, shape) / 4).astype(dtype) for k, (shape, _) in SHAPES.items()}
            for _ in range(steps)]


def _both(config, rng, dtype, steps, grads=None, **extra):
    """The same steps in NumPy and on Dask (synchronous scheduler): (NumPy's optimizer and params, Dask's)."""
    w0 = {k: rng.standard_normal(shape).astype(dtype) for k, (shape, _) in SHAPES.items()}
    grads = grads or _exact_grads(rng, dtype, steps)
    ref, a = make(config, **extra), {k: v.copy() for k, v in w0.items()}
    ours, b = make(config, **extra), {k: da.from_array(v.copy(), chunks=SHAPES[k][1]) for k, v in w0.items()}
    with np.errstate(all="ignore"), dask.config.set(scheduler="sync"):
        for g in grads:
            ref.update(a, g)
            ours.update(b, {k: da.from_array(v, chunks=SHAPES[k][1]) for k, v in g.items()})
    return ref, a, ours, b


def _assert_same(ref, a, ours, b):
    with dask.config.set(scheduler="sync"):
        for k in a:
            got = b[k].compute()
            assert got.dtype == a[k].dtype
            np.testing.assert_array_equal(got, a[k], err_msg=f"param {k}")
            for name in ref.buffers():
                np.testing.assert_array_equal(ours.state[k][name].compute(), ref.state[k][name], err_msg=f"{name} of {k}")
    assert (ours.iter, ours.skipped_steps) == (ref.iter, ref.skipped_steps)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", CONFIGS)
def test_clipped_steps_equal_numpy_bit_for_bit(config, dtype, rng):
    """Every chunk's engine scales its grads as it reads them, as in one process (a float16 grad scaled in
    float32, not rounded to float16 first); the grads passed in are not written."""
    grads = _exact_grads(rng, dtype, 8 if config.startswith("RAdam") else 4)
    kept = [{k: v.copy() for k, v in g.items()} for g in grads]
    ref, a, ours, b = _both(config, rng, dtype, len(grads), grads, clip_grad_norm=0.5)
    _assert_same(ref, a, ours, b)
    assert ref.last_grad_norm > 0.5, "the steps were not clipped"
    with dask.config.set(scheduler="sync"):
        assert float(ours.last_grad_norm.compute()) == ref.last_grad_norm
    for g, k in zip(grads, kept):
        for name in g:
            np.testing.assert_array_equal(g[name], k[name])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("what", ["overrides", "schedule", "skip_nonfinite", "all"])
def test_overrides_schedules_and_skips_equal_numpy_bit_for_bit(what, dtype, rng):
    grads = _exact_grads(rng, dtype, 6)
    grads[2]["b"][3] = np.nan  # skipped where skip_nonfinite is on; else NaN goes where NumPy sends it
    extra = {"overrides": dict(overrides={"b": {"weight_decay": 0.0, "lr": schedules.linear_schedule(0.01, 0.0, 4)}}),
             "schedule": dict(lr=schedules.warmup_cosine_decay_schedule(0.0, 0.05, 2, 6)),
             "skip_nonfinite": dict(skip_nonfinite=True)}
    extra["all"] = {**extra["overrides"], **extra["schedule"], **extra["skip_nonfinite"], "clip_grad_norm": 0.5}
    ref, a, ours, b = _both("NAdam-decoupled-wd", rng, dtype, len(grads), grads, **extra[what])
    _assert_same(ref, a, ours, b)


class _Runs(Callback):
    """The keys of every task a local scheduler runs."""

    def __init__(self):
        super().__init__()
        self.keys = []

    def _pretask(self, key, dsk, state):
        self.keys.append(key[0] if isinstance(key, tuple) else key)


@pytest.mark.parametrize("extra", [dict(skip_nonfinite=True), dict(overrides={"b": {"lr": 0.01}})],
                         ids=["skip_nonfinite", "overrides"])
def test_the_norm_is_computed_once_per_step(extra, rng):
    """skip_nonfinite needs the norm on the client first: the step then takes its number, not the graph again.
    With overrides, one layer per hyperparameter set: the second reads the scale the first persisted."""
    params = {k: da.from_array(rng.standard_normal(shape), chunks=chunks) for k, (shape, chunks) in SHAPES.items()}
    opt = xopt.Adam(clip_grad_norm=0.5, **extra)
    with dask.config.set(scheduler="sync"):
        for g in _exact_grads(rng, np.float64, 3):
            grads = {k: da.from_array(v, chunks=SHAPES[k][1]) for k, v in g.items()}
            with _Runs() as runs:
                opt.update(params, grads)
            with _Runs() as alone:
                xopt._clip.global_norm(list(grads.values())).compute()
            with _Runs() as kept:  # the norm as computed by the step: the grads are not read again
                assert float(opt.last_grad_norm.compute()) == float(xopt._clip.global_norm(list(g.values())))
            sums = [[k for k in r.keys if k.startswith("sum")] for r in (runs, alone, kept)]
            assert len(sums[0]) == len(sums[1]) > 0 == len(sums[2]), sums


def test_the_graph_stays_bounded_with_clipping(rng):
    params = {k: da.from_array(rng.standard_normal(shape), chunks=chunks) for k, (shape, chunks) in SHAPES.items()}
    opt = xopt.Adam(clip_grad_norm=0.5, overrides={"b": {"lr": 0.01}})
    sizes = []
    with dask.config.set(scheduler="sync"):
        for g in _exact_grads(rng, np.float64, 12):
            opt.update(params, {k: da.from_array(v, chunks=SHAPES[k][1]) for k, v in g.items()})
            sizes.append([len(params[k].__dask_graph__()) for k in params] +
                         [len(opt.state[k]["v"].__dask_graph__()) for k in params])
    assert sizes == [[2 * params["W"].npartitions, 2 * params["b"].npartitions] * 2] * 12, sizes


def test_a_state_file_with_overrides_and_a_schedule_resumes_as_numpy(rng, tmp_path):
    grads = _exact_grads(rng, np.float32, 6)
    extra = dict(lr=schedules.cosine_decay_schedule(0.01, 6), overrides={"b": {"weight_decay": 0.0}})
    ref, a, _, _ = _both("NAdam-decoupled-wd", np.random.default_rng(1), np.float32, 6, grads, **extra)
    _, _, first, b = _both("NAdam-decoupled-wd", np.random.default_rng(1), np.float32, 3, grads[:3], **extra)
    first.save(tmp_path / "s.npz")
    second = xopt.NAdam()
    second.load(tmp_path / "s.npz", params=b)
    with dask.config.set(scheduler="sync"):
        for g in grads[3:]:
            second.update(b, {k: da.from_array(v, chunks=SHAPES[k][1]) for k, v in g.items()})
    _assert_same(ref, a, second, b)


def test_a_subclass_with_its_own_init_steps_on_dask_as_on_numpy():
    """A user's subclass that fixes some hyperparameters in its own __init__: the chunks' optimizer is made
    from every hyperparameter by name (it raised "multiple values for keyword argument 'beta1'")."""

    class Fixed(xopt.Adam):
        def __init__(self, lr=1e-3, **options):
            super().__init__(lr=lr, beta1=0.8, beta2=0.99, **options)

    w = np.linspace(-1.0, 1.0, 8)
    g = np.linspace(0.5, -0.25, 8)
    on_numpy, on_dask = Fixed(), Fixed()
    p_numpy, p_dask = {"w": w.copy()}, {"w": da.from_array(w.copy(), chunks=4)}
    for _ in range(3):
        on_numpy.update(p_numpy, {"w": g})
        with dask.config.set(scheduler="sync"):
            on_dask.update(p_dask, {"w": da.from_array(g, chunks=4)})
    np.testing.assert_array_equal(p_dask["w"].compute(), p_numpy["w"])
