"""The fused CPU path against the array-API reference: params and every buffer, several steps, all floats."""

import subprocess
import sys

import numpy as np
import pytest

import xopt
from test_edges import CONFIGS, make

fused_cpu = pytest.importorskip("xopt.engines.fused_cpu", reason="numba is not installed")

DTYPES = [np.float16, np.float32, np.float64]
SHAPES = [(), (0,), (1, 0, 2), (7,), (3, 5), (2 * fused_cpu.CHUNK + 3,)]  # the last spans three chunks
TOL = {np.float16: dict(rtol=2e-3, atol=1e-3), np.float32: dict(rtol=1e-6, atol=1e-7),
       np.float64: dict(rtol=1e-14, atol=1e-15)}


def _pair(config):
    return make(config, impl="reference"), make(config, impl="fused")


def _assert_parity(ref, fused, p_ref, p_fused, dtype, what):
    for k in p_ref:
        assert p_fused[k].dtype == p_ref[k].dtype
        np.testing.assert_allclose(p_fused[k], p_ref[k], **TOL[dtype], err_msg=f"{what}: param {k}")
        assert ref.state[k]["step"] == fused.state[k]["step"]
        for name in ref.buffers():
            np.testing.assert_allclose(fused.state[k][name], ref.state[k][name], **TOL[dtype],
                                       err_msg=f"{what}: state {name} of {k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS)
def test_fused_matches_reference(config, shape, dtype, rng):
    ref, fused = _pair(config)
    p0 = rng.standard_normal(shape).astype(dtype)
    p_ref, p_fused = {"p": p0.copy()}, {"p": p0.copy()}
    for step in range(4):
        g = (rng.standard_normal(shape) + 0.1).astype(dtype)
        ref.update(p_ref, {"p": g})
        fused.update(p_fused, {"p": g.copy()})
        _assert_parity(ref, fused, p_ref, p_fused, dtype, f"{config} step {step + 1}")


@pytest.mark.parametrize("config", CONFIGS)
def test_fused_matches_reference_on_many_tensors_of_mixed_dtypes_and_steps(config, rng):
    """One call over many tensors: every one right, whatever its size, dtype or step count."""
    sizes = rng.integers(0, 3 * fused_cpu.CHUNK, 40)
    dtypes = [DTYPES[i % 3] for i in range(len(sizes))]
    p0 = {f"t{i}": rng.standard_normal(n).astype(d) for i, (n, d) in enumerate(zip(sizes, dtypes))}
    ref, fused = _pair(config)
    p_ref, p_fused = ({k: v.copy() for k, v in p0.items()} for _ in range(2))
    for step in range(5):
        grads = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in p0.items()}
        if step == 2:  # some tensors skip a step: their step counts part ways
            grads.update({k: None for k in list(grads)[::3]})
        ref.update(p_ref, grads)
        fused.update(p_fused, {k: None if g is None else g.copy() for k, g in grads.items()})
    for k in p0:
        dtype = p0[k].dtype.type
        np.testing.assert_allclose(p_fused[k], p_ref[k], **TOL[dtype], err_msg=f"{config}: {k}")
        for name in ref.buffers():
            np.testing.assert_allclose(fused.state[k][name], ref.state[k][name], **TOL[dtype])


@pytest.mark.parametrize("config", CONFIGS)
def test_every_step_takes_the_lane_and_stays_right(config, rng, lane):
    """Every step takes the exact-type lane (the first makes the state); it must give what the checked path gives."""
    p0 = {f"t{i}": rng.standard_normal(int(n)).astype(np.float32) for i, n in enumerate(rng.integers(1, 5000, 30))}
    ref, fused = _pair(config)
    p_ref, p_fused = ({k: v.copy() for k, v in p0.items()} for _ in range(2))
    for step in range(6):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p0.items()}
        ref.update(p_ref, grads)
        fused.update(p_fused, grads)
        if step == 3:
            ref.lr = fused.lr = 0.5 * ref.lr  # a schedule: the lane reads hyperparameters each step
    assert lane[1::2] == [True] * 6 and not any(lane[0::2]), "the fused twin's steps: the lane; the reference's: never"
    _assert_parity(ref, fused, p_ref, p_fused, np.float32, config)
    assert fused.iter == ref.iter == 6


def test_the_lane_declines_what_it_cannot_take(rng, lane):
    """A changed layout, a new array or a read-only param goes back through the checks (which explain)."""
    opt = xopt.Adam()
    params = {"a": rng.standard_normal(8).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    grads = {k: np.ones_like(v) for k, v in params.items()}
    opt.update(params, grads)
    opt.update(params, grads)
    assert lane == [True, True]
    with pytest.raises(ValueError, match="'b'"):
        opt.update(params, {"a": grads["a"], "b": np.ones(4, dtype=np.float32)})
    with pytest.raises(TypeError, match="'b'"):
        opt.update(params, {"a": grads["a"], "b": np.ones(3, dtype=np.int32)})
    params["b"].flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        opt.update(params, grads)
    params["b"].flags.writeable = True
    strided = np.ones(16, dtype=np.float32)[::2]
    before = params["a"].copy()
    opt.update(params, {"a": strided, "b": grads["b"]})  # a non-contiguous grad: the checked path copes
    assert not np.array_equal(params["a"], before)
    assert opt.state["a"]["step"] == opt.state["b"]["step"] == 3


def test_non_contiguous_params_and_grads(rng):
    base_ref = rng.standard_normal((6, 10)).astype(np.float32)
    base_fused = base_ref.copy()
    ref, fused = _pair("Adam-amsgrad-wd")
    for _ in range(3):
        g = rng.standard_normal((6, 20)).astype(np.float32)[::2, ::4]
        ref.update({"p": base_ref[::2, 1::2]}, {"p": g})
        fused.update({"p": base_fused[::2, 1::2]}, {"p": g})
    np.testing.assert_allclose(base_fused, base_ref, **TOL[np.float32])


def test_impl_fused_refuses_arrays_it_cannot_take_before_writing(rng):
    torch = pytest.importorskip("torch")
    opt = xopt.Adam(impl="fused")
    a = rng.standard_normal(4)
    kept = a.copy()
    params = {"a": a, "t": torch.ones(3, dtype=torch.float64)}
    with pytest.raises(TypeError, match="param 't', a torch array"):
        opt.update(params, {"a": np.ones(4), "t": torch.ones(3, dtype=torch.float64)})
    np.testing.assert_array_equal(a, kept)
    assert opt.iter == 0 and not opt.state


def test_impl_fused_without_numba_raises_in_the_constructor(monkeypatch, lane):
    from xopt import _dispatch

    monkeypatch.setattr(_dispatch, "_fused_cpu", lambda: None)
    monkeypatch.setattr(_dispatch, "_fused_cuda", lambda: None)
    with pytest.raises(ValueError, match="numba"):
        xopt.Adam(impl="fused")
    opt = xopt.Adam()  # auto falls back to the reference rule
    params = {"a": np.ones(3)}
    opt.update(params, {"a": np.ones(3)})
    opt.update(params, {"a": np.ones(3)})
    assert not any(lane) and params["a"][0] < 1.0


def test_auto_uses_the_reference_for_other_libraries(rng, lane):
    xps = pytest.importorskip("array_api_strict")
    opt = xopt.Adam()
    params = {"a": xps.asarray(rng.standard_normal(3))}
    opt.update(params, {"a": xps.asarray(np.ones(3))})
    opt.update(params, {"a": xps.asarray(np.ones(3))})
    assert lane == [False, False]


def test_chunk_table_covers_every_element_once():
    sizes = [0, 1, fused_cpu.CHUNK, fused_cpu.CHUNK + 1, 5]
    table = fused_cpu.chunk_table(sizes)
    covered = np.zeros(sum(sizes), dtype=int)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for t, lo, hi in table:
        assert 0 <= lo < hi <= sizes[t] and hi - lo <= fused_cpu.CHUNK
        covered[offsets[t] + lo: offsets[t] + hi] += 1
    assert np.all(covered == 1)


def test_compiled_kernels_are_cached_on_disk():
    """A second process loads the kernels from the disk cache instead of compiling them."""
    code = ("import xopt.engines.fused_cpu as f; from xopt.engines import cpu_objects; f.compile_all(); "
            "print(cpu_objects.COUNTS['loaded'], cpu_objects.COUNTS['built'], cpu_objects.COUNTS['numba'])")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)  # fills the cache
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    loaded, built, numba = map(int, out)
    # every rule's function and the step in both dtypes from xopt's cache, but LAMB's two (they allocate: numba's)
    assert loaded >= 22 and built == 0 and numba == 4, f"{loaded} loaded from the cache, {built} compiled, {numba} numba's"
