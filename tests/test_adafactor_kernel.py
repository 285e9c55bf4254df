"""Adafactor's fused CPU kernel (xopt.engines.cpu_factored) against its reference rule: the same bits, step after step.

The sums are the one place where order matters: ``xopt._norms`` defines them (each row's sum of squares in
chunks and 16 lanes, each column's in blocks of rows, the param's and the update's norms), the reference
rule follows them on host arrays, the kernel in its passes.  The first tests hold ``_norms`` to those
definitions written as plain loops.
"""

import numpy as np
import pytest

import xopt
from xopt import _norms
from xopt.optimizers import adafactor

pytest.importorskip("xopt.engines.fused_cpu", reason="numba is not installed")

from xopt.engines import cpu_factored, cpu_step, kernels  # noqa: E402

CHUNK, BLOCK = _norms.CHUNK, _norms.ROW_BLOCK

CONFIGS = {
    "default": dict(),
    "decay-d": dict(lr=0.05, weight_decay=0.1, d=2.0, eps2=1e-2, beta2_decay=-0.5),
    "eps1-schedule": dict(lr=lambda count: 0.3 / (1 + count), eps1=1e-20),
    "overrides": dict(weight_decay=0.01, overrides={"b*": {"weight_decay": 0.0, "lr": 0.03}}),
    "clip": dict(weight_decay=0.01, clip_grad_norm=0.5),
}
SHAPES = {"w": (33, 7), "b": (7,), "b1": (1,), "s": (), "t": (3, 5, 40), "col": (9, 1), "row": (1, 9),
          "tall": (2 * BLOCK + 5, 3), "wide": (2, CHUNK + 37), "m": (BLOCK + 3, 48), "big": (2 * CHUNK + 37,), "e": (0,), "e3": (1, 0, 2),
          "zero": (5, 3), "zero_b": (6,)}


def _plain_lanes(values):
    """The order of xopt._norms over one run of Python floats: chunks, 16 lanes, pairwise, chunks in order."""
    total = 0.0
    for at in range(0, len(values), CHUNK):
        lanes = [0.0] * _norms.LANES
        for i, v in enumerate(values[at:at + CHUNK]):
            lanes[i % _norms.LANES] += v
        while len(lanes) > 1:
            lanes = [lanes[k] + lanes[k + 1] for k in range(0, len(lanes), 2)]
        total += lanes[0]
    return total


def _plain_columns(matrix):
    """Each column's sum of squares by blocks of ROW_BLOCK rows, as plain loops over Python floats."""
    rows, columns = matrix.shape
    out = []
    for j in range(columns):
        total = 0.0
        for at in range(0, rows, BLOCK):
            block = 0.0
            for i in range(at, min(at + BLOCK, rows)):
                v = float(matrix[i, j])
                block += v * v  # (x ** 2 is pow, which may round otherwise)
            total += block
        out.append(total)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (BLOCK + 1, 5), (2 * BLOCK + 3, 2), (2, CHUNK + 19), (2, 3, 33)])
def test_row_and_column_sums_are_their_definitions(shape, dtype, rng):
    x = (rng.standard_normal(shape) * np.exp(rng.uniform(-30, 30, shape))).astype(dtype)  # order shows in the bits
    rows = _norms.row_squares(x)
    sums = _norms.row_sums(x)
    columns = _norms.column_squares(x)
    assert rows.shape == sums.shape == shape[:-1] and columns.shape == shape[:-2] + shape[-1:]
    flat = x.reshape(-1, shape[-2], shape[-1])
    for b, matrix in enumerate(flat):
        for i, row in enumerate(matrix):
            values = [float(v) for v in row]
            assert rows.reshape(-1, shape[-2])[b, i] == _plain_lanes([v * v for v in values])
            assert sums.reshape(-1, shape[-2])[b, i] == _plain_lanes(values)
        assert columns.reshape(-1, shape[-1])[b].tolist() == _plain_columns(matrix)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_a_matrix_update_is_g_over_the_root_of_v_hat_from_roots_per_row_and_column(dtype, rng):
    """min(r_i c_j, 1/ε₁) is 1/√max(v̂, ε₁²) to rounding; a factor of 0 (a row or a column of zero grads)
    gives the cap, as v̂'s floor does, and no warning (the tests turn warnings into errors)."""
    v_row, v_col = rng.random((2, 5, 1)).astype(dtype), rng.random((2, 1, 7)).astype(dtype)
    v_row[0, 1], v_col[1, 0, 3] = 0.0, 0.0
    eps1 = float(np.finfo(dtype).eps)
    r, c = adafactor.inverse_roots(np, v_row, v_col, eps1)
    got = np.minimum(r * c, adafactor.inverse_floor(eps1, float(np.finfo(dtype).max)))
    mean = np.maximum(v_row.astype(np.float64).mean(axis=-2, keepdims=True), eps1)
    want = 1.0 / np.sqrt(np.maximum(v_row.astype(np.float64) * v_col / mean, eps1 * eps1))
    np.testing.assert_allclose(got, want, rtol=4 * eps1)
    assert got.dtype == dtype and np.all(got[0, 1] == np.array(1.0 / eps1, dtype)) and got[1, 2, 3] == got[1, 0, 3]
    assert adafactor.inverse_floor(0.0, 1.0) == adafactor.inverse_floor(1e-40, float(np.finfo(np.float32).max)) == np.inf
    assert adafactor.inverse_floor(1e-3, 1e38) == 1000.0


def test_the_engine_runs_adafactor_off_the_lane_and_off_the_gpu():
    kernel = xopt.Adafactor.kernel
    assert kernel.norms and kernel.factored and kernels.RULES["adafactor"] not in kernels.CUDA_RULES
    from xopt.engines import fused_cpu

    assert fused_cpu.supports(xopt.Adafactor()) and fused_cpu.kind(xopt.Adafactor(), np.dtype(np.float32)) is None
    fused_cuda = pytest.importorskip("xopt.engines.fused_cuda")
    assert not fused_cuda.supports(xopt.Adafactor()) and fused_cuda.kind(xopt.Adafactor(), np.dtype(np.float32)) is None
    from xopt.engines import cuda_check

    with pytest.raises(ValueError, match="no CUDA kernel"):
        cuda_check.rule_of("Adafactor")
    assert kernels.RULES["adafactor"] not in cuda_check.CONFIGS


def _grads(rng, shapes, dtype):
    out = {k: rng.standard_normal(shape).astype(dtype) for k, shape in shapes.items()}
    for name in ("zero", "zero_b"):  # grads always 0: v̂ is clipped by ε₁², u is 0
        if name in out:
            out[name][...] = 0.0
    return out


def _run(config, impl, dtype, steps=6, shapes=SHAPES, grads=None, **extra):
    rng = np.random.default_rng(3)
    params = {k: rng.standard_normal(shape).astype(dtype) for k, shape in shapes.items()}
    opt = xopt.Adafactor(impl=impl, **{**CONFIGS[config], **extra})
    grads_rng = np.random.default_rng(4)
    with np.errstate(all="ignore"):
        for step in range(steps):
            g = _grads(grads_rng, shapes, dtype) if grads is None else grads[step]
            if step < 2:  # "late" joins at the third step: parts of two step counts
                g = {k: v for k, v in g.items() if k != "late"}
            opt.update({k: v for k, v in params.items() if k in g}, g)
    return params, opt


def _assert_same(a, b, what):
    (p_a, opt_a), (p_b, opt_b) = a, b
    for k in p_a:
        np.testing.assert_array_equal(p_b[k], p_a[k], err_msg=f"{what}: param {k}")
        assert p_b[k].dtype == p_a[k].dtype
        assert sorted(opt_b.state[k]) == sorted(opt_a.state[k]), f"{what}: {k}"
        for name in opt_a.state[k]:
            np.testing.assert_array_equal(opt_b.state[k][name], opt_a.state[k][name], err_msg=f"{what}: {name} of {k}")
    assert (opt_a.iter, opt_a.skipped_steps) == (opt_b.iter, opt_b.skipped_steps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", CONFIGS)
def test_fused_kernel_is_the_reference_bit_for_bit(config, dtype):
    """Six steps: β̂₂ = t^c crosses 1/2 (the two forms of lerp); matrices, stacks, a row or a column of one,
    rows of more than a chunk, columns of more than a block, vectors, 0-d, empty params, zero grads."""
    shapes = {**SHAPES, "late": (9, 2)}
    ref = _run(config, "reference", dtype, shapes=shapes)
    fused = _run(config, "fused", dtype, shapes=shapes)
    _assert_same(ref, fused, config)
    start = _run(config, "fused", dtype, steps=0, shapes=shapes)[0]
    for k in ("w", "b", "t", "wide"):
        assert not np.array_equal(fused[0][k], start[k]), k
    np.testing.assert_array_equal(fused[0]["e3"], start["e3"])


@pytest.mark.parametrize("skip", [False, True])
def test_nonfinite_grads_as_the_reference(skip):
    rng = np.random.default_rng(5)
    shapes = {"w": (40, 3), "b": (3,)}
    grads = [_grads(rng, shapes, np.float32) for _ in range(4)]
    grads[2]["w"][7, 1] = np.nan
    grads[3]["b"][1] = np.inf
    ref = _run("decay-d", "reference", np.float32, steps=4, shapes=shapes, grads=grads, skip_nonfinite=skip)
    fused = _run("decay-d", "fused", np.float32, steps=4, shapes=shapes, grads=grads, skip_nonfinite=skip)
    _assert_same(ref, fused, "skip" if skip else "propagate")
    assert fused[1].skipped_steps == (2 if skip else 0)
    assert np.all(np.isfinite(fused[0]["w"])) == skip


def test_several_threads_are_one_thread_bit_for_bit(monkeypatch):
    """A param of at least PARALLEL_MIN elements splits each pass into pieces over threads: the bits of one
    thread, and the reference's."""
    split = []
    threads = cpu_factored._threads
    monkeypatch.setattr(cpu_factored, "_threads", lambda n, pieces: split.append(threads(n, pieces)) or split[-1])
    shapes = {"w": (cpu_step.PARALLEL_MIN // 2048 + 7, 2048), "big": (cpu_step.PARALLEL_MIN + 3 * CHUNK + 11,),
              "b": (5,)}
    before = xopt.set_num_threads(1)
    try:
        one = _run("decay-d", "fused", np.float32, steps=3, shapes=shapes)
        xopt.set_num_threads(2)
        split.clear()
        two = _run("decay-d", "fused", np.float32, steps=3, shapes=shapes)
        clipped = _run("clip", "fused", np.float32, steps=2, shapes=shapes)
    finally:
        xopt.set_num_threads(before)
    assert split.count(2) == 3 * 3 + 2 * 3, "the two-thread steps did not split their passes over threads"
    _assert_same(one, two, "two threads")
    _assert_same(_run("decay-d", "reference", np.float32, steps=3, shapes=shapes), two, "reference")
    _assert_same(_run("clip", "reference", np.float32, steps=2, shapes=shapes), clipped, "clipped, two threads")


def test_float16_bfloat16_and_strided_params_step_through_copies(rng):
    start = {"w": rng.standard_normal((6, 5)).astype(np.float16), "b": rng.standard_normal(5).astype(np.float16),
             "view": rng.standard_normal((8, 6))}
    bfloat16 = pytest.importorskip("ml_dtypes").bfloat16
    start.update(wb=rng.standard_normal((7, 3)).astype(bfloat16), bb=rng.standard_normal(4).astype(bfloat16))
    grads = [{k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in start.items()} for _ in range(3)]
    runs = {}
    for impl in ("reference", "fused"):
        opt = xopt.Adafactor(lr=0.05, weight_decay=0.01, impl=impl)
        base = start["view"].copy()
        params = {**{k: v.copy() for k, v in start.items()}, "view": base[::2, ::2]}  # a strided view
        for g in grads:
            opt.update(params, {k: v[::2, ::2] if k == "view" else v for k, v in g.items()})
        runs[impl] = params, opt
        assert np.shares_memory(params["view"], base)
    _assert_same(runs["reference"], runs["fused"], "float16, bfloat16, strided")
    assert runs["fused"][0]["w"].dtype == np.float16 and runs["fused"][1].state["w"]["v_row"].dtype == np.float32
    assert runs["fused"][0]["wb"].dtype == bfloat16 and runs["fused"][1].state["wb"]["v_col"].dtype == np.float32


def test_the_kernel_runs_not_the_rule(monkeypatch):
    def refuse(*args):
        raise AssertionError("the reference rule ran")

    monkeypatch.setattr(xopt.Adafactor, "rule", refuse)
    params = {"w": np.ones((10, 4)), "b": np.ones(3, dtype=np.float32)}
    opt = xopt.Adafactor(weight_decay=0.01)
    for _ in range(3):
        opt.update(params, {"w": np.full((10, 4), 0.5), "b": np.full(3, 0.5, dtype=np.float32)})
    assert opt.state["w"]["step"] == 3 and not np.array_equal(params["w"], np.ones((10, 4)))


def test_fused_refuses_arrays_it_cannot_take_and_writes_nothing():
    torch = pytest.importorskip("torch")
    opt = xopt.Adafactor(impl="fused")
    params = {"a": np.ones((3, 2)), "t": torch.ones(3, dtype=torch.bfloat16)}
    with pytest.raises(TypeError, match="param 't'"):
        opt.update(params, {"a": np.ones((3, 2)), "t": torch.ones(3, dtype=torch.bfloat16)})
    assert opt.state == {} and np.array_equal(params["a"], np.ones((3, 2)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_cpu_tensors_step_as_numpy_arrays(dtype, monkeypatch):
    """CPU tensors (a leaf that requires grad too) go through the kernel, by NumPy views of their memory: the
    bits of the reference rule on NumPy arrays.  (The rule on the tensors themselves runs torch's elementwise
    ops, which may round a float32 result otherwise than NumPy's: within an ulp or two.)"""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    start = {"w": rng.standard_normal((20, 3)), "t": rng.standard_normal((2, 4, 5)), "b": rng.standard_normal(3)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in start.items()} for _ in range(5)]
    outs = {}
    rule = xopt.Adafactor.rule
    for make, impl in ((np.array, "reference"), (torch.tensor, "reference"), (torch.tensor, "fused")):
        ran = []
        monkeypatch.setattr(xopt.Adafactor, "rule", lambda *a: ran.append(1) or rule(*a))
        opt = xopt.Adafactor(lr=0.05, weight_decay=0.01, impl=impl)  # (a clip scale: from torch's sum of g²)
        params = {k: make(v.astype(dtype)) for k, v in start.items()}
        if make is torch.tensor:
            params["w"].requires_grad_(True)
        for g in grads:
            opt.update(params, {k: make(v.astype(dtype)) for k, v in g.items()})
        assert bool(ran) == (impl == "reference")
        outs[make.__name__, impl] = ({k: np.asarray(v.detach()) if make is torch.tensor else v
                                      for k, v in params.items()},
                                     {k: {n: np.asarray(b) for n, b in st.items() if n != "step"}
                                      for k, st in opt.state.items()})
    (ref_p, ref_s), (torch_p, _), (fused_p, fused_s) = outs.values()
    for k in start:
        np.testing.assert_array_equal(fused_p[k], ref_p[k], err_msg=k)
        np.testing.assert_allclose(fused_p[k], torch_p[k], rtol=1e-6 if dtype == "float32" else 1e-14, err_msg=k)
        for name in ref_s[k]:
            np.testing.assert_array_equal(fused_s[k][name], ref_s[k][name], err_msg=f"{name} of {k}")


def test_a_run_resumed_from_a_state_file_is_the_reference_run(tmp_path):
    rng = np.random.default_rng(7)
    start = {"w": rng.standard_normal((12, 5)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()} for _ in range(6)]
    kwargs = dict(lr=lambda count: 0.05 * 0.9**count, weight_decay=0.01, overrides={"b": {"weight_decay": 0.0}})
    straight, params = xopt.Adafactor(impl="reference", **kwargs), {k: v.copy() for k, v in start.items()}
    for g in grads:
        straight.update(params, g)
    first, resumed = xopt.Adafactor(impl="fused", **kwargs), {k: v.copy() for k, v in start.items()}
    for g in grads[:3]:
        first.update(resumed, g)
    first.save(tmp_path / "adafactor.npz")
    second = xopt.Adafactor(impl="fused", **kwargs)
    second.load(tmp_path / "adafactor.npz", resumed)
    for g in grads[3:]:
        second.update(resumed, g)
    _assert_same((params, straight), (resumed, second), "resumed")
