"""Every engine module offers the interface of xopt.engines.interface, with the same parameters."""

import importlib
import inspect

import pytest

from xopt.engines.interface import Engine, LaneEngine


def _parameters(f):
    return [p for p in inspect.signature(f).parameters if p != "self"]


def _members(protocol):
    return {name: f for name, f in vars(protocol).items() if inspect.isfunction(f) and not name.startswith("_")} | (
        _members(Engine) if protocol is LaneEngine else {})


@pytest.mark.parametrize("name, protocol, leave_out", [
    ("fused_cpu", LaneEngine, ()),
    ("fused_cuda", LaneEngine, ()),
    ("fused_dask", Engine, ("supports",)),  # a chunk's task picks its own engine on its worker
    ("cuda_blockwise", Engine, ()),  # 8-bit state on CuPy params (the checked path only)
])
def test_an_engine_defines_its_interface(name, protocol, leave_out):
    if name == "fused_cpu":
        pytest.importorskip("numba")
    if name == "fused_dask":
        pytest.importorskip("dask.array")
    module = importlib.import_module(f"xopt.engines.{name}")
    for member, f in _members(protocol).items():
        if member in leave_out:
            continue
        assert callable(getattr(module, member, None)), f"xopt.engines.{name} has no {member}()"
        assert _parameters(getattr(module, member)) == _parameters(f), f"xopt.engines.{name}.{member}"


def test_the_lane_and_the_checked_path_call_the_interface_only():
    """The dispatcher, the lane and the checked path call an engine through the interface's names alone."""
    import re

    import xopt._checked
    import xopt._dispatch
    import xopt._lane

    names = set(_members(LaneEngine)) | {"takes_type"}  # takes_type: the CUDA device's array type, asked by dispatch
    for module in (xopt._dispatch, xopt._lane, xopt._checked):
        called = set(re.findall(r"\b(?:engine|dask_engine|cpu|cuda|m)\.(\w+)\(", inspect.getsource(module)))
        assert called <= names, f"{module.__name__} calls {called - names} on an engine"
