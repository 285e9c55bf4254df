"""State files and state_dicts at their edges: files written by other tools or edited by hand, odd params and
keys, long runs; each test names what went wrong before."""

import zipfile

import numpy as np
import pytest

import xopt


def _trained(seed=0):
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    opt = xopt.Adam(lr=0.01)
    for _ in range(2):
        opt.update(params, {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()})
    return opt, params


def _rewritten(src, dst, compression):
    """The members of the file ``src`` written again into ``dst`` with another zip compression."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", compression=compression) as out:
        for name in z.namelist():
            out.writestr(name, z.read(name))


@pytest.mark.parametrize("compression", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA], ids=["bzip2", "lzma"])
def test_a_member_compressed_other_than_stored_or_deflated_is_refused(compression, tmp_path):
    """Before, a bzip2 or LZMA member was read whatever size it claimed (only a deflated member's size was
    bounded by the bytes it takes): a 1.4 KB bzip2 file made a load allocate and fill 200 MB."""
    opt, params = _trained()
    opt.save(tmp_path / "opt.npz")
    _rewritten(tmp_path / "opt.npz", tmp_path / "other.npz", compression)
    fresh = xopt.Adam(lr=0.01)
    with pytest.raises(ValueError, match="not an xopt state file.*compressed with zip method"):
        fresh.load(tmp_path / "other.npz", params=params)
    assert fresh.state == {} and fresh.iter == 0
    _rewritten(tmp_path / "opt.npz", tmp_path / "deflated.npz", zipfile.ZIP_DEFLATED)  # np.savez_compressed's
    fresh.load(tmp_path / "deflated.npz", params=params)
    assert fresh.iter == opt.iter


def test_nadam_resumed_at_a_huge_step_count_steps_without_running_every_product(tmp_path, monkeypatch):
    """Before, the running product of μ stopped early only at 0.0, but with beta1 = 0.9 it settles at the
    smallest subnormal, 5e-324 (which μ > 0.5 rounds back to itself): a NAdam loaded at step 10**9 made 10**9
    multiplications at its next step (5.6 s at step 10**7), one at 2**62 never ended."""
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal(5).astype(np.float32)}
    opt = xopt.NAdam()
    opt.update(params, {"w": np.ones(5, np.float32)})
    sd = opt.state_dict()
    sd["state"]["w"]["step"] = 2**62
    xopt.save_state(sd, tmp_path / "opt.npz")
    resumed = xopt.NAdam()
    resumed.load(tmp_path / "opt.npz", params=params)
    calls = [0]
    mu = xopt.NAdam._mu

    def counted(self, step):
        calls[0] += 1
        if calls[0] > 100_000:
            raise RuntimeError("the product of μ is run step by step up to the step count")
        return mu(self, step)

    monkeypatch.setattr(xopt.NAdam, "_mu", counted)
    resumed.update(params, {"w": np.ones(5, np.float32)})
    assert resumed.state["w"]["step"] == 2**62 + 1 and np.isfinite(params["w"]).all()
    assert resumed.mu_product(2**62 + 1) == 5e-324
    # the products are those of every step, multiplied one by one
    product = 1.0
    for t in range(1, 9001):
        product *= mu(resumed, t)
        if t in (10, 1000, 7000, 9000):
            assert xopt.NAdam().mu_product(t) == product


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_a_step_at_the_largest_int64_count_is_refused_and_changes_nothing(impl, tmp_path):
    """Before, a param loaded at step 2**63 - 1 (which a load takes) stepped to 2**63: a state that no file holds,
    no load takes and no further step takes (save raised 'cannot be saved', the next update 'step ...')."""
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal(3).astype(np.float32)}
    opt = xopt.Adam(impl=impl)
    opt.update(params, {"w": np.ones(3, np.float32)})
    sd = opt.state_dict()
    sd["state"]["w"]["step"] = 2**63 - 1
    opt.load_state_dict(sd, params=params)
    before = params["w"].copy()
    with pytest.raises(ValueError, match="param 'w'.*step 9223372036854775807, the largest an int64"):
        opt.update(params, {"w": np.ones(3, np.float32)})
    assert np.array_equal(params["w"], before) and opt.state["w"]["step"] == 2**63 - 1 and opt.iter == 1
    opt.save(tmp_path / "opt.npz")  # still a state a file holds
    xopt.Adam(impl=impl).load(tmp_path / "opt.npz", params=params)


def test_an_iter_a_load_would_refuse_is_refused_by_save(tmp_path):
    """Before, save wrote an iter of 2**63 (an update after a load at 2**63 - 1) into the file's JSON, and the load
    of that file refused it: a file written without complaint that could not be read back."""
    opt, params = _trained()
    sd = opt.state_dict()
    sd["iter"] = 2**63 - 1
    opt.load_state_dict(sd, params=params)
    opt.update(params, {k: np.ones_like(v) for k, v in params.items()})
    assert opt.iter == 2**63
    (tmp_path / "opt.npz").write_bytes(b"old")
    with pytest.raises(ValueError, match=r"state_dict\['iter'\] cannot be saved: 9223372036854775808"):
        opt.save(tmp_path / "opt.npz")
    assert (tmp_path / "opt.npz").read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["opt.npz"]
    sd = opt.state_dict()
    sd["iter"], sd["skipped_steps"] = 5, 2**63
    with pytest.raises(ValueError, match=r"state_dict\['skipped_steps'\] cannot be saved"):
        xopt.save_state(sd, tmp_path / "opt.npz")


def test_a_bytes_path_saves_and_loads(tmp_path):
    """Before, save of a bytes path (which open() and load take) raised TypeError 'cannot use a string pattern on a
    bytes-like object' from the search for stale temp files."""
    opt, params = _trained()
    path = bytes(tmp_path / "opt.npz")
    opt.save(path)
    opt.save(path)  # over the file it wrote
    loaded = xopt.Adam(lr=0.01)
    loaded.load(path, params=params)
    assert loaded.iter == opt.iter and all(np.array_equal(loaded.state[k]["m"], opt.state[k]["m"]) for k in params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt.npz"]


def test_an_8bit_state_with_params_below_min_8bit_size_loads_into_a_bfloat16_optimizer(tmp_path):
    """Before, the float32 buffers of an 8-bit optimizer's small params (below min_8bit_size) were left float32 when
    its state was loaded into an Adam(state_dtype='bfloat16'), which keeps its own state_dtype there, and the load
    raised "state 'm' of param 'b' is float32 but ... keeps the state of that param in bfloat16"; setting
    state_dtype='bfloat16' on the 8-bit optimizer converted the same state."""
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal(40).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32),
              "d": rng.standard_normal(5)}
    grads = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}
    eight = xopt.Adam(state_dtype="8bit", min_8bit_size=16)
    eight.update(params, grads)
    eight.save(tmp_path / "opt.npz")
    loaded = xopt.Adam(state_dtype="bfloat16")
    loaded.load(tmp_path / "opt.npz", params=params)
    eight.state_dtype = "bfloat16"  # the same conversion, by the setter
    for key in params:
        for name in ("m", "v"):
            assert str(loaded.state[key][name].dtype) == "bfloat16"
            assert loaded.state[key][name].view(np.uint16).tobytes() == eight.state[key][name].view(np.uint16).tobytes()
    a, b = dict(params), {k: v.copy() for k, v in params.items()}
    loaded.update(a, grads)
    eight.update(b, grads)
    assert all(a[k].tobytes() == b[k].tobytes() for k in params)
