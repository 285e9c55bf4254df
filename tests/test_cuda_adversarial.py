"""The CUDA engine at its edges: its kernel's CPU build behind xopt's own dispatch, and CuPy arrays over host memory
(only the CUDA calls stubbed), against the reference rule."""

from __future__ import annotations

import numpy as np
import pytest

import xopt
from xopt.engines import fused_cuda
from test_cuda_source import HostDevice, cuda_on_cpu  # noqa: F401  (a fixture)
from test_cuda_compose import _cupy_host, _cupy_twin, _host
from test_cuda_8bit_host import cupy8  # noqa: F401  (a fixture)

pytestmark = pytest.mark.cuda_source


@pytest.fixture
def cupy_lane(cuda_on_cpu, monkeypatch):  # noqa: F811
    """CuPy arrays (over host memory) to the CUDA engine's checked path and lane, as on a GPU."""
    pytest.importorskip("cupy")
    monkeypatch.setattr(fused_cuda, "accepts", lambda opt, e: fused_cuda._is_cupy(e.p) and fused_cuda._is_cupy(e.g)
                        and not e.rebind and fused_cuda.kind(opt, e.p.dtype) is not None)
    return cuda_on_cpu


def _snapshot(opt, params):
    return ({k: _host(v) for k, v in params.items()},
            {k: {n: (v if n == "step" else _host(v)) for n, v in st.items()} for k, st in opt.state.items()},
            opt.iter)


def _assert_unchanged(before, after):
    (p0, s0, i0), (p1, s1, i1) = before, after
    assert i0 == i1
    for k in p0:
        np.testing.assert_array_equal(p1[k], p0[k])
        assert s0[k].keys() == s1[k].keys()
        for n in s0[k]:
            np.testing.assert_array_equal(s1[k][n], s0[k][n])


def test_float_state_on_another_gpu_than_its_param_is_named(cupy_lane, lane, rng):
    """A state buffer on another GPU than its param (a state kept from a run on another GPU, a param moved since):
    the lane declined it, and the checked path, whose checks compare a grad's GPU with its param's but not the
    state's, built the launch's table and raised "xopt internal error: the CUDA table refused arrays the checks
    passed".  Now the checked path names the param, the buffer and both GPUs, before any write."""
    params = {"w": rng.standard_normal(40), "v": rng.standard_normal(7)}
    ours, b = _cupy_twin("Adam", params, {k: rng.standard_normal(v.shape) for k, v in params.items()})
    ours.state["w"]["m"] = _cupy_host(_host(ours.state["w"]["m"]), device=1)
    before = _snapshot(ours, b)
    g = {k: _cupy_host(rng.standard_normal(v.shape)) for k, v in params.items()}
    lane.clear()
    with pytest.raises(ValueError, match=r"state buffer 'm' of param 'w' is on GPU 1 but the param is on GPU 0"):
        ours.update(b, g)
    assert lane == [False] and (cupy_lane.launches, len(cupy_lane.uploads)) == (0, 0)
    _assert_unchanged(before, _snapshot(ours, b))


@pytest.mark.parametrize("buffer", ["m", "m_absmax"])
def test_8bit_state_on_another_gpu_than_its_param_is_refused(buffer, cupy8, rng):  # noqa: F811
    """8-bit state (codes or absmax) on another GPU than its param: the checked path launched xopt_step8 on the
    param's GPU with the other GPU's addresses in its table (on a GPU: an illegal address, which ends the
    process's CUDA context, or another allocation's bytes).  Now it raises, naming the buffer, before any write or
    launch."""
    from test_cuda_8bit import _grads, _random
    from test_cuda_8bit_host import _cupy_twin as twin8

    params = _random(rng, [5000, 100], np.float32)
    gs = _grads(rng, params, 2)
    _, _, ours, b = twin8(cupy8, "Adam", params, gs[0], min_8bit_size=1000)
    ours.state["w0"][buffer] = cupy8.on_gpu(cupy8.host(ours.state["w0"][buffer]), device=1)
    before = _snapshot(ours, b)
    with pytest.raises(ValueError, match=f"state buffer '{buffer}' of param 'w0' is on GPU 1"):
        ours.update(b, {k: cupy8.on_gpu(v) for k, v in gs[1].items()})
    assert not cupy8.launches8 and not cupy8.launches
    _assert_unchanged(before, _snapshot(ours, b))


def test_a_kept_verdict_stands_for_the_checked_paths_table(cuda_on_cpu, monkeypatch):  # noqa: F811
    """A self-check verdict kept on disk is keyed by a hash of xopt's host side of the launch, but that hash left out
    ``cuda_reader.py``, which builds the table of every check's first step (the checked path's) and of the lane's
    steps where numba cannot run: a changed table builder would have read a verdict kept for the old one."""
    pytest.importorskip("cupy")
    from pathlib import Path

    from xopt.engines import cuda_check

    try:
        before = cuda_check._case(0, 4, "float32")
    except Exception:  # noqa: BLE001
        before = None
    if before is None:
        pytest.skip("CuPy cannot say NVRTC's version here")
    read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read(self) + (b"\n# changed" if self.name == "cuda_reader.py"
                                                                         else b""))
    assert cuda_check._case(0, 4, "float32")["host"] != before["host"]


def test_a_relative_cache_folder_is_the_one_first_named(tmp_path, monkeypatch):
    """A relative ``XOPT_CUDA_CACHE_DIR`` was chosen once per process but resolved at every read and write: after the
    process changed its working directory, kernels and verdicts were written nowhere (``write`` answered False) or
    into another folder of the same name, and those kept were not found.  The folder is now made absolute when
    chosen."""
    from xopt.engines import cuda_cache

    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(cuda_cache.ENV, "kernels")
    cuda_cache.directory.cache_clear()
    try:
        assert cuda_cache.directory() == tmp_path / "kernels"
        assert cuda_cache.write_json("verdict-x.json", {"passed": True})
        monkeypatch.chdir(tmp_path / "run")
        assert cuda_cache.read_json("verdict-x.json") == {"passed": True}
        assert cuda_cache.write_json("verdict-y.json", {"passed": False})
        assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == ["verdict-x.json", "verdict-y.json"]
        assert not (tmp_path / "run" / "kernels").exists()
    finally:
        cuda_cache.directory.cache_clear()


def test_first_gpu_keeps_a_relative_out_folder_whole(tmp_path, monkeypatch):
    """tools/first_gpu.py runs each part in the repository's root, but handed it the --out folder as given: run from
    another folder with a relative --out (``gpu_run.sh``'s default is ``out``), the runner wrote the end lines and the
    log there and each part its own lines (and the GPU tests' files) into a folder of that name in the repository."""
    import importlib.util
    import json
    import shutil
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "first_gpu.py"
    spec = importlib.util.spec_from_file_location("first_gpu", script)
    fg = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "first_gpu", fg)  # its dataclass looks its module up
    spec.loader.exec_module(fg)
    name = f"first-gpu-relative-{tmp_path.name}"
    monkeypatch.chdir(tmp_path)
    part = fg.Part("quick", (sys.executable, "-c", f"import sys; sys.path.insert(0, {str(script.parent)!r}); "
                             "import first_gpu; first_gpu.emit(value=1)"), 30.0)
    try:
        fg.run_parts([part], name, budget_s=60, echo=lambda *a: None)
        lines = [json.loads(x) for x in (tmp_path / name / "first-gpu.jsonl").read_text().splitlines()]
        assert [x["part"] for x in lines] == ["quick", "quick", "summary"] and lines[0]["value"] == 1
        assert not (fg.ROOT / name).exists()
    finally:
        shutil.rmtree(fg.ROOT / name, ignore_errors=True)


_DIES_AT_EXIT = '''
import atexit, os, signal

def passes_then_dies(rule, dtype, device):
    """A pass, then a crash as the process exits (a library's teardown), after the verdict is printed."""
    from xopt.engines import cuda_check, fused_cuda

    atexit.register(os.kill, os.getpid(), signal.SIGSEGV)
    return cuda_check.SelfCheck(fused_cuda.kernel_name(rule, dtype), device, True, "a stand-in check")
'''


def test_a_self_check_that_passed_stands_when_its_process_crashes_at_exit(tmp_path, monkeypatch):
    """The self-check's child printed its verdict, a pass, and then crashed at its exit (a segfault in a library's
    teardown): the verdict was thrown away for "the self-check process died with signal SIGSEGV", a failure kept on
    disk, so impl="auto" kept the reference rule on that GPU for good.  Every step of the check ends in a download
    that a fault of the kernel would fail, so a signal after the verdict is not the kernel's: the verdict stands."""
    import os

    from xopt.engines import cuda_check

    (tmp_path / "dies_at_exit.py").write_text(_DIES_AT_EXIT)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    result, keep = cuda_check.in_child(0, 4, "float32", check="dies_at_exit:passes_then_dies", timeout=120)
    assert result.passed and result.mismatch is None and keep, result


def test_tensors_on_another_gpu_than_the_current_one_step(cuda_on_cpu, lane, monkeypatch, rng):  # noqa: F811
    """torch CUDA tensors on another GPU than the current one (``model.to("cuda:1")`` without
    ``torch.cuda.set_device(1)``): the lane entered torch's stream of the tensors' GPU while the current GPU was
    another, and CuPy's stream raises there ("The device that the stream is created on (1) does not match with the
    current device (0)"): the step raised instead of running.  The lane now makes the tensors' GPU current first.
    (torch CPU tensors stand for CUDA ones; the stream stands for CuPy's, with its check.)"""
    import contextlib

    torch = pytest.importorskip("torch")
    from xopt import _lane
    from test_cuda_source import tensor_numpy

    monkeypatch.setattr(_lane, "_tensor_dtype", lambda t: None)  # the CPU engine does not take them: "CUDA" tensors

    @contextlib.contextmanager
    def stream_of_gpu_1():
        current = HostDevice.current_device()
        if current != 1:  # CuPy's Stream.__enter__ (check_stream_device_match)
            raise RuntimeError(f"The device that the stream is created on (1) does not match with the current device "
                               f"({current})")
        yield

    monkeypatch.setattr(HostDevice, "tensor_device", staticmethod(lambda t: 1))
    monkeypatch.setattr(HostDevice, "tensor_devices", staticmethod(lambda ts: {1}))
    monkeypatch.setattr(HostDevice, "device_of", staticmethod(lambda a: 1))  # every array on "GPU 1"
    monkeypatch.setattr(HostDevice, "tensor_stream", staticmethod(lambda t: stream_of_gpu_1()))
    b = {f"w{i}": torch.nn.Parameter(torch.tensor(rng.standard_normal(n), dtype=torch.float32))
         for i, n in enumerate([5, 300])}
    grads = [{k: torch.tensor(rng.standard_normal(v.shape), dtype=torch.float32) for k, v in b.items()}
             for _ in range(3)]
    ours, ref = xopt.Adam(), xopt.Adam(impl="reference")
    ours.update(b, grads[0])  # the self-check (here, in this process), then the checked path: torch's ops
    a = {k: tensor_numpy(v.detach()).copy() for k, v in b.items()}
    ref.state = {k: {n: (tensor_numpy(v).copy() if isinstance(v, torch.Tensor) else v) for n, v in st.items()}
                 for k, st in ours.state.items()}
    ref.iter = ours.iter
    launches = cuda_on_cpu.launches  # the self-check's, so far
    for g in grads[1:]:
        ref.update(a, {k: tensor_numpy(v) for k, v in g.items()})
        ours.update(b, g)
        assert lane[-1] is True
    assert HostDevice.current_device() == 0 and cuda_on_cpu.launches == launches + 2
    for k in a:
        np.testing.assert_array_equal(tensor_numpy(b[k].detach()), a[k], err_msg=k)
