"""The self-check of impl="auto" in a child process, its verdict kept on disk (xopt.engines.cuda_check.verdict).

The parent is the CPU build of the kernel behind xopt's dispatch (``cuda_on_cpu``, as in test_cuda_source.py);
the child runs a stand-in check from tests/self_check_cases.py through the same code that runs
``cuda_check.self_check`` on a GPU: one that aborts (a kernel's fault), one that mismatches, one that passes,
one that hangs, one that cannot run, one stopped from outside.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xopt
from xopt.engines import cuda_cache, cuda_check
from test_cuda_source import cuda_on_cpu  # noqa: F401  (a fixture)

pytestmark = pytest.mark.cuda_source
HERE = Path(__file__).resolve().parent


@pytest.fixture
def isolated(cuda_on_cpu, cuda_cache_dir, monkeypatch):  # noqa: F811
    """The self-check in a child process, which can import tests/self_check_cases.py; the children counted."""
    try:  # a verdict's key names the kernel's NVRTC and CuPy
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"CuPy cannot load NVRTC: {exc!r}")
    monkeypatch.setattr(cuda_check, "ISOLATED", True)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    children, real = [], cuda_check.in_child
    monkeypatch.setattr(cuda_check, "in_child", lambda *a, **k: (children.append(a), real(*a, **k))[1])
    return children


def _steps(impl, n=3):
    """``n`` Adam steps on float32 params, the same for every impl: (params, the optimizer)."""
    rng = np.random.default_rng(0)
    params, opt = {"w": rng.standard_normal(40).astype(np.float32)}, xopt.Adam(impl=impl)
    for _ in range(n):
        opt.update(params, {"w": rng.standard_normal(40).astype(np.float32)})
    return params, opt


def _verdicts(folder):
    return [json.loads(p.read_text()) for p in sorted(folder.glob("verdict-*.json"))]


def _second_process(check, cache):
    env = {**os.environ, cuda_cache.ENV: str(cache),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(HERE / "self_check_cases.py"), check], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("check, why", [("aborts", "the self-check process died with signal SIGABRT"),
                                        ("mismatches", "Adam() step 1, tensor (3, 5), param element 0")])
@pytest.mark.slow  # child processes: a few seconds each
def test_a_failing_child_leaves_this_process_on_the_reference_and_the_next_reads_the_verdict(
        check, why, isolated, cuda_on_cpu, cuda_cache_dir, monkeypatch):  # noqa: F811
    """The child aborts (what a kernel's fault does) or reports a mismatch: this process goes on, warns once, runs
    the reference rule bit for bit, launches nothing; the verdict is on disk, and a second process reads it
    there (no child), warns once and runs the reference too."""
    monkeypatch.setattr(cuda_check, "CHECK", f"self_check_cases:{check}")
    ref, _ = _steps("reference")
    with pytest.warns(cuda_check.SelfCheckWarning, match="FAILED: " + why.replace("(", r"\(").replace(")", r"\)")):
        ours, opt = _steps("auto")  # one warning in three steps: filterwarnings = error takes a second one
    np.testing.assert_array_equal(ours["w"], ref["w"])
    assert cuda_on_cpu.launches == 0 and len(isolated) == 1
    result = cuda_check.RESULTS[(0, 4, "float32")]
    assert not result.passed and why in result.mismatch and result.kept
    (kept,) = _verdicts(cuda_cache_dir)
    assert kept["passed"] is False and why in kept["mismatch"] and Path(result.kept).parent == cuda_cache_dir
    assert kept["case"]["gpu"] == "the kernel's CPU build (0)" and kept["case"]["rule"] == 4

    second = _second_process(f"self_check_cases:{check}", cuda_cache_dir)
    assert second["children"] == 0 and second["launches"] == 0 and second["same"], second
    (warning,) = second["warnings"]
    assert why in warning and "this verdict is kept in" in warning


@pytest.mark.slow  # child processes: a few seconds each
def test_a_passing_child_lets_the_kernel_run_and_is_asked_once(isolated, cuda_on_cpu, cuda_cache_dir,
                                                                monkeypatch):  # noqa: F811
    monkeypatch.setattr(cuda_check, "CHECK", "self_check_cases:passes")
    ref, _ = _steps("reference")
    ours, _ = _steps("auto")
    np.testing.assert_array_equal(ours["w"], ref["w"])
    assert cuda_on_cpu.launches == 3 and len(isolated) == 1
    assert [v["passed"] for v in _verdicts(cuda_cache_dir)] == [True]
    monkeypatch.setattr(cuda_check, "RESULTS", {})  # as in a new process: the verdict read from disk
    _steps("auto")
    assert cuda_on_cpu.launches == 6 and len(isolated) == 1


@pytest.mark.slow  # child processes: a few seconds each
def test_a_child_past_the_timeout_fails_the_check(isolated, cuda_on_cpu, cuda_cache_dir, monkeypatch):  # noqa: F811
    monkeypatch.setattr(cuda_check, "CHECK", "self_check_cases:hangs")
    monkeypatch.setattr(cuda_check, "TIMEOUT", 5.0)
    result = cuda_check.verdict(0, 4, "float32")
    assert not result.passed and result.mismatch == "the self-check process ran past 5 s and was stopped (not kept)"
    assert _verdicts(cuda_cache_dir) == []  # it may pass another time (a cold build, a busy machine)


@pytest.mark.slow  # child processes: a few seconds each
def test_a_child_that_cannot_run_the_check_keeps_no_verdict(isolated, cuda_on_cpu, cuda_cache_dir,
                                                            monkeypatch):  # noqa: F811
    """An error in the child (no GPU for it, say) fails the check in this process only: the next one asks again."""
    monkeypatch.setattr(cuda_check, "CHECK", "self_check_cases:raises")
    for _ in range(2):
        result = cuda_check.verdict(0, 4, "float32")
        assert not result.passed and result.kept is None
        assert result.mismatch.startswith("the self-check process could not run the check (exit code 1: ")
        assert "RuntimeError: no CUDA-capable device is detected" in result.mismatch
    assert len(isolated) == 2 and _verdicts(cuda_cache_dir) == []


def test_a_gpu_in_an_exclusive_compute_mode_fails_the_check_unrun_and_keeps_nothing(
        isolated, cuda_on_cpu, cuda_cache_dir, monkeypatch):  # noqa: F811
    """No child can use a GPU this process holds in exclusive mode: no child is started, the check fails with the
    reason and the way round it, nothing is kept; a verdict kept from an earlier run is still read."""
    monkeypatch.setattr(cuda_check, "CHECK", "self_check_cases:passes")
    monkeypatch.setattr(cuda_on_cpu, "exclusive", staticmethod(lambda device_id: True))
    result = cuda_check.verdict(0, 4, "float32")
    assert not result.passed and result.kept is None and "exclusive compute mode" in result.mismatch
    assert "impl='fused'" in result.mismatch and isolated == [] and _verdicts(cuda_cache_dir) == []
    monkeypatch.setattr(cuda_on_cpu, "exclusive", staticmethod(lambda device_id: False))
    assert cuda_check.verdict(0, 4, "float32").passed and len(isolated) == 1  # kept now
    monkeypatch.setattr(cuda_on_cpu, "exclusive", staticmethod(lambda device_id: True))
    assert cuda_check.verdict(0, 4, "float32").passed and len(isolated) == 1  # read from disk, no child


def test_a_child_stopped_from_outside_keeps_no_verdict(isolated, cuda_on_cpu, cuda_cache_dir,
                                                       monkeypatch):  # noqa: F811
    monkeypatch.setattr(cuda_check, "CHECK", "self_check_cases:terminated")
    result = cuda_check.verdict(0, 4, "float32")
    assert not result.passed and result.mismatch == "the self-check process was stopped by signal SIGTERM (not kept)"
    assert _verdicts(cuda_cache_dir) == []


def test_a_cuda_error_after_the_kernel_ran_fails_the_check(cuda_on_cpu, monkeypatch):  # noqa: F811
    """A kernel's fault shows in a later CUDA call (here a download): a failed check, not an error; an error
    before any launch (no GPU, no memory) is raised, as the check could not run."""
    def faulted(a):
        raise RuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered")
    monkeypatch.setattr(cuda_on_cpu, "download", staticmethod(faulted))
    result = cuda_check.self_check("Adam", np.float32)
    assert not result.passed and result.mismatch.startswith("Adam() step 1: after the kernel ran, RuntimeError(")
    monkeypatch.setattr(cuda_on_cpu, "upload", staticmethod(faulted))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        cuda_check.self_check("Adam", np.float32)


@pytest.mark.slow  # child processes: a few seconds each
def test_a_corrupt_verdict_file_is_asked_again(isolated, cuda_on_cpu, cuda_cache_dir, monkeypatch):  # noqa: F811
    monkeypatch.setattr(cuda_check, "CHECK", "self_check_cases:passes")
    assert cuda_check.verdict(0, 4, "float32").passed
    (path,) = cuda_cache_dir.glob("verdict-*.json")
    for broken in (path.read_bytes()[:20], b'{"passed": "yes"}'):  # truncated; not a verdict
        path.write_bytes(broken)
        assert cuda_check.verdict(0, 4, "float32").passed
        assert json.loads(path.read_text())["passed"] is True
    assert len(isolated) == 3


@pytest.mark.slow  # child processes: a few seconds each
def test_the_real_check_in_a_child_without_a_gpu(cuda_cache_dir, monkeypatch):
    """cuda_check.self_check itself in the child, on this machine: with no GPU the child cannot run it, which fails
    the check here and keeps nothing (the parent cannot name a GPU either)."""
    pytest.importorskip("cupy")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    result, keep = cuda_check.in_child(0, 4, "float32")
    assert not result.passed and not keep and "could not run the check (exit code 1: " in result.mismatch
    assert result.checked == "in a child process, by xopt.engines.cuda_check:self_check"


def test_only_the_kernels_own_failures_are_kept():
    """A mismatch or a fault of the kernel's launch is kept on disk; any other error after the kernel ran (out of
    memory beside the user's process, say) may pass another time, and fails the check for this process only."""
    def result(passed, why=None):
        return cuda_check.SelfCheck("k", 0, passed, "checked", why)

    assert cuda_check._kernels_own(result(True))
    assert cuda_check._kernels_own(result(False, "Adam() step 1, tensor (3, 5), param element 0: 1.0 != 2.0"))
    assert cuda_check._kernels_own(result(False, "Adam() step 1: after the kernel ran, CUDARuntimeError("
                                                 "'cudaErrorIllegalAddress: an illegal memory access')"))
    assert not cuda_check._kernels_own(result(False, "Adam() step 1: after the kernel ran, OutOfMemoryError("
                                                     "'Out of memory allocating 512 bytes')"))
    assert not cuda_check._kernels_own(result(False, "Adam(): the kernel raised RuntimeError('no NVRTC')"))


def test_cupy_device_reads_the_compute_mode(monkeypatch):
    """``CupyDevice.exclusive``: the runtime's computeMode, 0 (default) shared, any other (exclusive thread,
    prohibited, exclusive process) not."""
    pytest.importorskip("cupy")
    from cupy.cuda import runtime

    from xopt.engines.cuda_device import CupyDevice

    for mode, alone in ((0, False), (1, True), (2, True), (3, True)):
        monkeypatch.setattr(runtime, "getDeviceProperties", lambda device_id, mode=mode: {"computeMode": mode})
        assert CupyDevice.exclusive(0) is alone
