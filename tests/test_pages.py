"""Large state buffers in mappings of their own (xopt._pages): ordinary NumPy arrays with the values asked, placed a
quarter of a huge page apart per slot from their param's offset, and everything a state goes through (steps,
state_dict, pickle, deepcopy, files, read-only copies) gives the same numbers as with NumPy's own arrays."""

from __future__ import annotations

import copy
import pickle
import sys

import numpy as np
import pytest

import xopt
from xopt import _pages

LINUX = sys.platform.startswith("linux")
BIG = _pages.HUGE_MIN // 4  # float32 elements: a buffer of HUGE_MIN bytes
QUARTER = (1 << 21) // 4


@pytest.mark.parametrize("value", [0.0, 0.5, np.nan])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_a_large_buffer_is_a_plain_writable_array_of_the_value(dtype, value):
    if np.dtype(dtype).kind == "u" and not value == value:
        pytest.skip("no NaN in uint8")
    shape = (_pages.HUGE_MIN // np.dtype(dtype).itemsize // 64, 64)
    a = _pages.full(shape, value if np.dtype(dtype).kind == "f" else 7, dtype)
    assert type(a) is np.ndarray and a.shape == shape and a.dtype == dtype
    assert a.flags.c_contiguous and a.flags.aligned and a.flags.writeable
    want = np.full(shape, value if np.dtype(dtype).kind == "f" else 7, dtype)
    np.testing.assert_array_equal(a, want)
    assert _pages.mapped(a) is LINUX
    a[-1, -1] = 3
    assert a[-1, -1] == 3


def test_a_small_buffer_is_numpys_own():
    a = _pages.full((3, 4), 0.25, np.float32)
    assert not _pages.mapped(a) and a.base is None
    np.testing.assert_array_equal(a, np.full((3, 4), 0.25, np.float32))


@pytest.mark.skipif(not LINUX, reason="mappings of their own on Linux only")
def test_each_slot_starts_a_quarter_page_further_from_its_param():
    p = np.ones(BIG, np.float32)
    at = p.ctypes.data % (1 << 21)
    at -= at % 64  # from the cache line the param starts in
    for slot in range(3):
        b = _pages.full(p.shape, 0.0, np.float32, p, slot)
        assert b.ctypes.data % (1 << 21) == (at + (slot + 1) * QUARTER) % (1 << 21)
    c = _pages.empty(p.shape, np.float32, p.ctypes.data, 1)  # an address stands for the param
    assert c.ctypes.data % (1 << 21) == (at + 2 * QUARTER) % (1 << 21)


@pytest.mark.skipif(not LINUX, reason="mappings of their own on Linux only")
def test_state_loaded_with_its_params_is_placed_by_them():
    params = {"w": np.ones(BIG, np.float32)}
    opt = xopt.Adam()
    opt.update(params, {"w": np.full(BIG, 0.5, np.float32)})
    new = xopt.Adam()
    new.load_state_dict(opt.state_dict(), params)
    at = params["w"].ctypes.data % (1 << 21)
    at -= at % 64
    offsets = sorted(new.state["w"][k].ctypes.data % (1 << 21) for k in ("m", "v"))
    assert offsets == sorted((at + q * QUARTER) % (1 << 21) for q in (1, 2))
    for k in ("m", "v"):
        np.testing.assert_array_equal(new.state["w"][k], opt.state["w"][k])


@pytest.mark.skipif(not LINUX, reason="mappings of their own on Linux only")
def test_a_buffer_is_aligned_for_its_elements_whatever_its_params_alignment():
    """A float32 state of a float16 param that starts 2 bytes past a 4-byte boundary (a slice of a flat buffer)
    starts on a cache line, in its mapping, and the step keeps it (a misaligned buffer would be copied)."""
    flat = np.zeros(BIG * 2 + 1, np.float16)
    p = flat[1:]
    assert p.ctypes.data % 4 == 2
    b = _pages.full(p.shape, 0.0, np.float32, p, 0)
    assert b.ctypes.data % 64 == 0 and b.flags.aligned and _pages.mapped(b)
    opt = xopt.Adam(lr=0.1)
    opt.update({"w": p}, {"w": np.ones(p.shape, np.float16)})
    opt.update({"w": p}, {"w": np.ones(p.shape, np.float16)})
    assert _pages.mapped(opt.state["w"]["m"]) and opt.state["w"]["m"].ctypes.data % 64 == 0


def _present(lo, hi):
    """How many 4 KiB pages of addresses [lo, hi) are backed (bit 63 of /proc/self/pagemap)."""
    first, last = lo // 4096, -(-hi // 4096)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read((last - first) * 8), dtype=np.uint64)
    return int(np.count_nonzero(entries >> np.uint64(63)))


@pytest.mark.skipif(not LINUX, reason="/proc/self/pagemap")
@pytest.mark.parametrize("slot", [0, 2])
def test_a_buffer_written_whole_holds_no_more_memory_than_its_bytes(slot):
    """Only the huge pages wholly inside a buffer are advised: one it starts or ends in would be backed whole,
    the mapping's room before and after the buffer with it (a 4 MiB buffer held 6 MiB)."""
    a = _pages.full((_pages.HUGE_MIN + 12345,), 1, np.uint8, near=np.zeros(10), slot=slot)
    assert _pages.mapped(a)
    a[...] = 3
    room = a.base  # the whole mapping, as NumPy sees it
    base, start = room.__array_interface__["data"][0], a.__array_interface__["data"][0]
    end = start + a.nbytes
    assert _present(start, end) == -(-end // 4096) - start // 4096  # the buffer itself: every page
    before, after = _present(base, start // 4096 * 4096), _present(-(-end // 4096) * 4096, base + room.nbytes)
    assert (before, after) == (0, 0)


def test_without_the_advice_buffers_are_numpys(monkeypatch):
    monkeypatch.setattr(_pages, "_ADVICE", None)
    a = _pages.full(BIG, 0.5, np.float32)
    assert not _pages.mapped(a) and a.base is None and float(a[0]) == 0.5


def test_a_copy_is_c_ordered_and_native():
    a = np.asfortranarray(np.arange(BIG, dtype=">f4").reshape(64, -1))
    b = _pages.copy(a)
    assert b.flags.c_contiguous and b.dtype == np.float32 and b.dtype.isnative
    np.testing.assert_array_equal(b, a)
    assert _pages.mapped(b) is LINUX


@pytest.mark.parametrize("name", ["Adam", "RMSprop", "AdaGrad", "Lion"])
def test_a_large_params_state_steps_saves_and_loads_as_numpys(name, tmp_path):
    rng = np.random.default_rng(3)
    params = {"w": rng.standard_normal(BIG).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    twin = {k: v.copy() for k, v in params.items()}
    ours, ref = getattr(xopt, name)(), getattr(xopt, name)(impl="reference")
    for _ in range(3):
        g = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        ours.update(params, g)
        ref.update(twin, g)
    buf = next(v for k, v in ours.state["w"].items() if k != "step")
    assert _pages.mapped(buf) is LINUX
    np.testing.assert_array_equal(params["w"], twin["w"])
    for k in ours.state["w"]:
        np.testing.assert_array_equal(ours.state["w"][k], ref.state["w"][k])
    path = tmp_path / "s.xopt"
    xopt.save_state(ours.state_dict(), path)
    again = [getattr(xopt, name)() for _ in range(4)]
    again[0].load_state_dict(xopt.load_state(path))
    again[1].load_state_dict(ours.state_dict())
    again[2] = pickle.loads(pickle.dumps(ours))
    again[3] = copy.deepcopy(ours)  # a pickle's and a copy's buffers are NumPy's own: the same numbers
    g = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    ours.update(params, g)
    for i, opt in enumerate(again):
        mine = {k: v.copy() for k, v in twin.items()}
        opt.update(mine, g)
        np.testing.assert_array_equal(mine["w"], params["w"])
        if i < 2:  # a file's buffers and a state_dict's copies are placed as new ones
            assert _pages.mapped(next(v for k, v in opt.state["w"].items() if k != "step")) is LINUX
