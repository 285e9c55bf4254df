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
