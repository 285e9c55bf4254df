"""_dispatch's engine lookup costs nothing per step: a library is looked for once, Dask is not imported for NumPy."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

import xopt
from xopt import _dispatch


def test_a_library_is_looked_for_once_per_process(monkeypatch):
    """find_spec costs some 40 us when the library is installed but not imported (or missing): not per step."""
    calls = []
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: calls.append(name) or find_spec(name, *a))
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(_dispatch, "_FOUND", {})
    opt, params = xopt.Adam(), {"w": np.ones(5, dtype=np.float16)}  # float16: the checked path, every step
    for _ in range(3):
        opt.update(params, {"w": np.ones(5, dtype=np.float16)})
    assert calls.count("cupy") == 1, calls


def test_a_numpy_step_does_not_import_dask():
    """Dask arrays exist only once dask.array is imported: a NumPy user with Dask installed does not pay its import."""
    code = ("import sys, numpy as np, xopt; xopt.Adam().update({'w': np.ones(3)}, {'w': np.ones(3)}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=".")
    assert out.stdout.strip() == "[]", out.stdout


def test_dask_arrays_still_find_their_engine():
    dask = pytest.importorskip("dask")
    da = pytest.importorskip("dask.array")

    params, want = {"w": da.from_array(np.arange(6.0), chunks=2)}, {"w": np.arange(6.0)}
    xopt.Adam().update(params, {"w": da.ones(6, chunks=2)})
    xopt.Adam().update(want, {"w": np.ones(6)})
    with dask.config.set(scheduler="sync"):
        np.testing.assert_array_equal(params["w"].compute(), want["w"])
    assert isinstance(params["w"], da.Array)
