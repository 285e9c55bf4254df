"""8-bit state (``state_dtype="8bit"``) of CuPy params without a GPU: the checked path's own dispatch, checks and
state on CuPy arrays made over host memory (run by the CUDA kernel's CPU build, as tests/test_cuda_8bit.py runs
it), state files, the refusals; and the reference path of a library other than NumPy (array-api-strict standing in
for CuPy), which CuPy params take where the kernel does not."""

from __future__ import annotations

import numpy as np
import pytest

from xopt.engines import blockwise, fused_cuda
from xopt.engines.blockwise import SUFFIX
from test_cuda_source import cuda_on_cpu  # noqa: F401  (a fixture)
from test_cuda_8bit import Q, _assert_same, _grads, _opt, _placed, _random, _run
from test_state_8bit import same_bits

pytestmark = pytest.mark.cuda_source


# -- CuPy params: the checked path's own dispatch, CuPy's arrays over host memory (no GPU: no CuPy kernel runs) -------
@pytest.fixture
def cupy8(cuda_on_cpu, monkeypatch):  # noqa: F811
    """CuPy arrays (over host memory) to the CUDA engine, float and 8-bit, as on a GPU; NumPy arrays to the
    reference.  Copies between NumPy and such CuPy arrays (a state file's) through host memory."""
    cupy = pytest.importorskip("cupy")
    from test_cuda_compose import _cupy_host, _host

    monkeypatch.setattr(fused_cuda, "accepts", lambda opt, e: fused_cuda._is_cupy(e.p) and fused_cuda._is_cupy(e.g)
                        and not e.rebind and fused_cuda.kind(opt, e.p.dtype) is not None)
    from xopt import _backend

    to_numpy, from_numpy = _backend.to_numpy, _backend.from_numpy
    monkeypatch.setattr(_backend, "to_numpy", lambda x: _host(x) if type(x) is cupy.ndarray else to_numpy(x))
    monkeypatch.setattr(_backend, "from_numpy", lambda a, like: _cupy_host(np.asarray(a)) if type(like) is cupy.ndarray
                        else from_numpy(a, like))
    cuda_on_cpu.cupy, cuda_on_cpu.on_gpu, cuda_on_cpu.host = cupy, _cupy_host, _host
    return cuda_on_cpu


def _cupy_twin(cupy8, config, params, first_grads, **extra):
    """An optimizer on CuPy arrays (over host memory) as the reference stands after its first step: params and
    state copied from it (a first step on the GPU would make its state with CuPy kernels)."""
    seed = _opt(config, "reference", **extra)
    ps = {k: _placed(v) for k, v in params.items()}
    with np.errstate(all="ignore"):
        seed.update(ps, first_grads)
    ours = _opt(config, "fused", **extra)
    ours.state = {k: {n: (v if n == "step" else cupy8.on_gpu(v)) for n, v in st.items()}
                  for k, st in seed.state.items()}
    ours.iter = 1
    return seed, ps, ours, {k: cupy8.on_gpu(v) for k, v in ps.items()}


def _assert_same_cupy(cupy8, ref, ours, a, b, what):
    for k in a:
        assert type(b[k]) is cupy8.cupy.ndarray and same_bits(cupy8.host(b[k]), a[k]), f"{what}: param {k}"
        for name, buf in ref.state[k].items():
            if name != "step":
                mine = ours.state[k][name]
                assert type(mine) is cupy8.cupy.ndarray, f"{what}: {name} of {k} left the GPU"
                assert same_bits(cupy8.host(mine), buf), f"{what}: {name} of {k}"


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", ["Adam-amsgrad-wd", "AdamW", "Lion", "RMSprop-momentum-wd", "AdaGrad", "SGD",
                                    "Nesterov"])
def test_cupy_params_step_through_the_checked_path(config, dtype, cupy8, rng):
    """CuPy params with state_dtype="8bit": buffer_dtype uint8, the state's checks, the dispatch to the CUDA 8-bit
    kernel (one launch a step for the 8-bit params) and the float kernel for those below min_8bit_size (one
    launch); params, codes and absmax stay CuPy arrays and equal the reference's on NumPy copies."""
    params = _random(rng, [5000, Q + 7, 100], dtype)
    grads_seq = _grads(rng, params, 4)
    ref, a, ours, b = _cupy_twin(cupy8, config, params, grads_seq[0], min_8bit_size=1000)
    with np.errstate(all="ignore"):
        for g in grads_seq[1:]:
            ref.update(a, g)
            ours.update(b, {k: cupy8.on_gpu(v) for k, v in g.items()})
    assert [launch[3] for launch in cupy8.launches8] == [[5000, Q + 7]] * 3 and cupy8.launches == 3
    assert ours.state["w0"]["m" if "m" in ours.state["w0"] else next(iter(ours.buffers()))].dtype == np.uint8
    _assert_same_cupy(cupy8, ref, ours, a, b, config)


def test_cupy_8bit_state_saved_and_loaded(cupy8, tmp_path, rng):
    """save() writes a CuPy param's 8-bit state from host copies; load() reads it as NumPy, and the first step moves
    it to the param's GPU and steps on from it, as the reference steps on from its own file."""
    params = _random(rng, [5000, 300], np.float32)
    grads_seq = _grads(rng, params, 4)
    ref, a, ours, b = _cupy_twin(cupy8, "Adam", params, grads_seq[0], min_8bit_size=1000)
    ref.update(a, grads_seq[1])
    ours.update(b, {k: cupy8.on_gpu(v) for k, v in grads_seq[1].items()})
    ours.save(tmp_path / "gpu.npz")
    ref.save(tmp_path / "ref.npz")
    saved = np.load(tmp_path / "gpu.npz", allow_pickle=False)
    again = np.load(tmp_path / "ref.npz", allow_pickle=False)
    assert sorted(saved.files) == sorted(again.files)
    for name in saved.files:
        if name != "meta":
            np.testing.assert_array_equal(saved[name], again[name], err_msg=name)
    loaded = _opt("Adam", "fused", min_8bit_size=1000)
    loaded.load(tmp_path / "gpu.npz")
    assert type(loaded.state["w0"]["m"]) is np.ndarray and loaded.state["w0"]["m"].dtype == np.uint8
    for g in grads_seq[2:]:
        ref.update(a, g)
        loaded.update(b, {k: cupy8.on_gpu(v) for k, v in g.items()})
    _assert_same_cupy(cupy8, ref, loaded, a, b, "loaded")
    assert len(cupy8.launches8) == 1 + 2


def test_a_gpu_state_steps_numpy_params(cupy8, rng):
    """A CuPy param's 8-bit state (a state_dict taken on the GPU) given to NumPy params: the step moves it to NumPy
    and steps on as the reference does."""
    params = _random(rng, [5000, 2100], np.float32)
    grads_seq = _grads(rng, params, 3)
    ref, a, ours, b = _cupy_twin(cupy8, "RMSprop-momentum-wd", params, grads_seq[0])
    assert all(type(buf) is cupy8.cupy.ndarray for st in ours.state.values() for n, buf in st.items() if n != "step")
    c = {k: v.copy() for k, v in a.items()}
    for g in grads_seq[1:]:
        ref.update(a, g)
        ours.update(c, g)
    assert all(type(buf) is np.ndarray for st in ours.state.values() for n, buf in st.items() if n != "step")
    _assert_same(ref, ours, a, c, "GPU state on NumPy params")


def test_cupy_params_refused_where_no_kernel_takes_them(cupy8, rng):
    """impl="fused", a block_size the kernel declines: refused before anything is written, naming why; a wrong
    absmax on a CuPy param is refused as on NumPy."""
    params = _random(rng, [5000], np.float32)
    ref, a, ours, b = _cupy_twin(cupy8, "Adam", params, _grads(rng, params, 1)[0], block_size=4096)
    before = cupy8.host(b["w0"])
    with pytest.raises(TypeError, match="8-bit state of Adam.*'w0', a cupy array.*block_size 32 to 2048, not 4096"):
        ours.update(b, {"w0": cupy8.on_gpu(rng.standard_normal(5000).astype(np.float32))})
    np.testing.assert_array_equal(cupy8.host(b["w0"]), before)
    half = _random(rng, [5000], np.float16)
    ref, a, ours, b = _cupy_twin(cupy8, "Adam", half, _grads(rng, half, 1)[0])
    with pytest.raises(TypeError, match="'w0', a cupy array.*its grad is float32: the CUDA kernel takes a 16-bit"):
        ours.update(b, {"w0": cupy8.on_gpu(rng.standard_normal(5000).astype(np.float32))})
    ref, a, ours, b = _cupy_twin(cupy8, "Adam", params, _grads(rng, params, 1)[0])
    ours.state["w0"]["v" + SUFFIX] = ours.state["w0"]["v" + SUFFIX][:-1]
    with pytest.raises(ValueError, match="'w0': its 8-bit state 'v' needs 'v_absmax', float32 of shape"):
        ours.update(b, {"w0": cupy8.on_gpu(rng.standard_normal(5000).astype(np.float32))})
    assert cupy8.launches8 == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config, block", [("Adam-amsgrad-wd", 256), ("RMSprop-momentum-wd", 4096), ("Lion", 100)])
def test_the_reference_path_of_a_library_other_than_numpy(config, block, dtype, monkeypatch, rng):
    """What CuPy params run where the kernel does not (impl="reference"; impl="auto" before its self-check; a
    block_size it declines), on array-api-strict arrays standing in for CuPy's: the state made in the param's
    library (xp.full), checked there, the array-API reference rule over it; bit for bit the NumPy run."""
    xps = pytest.importorskip("array_api_strict")
    monkeypatch.setattr(blockwise, "LIBRARIES", (*blockwise.LIBRARIES, "array_api_strict"))
    params = _random(rng, [5000, 2100, 50], dtype)
    grads_seq = _grads(rng, params, 3)
    ref, a = _run(config, "reference", params, grads_seq, block_size=block, min_8bit_size=1000)
    ours = _opt(config, "reference", block_size=block, min_8bit_size=1000)
    b = {k: xps.asarray(v) for k, v in params.items()}
    with np.errstate(all="ignore"):
        for g in grads_seq:
            ours.update(b, {k: xps.asarray(v) for k, v in g.items()})
    assert type(ours.state["w0"][ours.buffers()[0]]).__module__.startswith("array_api_strict")
    for k in a:
        assert same_bits(np.asarray(b[k]), a[k]), k
        for name, buf in ref.state[k].items():
            if name != "step":
                assert same_bits(np.asarray(ours.state[k][name]), buf), (k, name)
    assert ref.state["w0"][ref.buffers()[0]].dtype == np.uint8 and ref.state["w2"][ref.buffers()[0]].dtype == dtype
