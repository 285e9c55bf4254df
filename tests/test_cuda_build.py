"""The CUDA kernels built without a GPU, exactly as xopt builds them on one, and their machine code read.

``fused_cuda.build`` is what runs before a launch: CuPy's NVRTC (``compile_using_nvrtc``) with xopt's
options and CuPy's own ``-arch`` for the GPU.  Here the GPU's part of that choice is fixed to an H100's
(``-arch=sm_90``, a cubin: what CuPy picks for compute capability 9.0 with NVRTC 12.8 or later) and
everything else is CuPy's and xopt's code as it runs.  The cubins are then disassembled (nvdisasm) to
check what the kernel was shaped for: 128-bit global loads and stores, only global-space accesses, no
local memory (spills); and that the PTX has no flush-to-zero.

Needs the test extra's wheels (cupy-cuda13x, nvidia-cuda-nvrtc, nvidia-cuda-nvdisasm, nvidia-cuda-cuobjdump);
skipped, with the reason, where they are missing.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from xopt.engines import cuda_device, fused_cuda
from xopt.engines.kernels import CUDA_RULES

# slow: every instance built by NVRTC and nvcc, and its SASS read (tests/test_cuda_source.py runs the same
# source as C++ by default)
pytestmark = [pytest.mark.cuda_source, pytest.mark.slow]

RULES = list(CUDA_RULES)
DTYPES = ["float16", "bfloat16", "float32", "float64"]
# (rule, param dtype, state_dtype): every rule on every param dtype, and Adam's bfloat16 state where its math is float
INSTANCES = ([(rule, dtype, None) for rule in RULES for dtype in DTYPES]
             + [(rule, dtype, state) for state in fused_cuda.STATE_TYPES for rule in fused_cuda.STATE_RULES
                for dtype in DTYPES if fused_cuda.PTYPES[dtype][1] == "float"])
ARCH = "90"  # an H100


def _tool(name):
    """A CUDA tool from PATH or from an NVIDIA wheel (nvidia/cu*/bin), or None."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        return None
    for root in getattr(nvidia, "__path__", []):
        for candidate in sorted(Path(root).glob(f"cu*/bin/{name}"), reverse=True):
            if os.access(candidate, os.X_OK):
                return str(candidate)
    return None


@pytest.fixture(scope="module")
def compiler(request):
    """cupy.cuda.compiler with NVRTC loaded and the GPU's part of -arch fixed to sm_90."""
    try:
        from cupy.cuda import compiler
    except Exception as exc:  # noqa: BLE001  (not installed, or its CUDA libraries missing)
        pytest.skip(f"CuPy cannot be imported: {exc!r}")
    try:
        compiler._get_nvrtc_version()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"CuPy cannot load NVRTC (the nvidia-cuda-nvrtc wheel): {exc!r}")
    patch = pytest.MonkeyPatch()
    # CuPy's own rule, for a device of compute capability 9.0 (its query of the device is the only part skipped)
    patch.setattr(compiler, "_get_arch_for_options_for_nvrtc", lambda arch=None: (f"-arch=sm_{arch}", "cubin"))
    request.addfinalizer(patch.undo)
    return compiler


@pytest.fixture(scope="module")
def cubins(compiler):
    """{(rule, dtype, state): (cubin, lowered name, NVRTC log)}, each built alone as fused_cuda._function builds it."""
    built = {}
    for rule, dtype, state in INSTANCES:
        name, log = fused_cuda.kernel_name(rule, dtype, state), io.StringIO()
        cubin, lowered = fused_cuda.build([name], arch=ARCH, log_stream=log)
        built[rule, dtype, state] = (cubin, lowered.get(name), log.getvalue())
    return built


def test_every_instance_builds_through_cupys_nvrtc_without_a_warning(cubins):
    assert len(cubins) == len(RULES) * len(DTYPES) + 3
    for (rule, dtype, state), (cubin, lowered, log) in cubins.items():
        name = fused_cuda.kernel_name(rule, dtype, state)
        assert log.strip("\0 \n") == "", f"{name}: NVRTC said {log!r}"
        assert lowered and lowered.startswith("_Z9xopt_step"), f"{name}: no lowered name ({lowered!r})"
        assert cubin[:4] == b"\x7fELF" and lowered.encode() in cubin, f"{name}: not a cubin holding {lowered}"


def test_build_passes_xopt_options_and_not_cupys_flush_to_zero(compiler, monkeypatch):
    """What reaches NVRTC: xopt's options, CuPy's -arch and default execution space, and no -ftz."""
    seen = []
    real = compiler._NVRTCProgram.compile
    monkeypatch.setattr(compiler._NVRTCProgram, "compile",
                        lambda self, options=(), log_stream=None: (seen.append(options), real(self, options,
                                                                                              log_stream))[1])
    fused_cuda.build([fused_cuda.kernel_name(4, "float32")], arch=ARCH)
    (options,) = seen
    assert options[:len(fused_cuda.OPTIONS)] == fused_cuda.OPTIONS and "--fmad=false" in options
    assert f"-arch=sm_{ARCH}" in options
    assert not any(o.startswith("-ftz") or o.startswith("--ftz") for o in options)


def _complete(cubin):
    """The cubin as long as its ELF header says: NVRTC's CUBIN through CuPy can come a byte short at the end
    (the program header table's last, zero, byte), which the driver accepts and nvdisasm does not."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    phoff, = struct.unpack_from("<Q", cubin, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", cubin, 0x36)
    size = max(shoff + shentsize * shnum, phoff + phentsize * phnum)
    assert len(cubin) >= size - 1, "a cubin shorter than its header by more than one byte"
    return cubin + b"\0" * (size - len(cubin))


@pytest.fixture(scope="module")
def sass(cubins, tmp_path_factory):
    """{(rule, dtype, state): the SASS of the instance}, by nvdisasm."""
    nvdisasm = _tool("nvdisasm")
    if nvdisasm is None:
        pytest.skip("no nvdisasm (the nvidia-cuda-nvdisasm wheel) to read the SASS")
    root = tmp_path_factory.mktemp("sass")
    out = {}
    for (rule, dtype, state), (cubin, _, _) in cubins.items():
        path = root / f"xopt_step_{rule}_{dtype}_{state}.cubin"
        path.write_bytes(_complete(cubin))
        out[rule, dtype, state] = subprocess.run([nvdisasm, str(path)], check=True, capture_output=True, text=True).stdout
    return out


def _accesses(text):
    return set(re.findall(r"\b(?:LDG|STG|LDL|STL|LDS|STS|LD|ST)\.[A-Z0-9.]+", text))


@pytest.mark.parametrize("rule, dtype, state", INSTANCES, ids=lambda x: str(x))
def test_sass_has_128_bit_global_accesses_and_no_local_memory(sass, rule, dtype, state):
    text = sass[rule, dtype, state]
    accesses = _accesses(text)
    assert any(re.fullmatch(r"LDG\.E(\.\w+)*\.128", a) for a in accesses), f"no 128-bit load: {sorted(accesses)}"
    assert any(re.fullmatch(r"STG\.E(\.\w+)*\.128", a) for a in accesses), f"no 128-bit store: {sorted(accesses)}"
    generic = {a for a in accesses if a.split(".")[0] in ("LD", "ST")}
    assert not generic, f"generic (not global-space) accesses: {sorted(generic)}"
    local = {a for a in accesses if a.split(".")[0] in ("LDL", "STL")}
    assert not local, f"local memory (register spills): {sorted(local)}"


@pytest.mark.parametrize("rule, dtype, state", [(r, d, None) for r in (3, 4) for d in ("float16", "bfloat16", "float32")]
                         + [(4, "float32", "bfloat16")], ids=str)
def test_sass_issues_every_load_of_a_group_before_its_math(sass, rule, dtype, state):
    """Explicit ILP, RMSprop and Adam: from the first 128-bit load on, every 128-bit load of the group (param,
    grad, the three state slots: 5 for float32, 2 + 3 x 2 for 16-bit params, 2 x 2 + 3 for float32 params with
    bfloat16 state) comes before the first math."""
    lines = sass[rule, dtype, state].splitlines()
    first = next(i for i, line in enumerate(lines) if re.search(r"\bLDG\.E(\.\w+)*\.128\b", line))
    math = next(i for i in range(first, len(lines)) if re.search(r"\b(MUFU|FADD|FMUL|FFMA|FSETP)\b", lines[i]))
    loads = sum(bool(re.search(r"\bLDG\.E(\.\w+)*\.128\b", line)) for line in lines[first:math])
    want = 7 if state else 5 if dtype == "float32" else 8
    assert loads == want, "\n".join(lines[first:math])


def test_nvrtc_keeps_subnormals(compiler, monkeypatch):
    """No flush-to-zero instruction in the PTX of any instance (CuPy's PTX mode of the same build);
    the same count finds CuPy's -ftz=true when it is added, as RawModule would."""
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc", lambda arch=None: (f"-arch=compute_{arch}", "ptx"))
    names = [fused_cuda.kernel_name(rule, dtype, state) for rule, dtype, state in INSTANCES]
    ptx, _ = fused_cuda.build(names, arch=ARCH)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    assert ptx.count(".entry ") == len(INSTANCES) and ".ftz" not in ptx
    monkeypatch.setattr(cuda_device, "OPTIONS", cuda_device.OPTIONS + ("-ftz=true",))
    flushed, _ = fused_cuda.build([fused_cuda.kernel_name(4, "float32")], arch=ARCH)
    assert (flushed.decode() if isinstance(flushed, bytes) else flushed).count(".ftz") > 10


def test_resource_usage_no_stack_no_local(cubins, tmp_path):
    """cuobjdump's count of each instance's registers, stack and local memory (spills would be local)."""
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("no cuobjdump (the nvidia-cuda-cuobjdump wheel)")
    for (rule, dtype, state), (cubin, lowered, _) in cubins.items():
        path = tmp_path / "k.cubin"
        path.write_bytes(_complete(cubin))
        out = subprocess.run([cuobjdump, "-res-usage", str(path)], check=True, capture_output=True, text=True).stdout
        usage = re.search(rf"Function {re.escape(lowered)}:\s*\n\s*(.*)", out)
        assert usage, out
        fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", usage.group(1)))
        assert fields["STACK"] == "0" and fields["LOCAL"] == "0", f"{rule} {dtype}: {usage.group(1)}"
        assert int(fields["REG"]) <= 128, f"{rule} {dtype}: {usage.group(1)}"


def test_nvcc_builds_every_kernel_instance(tmp_path):
    """The same instances built by nvcc with xopt's options for Hopper, every warning an error."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    lines = [f'#include "{fused_cuda.SOURCE}"']
    for rule, dtype, state in INSTANCES:
        name, math = fused_cuda.kernel_name(rule, dtype, state), fused_cuda.PTYPES[dtype][1]
        lines.append(f"template __global__ void {name}(const unsigned long long*, const long long*, "
                     f"const int*, int, const {math}*, const {math}*);")
    for dtype in DTYPES:
        name, math = fused_cuda.norm_name(dtype), fused_cuda.PTYPES[dtype][1]
        lines.append(f"template __global__ void {name}(const unsigned long long*, const long long*, const int*, int, "
                     f"double*, unsigned int*, double*, {math}*, double);")
    src = tmp_path / "instances.cu"
    src.write_text("\n".join(lines) + "\n")
    ptx = tmp_path / "instances.ptx"
    subprocess.run([nvcc, f"-arch=sm_{ARCH}", *fused_cuda.OPTIONS, "-Werror", "all-warnings", "-ptx", str(src),
                    "-o", str(ptx)], check=True, capture_output=True, text=True)
    text = ptx.read_text()
    assert text.count(".entry ") == len(INSTANCES) + len(DTYPES)
    assert "fma." not in text, "--fmad=false should leave no fused multiply-add"
    assert ".ftz" not in text, "subnormals are kept"
    assert "cvt.rn.f16.f32" in text and "cvt.f32.f16" in text  # half params converted in the kernel


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_pass_builds_through_cupys_nvrtc_without_a_warning_or_local_memory(compiler, dtype, tmp_path):
    """The norm pass (clip_grad_norm, skip_nonfinite) of each grad dtype, built as fused_cuda._function builds it."""
    name, log = fused_cuda.norm_name(dtype), io.StringIO()
    cubin, lowered = fused_cuda.build([name], arch=ARCH, log_stream=log)
    assert log.getvalue().strip("\0 \n") == "", f"{name}: NVRTC said {log.getvalue()!r}"
    assert lowered.get(name, "").startswith("_Z9xopt_norm") and cubin[:4] == b"\x7fELF"
    nvdisasm = _tool("nvdisasm")
    if nvdisasm is None:
        pytest.skip("no nvdisasm (the nvidia-cuda-nvdisasm wheel) to read the SASS")
    path = tmp_path / "norm.cubin"
    path.write_bytes(_complete(cubin))
    text = subprocess.run([nvdisasm, str(path)], check=True, capture_output=True, text=True).stdout
    accesses = _accesses(text)
    assert not {a for a in accesses if a.split(".")[0] in ("LDL", "STL")}, f"local memory: {sorted(accesses)}"
    assert "ATOM" in text or "RED" in text, "no atomic count of the blocks done"


@pytest.fixture(scope="module")
def cubins8(compiler):
    """{(rule, dtype): (cubin, lowered name, NVRTC log)} of the 8-bit state's step (xopt.engines.cuda_blockwise)."""
    from xopt.engines import cuda_blockwise

    built = {}
    for rule in cuda_blockwise.RULES8:
        for dtype in DTYPES:
            name, log = cuda_blockwise.step8_name(rule, dtype), io.StringIO()
            cubin, lowered = fused_cuda.build([name], arch=ARCH, log_stream=log)
            built[rule, dtype] = (cubin, lowered.get(name), log.getvalue())
    return built


def test_8bit_instances_build_without_a_warning_local_memory_or_flush_to_zero(compiler, cubins8, tmp_path, monkeypatch):
    """Every 8-bit instance through CuPy's NVRTC: no warning; its SASS global-space accesses only, no local memory,
    the shared scratch (STS/LDS) and the phases' barriers, no atomics; no .ftz and no fused multiply-add in its PTX."""
    from xopt.engines import cuda_blockwise

    nvdisasm = _tool("nvdisasm")
    for (rule, dtype), (cubin, lowered, log) in cubins8.items():
        name = cuda_blockwise.step8_name(rule, dtype)
        assert log.strip("\0 \n") == "", f"{name}: NVRTC said {log!r}"
        assert lowered and lowered.startswith("_Z10xopt_step8"), f"{name}: {lowered!r}"
        if nvdisasm is None:
            continue
        path = tmp_path / "k.cubin"
        path.write_bytes(_complete(cubin))
        text = subprocess.run([nvdisasm, str(path)], check=True, capture_output=True, text=True).stdout
        accesses = _accesses(text)
        assert not {a for a in accesses if a.split(".")[0] in ("LD", "ST", "LDL", "STL")}, f"{name}: {sorted(accesses)}"
        assert re.search(r"\bSTS\b", text) and re.search(r"\bLDS\b", text), f"{name}: no shared scratch"
        assert re.search(r"\bBAR\.SYNC", text) and not re.search(r"\bATOMS?\.", text), f"{name}: barriers, no atomics"
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc", lambda arch=None: (f"-arch=compute_{arch}", "ptx"))
    names = [cuda_blockwise.step8_name(rule, dtype) for rule, dtype in cubins8]
    ptx, _ = fused_cuda.build(names, arch=ARCH)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    assert ptx.count(".entry ") == len(names) and ".ftz" not in ptx and "fma." not in ptx
