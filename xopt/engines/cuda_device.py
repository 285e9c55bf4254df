"""The CUDA kernels' source, how it is built, a step's table, and how the table reaches the GPU.

The kernel source is ``xopt/engines/cuda/optimizers.cu``; its constants (elements per block, threads per
block, scalars per part) are read from it here.  :class:`CupyDevice` is the one place that talks to the GPU
(through CuPy): the tests put the CPU build of the same kernel in its place (``fused_cuda.DEVICE``).
"""

from __future__ import annotations

import functools
import operator
import re
import sys
from pathlib import Path

import numpy as np

from . import cuda_cache
from .kernels import cut

__all__ = ["SOURCE", "CHUNK", "THREADS", "N_SCALARS", "N_SLOTS", "ALIGN", "PTYPES", "STATE_TYPES", "OPTIONS",
           "case_name", "kernel_name", "step8_name", "norm_name", "block_table", "build", "built", "CupyDevice"]

SOURCE = Path(__file__).with_name("cuda") / "optimizers.cu"
_TEXT = SOURCE.read_text()
CHUNK = int(re.search(r"#define XOPT_CHUNK (\d+)", _TEXT).group(1))  # elements per block
THREADS = int(re.search(r"#define XOPT_THREADS (\d+)", _TEXT).group(1))  # threads per block
N_SCALARS = int(re.search(r"#define XOPT_SCALARS (\d+)", _TEXT).group(1))  # a part's row; fewer: zeros after
N_SLOTS = 5  # rows of the address table: param, grad, three state buffers
ALIGN = 16  # bytes: a tensor whose arrays all start on this boundary gets 128-bit loads and stores

# param dtype -> (its C type in the kernel, the C type of the math and the state)
PTYPES = {"float16": ("unsigned short", "float"), "bfloat16": ("xopt_bf16", "float"), "float32": ("float", "float"),
          "float64": ("double", "double")}
# state_dtype -> the state's C type in the kernel, for params whose math is float (Adam's state_dtype="bfloat16")
STATE_TYPES = {"bfloat16": "xopt_bf16"}
# --fmad=false: no a * b + c fused (the reference's rounding).  Not CuPy's RawModule, which adds
# -ftz=true after these (flushing float32 subnormals to zero): NVRTC's default, -ftz=false, keeps them.
OPTIONS = ("--fmad=false",)


def case_name(dtype, state=None) -> str:
    """How the self-check's verdicts name a kernel's case: the params' dtype name, then "/" and the state's where it
    is not the math type ("float32/bfloat16": float32 params, bfloat16 state)."""
    return _name(dtype) if state is None else f"{_name(dtype)}/{state}"


def kernel_name(rule: int, dtype, state=None) -> str:
    """The template instance that runs ``rule`` on params of ``dtype`` (a dtype, its name, or a :func:`case_name`),
    its state in the math type or (``state``, a name in :data:`STATE_TYPES`) in that, or 8-bit (``state="8bit"``:
    :func:`step8_name`)."""
    if isinstance(dtype, str) and "/" in dtype:
        dtype, state = dtype.split("/")
    p, s = PTYPES[_name(dtype)]
    if state is None:
        return f"xopt_step<{rule}, {p}, {s}>"
    if state == "8bit":  # the 8-bit state's kernel (xopt.engines.cuda_blockwise)
        return step8_name(rule, dtype)
    if s != "float":
        raise ValueError(f"no kernel keeps {state} state for {_name(dtype)} params (their math is {s})")
    return f"xopt_step<{rule}, {p}, {s}, {STATE_TYPES[state]}>"


def _name(dtype) -> str:
    """A dtype's name; bfloat16's too, where NumPy does not know it by name (ml_dtypes not imported yet)."""
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def step8_name(rule: int, dtype) -> str:
    """The template instance of the 8-bit state's step (``state_dtype="8bit"``) of ``rule`` on params of ``dtype``."""
    p, s = PTYPES[_name(dtype)]
    return f"xopt_step8<{rule}, {p}, {s}>"


def norm_name(dtype) -> str:
    """The template instance of the norm pass over grads of ``dtype``."""
    p, s = PTYPES[_name(dtype)]
    return f"xopt_norm<{p}, {s}>"


def block_table(sizes, aligned=None, part=None) -> np.ndarray:
    """(tensor, chunk, aligned, part) per block, int32: every element of every tensor in exactly one block."""
    tensor, chunk = cut(sizes, CHUNK)
    if len(sizes) >= 2**31 or (len(chunk) and chunk[-1] >= 2**31):
        raise ValueError("too many tensors or chunks for one launch")
    out = np.zeros((len(tensor), 4), dtype=np.int32)
    out[:, 0], out[:, 1] = tensor, chunk
    if aligned is not None:
        out[:, 2] = np.asarray(aligned, dtype=np.int32)[tensor]
    if part is not None:
        out[:, 3] = np.asarray(part, dtype=np.int32)[tensor]
    return out


def build(names, arch=None, log_stream=None, source=None):
    """Compile the kernel instances ``names`` as xopt does before a launch: (cubin, {name: lowered name}).

    CuPy's NVRTC (``cupy.cuda.compiler.compile_using_nvrtc``) with :data:`OPTIONS`; ``arch=None`` is
    CuPy's own choice for the current GPU (its compute capability, capped at what NVRTC knows).  ``source``:
    the kernel source's text (default: :data:`SOURCE` read now).  Always NVRTC: :func:`built` is the cached build.
    """
    from cupy.cuda import compiler

    source = SOURCE.read_text() if source is None else source
    return compiler.compile_using_nvrtc(source, OPTIONS, arch=arch, name_expressions=tuple(names),
                                        log_stream=log_stream)


def built(names, arch=None):
    """:func:`build`'s answer from the disk cache (:mod:`xopt.engines.cuda_cache`) where a process has built the
    same instances from the same source, options, NVRTC, CuPy and arch before; else :func:`build`'s, kept there."""
    source = SOURCE.read_text()
    return cuda_cache.compiled(source, OPTIONS, names, lambda: build(names, arch, source=source), arch)


class CupyDevice:
    """How a step's table reaches the GPU and is launched; the tests put the CPU build of the kernel in its place."""

    address = staticmethod(operator.attrgetter("data.ptr"))
    device_of = staticmethod(operator.attrgetter("data.device_id"))

    @staticmethod
    def takes(array_type) -> bool:
        """Whether the lane takes params of ``array_type`` here: exact ``cupy.ndarray`` (never imports CuPy)."""
        cupy = sys.modules.get("cupy")
        return cupy is not None and array_type is getattr(cupy, "ndarray", None)

    @staticmethod
    def takes_tensor(t) -> bool:
        """Whether the lane takes torch tensors like ``t`` here: CUDA tensors."""
        return bool(t.is_cuda)

    @staticmethod
    def tensor_device(t) -> int:
        """The CUDA device ordinal of torch tensor ``t`` (CuPy's device id for the same GPU)."""
        return t.device.index

    @staticmethod
    def tensor_devices(ts) -> set:
        """The CUDA device ordinals of torch tensors ``ts`` (-1 for a CPU tensor), as a set."""
        import torch

        return set(map(torch.Tensor.get_device, ts))

    @staticmethod
    def tensor_stream(t):
        """torch's current stream on ``t``'s GPU, as CuPy's (a context that makes it CuPy's current stream)."""
        import cupy
        import torch

        stream = torch.cuda.current_stream(t.device)
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        if from_external is not None and hasattr(stream, "__cuda_stream__"):
            return from_external(stream)
        return cupy.cuda.ExternalStream(stream.cuda_stream, t.device.index)

    @staticmethod
    def current_device():
        import cupy

        return cupy.cuda.Device().id

    @staticmethod
    def identity(device_id) -> str:
        """GPU ``device_id`` as the self-check's verdicts on disk name it: its name, compute capability, UUID (or
        PCI bus id) and the driver's version.  Asks the runtime; loads no module, launches nothing."""
        from cupy.cuda import Device, runtime

        props = runtime.getDeviceProperties(device_id)
        name, uuid = props.get("name", b"?"), props.get("uuid")
        name = name.decode(errors="replace").rstrip("\0") if isinstance(name, bytes) else str(name)
        where = uuid.hex() if isinstance(uuid, bytes) and uuid.strip(b"\0") else runtime.deviceGetPCIBusId(device_id)
        arch = Device(device_id).compute_capability
        return f"{name} sm_{arch} {where} driver {runtime.driverGetVersion()}"

    @staticmethod
    def exclusive(device_id) -> bool:
        """Whether GPU ``device_id`` is in an exclusive compute mode (one process at a time) or prohibited: then no
        other process (the self-check's child) can use it while this one holds it."""
        from cupy.cuda import runtime

        return runtime.getDeviceProperties(device_id).get("computeMode", 0) != 0

    @staticmethod
    def on(device_id):
        """A context in which ``device_id`` is the current GPU."""
        import cupy

        return cupy.cuda.Device(device_id)

    @staticmethod
    def upload(host):
        """``host`` (a NumPy array) on the current GPU: one copy, on the current stream (CuPy stages it through
        page-locked memory, which it keeps until the copy is done)."""
        import cupy

        return cupy.asarray(host)

    @staticmethod
    def scratch(nbytes):
        """``nbytes`` of device memory (uint8), not initialised."""
        import cupy

        return cupy.empty(nbytes, dtype=cupy.uint8)

    @staticmethod
    def download(a):
        import cupy

        return cupy.asnumpy(a)

    @staticmethod
    def scale(clip, dtype):
        """The clip scale (a number, or a 0-d array on the GPU: no host sync) as one element of ``dtype`` there."""
        import cupy

        return cupy.asarray(clip, dtype=dtype).reshape(1)

    @staticmethod
    def function(rule, dtype, state=None):
        import cupy

        return _function(cupy.cuda.Device().id, kernel_name(rule, dtype, state))

    @staticmethod
    def function8(rule, dtype):
        """The 8-bit state's step of ``rule`` on params of ``dtype`` (:mod:`xopt.engines.cuda_blockwise`)."""
        import cupy

        return _function(cupy.cuda.Device().id, step8_name(rule, dtype))

    @staticmethod
    def norm_function(dtype):
        import cupy

        return _function(cupy.cuda.Device().id, norm_name(dtype))

    @staticmethod
    def launch(function, n_blocks, args):
        CupyDevice.launcher(function, n_blocks, args)()

    @staticmethod
    def select(device_id):
        """Making ``device_id`` the current GPU, as a call into C (the runtime's ``cudaSetDevice``)."""
        import cupy

        return functools.partial(cupy.cuda.runtime.setDevice, device_id)

    @staticmethod
    def ordered(device_id) -> list:
        """Order a step's launches on GPU ``device_id`` (the current one) after xopt's last launch there: where
        that ran on another stream, the current stream waits for the event recorded after it (queued on the
        GPU; the host does not wait), so no step rewrites a param, a state buffer or a table that a launch
        still in flight on another stream reads.  Returns the calls into C that record this step's event after
        its launch and remember it, for ``xopt._atomic.together``, after the launcher."""
        import cupy

        stream = cupy.cuda.get_current_stream()
        last = _LAST.get(device_id)
        if last is not None and last[0] != stream.ptr:
            stream.wait_event(last[1])
        event = _EVENTS.get((device_id, stream.ptr))
        if event is None:
            event = _EVENTS[device_id, stream.ptr] = cupy.cuda.Event(disable_timing=True)
        return [functools.partial(event.record, stream),
                functools.partial(_LAST.__setitem__, device_id, (stream.ptr, event))]

    @staticmethod
    def launcher(function, n_blocks, args):
        """The launch as a call into C (CuPy's compiled ``Function.__call__``): for ``xopt._atomic.together``."""
        import cupy

        return functools.partial(function, (n_blocks,), (THREADS,), args, stream=cupy.cuda.get_current_stream())


_LAST = {}  # GPU id -> (the stream of xopt's last launch there, the event recorded after it)
_EVENTS = {}  # (GPU id, stream) -> the event recorded after each launch on that stream (one, recorded again)


@functools.lru_cache(maxsize=None)
def _function(device_id, name):
    """The compiled kernel ``name`` on GPU ``device_id`` (current): loaded on first use in this process, from the
    disk cache or built (:func:`built`)."""
    from cupy.cuda import function

    cubin, lowered = built([name])
    module = function.Module()
    module.load(cubin)
    return module.get_function(lowered[name])



# -- a step's table ---------------------------------------------------------------------------------
def _sections(n, n_blocks, scalar_bytes):
    """Byte offsets in a step's table: sizes, blocks, scalars' rows, the norm pass's count, the end."""
    sizes, blocks = 40 * n, 48 * n
    scalars = blocks + 16 * n_blocks
    count = scalars + scalar_bytes
    return sizes, blocks, scalars, count, count + 8


def _scalar_bytes(n_parts, math_dtype) -> int:
    return -(-n_parts * N_SCALARS * math_dtype.itemsize // 8) * 8


def _table(ptrs, sizes, aligned, part, scalar_bytes):
    """The table :func:`xopt.engines.cuda_memory.gather` writes, from the addresses (5 x n), sizes, aligned flags
    and parts; zeroed scalars' rows and count."""
    n = len(sizes)
    blocks = block_table(sizes, aligned, part)
    table = np.zeros(_sections(n, len(blocks), scalar_bytes)[-1], dtype=np.uint8)
    table[:40 * n] = ptrs.astype(np.int64).reshape(-1).view(np.uint8)
    table[40 * n:48 * n] = sizes.astype(np.int64).view(np.uint8)
    table[48 * n:48 * n + blocks.nbytes] = blocks.reshape(-1).view(np.uint8)
    return len(blocks), table
