"""Built CUDA kernels kept on disk (xopt.engines.cuda_cache): a second process calls NVRTC zero times.

The two processes are benchmarks/cuda_cache.py's: CuPy's NVRTC as on a GPU, through ``cuda_device._function``,
with the GPU's part of ``-arch`` fixed to an H100's (sm_90, as in tests/test_cuda_build.py) and the driver's
part (loading the cubin into a context) stubbed: no GPU here.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from xopt.engines import cuda_cache, cuda_device

HERE = Path(__file__).resolve().parent
_SPEC = importlib.util.spec_from_file_location("cuda_cache_bench", HERE.parent / "benchmarks" / "cuda_cache.py")
cuda_cache_bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(cuda_cache_bench)


def _nvrtc():
    try:
        from cupy.cuda import compiler

        compiler._get_nvrtc_version()
    except Exception as exc:  # noqa: BLE001  (CuPy or its NVRTC missing)
        pytest.skip(f"CuPy cannot load NVRTC: {exc!r}")


@pytest.mark.cuda_source
@pytest.mark.slow  # NVRTC's builds, as tests/test_cuda_build.py's; the stand-in builds below run by default
def test_a_second_process_builds_no_kernel(tmp_path):
    _nvrtc()
    names = [cuda_device.kernel_name(4, "float32"), cuda_device.norm_name("float16")]
    first = cuda_cache_bench.run_child(tmp_path, names)  # each: a new process's first use of the kernels
    second = cuda_cache_bench.run_child(tmp_path, names)
    assert first["nvrtc"] == 2 and second["nvrtc"] == 0, (first, second)
    assert second["functions"] == first["functions"]
    assert [lowered for _, lowered in first["functions"]][0].startswith("_Z9xopt_step")
    assert len(list(tmp_path.glob("kernel-*.bin"))) == 2 and not list(tmp_path.glob(".*"))


@pytest.fixture
def fake_builds(cuda_cache_dir, monkeypatch):
    """cuda_cache.compiled over a stand-in build (counted) and a fixed key: no CuPy needed."""
    monkeypatch.setattr(cuda_cache, "kernel_key", lambda source, options, names, arch=None: "k")
    builds = []

    def compiled():
        return cuda_cache.compiled("src", ("--fmad=false",), ["f<1>"], lambda: (builds.append(1), (
            b"\x7fELF" + bytes(range(256)) * 4, {"f<1>": "_Z1fILi1EEvv"}))[1])
    return compiled, builds


def test_a_kept_kernel_is_read_back_and_not_built(fake_builds, cuda_cache_dir):
    compiled, builds = fake_builds
    first = compiled()
    assert compiled() == first and len(builds) == 1
    assert [p.name for p in cuda_cache_dir.iterdir()] == ["kernel-k.bin"]


@pytest.mark.parametrize("damage", ["truncated", "a byte changed", "empty", "another format", "names missing"])
def test_a_damaged_kernel_file_is_ignored_and_built_again(damage, fake_builds, cuda_cache_dir):
    compiled, builds = fake_builds
    first = compiled()
    path = cuda_cache_dir / "kernel-k.bin"
    blob = path.read_bytes()
    path.write_bytes({"truncated": blob[:-1], "a byte changed": blob[:-5] + b"X" + blob[-4:], "empty": b"",
                      "another format": b"\x7fELF" + blob,
                      "names missing": blob.replace(b'"f<1>"', b'"g<1>"')}[damage])
    assert compiled() == first and len(builds) == 2
    assert path.read_bytes() == blob, "the file written again"
    assert compiled() == first and len(builds) == 2


def test_without_a_writable_folder_kernels_are_built_in_memory(fake_builds, tmp_path, monkeypatch):
    compiled, builds = fake_builds
    (tmp_path / "a-file").write_text("")
    for unusable in ("", str(tmp_path / "a-file" / "cache")):  # turned off; a folder that cannot be made
        monkeypatch.setenv(cuda_cache.ENV, unusable)
        cuda_cache.directory.cache_clear()
        assert cuda_cache.directory() is None
        before = len(builds)
        compiled(), compiled()
        assert len(builds) == before + 2
    assert not cuda_cache.write("x", b"") and cuda_cache.read("x") is None


def test_the_folder_numba_s_policy(tmp_path, monkeypatch):
    """Beside the source (in __pycache__), else the user's cache folder, else one of this user's in the temporary
    directory, else none; XOPT_CUDA_CACHE_DIR first."""
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.delenv(cuda_cache.ENV, raising=False)
    monkeypatch.setattr(cuda_cache, "__file__", str(tmp_path / "pkg" / "cuda_cache.py"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    expected = [tmp_path / "pkg" / "__pycache__" / "xopt-cuda", tmp_path / "home-cache" / "xopt-cuda",
                tmp_path / "tmp" / f"xopt-cuda-cache-{os.getuid()}", None]
    for i, folder in enumerate(expected):
        cuda_cache.directory.cache_clear()
        assert cuda_cache.directory() == folder
        if i == 0:
            monkeypatch.setattr(cuda_cache, "__file__", str(blocked / "cuda_cache.py"))
        elif i == 1:
            monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
        elif i == 2:
            assert folder.stat().st_mode & 0o777 == 0o700
            monkeypatch.setattr("tempfile.tempdir", str(blocked))
    monkeypatch.setenv(cuda_cache.ENV, str(tmp_path / "chosen"))
    cuda_cache.directory.cache_clear()
    assert cuda_cache.directory() == tmp_path / "chosen"
    cuda_cache.directory.cache_clear()


def test_the_key_is_every_input_of_the_build(monkeypatch):
    compiler = pytest.importorskip("cupy.cuda.compiler")
    _nvrtc()
    arch = {"value": "-arch=sm_90"}
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc", lambda a=None: (arch["value"], "cubin"))
    base = ("src", ("--fmad=false",), ["f<1>"])
    key = cuda_cache.kernel_key(*base)
    assert cuda_cache.kernel_key(*base) == key
    assert len({key, cuda_cache.kernel_key("src ", *base[1:]), cuda_cache.kernel_key("src", (), base[2]),
                cuda_cache.kernel_key("src", base[1], ["f<2>"])}) == 4
    arch["value"] = "-arch=sm_100"
    assert cuda_cache.kernel_key(*base) != key
    import cupy

    monkeypatch.setattr(cupy, "__version__", "0.0.0")
    arch["value"] = "-arch=sm_90"
    assert cuda_cache.kernel_key(*base) != key
