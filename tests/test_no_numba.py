"""Without usable numba (its JIT disabled, numba not installed, or an install whose import raises) xopt runs its
reference rule everywhere: the same numbers, checks and messages as in a normal process; impl="fused" says why not.

Each case runs in a fresh interpreter, so that NUMBA_DISABLE_JIT and the hidden numba are there from start-up.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# argv: mode ("normal", "disabled", "hidden", "broken"), output folder.  Writes results.npz and messages.json.
SCRIPT = r'''
import json, os, sys
from pathlib import Path

mode, out = sys.argv[1], Path(sys.argv[2])
if mode in ("hidden", "broken"):
    class _NoNumba:
        def find_spec(self, name, path=None, target=None):
            if name == "numba" or name.startswith("numba."):
                if mode == "hidden":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)  # as if not installed
                raise RuntimeError("broken numba")
            return None

    sys.meta_path.insert(0, _NoNumba())
assert "numba" not in sys.modules

import numpy as np
import xopt

results, messages = {}, {}


def data(seed, dtype, eighths):
    rng = np.random.default_rng(seed)
    params = {"W": rng.standard_normal((3, 4)).astype(dtype), "b": rng.standard_normal(4).astype(dtype)}
    if eighths:  # squares and their sums exact in float64: the norm does not depend on the order of the sum
        grads = [{k: (rng.integers(-16, 17, v.shape) / 8).astype(dtype) for k, v in params.items()} for _ in range(3)]
    else:
        grads = [{k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()} for _ in range(3)]
    return params, grads


CASES = {  # name: (optimizer, dtype, params as a list, grads in eighths)
    "sgd": (lambda impl: xopt.SGD(lr=0.1, impl=impl), np.float32, False, False),
    "adam_clip": (lambda impl: xopt.Adam(lr=0.01, clip_grad_norm=1.0, impl=impl), np.float64, False, True),
    "adamw_overrides": (lambda impl: xopt.AdamW(lr=0.01, weight_decay=0.1, overrides={"b*": {"weight_decay": 0.0}},
                                                impl=impl), np.float32, False, False),
    "adam_list": (lambda impl: xopt.Adam(lr=0.01, impl=impl), np.float64, True, False),
}
impls = ("reference",) if mode == "normal" else ("auto", "reference")
for name, (make, dtype, as_list, eighths) in CASES.items():
    for impl in impls:
        params, grads = data(len(name), dtype, eighths)
        opt = make(impl)
        if as_list:
            params, grads = list(params.values()), [list(g.values()) for g in grads]
        for g in grads:
            opt.update(params, g)
        keys = range(len(params)) if as_list else list(params)
        for k in keys:
            results[f"{name}/{impl}/param/{k}"] = params[k]
            for buf, v in opt.state[k].items():
                results[f"{name}/{impl}/state/{k}/{buf}"] = np.asarray(v)
        if name == "adam_clip":
            assert opt.last_grad_norm > 1.0  # clipped
            results[f"{name}/{impl}/last_grad_norm"] = np.asarray(opt.last_grad_norm)
        path = out / f"{name}-{impl}.npz"
        opt.save(path)
        again = make(impl)
        again.load(path)
        saved, loaded = opt.state_dict(), again.state_dict()
        assert loaded["iter"] == saved["iter"] == 3 and loaded["state"].keys() == saved["state"].keys()
        for k, st in saved["state"].items():
            assert loaded["state"][k].keys() == st.keys()
            for buf, v in st.items():
                np.testing.assert_array_equal(loaded["state"][k][buf], v)

for impl in ("auto", "reference"):  # an overlapping pair of params: refused, nothing written
    buf = np.arange(8, dtype=np.float64)
    kept = buf.copy()
    opt = xopt.Adam(impl=impl)
    try:
        opt.update({"a": buf[:5], "b": buf[3:]}, {"a": np.ones(5), "b": np.ones(5)})
    except Exception as exc:
        messages[f"overlap/{impl}"] = f"{type(exc).__name__}: {exc}"
    np.testing.assert_array_equal(buf, kept)
    assert opt.iter == 0 and not opt.state

if mode != "normal":
    try:  # refused in the constructor, or (CuPy installed: it could run CuPy arrays) at the step on NumPy arrays
        xopt.Adam(impl="fused").update({"W": np.ones(3)}, {"W": np.ones(3)})
    except Exception as exc:
        messages["fused"] = f"{type(exc).__name__}: {exc}"
    from xopt import _dispatch

    _dispatch._fused_cuda = lambda: None  # as without CuPy: no fused engine at all, refused in the constructor
    try:
        xopt.Adam(impl="fused")
    except Exception as exc:
        messages["fused/no cupy"] = f"{type(exc).__name__}: {exc}"

np.savez(out / "results.npz", **results)
(out / "messages.json").write_text(json.dumps(messages))
'''


def _run(mode, tmp_path):
    out = tmp_path / mode
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_DISABLE_JIT"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    if mode == "disabled":
        env["NUMBA_DISABLE_JIT"] = "1"
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{mode}:\n{done.stdout}\n{done.stderr}"
    with np.load(out / "results.npz") as f:
        results = {k: f[k] for k in f.files}
    return results, json.loads((out / "messages.json").read_text())


@pytest.fixture(scope="module")
def normal(tmp_path_factory):
    """The steps and messages of a normal process, impl="reference"."""
    return _run("normal", tmp_path_factory.mktemp("normal"))


@pytest.mark.parametrize("mode, why", [("disabled", "NUMBA_DISABLE_JIT"), ("hidden", "numba is not installed"),
                                       ("broken", "broken numba")])
def test_without_usable_numba_xopt_runs_the_reference(normal, tmp_path, mode, why):
    want, want_messages = normal
    got, messages = _run(mode, tmp_path)
    assert len(want) > 20
    for impl in ("auto", "reference"):
        for key, value in want.items():
            mine = key.replace("/reference/", f"/{impl}/")
            assert got[mine].dtype == value.dtype, mine
            np.testing.assert_array_equal(got[mine], value, err_msg=f"{mode}: {mine}")
        assert messages[f"overlap/{impl}"] == want_messages["overlap/reference"]
    assert messages["overlap/reference"].startswith("ValueError:")
    for key in ("fused", "fused/no cupy"):
        assert messages[key].startswith("ValueError:") and why in messages[key] and "numba" in messages[key], messages


def test_the_overlap_message_is_the_same_on_both_paths(normal):
    _, messages = normal
    assert messages["overlap/auto"] == messages["overlap/reference"]


_NO_CACHE_LOCATOR = """
import numba.core.caching as caching
for name in ("InTreeCacheLocator", "UserWideCacheLocator", "IPythonCacheLocator", "ZipCacheLocator"):
    setattr(getattr(caching, name), "from_function", classmethod(lambda cls, *a: None))  # nowhere to cache
import numba, numpy as np, xopt
from xopt import _dispatch
p = {"w": np.ones(3, np.float32)}
opt = xopt.Adam()
for _ in range(2):
    opt.update(p, {"w": np.ones(3, np.float32)})
from xopt.engines import cpu_objects
print(_dispatch._fused_cpu() is not None, numba.config.CACHE_DIR, float(p["w"][0]), cpu_objects.folder(),
      cpu_objects._key())
"""


@pytest.mark.slow  # compiles Adam's kernels again, into a cache of its own
def test_a_read_only_install_without_a_home_caches_its_kernels_in_the_temporary_directory(tmp_path):
    """numba's cache=True raised "cannot cache function ...: no locator available" at import where the package
    folder is read-only and there is no writable home (a container's non-root user): every update failed."""
    env = dict(os.environ, TMPDIR=str(tmp_path), NUMBA_CACHE_DIR="")
    env.pop("NUMBA_CACHE_DIR")
    run = subprocess.run([sys.executable, "-c", _NO_CACHE_LOCATOR], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parent.parent, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    engine, cache_dir, w, objects, key = run.stdout.split()
    assert engine == "True" and cache_dir.startswith(str(tmp_path)) and float(w) < 1.0, run.stdout
    # the small step's code is kept as xopt's objects (here the package's __pycache__ is writable: only numba's
    # locators are gone), what numba compiles besides in the temporary directory
    assert any(Path(cache_dir).rglob("*.nbi")) or any(Path(objects).glob(f"*-{key}.o")), "nothing was cached"


_TORCH_WITHOUT_NUMBA = """
import sys
class _NoNumba:
    def find_spec(self, name, path=None, target=None):
        if name == "numba" or name.startswith("numba."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoNumba())
import numpy as np, torch, xopt, xopt.torch
torch.manual_seed(0)
w0, grads = torch.randn(3, 4, dtype=torch.float64), [torch.randn(3, 4, dtype=torch.float64) for _ in range(3)]
w = w0.clone().requires_grad_()
opt = xopt.torch.AdamW([w], lr=0.1, weight_decay=0.1)
p = {"w": w0.clone()}
plain = xopt.AdamW(lr=0.1, weight_decay=0.1, eps=1e-8)
for g in grads:
    w.grad = g.clone()
    opt.step()
    plain.update(p, {"w": g.clone()})
np.save(sys.argv[1], np.stack([w.detach().numpy(), p["w"].numpy(), w0.numpy(), *[g.numpy() for g in grads]]))
print("numba" in sys.modules)
"""


def test_without_numba_torch_tensors_take_the_reference_path(tmp_path):
    """With numba not installed, a step on CPU torch tensors (``update`` on tensors, ``xopt.torch``'s step) raised
    ModuleNotFoundError: the lane imported the tensor engine's module, which imports numba, before asking whether
    numba's code can run.  Now it asks first, and the reference rule takes the step: torch.optim's numbers."""
    torch = pytest.importorskip("torch")
    out = tmp_path / "w.npy"
    run = subprocess.run([sys.executable, "-c", _TORCH_WITHOUT_NUMBA, str(out)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["False"]  # numba was never imported
    got_torch_front, got_update, w0, *grads = np.load(out)
    w = torch.tensor(w0, requires_grad=True)
    want = torch.optim.AdamW([w], lr=0.1, weight_decay=0.1, eps=1e-8)
    for g in grads:
        w.grad = torch.tensor(g)
        want.step()
    np.testing.assert_allclose(got_torch_front, w.detach().numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(got_update, w.detach().numpy(), rtol=1e-13, atol=1e-15)
    assert not np.array_equal(got_update, w0)


_NO_CACHE_LOCATOR_TORCH_FIRST = """
import numba.core.caching as caching
for name in ("InTreeCacheLocator", "UserWideCacheLocator", "IPythonCacheLocator", "ZipCacheLocator"):
    setattr(getattr(caching, name), "from_function", classmethod(lambda cls, *a: None))  # nowhere to cache
import numba, torch, xopt.torch
w = torch.ones(3, requires_grad=True)
opt = xopt.torch.Adam([w], lr=0.1)
for _ in range(2):
    w.grad = torch.ones(3)
    opt.step()
print(numba.config.CACHE_DIR, float(w[0]))
"""


@pytest.mark.slow  # compiles the tensor step's kernels again, into a cache of its own
def test_a_read_only_install_whose_first_step_is_on_torch_tensors_caches_in_the_temporary_directory(tmp_path):
    """In a read-only install without a writable home, a process whose first step was on torch tensors raised numba's
    "cannot cache function ...: no locator available": the lane imported the tensor engine's module before
    ``xopt._numba.usable()`` had found numba a place to cache (a step on NumPy arrays first did not)."""
    pytest.importorskip("torch")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop("NUMBA_CACHE_DIR", None)
    run = subprocess.run([sys.executable, "-c", _NO_CACHE_LOCATOR_TORCH_FIRST], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    cache_dir, w = run.stdout.split()
    assert cache_dir.startswith(str(tmp_path)) and float(w) < 1.0, run.stdout
