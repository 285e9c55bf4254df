"""state_dtype='8bit': blockwise 8-bit m and v; the fused CPU kernel bit-equal to the reference rule."""

from __future__ import annotations

import numpy as np
import pytest

import xopt
from xopt.engines import blockwise
from xopt.engines.blockwise import SIGNED, UNSIGNED, midpoints
from xopt.engines.cpu_blockwise import key_table, table_code

N = 5000 + 77  # above min_8bit_size, a tail shorter than a block
CONFIGS = {
    "Adam": (xopt.Adam, {}),
    "Adam-amsgrad-l2-eps": (xopt.Adam, dict(amsgrad=True, weight_decay=0.01, eps_hat=False)),
    "AdamW": (xopt.AdamW, {}),
}


def _bnb_dynamic_map(signed):
    """bitsandbytes' create_dynamic_map (7 exponent bits, 8 bits), transcribed in torch float32 as it computes."""
    torch = pytest.importorskip("torch")
    data = []
    for i in range(7):
        items = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, items)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    return np.sort(np.array(data, dtype=np.float32))


@pytest.mark.parametrize("signed", [True, False])
def test_the_maps_are_bitsandbytes_dynamic_maps(signed):
    ours, theirs = (SIGNED if signed else UNSIGNED), _bnb_dynamic_map(signed)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)  # float64 then rounded, vs float32 throughout


def _nearest_rule(code, y):
    """The reference's code of float32 ``y``: count(mid < y), NaN 255."""
    found = np.searchsorted(midpoints(code)[:255], y, side="left")
    return np.where(np.isnan(y), 255, found).astype(np.uint8)


@pytest.mark.parametrize("code", [SIGNED, UNSIGNED], ids=["signed", "unsigned"])
def test_the_key_table_gives_the_reference_code_for_every_float32(code):
    # The kernel's code of y is table[key >> 16] >> 16, plus 1 where the key's low 16 bits pass the entry's.
    # Within one range of keys (no NaN in it) the reference's code never falls as y grows and rises at most
    # once (key_table asserts it), at the threshold the entry names; the kernel's is a step at that same low
    # value.  So the two agree on a whole range when they agree at its two ends and on both sides of its step:
    # checked here for all 65536 ranges, which covers every float32 but the signaling NaNs (the kernel's values
    # are products, whose NaNs are quiet).
    table = key_table(midpoints(code))
    top = np.arange(1 << 16, dtype=np.uint32) << 16
    low = table & 0xFFFF
    step = np.minimum(low + 1, 0xFFFF)
    keys = np.concatenate([top, top | 0xFFFF, top | low, top | step])
    bits = np.where(keys >> 31 != 0, keys ^ np.uint32(0x80000000), ~keys).astype(np.uint32)
    signaling = ((bits & 0x7F800000) == 0x7F800000) & ((bits & 0x7FFFFF) != 0) & ((bits & 0x400000) == 0)
    y = bits[~signaling].view(np.float32)
    mid = midpoints(code)[:255]
    extra = np.concatenate([mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, -np.float32(np.inf)),
                            np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0, -1.0, 1e-45, -1e-45])])
    y = np.concatenate([y, extra.astype(np.float32)])
    with np.errstate(invalid="ignore"):
        assert np.array_equal(table_code(table, y), _nearest_rule(code, y))


def test_the_reference_code_is_the_nearest_value():
    rng = np.random.default_rng(0)
    y = np.concatenate([rng.uniform(-1, 1, 20000), rng.standard_normal(20000) * 1e-4,
                        SIGNED, midpoints(SIGNED)[:255], [0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40]]).astype(np.float32)
    for code in (SIGNED, UNSIGNED):
        found = _nearest_rule(code, y)
        nearest = np.abs(y[:, None].astype(np.float64) - code[None, :]).min(axis=1)
        # nearest, but at a threshold (a float32 midpoint) where both neighbours are as near to float32 precision
        assert np.all(np.abs(y.astype(np.float64) - code[found]) <= nearest + 2.0**-23 * np.abs(y) + 1e-45)


def _edge_grads(rng, dtype, step):
    g = rng.standard_normal(N).astype(dtype)
    if step == 1:
        g[:256] = 0.0  # a block of zeros: absmax 0
        g[300] = 1e4  # one huge value in a block
        g[600:620] = np.finfo(np.float32).tiny / 8  # subnormals in float32
    if step == 2:
        g[1000] = np.nan
        g[2000] = np.inf
        g[2100] = -np.inf
    return g


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("config", CONFIGS)
def test_the_fused_kernel_equals_the_reference_bit_for_bit(config, dtype):
    cls, hyper = CONFIGS[config]
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(N).astype(dtype)
    grads = [_edge_grads(rng, dtype, k) for k in range(4)]
    runs = []
    for impl in ("reference", "fused"):
        opt, params = cls(lr=0.01, state_dtype="8bit", impl=impl, **hyper), {"w": p0.copy()}
        with np.errstate(all="ignore"):
            for g in grads:
                opt.update(params, {"w": g.copy()})
        runs.append((params["w"], opt.state["w"]))
    (p_ref, st_ref), (p_fused, st_fused) = runs
    assert p_ref.view(np.uint8).tobytes() == p_fused.view(np.uint8).tobytes()
    assert set(st_ref) == set(st_fused)
    for name in st_ref:
        if name != "step":
            assert np.array_equal(st_ref[name], st_fused[name], equal_nan=True), name
    assert np.isnan(st_ref["m_absmax"][1000 // 256])  # a NaN takes its block


def test_state_layout_and_bytes():
    opt = xopt.Adam(state_dtype="8bit")
    params = {"big": np.ones((64, 100), np.float32), "small": np.ones(10, np.float32)}
    opt.update(params, {k: np.ones_like(v) for k, v in params.items()})
    big, small = opt.state["big"], opt.state["small"]
    assert big["m"].dtype == np.uint8 and big["m"].shape == (64, 100) and big["m_absmax"].shape == (25,)
    assert small["m"].dtype == np.float32 and "m_absmax" not in small
    assert sum(b.nbytes for k, b in big.items() if k != "step") / 6400 == pytest.approx(2 + 8 / 256)


def test_save_and_load_resume_bit_identical(tmp_path):
    rng = np.random.default_rng(2)
    grads = [{"w": rng.standard_normal((80, 70)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
             for _ in range(4)]
    p0 = {"w": rng.standard_normal((80, 70)).astype(np.float32), "b": np.zeros(7, np.float32)}
    straight, resumed = ({k: v.copy() for k, v in p0.items()} for _ in range(2))
    a, b = xopt.AdamW(state_dtype="8bit", block_size=128), xopt.AdamW(state_dtype="8bit", block_size=128)
    for g in grads[:2]:
        a.update(straight, g)
        b.update(resumed, g)
    b.save(tmp_path / "s.npz")
    c = xopt.AdamW(state_dtype="8bit", block_size=128)
    c.load(tmp_path / "s.npz", params=resumed)
    assert c.state["w"]["m"].dtype == np.uint8 and c.state["w"]["m_absmax"].shape == (44,)
    for g in grads[2:]:
        a.update(straight, g)
        c.update(resumed, g)
    for k in p0:
        assert np.array_equal(straight[k], resumed[k])
        for name in a.state[k]:
            assert np.array_equal(a.state[k][name], c.state[k][name])


def test_a_float32_state_converts_to_8bit_and_back():
    rng = np.random.default_rng(3)
    params = {"w": rng.standard_normal(N).astype(np.float32)}
    full = xopt.Adam(lr=0.01)
    for _ in range(5):
        full.update(params, {"w": rng.standard_normal(N).astype(np.float32)})
    eight = xopt.Adam(lr=0.01, state_dtype="8bit")
    eight.load_state_dict(full.state_dict(), params=params)
    assert eight.state_dtype == "8bit" and eight.state["w"]["m"].dtype == np.uint8
    back = xopt.Adam(lr=0.01)
    back.load_state_dict(eight.state_dict(), params=params)
    assert back.state_dtype is None and back.state["w"]["m"].dtype == np.float32
    for name, code in (("m", SIGNED), ("v", UNSIGNED)):
        exact, kept = full.state["w"][name], back.state["w"][name]
        expect = blockwise.dequantize(np, eight.state["w"][name], eight.state["w"][name + "_absmax"], code, 256,
                                      np.float32)
        assert np.array_equal(kept, expect)
        blocks = np.abs(np.pad(exact, (0, 256 - N % 256)).reshape(-1, 256)).max(axis=1)
        # The error of one element is at most half the gap of the map around it, times its block's absmax:
        # the largest gap of both maps is 0.0141 (the signed map's top decade).
        assert np.all(np.abs(kept - exact) <= 0.0071 * np.repeat(blocks, 256)[:N])
    eight.update(params, {"w": np.ones(N, np.float32)})  # steps on from the converted state


def test_unsupported_optimizers_and_arrays_are_refused_naming_them():
    with pytest.raises(TypeError, match="NAdam.*state_dtype"):
        xopt.NAdam(state_dtype="8bit")
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        xopt.Adam(state_dtype="8bit", block_size=0)
    torch = pytest.importorskip("torch")
    opt = xopt.Adam(state_dtype="8bit")
    with pytest.raises(TypeError, match="'w'.*8bit.*NumPy arrays only, not torch"):
        opt.update({"w": torch.ones(5000)}, {"w": torch.ones(5000)})
    assert opt.state == {}


def test_a_wrong_absmax_is_refused_before_any_write():
    opt = xopt.Adam(state_dtype="8bit")
    params = {"w": np.ones(N, np.float32)}
    opt.update(params, {"w": np.ones(N, np.float32)})
    opt.state["w"]["v_absmax"] = opt.state["w"]["v_absmax"][:-1]
    before = params["w"].copy()
    with pytest.raises(ValueError, match="'w'.*'v_absmax'.*shape"):
        opt.update(params, {"w": np.ones(N, np.float32)})
    assert np.array_equal(params["w"], before) and opt.state["w"]["step"] == 1
