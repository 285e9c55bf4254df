"""state_dtype='8bit': blockwise 8-bit state buffers; the fused CPU kernel bit-equal to the reference rule."""

from __future__ import annotations

import numpy as np
import pytest

import xopt
from xopt.engines import blockwise
from xopt.engines.blockwise import SIGNED, UNSIGNED, midpoints
from xopt.engines.cpu_codes import codes_of, values_of

N = 5000 + 77  # above min_8bit_size, a tail shorter than a block
CONFIGS = {
    "Adam": (xopt.Adam, {}),
    "Adam-amsgrad-l2-eps": (xopt.Adam, dict(amsgrad=True, weight_decay=0.01, eps_hat=False)),
    "AdamW": (xopt.AdamW, {}),
    "Lion": (xopt.Lion, {}),
    "Lion-decay": (xopt.Lion, dict(weight_decay=0.1)),
    "RMSprop": (xopt.RMSprop, {}),
    "RMSprop-momentum-l2": (xopt.RMSprop, dict(momentum=0.5, weight_decay=0.01)),
    "AdaGrad": (xopt.AdaGrad, dict(lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01)),
    "SGD-momentum": (xopt.SGD, dict(momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "SGD-nesterov": (xopt.SGD, dict(momentum=0.9, nesterov=True)),
    "Momentum": (xopt.Momentum, {}),
    "Nesterov": (xopt.Nesterov, {}),
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
def test_dynamic_map_is_bitsandbytes_dynamic_map(signed):
    # the map the float maps were measured against (benchmarks/state_8bit_roundtrip.py)
    np.testing.assert_allclose(blockwise.dynamic_map(signed), _bnb_dynamic_map(signed), rtol=1e-6, atol=0)


def test_the_maps_are_the_small_float_formats():
    # m: 3 fraction bits, 2**-17 .. 1 (and the dead codes above 1 up to 2); v: 3 fraction bits, 2**-33 .. 1
    assert SIGNED[127] == 0.0 and not np.signbit(SIGNED[127])
    assert np.array_equal(SIGNED[:127], -SIGNED[128:255][::-1]) and SIGNED[255] == 2.0
    assert SIGNED[128] == 2.0**-17 and SIGNED[127 + 120] == 1.0 and SIGNED[126 + 120] == 1 - 2.0**-4
    assert UNSIGNED[0] == 0.0 and UNSIGNED[1] == 2.0**-33 and UNSIGNED[248] == 1.0 and UNSIGNED[255] == 1.875
    for code, first in ((SIGNED[128:], 2.0**-17), (UNSIGNED[1:], 2.0**-33)):
        exponent = np.floor(np.log2(code.astype(np.float64)))
        fraction = code / 2.0**exponent - 1.0  # 1 + f / 8: 3 bits of fraction above the subnormals
        normal = code >= 8 * first
        assert np.all((fraction[normal] * 8) % 1 == 0)
        assert np.array_equal(code[~normal], first * np.arange(1, (~normal).sum() + 1))


def _nearest_rule(code, y):
    """The reference's code of float32 ``y``: count(mid < y), NaN 255."""
    found = np.searchsorted(midpoints(code)[:255], y, side="left")
    return np.where(np.isnan(y), 255, found).astype(np.uint8)


def _hard_floats(code):
    """Every map value, every threshold and its two float32 neighbours (twice, for the next ones), every power of
    two and its neighbours, the specials, subnormals, and a million random bit patterns."""
    mid = midpoints(code)[:255]
    up, down = np.float32(np.inf), -np.float32(np.inf)
    near = [mid, np.nextafter(mid, up), np.nextafter(mid, down),
            np.nextafter(np.nextafter(mid, up), up), np.nextafter(np.nextafter(mid, down), down)]
    powers = np.float32(2.0) ** np.arange(-149, 128, dtype=np.float64).astype(np.float32)
    near += [powers, np.nextafter(powers, up), np.nextafter(powers, down)]
    near += [code, np.float32([0.0, 1.0, 2.0, 3.0, np.inf, np.nan, 1e-45, 1e-40, np.finfo(np.float32).max])]
    rng = np.random.default_rng(0)
    near.append(rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32))
    y = np.concatenate(near).astype(np.float32)
    return np.concatenate([y, -y])


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_the_kernel_codes_and_values_are_the_maps(signed):
    # The kernel finds codes and values by arithmetic on the bits; the reference by searchsorted on the
    # midpoints and a take.  Both codes are steps that change only at a threshold, so the ends, thresholds and
    # their neighbours (and the tie at each threshold) decide; checked, once, over all 2**32 float32 too.
    code = SIGNED if signed else UNSIGNED
    assert np.array_equal(values_of(np.arange(256, dtype=np.uint8), signed).view(np.uint32), code.view(np.uint32))
    y = _hard_floats(code)
    with np.errstate(invalid="ignore"):
        assert np.array_equal(codes_of(y, signed), _nearest_rule(code, y))


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_the_kernel_codes_and_values_of_short_runs(signed):
    # 16 at a time and the rest one by one: every length up to two vectors and a bit, so every tail
    code = SIGNED if signed else UNSIGNED
    rng = np.random.default_rng(4)
    for n in range(1, 40):
        y = (rng.standard_normal(n) * 10.0 ** rng.integers(-12, 1, n)).astype(np.float32)
        y[rng.integers(0, n)] = midpoints(code)[rng.integers(0, 255)]  # a tie somewhere
        y = y if signed else np.abs(y)
        assert np.array_equal(codes_of(y, signed), _nearest_rule(code, y)), n
        c = rng.integers(0, 256, n).astype(np.uint8)
        assert np.array_equal(values_of(c, signed).view(np.uint32), code[c].view(np.uint32)), n


def test_the_reference_code_is_the_nearest_value():
    rng = np.random.default_rng(0)
    y = np.concatenate([rng.uniform(-1, 1, 20000), rng.standard_normal(20000) * 1e-4,
                        SIGNED, midpoints(SIGNED)[:255], [0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40]]).astype(np.float32)
    for code in (SIGNED, UNSIGNED):
        found = _nearest_rule(code, y)
        nearest = np.abs(y[:, None].astype(np.float64) - code[None, :]).min(axis=1)
        # nearest, but at a threshold (a float32 midpoint) where both neighbours are as near to float32 precision
        assert np.all(np.abs(y.astype(np.float64) - code[found]) <= nearest + 2.0**-23 * np.abs(y) + 1e-45)


def test_a_tie_goes_to_the_smaller_value():
    mid = midpoints(SIGNED)[:255]
    assert np.array_equal(_nearest_rule(SIGNED, mid), np.arange(255))
    assert np.array_equal(codes_of(mid, True), np.arange(255))
    mid = midpoints(UNSIGNED)[:255]
    assert np.array_equal(codes_of(mid, False), np.arange(255))


def same_bits(a, b) -> bool:
    """Bit for bit, but for the sign of a NaN: NaN where the other has NaN, the same bits elsewhere.  (On x86 an
    operation on two NaNs gives its first operand's, and NumPy and LLVM order the operands of an add as they
    like: RMSprop with momentum, an inf grad, gives +NaN params in the reference and -NaN in the kernel.)"""
    nan = np.isnan(a)
    return a.dtype == b.dtype and np.array_equal(nan, np.isnan(b)) and np.array_equal(a[~nan].view(np.uint8),
                                                                                     b[~nan].view(np.uint8))


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


# Each (rule, dtype) compiles a kernel of its own, 4-12 s of CPU: float64 params are checked for Adam's rule in the
# default run and for every other rule in the slow one (float16 params step through the float32 kernels).
BIT_CASES = [pytest.param(config, dtype, marks=[pytest.mark.slow] if dtype is np.float64 and
                          CONFIGS[config][0] not in (xopt.Adam, xopt.AdamW) else [])
             for config in CONFIGS for dtype in (np.float16, np.float32, np.float64)]


@pytest.mark.parametrize("config, dtype", BIT_CASES)
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
    assert same_bits(p_ref, p_fused)
    assert set(st_ref) == set(st_fused)
    names = [name for name in st_ref if name != "step" and not name.endswith("_absmax")]
    assert names == list(cls(**hyper).buffers())
    for name in names:
        assert st_ref[name].dtype == np.uint8
        for key in (name, name + "_absmax"):
            assert np.array_equal(st_ref[key], st_fused[key], equal_nan=True), key
    assert np.isnan(st_ref[names[0] + "_absmax"][1000 // 256])  # a NaN takes its block


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
        # The error of one element is at most half the gap of the map around it, times its block's absmax: with
        # 3 bits of fraction 1/16 of the value, or half the subnormal step, 2**-18 (m) and 2**-34 (v) of absmax.
        absmax = np.repeat(blocks, 256)[:N]
        floor = 2.0**-18 if name == "m" else 2.0**-34
        assert np.all(np.abs(kept - exact) <= np.abs(exact) / 16 * (1 + 1e-5) + floor * absmax)
    eight.update(params, {"w": np.ones(N, np.float32)})  # steps on from the converted state


def test_a_storage_hyperparameter_set_mid_run_converts_the_state():
    # as load_state_dict converts a saved state: the next step finds state of the dtype the optimizer keeps (it
    # refused the step before: "param 'w' is float32 but its optimizer state 'm' is bfloat16")
    rng = np.random.default_rng(4)
    params = {"w": rng.standard_normal(N).astype(np.float32)}
    opt = xopt.Adam(lr=0.01, amsgrad=True, state_dtype="bfloat16")
    opt.update(params, {"w": rng.standard_normal(N).astype(np.float32)})
    before = {name: buf.astype(np.float32) for name, buf in opt.state["w"].items() if name != "step"}
    opt.state_dtype = None
    assert all(np.array_equal(opt.state["w"][name], buf) for name, buf in before.items())  # exact
    opt.update(params, {"w": rng.standard_normal(N).astype(np.float32)})
    floats = {name: opt.state["w"][name].copy() for name in opt.buffers()}
    opt.state_dtype = "8bit"
    assert opt.state["w"]["m"].dtype == np.uint8 and opt.state["w"]["m_absmax"].shape == (-(-N // 256),)
    expect = blockwise.dequantize(np, *blockwise.quantize(np, floats["m"], SIGNED, 256), SIGNED, 256, np.float32)
    got = blockwise.dequantize(np, opt.state["w"]["m"], opt.state["w"]["m_absmax"], SIGNED, 256, np.float32)
    assert np.array_equal(got, expect)
    opt.block_size = 64  # the codes made again in blocks of 64, from their values in blocks of 256
    assert opt.state["w"]["v"].dtype == np.uint8 and opt.state["w"]["v_absmax"].shape == (-(-N // 64),)
    opt.update(params, {"w": rng.standard_normal(N).astype(np.float32)})
    kept = {name: buf for name, buf in opt.state["w"].items()}
    with pytest.raises(ValueError, match="state_dtype"):
        opt.state_dtype = "float16"
    opt.state["w"]["m_absmax"] = np.zeros(3)  # a state that does not convert: refused, nothing changed
    with pytest.raises(TypeError, match="m_absmax"):
        opt.state_dtype = None
    assert opt.state_dtype == "8bit" and all(opt.state["w"][k] is v for k, v in kept.items() if k != "m_absmax")


def test_a_storage_hyperparameter_set_during_a_first_step_waits_for_it():
    # set from another thread while the first step (which makes the state) is under way: it waits for the step's
    # end, then converts the state the step made; it took the step's state halfway before (float state with
    # state_dtype='8bit', which every later step refused)
    import threading
    import time

    started, proceed, armed = threading.Event(), threading.Event(), [False]

    def lr(count):  # the schedule is read inside the step, before its state is made
        if armed[0]:
            armed[0] = False
            started.set()
            proceed.wait(10)
        return 0.01

    opt = xopt.Adam(lr=lr)
    params = {"w": np.ones(N, np.float32)}
    armed[0] = True
    step = threading.Thread(target=opt.update, args=(params, {"w": np.ones(N, np.float32)}))
    step.start()
    assert started.wait(10)
    setter = threading.Thread(target=setattr, args=(opt, "state_dtype", "8bit"))
    setter.start()
    time.sleep(0.2)
    proceed.set()
    step.join()
    setter.join()
    assert opt.state_dtype == "8bit" and opt.state["w"]["m"].dtype == np.uint8
    opt.update(params, {"w": np.ones(N, np.float32)})
    assert opt.state["w"]["step"] == 2


@pytest.mark.parametrize("block", [N + 1, 2**40, 2**63, 2**70])
def test_a_block_size_above_the_size_costs_the_size_not_the_block(block):
    # one block shorter than block_size: quantized and stepped without padding it to block_size (2**40 zeros
    # were asked for: a MemoryError, or a process killed where the memory is overcommitted); a block_size past
    # int64 too (the fused step raised OverflowError where the reference stepped)
    rng = np.random.default_rng(7)
    p0 = rng.standard_normal(N).astype(np.float32)
    grads = [{"w": rng.standard_normal(N).astype(np.float32)} for _ in range(2)]
    runs = []
    for impl in ("fused", "reference"):
        params, opt = {"w": p0.copy()}, xopt.Adam(lr=0.01, state_dtype="8bit", block_size=block, impl=impl)
        for g in grads:
            opt.update(params, g)
        assert opt.state["w"]["m_absmax"].shape == (1,)
        runs.append((params["w"], opt.state["w"]))
    (p_f, st_f), (p_r, st_r) = runs
    assert same_bits(p_f, p_r) and all(np.array_equal(st_f[k], st_r[k]) for k in st_f if k != "step")
    values = blockwise.dequantize(np, st_r["m"], st_r["m_absmax"], SIGNED, block, np.float32)
    assert np.array_equal(values, SIGNED[st_r["m"]] * st_r["m_absmax"][0])


def test_state_dtype_bfloat16_set_mid_run_rounds_a_float_state():
    # a float state (and the float state of a param below min_8bit_size) set to bfloat16 is rounded to it, as the
    # optimizer keeps it from then on; it was kept float, and every later step refused it
    import ml_dtypes

    rng = np.random.default_rng(5)
    for dtype, start in ((np.float32, None), (np.float64, None), (np.float32, "8bit")):
        params = {"w": rng.standard_normal(N).astype(dtype), "b": rng.standard_normal(10).astype(dtype)}
        opt = xopt.Adam(lr=0.01, state_dtype=start)
        opt.update(params, {k: rng.standard_normal(p.shape).astype(dtype) for k, p in params.items()})
        floats = {name: opt.state["b"][name].copy() for name in opt.buffers()}
        opt.state_dtype = "bfloat16"
        for key in params:
            assert all(opt.state[key][name].dtype == ml_dtypes.bfloat16 for name in opt.buffers())
        assert all(np.array_equal(opt.state["b"][name], buf.astype(ml_dtypes.bfloat16)) for name, buf in floats.items())
        opt.update(params, {k: rng.standard_normal(p.shape).astype(dtype) for k, p in params.items()})
        assert opt.state["w"]["step"] == 2


def test_an_8bit_state_of_float_params_loads_with_its_params():
    params = {"s": 1.5, "w": np.ones(300, np.float32)}
    grads = {"s": 0.5, "w": np.ones(300, np.float32)}
    opt = xopt.Adam(state_dtype="8bit", min_8bit_size=0)
    opt.update(params, grads)
    other = xopt.Adam(state_dtype="8bit", min_8bit_size=0)
    other.load_state_dict(opt.state_dict(), params=params)  # raised AttributeError: a float has no shape
    assert other.state["s"]["m"].shape == () and other.state["s"]["m"].dtype == np.uint8
    mine, theirs = dict(params), dict(params)
    opt.update(mine, grads)
    other.update(theirs, grads)
    assert mine["s"] == theirs["s"] and np.array_equal(mine["w"], theirs["w"])


def test_unsupported_optimizers_and_arrays_are_refused_naming_them():
    with pytest.raises(TypeError, match="NAdam.*state_dtype"):
        xopt.NAdam(state_dtype="8bit")
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        xopt.Adam(state_dtype="8bit", block_size=0)
    torch = pytest.importorskip("torch")
    opt = xopt.Adam(state_dtype="8bit")
    with pytest.raises(TypeError, match="'w'.*8bit.*NumPy and CuPy arrays only, not torch"):
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


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_a_byte_swapped_absmax_steps_as_a_native_one(impl):
    # the fused kernel reads raw bytes: a big-endian absmax (a user's, a file's) is taken in native byte order, as
    # a float state buffer is; the fused step raised numba's TypingError (after the checks, its message naming no
    # param), the reference stepped it
    rng = np.random.default_rng(8)
    p0 = rng.standard_normal(N).astype(np.float32)
    grads = [rng.standard_normal(N).astype(np.float32) for _ in range(2)]
    runs = []
    for swap in (False, True):
        opt, params = xopt.Adam(lr=0.01, state_dtype="8bit", impl=impl), {"w": p0.copy()}
        opt.update(params, {"w": grads[0]})
        if swap:
            for name in ("m_absmax", "v_absmax"):
                absmax = opt.state["w"][name]
                opt.state["w"][name] = absmax.astype(absmax.dtype.newbyteorder(">"))
        opt.update(params, {"w": grads[1]})
        runs.append((params["w"], opt.state["w"]))
    (p_native, st_native), (p_swapped, st_swapped) = runs
    assert same_bits(p_native, p_swapped)
    for name in ("m", "m_absmax", "v", "v_absmax"):
        assert np.array_equal(st_native[name], st_swapped[name]), name
        assert st_swapped[name].dtype.isnative, name


def test_a_byte_swapped_absmax_loads_in_native_byte_order():
    # as a float state's buffers load (native copies); an 8-bit state's absmax was refused, "float32 ... got >f4"
    rng = np.random.default_rng(9)
    params = {"w": rng.standard_normal(N).astype(np.float32)}
    opt = xopt.Adam(lr=0.01, state_dtype="8bit")
    opt.update(params, {"w": rng.standard_normal(N).astype(np.float32)})
    saved = opt.state_dict()
    saved["state"]["w"] = {name: buf.astype(buf.dtype.newbyteorder(">")) if name.endswith("_absmax") else buf
                           for name, buf in saved["state"]["w"].items()}
    for block in (256, 128):  # kept as it is, and converted to other blocks
        other = xopt.Adam(lr=0.01, state_dtype="8bit", block_size=block)
        other.load_state_dict(saved, params=params)
        for name in ("m_absmax", "v_absmax"):
            assert other.state["w"][name].dtype == np.float32 and other.state["w"][name].dtype.isnative
        if block == 256:
            assert all(np.array_equal(other.state["w"][k], opt.state["w"][k]) for k in opt.state["w"])
        other.update(dict(params), {"w": np.ones(N, np.float32)})


@pytest.mark.parametrize("key", ["w", "b"])  # 8-bit codes, and a small param's float32 state
@pytest.mark.parametrize("bad", [[0] * 3, 3, "codes"], ids=["list", "int", "str"])
def test_a_state_buffer_that_is_not_an_array_is_refused_naming_it(key, bad):
    # refused before any write, as other wrong buffers are; it raised AttributeError ("'list' object has no
    # attribute 'shape'"), naming neither the param nor the buffer
    opt = xopt.Adam(state_dtype="8bit")
    params = {"w": np.ones(N, np.float32), "b": np.ones(10, np.float32)}
    opt.update(params, {k: np.ones_like(v) for k, v in params.items()})
    opt.state[key]["v"] = bad
    before = {k: v.copy() for k, v in params.items()}
    with pytest.raises(TypeError, match=f"'{key}'.*'v' is not an array"):
        opt.update(params, {k: np.ones_like(v) for k, v in params.items()})
    assert all(np.array_equal(params[k], before[k]) for k in params) and opt.state[key]["step"] == 1


def test_a_float_state_of_an_8bit_sized_param_is_refused_naming_its_shape_or_dtype():
    # a param grown past min_8bit_size under its key, or a float buffer put in an 8-bit state: refused naming what
    # is wrong with the buffer, as a float state is; it was refused as lacking 'm_absmax'
    opt = xopt.Adam(state_dtype="8bit")
    opt.update({"b": np.ones(10, np.float32)}, {"b": np.ones(10, np.float32)})
    with pytest.raises(ValueError, match=r"param 'b' has shape \(5077,\) but its optimizer state 'm' was made for "
                                         r"shape \(10,\)"):
        opt.update({"b": np.ones(N, np.float32)}, {"b": np.ones(N, np.float32)})
    params = {"w": np.ones(N, np.float32)}
    opt.update(params, {"w": np.ones(N, np.float32)})
    opt.state["w"]["v"] = np.zeros(N, np.float32)
    with pytest.raises(TypeError, match="param 'w' keeps its state in uint8 .* optimizer state 'v' is float32"):
        opt.update(params, {"w": np.ones(N, np.float32)})
    assert opt.state["b"]["step"] == opt.state["w"]["step"] == 1


@pytest.mark.parametrize("state_dtype", [None, "8bit"])  # float state: the optimizer's, or a param below min_8bit_size
def test_an_8bit_state_of_number_params_loads_as_float_in_their_compute_dtype(state_dtype):
    # a Python float param steps in float64 (a NumPy scalar in its dtype's compute dtype): its 8-bit state comes back
    # float64 when the params are given, as an array param's does; it came back float32, and the load refused it
    params = {"s": 1.5, "n": np.float16(2.5), "w": np.ones(300, np.float32)}
    grads = {"s": 0.5, "n": np.float16(0.5), "w": np.ones(300, np.float32)}
    opt = xopt.Adam(state_dtype="8bit", min_8bit_size=0)
    opt.update(params, grads)
    other = xopt.Adam(state_dtype=state_dtype)
    other.load_state_dict(opt.state_dict(), params=params)
    assert {k: other.state[k]["m"].dtype for k in params} == {"s": np.float64, "n": np.float32, "w": np.float32}
    for k in params:
        for name, code in (("m", SIGNED), ("v", UNSIGNED)):
            expect = blockwise.dequantize(np, opt.state[k][name].reshape(-1), opt.state[k][name + "_absmax"], code,
                                          256, np.float32)
            assert np.array_equal(other.state[k][name].reshape(-1), expect)
    mine = dict(params)
    other.update(mine, grads)
    assert other.state["s"]["step"] == 2 and type(mine["s"]) is float and type(mine["n"]) is np.float16


# -- a converted state of float64 params ---------------------------------------------------------------------------
def _reference_step(hyper, state, params, grads):
    """The reference rule's Adam step from ``state`` (param key -> float buffers in the params' dtypes)."""
    ref = xopt.Adam(impl="reference", **hyper)
    ref.load_state_dict({**ref.state_dict(), "iter": 2, "state": state}, params=params)
    mine = {k: v.copy() for k, v in params.items()}
    ref.update(mine, grads)
    return ref, mine


def test_a_bfloat16_state_loads_with_params_into_an_8bit_optimizer_in_each_params_compute_dtype():
    # a float64 param below min_8bit_size, kept in float by the 8-bit optimizer: its bfloat16 buffers load in
    # float64 (exactly; the load refused the float32 it made of them), a float32 param's in float32
    hyper = dict(lr=0.01, amsgrad=True)
    rng = np.random.default_rng(21)
    params = {"w": rng.standard_normal(300), "b": rng.standard_normal(300).astype(np.float32)}
    low = xopt.Adam(state_dtype="bfloat16", **hyper)
    for _ in range(2):
        low.update(params, {k: rng.standard_normal(300).astype(p.dtype) for k, p in params.items()})
    exact = {k: {"step": 2, **{b: st[b].astype(params[k].dtype) for b in low.buffers()}} for k, st in low.state.items()}
    opt = xopt.Adam(state_dtype="8bit", **hyper)
    opt.load_state_dict(low.state_dict(), params=params)
    for k, st in exact.items():
        for b in opt.buffers():
            assert opt.state[k][b].dtype == params[k].dtype and np.array_equal(opt.state[k][b], st[b]), (k, b)
    grads = {k: rng.standard_normal(300).astype(p.dtype) for k, p in params.items()}
    mine = {k: v.copy() for k, v in params.items()}
    opt.update(mine, grads)
    ref, theirs = _reference_step(hyper, exact, params, grads)
    for k, p in params.items():
        eps = np.finfo(p.dtype).eps
        assert mine[k].dtype == p.dtype
        np.testing.assert_allclose(mine[k], theirs[k], rtol=4 * eps, atol=0)


def test_an_8bit_state_loads_with_float64_torch_params():
    # it raised "Cannot interpret 'torch.float64' as a data type"
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(24)
    w0, g = rng.standard_normal(N), rng.standard_normal(N)
    eight = xopt.Adam(lr=0.01, state_dtype="8bit")
    eight.update({"w": w0.copy()}, {"w": g})
    numpy_run = xopt.Adam(lr=0.01)
    numpy_run.load_state_dict(eight.state_dict(), params={"w": w0})
    expected = {"w": w0.copy()}
    numpy_run.update(expected, {"w": g})
    params = {"w": torch.tensor(w0)}
    opt = xopt.Adam(lr=0.01)
    opt.load_state_dict(eight.state_dict(), params=params)
    opt.update(params, {"w": torch.tensor(g)})
    assert opt.state["w"]["m"].dtype == torch.float64 and opt.state["w"]["step"] == 2
    np.testing.assert_allclose(params["w"].numpy(), expected["w"], rtol=4 * np.finfo(np.float64).eps, atol=0)


def test_an_8bit_state_converted_without_the_params_is_widened_by_a_float64_params_step():
    # without the params the buffers come back float32 (the param's dtype is not known): the float64 param's
    # next step widens them (exactly) and steps as the state loaded with params= does, to the bit; so does a
    # step after turning 8-bit state off with the setter
    rng = np.random.default_rng(25)
    w0, g = rng.standard_normal(N), rng.standard_normal(N)
    eight = xopt.Adam(lr=0.01, state_dtype="8bit")
    eight.update({"w": w0.copy()}, {"w": g})
    expected = {"w": w0.copy()}
    with_params = xopt.Adam(lr=0.01)
    with_params.load_state_dict(eight.state_dict(), params=expected)
    assert with_params.state["w"]["m"].dtype == np.float64
    with_params.update(expected, {"w": g})
    without = xopt.Adam(lr=0.01)
    without.load_state_dict(eight.state_dict())
    assert without.state["w"]["m"].dtype == np.float32
    params = {"w": w0.copy()}
    without.update(params, {"w": g})
    set_off = xopt.Adam(lr=0.01, state_dtype="8bit")
    set_off.load_state_dict(eight.state_dict())
    set_off.state_dtype = None
    by_setter = {"w": w0.copy()}
    set_off.update(by_setter, {"w": g})
    for opt, p in ((without, params), (set_off, by_setter)):
        assert opt.state["w"]["step"] == 2 and {opt.state["w"][n].dtype for n in "mv"} == {np.dtype(np.float64)}
        assert np.array_equal(p["w"], expected["w"])
        for n in "mv":
            assert np.array_equal(opt.state["w"][n], with_params.state["w"][n])


@pytest.mark.parametrize("options", [{"clip_grad_norm": 1.0}, {}])
def test_a_read_only_grad_steps_in_place_as_a_writable_one(options):
    """The kernel only reads grads: a read-only one (a JAX array's NumPy view, a read-only memmap) steps in place,
    with the numbers of a writable one, and no copy of it (the checked path's 8-bit call copied it whole)."""
    import tracemalloc

    n = 1 << 18
    runs = []
    for writeable in (True, False):
        opt = xopt.Adam(lr=0.01, state_dtype="8bit", **options)
        params = {"w": np.linspace(-1, 1, n, dtype=np.float32)}
        g = np.cos(np.arange(n, dtype=np.float32))
        g.flags.writeable = writeable
        for _ in range(2):  # the state made, then the lane's code loaded
            opt.update(params, {"w": g})
        tracemalloc.start()
        opt.update(params, {"w": g})
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < g.nbytes // 4, peak
        runs.append((params["w"].copy(), opt.state["w"]["m"].copy(), opt.state["w"]["v_absmax"].copy()))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("where", [None, 0, -1])
@pytest.mark.parametrize("order", ["C", "F"])
def test_skip_nonfinite_checks_a_large_grad_without_an_array_of_its_size(where, order):
    """skip_nonfinite's check on the checked path (8-bit state's steps take it) reads a NumPy grad a chunk at a
    time (a bool array of the grad's size was made every step); a NaN anywhere still skips the step."""
    import tracemalloc

    shape = (512, 1024)
    opt = xopt.Adam(lr=0.01, state_dtype="8bit", skip_nonfinite=True)
    params = {"w": np.ones(shape, np.float32, order=order)}
    g = np.asarray(np.full(shape, 0.5, np.float32), order=order)
    for _ in range(2):
        opt.update(params, {"w": g})
    before = params["w"].copy()
    if where is not None:
        g.reshape(-1, order="A")[where] = np.nan
    tracemalloc.start()
    opt.update(params, {"w": g})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    if order == "C" or where is not None:  # (a Fortran-ordered param steps through C-ordered copies)
        assert peak < g.size // 4, peak  # a bool chunk, not a bool array of the grad (g.size bytes)
    assert opt.skipped_steps == (where is not None)
    assert np.array_equal(params["w"], before) is (where is not None)


def test_a_wrong_buffer_of_an_8bit_state_is_named():
    """Without params, a buffer of another shape than the others is named with both shapes (the first buffer's
    shape stood for the param's, so the right one was blamed); an absmax that is no array is named, with its type."""
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal(5000).astype(np.float32)}
    opt = xopt.Adam(lr=0.01, state_dtype="8bit")
    opt.update(params, {"w": rng.standard_normal(5000).astype(np.float32)})
    sd = opt.state_dict()
    sd["state"]["w"]["m"] = sd["state"]["w"]["m"][:-1].copy()  # 4999 codes: still 20 blocks of 256
    with pytest.raises(ValueError, match=r"'m' has shape \(4999,\) but 'v' has shape \(5000,\)"):
        xopt.Adam(lr=0.01, state_dtype="8bit").load_state_dict(sd)
    sd = opt.state_dict()
    sd["state"]["w"]["v_absmax"] = list(sd["state"]["w"]["v_absmax"])
    with pytest.raises(TypeError, match="'v_absmax'.*got list"):
        xopt.Adam(lr=0.01).load_state_dict(sd)  # to float state: a conversion
