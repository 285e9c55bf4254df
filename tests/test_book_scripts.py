"""The book's ch06/optimizer_compare_naive.py, verbatim (tests/book/), with xopt as its ``common.optimizer``.

Its params are Python floats: xopt rebinds them, as the seed's ``params[key] -= ...`` does, so the
history the script appends holds 30 different points per optimizer, the seed's points.
"""

import pathlib
import runpy
import sys
import types

import numpy as np
import pytest

import xopt
from xopt.bench import seed

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SCRIPT = pathlib.Path(__file__).parent / "book" / "optimizer_compare_naive.py"
_PLOT = plt.plot


def _run_book_script(module, monkeypatch):
    """Run the script with ``from common.optimizer import *`` giving ``module``; the (x, y) histories it plots."""
    common = types.ModuleType("common")
    common.optimizer = module
    monkeypatch.setitem(sys.modules, "common", common)
    monkeypatch.setitem(sys.modules, "common.optimizer", module)
    drawn = []

    def plot(*args, **kwargs):
        if len(args) >= 3 and args[2] == "o-":
            drawn.append((list(args[0]), list(args[1])))
        return _PLOT(*args, **kwargs)

    monkeypatch.setattr(plt, "plot", plot)
    monkeypatch.setattr(plt, "show", lambda: None)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    plt.close("all")
    return drawn


def test_the_books_naive_comparison_runs_unchanged_and_draws_the_seeds_paths(monkeypatch):
    ours = _run_book_script(xopt, monkeypatch)
    theirs = _run_book_script(seed, monkeypatch)
    assert len(ours) == len(theirs) == 4  # SGD, Momentum, AdaGrad, Adam
    for name, (xs, ys), (x_ref, y_ref) in zip(["SGD", "Momentum", "AdaGrad", "Adam"], ours, theirs):
        assert len(xs) == 30 and len({(x, y) for x, y in zip(xs, ys)}) == 30, f"{name}: 30 distinct points"
        assert all(type(v) is float for v in xs + ys), f"{name}: params stay Python floats"
        np.testing.assert_allclose(xs, x_ref, rtol=1e-12, atol=1e-15, err_msg=f"{name} x")
        np.testing.assert_allclose(ys, y_ref, rtol=1e-12, atol=1e-15, err_msg=f"{name} y")


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_numpy_scalar_params_are_rebound_and_keep_their_type(impl):
    params = {"a": np.float32(1.5), "b": 2.0, "c": np.array(3.0)}
    c = params["c"]
    opt = xopt.Adam(lr=0.1, impl=impl)
    for _ in range(3):
        opt.update(params, {"a": np.float32(0.5), "b": 0.5, "c": 0.5})
    assert type(params["a"]) is np.float32 and type(params["b"]) is float
    assert params["c"] is c and c.shape == ()  # a 0-d array stays in place
    ref = xopt.Adam(lr=0.1, impl=impl)
    arrays = {"a": np.array([1.5], np.float32), "b": np.array([2.0]), "c": np.array([3.0])}
    for _ in range(3):
        ref.update(arrays, {k: np.full(1, 0.5, v.dtype) for k, v in arrays.items()})
    for k in params:
        assert float(params[k]) == float(arrays[k][0]), k


def test_number_params_in_a_tuple_are_refused():
    with pytest.raises(TypeError, match=r"param \[0\] is a number in a tuple; pass a dict or a list"):
        xopt.SGD().update((1.0,), (1.0,))


def test_an_int_param_is_refused_naming_what_params_may_be():
    with pytest.raises(TypeError, match="param 'x' is not an array .got int.; params are arrays or Python floats"):
        xopt.SGD().update({"x": 1}, {"x": 1.0})


def test_equal_float_objects_under_two_keys_are_two_params():
    zero = 0.0
    params = {"a": zero, "b": zero}
    xopt.SGD(lr=1.0).update(params, {"a": 1.0, "b": 2.0})
    assert params == {"a": -1.0, "b": -2.0}
