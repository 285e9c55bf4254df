"""xopt's own cache of a small CPU step's machine code (xopt.engines.cpu_objects): a warm process starts no numba."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# One SGD (momentum) step on float32 params in a fresh process: the params and buffer after it, whether numba
# was imported, and what the object cache loaded and built.
CHILD = r"""
import json, sys
import numpy as np, xopt
from xopt.engines import cpu_objects
p = {"w": np.linspace(-1, 1, 7, dtype=np.float32), "b": np.float32([0.5, -2.0])}
g = {k: np.cos(3 * v) for k, v in p.items()}
opt = xopt.SGD(lr=0.1, momentum=0.9)  # auto: the CPU engine (impl="fused" imports the CUDA one too, where CuPy is)
opt.update(p, g)
print(json.dumps({"p": {k: v.tolist() for k, v in p.items()}, "numba_imported": "numba" in sys.modules, **cpu_objects.COUNTS}))
"""


def _run(cache):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=cache, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def _reference():
    import xopt

    p = {"w": np.linspace(-1, 1, 7, dtype=np.float32), "b": np.float32([0.5, -2.0])}
    g = {k: np.cos(3 * v) for k, v in p.items()}
    xopt.SGD(lr=0.1, momentum=0.9, impl="reference").update(p, g)
    return {k: v.tolist() for k, v in p.items()}


def test_a_warm_process_loads_the_step_without_numba_and_a_damaged_object_is_built_again(tmp_path):
    expected = _reference()
    cold = _run(tmp_path)
    assert cold["built"] == 2 and cold["loaded"] == 0 and cold["numba_imported"]  # the step and SGD's rule, compiled
    warm = _run(tmp_path)
    assert warm["built"] == 0 and warm["loaded"] == 2 and not warm["numba_imported"]
    for got in (cold, warm):
        for k in expected:
            np.testing.assert_allclose(got["p"][k], expected[k], rtol=1e-6)
    step = next((tmp_path / "xopt-objects").glob("step-float32-*.o"))
    step.write_bytes(step.read_bytes()[:-100])  # cut short: its checksum no longer matches
    again = _run(tmp_path)
    assert again["built"] == 1 and again["loaded"] == 1
    for k in expected:
        np.testing.assert_allclose(again["p"][k], expected[k], rtol=1e-6)
    assert len(list((tmp_path / "xopt-objects").glob("*.o"))) == 2  # rewritten in place, no stray files


def test_a_function_that_needs_numba_at_run_time_runs_uncached():
    from numba import cfunc, types

    from xopt.engines import cpu_native, cpu_objects

    @cfunc(types.int64(types.int64))
    def allocates(n):  # an array of its own: numba's runtime allocates it
        return np.zeros(n).size + 1

    assert cpu_native.object_code(allocates) is None
    before = dict(cpu_objects.COUNTS)
    name = f"test-allocates-{os.getpid()}"
    address = cpu_objects.address(name, lambda: cpu_native.object_code(allocates) or allocates)
    assert address == allocates.address and not cpu_objects.cached(name)
    assert cpu_objects.COUNTS == {**before, "numba": before["numba"] + 1}
    import ctypes

    assert ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)(address)(5) == 6


def test_object_code_runs_without_numba_helpers():
    """A rule's object code, loaded by cpu_objects, computes the rule (a process without numba loads it: above)."""
    import ctypes

    from xopt.engines import cpu_native

    function = cpu_native.rule_function(0, np.float64)  # SGD
    symbol, code = cpu_native.object_code(function)
    assert symbol == function._wrapper_name
    from xopt.engines import cpu_objects

    address = cpu_objects._load(symbol, code)
    p, g = np.linspace(-1, 1, 9), np.linspace(2, 3, 9)
    q = p.copy()
    ptrs = np.array([[p.ctypes.data, g.ctypes.data, p.ctypes.data, p.ctypes.data, p.ctypes.data]], np.int64)
    s = np.array([0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])  # lr, weight_decay, momentum, ..., no buffer; clip 1
    ctypes.CFUNCTYPE(None, *[ctypes.c_int64] * 7)(address)(ptrs.ctypes.data, 0, 0, 9, s.ctypes.data, len(s), 0)
    np.testing.assert_array_equal(p, q - 0.1 * g)


def test_a_read_only_install_imports_numba_first(monkeypatch):
    """Objects in the private folder of a read-only install: usable() imports numba (which finds itself a place
    to cache) rather than skipping it; beside numba's cache, it skips it."""
    from xopt import _numba
    from xopt.engines import cpu_objects, cpu_step

    monkeypatch.setattr(cpu_step, "cached", lambda: True)
    monkeypatch.setitem(cpu_objects._STATE, "folder", "/nonexistent/xopt-objects")
    monkeypatch.setitem(cpu_objects._STATE, "private", True)
    assert not _numba._warm()
    monkeypatch.setitem(cpu_objects._STATE, "private", False)
    assert _numba._warm()
