"""Fused CUDA kernels (CuPy): one launch per step for any number of tensors.

Not yet run on an NVIDIA GPU: the kernel source, ``xopt/engines/cuda/optimizers.cu``, is compiled
in the tests exactly as :func:`build` compiles it on a GPU (CuPy's NVRTC, for sm_90; its SASS read
for 128-bit accesses and spills, ``tests/test_cuda_build.py``) and run thread by thread on the CPU
through this module's own tables (``tests/test_cuda_source.py``).  Until ``tests/test_fused_gpu.py``
has passed on a GPU and VERIFIED below is set to True, ``impl="auto"`` runs these kernels for a
(GPU, rule, dtype) only once :func:`self_check` has found them equal to the reference rule there,
bit for bit, on edge shapes; ``impl="fused"`` runs them without it.

A step is one launch of ``xopt_step<rule, P, S>`` over a :class:`Table`: the addresses
of every tensor's param, grad and state buffers, their sizes, and which chunk of which
tensor each block updates.  The table is built on the host and uploaded once; while
the arrays stay the same (see :mod:`xopt._plan`) a step uploads the grads' addresses only when
they changed, and launches on CuPy's current stream.  Scalars are computed on the host by the
optimizer's own ``scalars(step)`` and passed by value in the math type (float32 for half params,
so a small eps survives).  The clip scale of ``clip_grad_norm`` stays on the GPU (computed there
from the norm, no host sync): the kernel reads it from device memory and multiplies each grad by
it in the math type, as the reference rule does; the caller's grads are read, never copied.
"""

from __future__ import annotations

import ctypes
import functools
import operator
import re
from pathlib import Path

import numpy as np

from .. import _backend
from .kernels import KERNELS, cut, lookup

__all__ = ["VERIFIED", "SOURCE", "CHUNK", "THREADS", "PTYPES", "OPTIONS", "kernel_name", "block_table", "build",
           "Table", "supports", "accepts", "apply", "compile_all", "PLAN_DTYPES", "device_of", "self_check",
           "SelfCheck", "SelfCheckWarning", "trusted", "CLIPS"]

VERIFIED = False  # set True only with a committed GPU test and benchmark run of these kernels

SOURCE = Path(__file__).with_name("cuda") / "optimizers.cu"
CHUNK = int(re.search(r"#define XOPT_CHUNK (\d+)", SOURCE.read_text()).group(1))  # elements per block
THREADS = 256  # threads per block
N_SCALARS = 9  # the kernel's s0..s8; a rule that needs fewer gets zeros
N_SLOTS = 5  # rows of the address table: param, grad, three state buffers
ALIGN = 16  # bytes: a tensor whose arrays all start on this boundary gets 128-bit loads and stores

# param dtype -> (its C type in the kernel, the C type of the math and the state)
PTYPES = {"float16": ("unsigned short", "float"), "float32": ("float", "float"), "float64": ("double", "double")}
# --fmad=false: no a * b + c fused (the reference's rounding).  Not CuPy's RawModule, which adds
# -ftz=true after these (flushing float32 subnormals to zero): NVRTC's default, -ftz=false, keeps them.
OPTIONS = ("--fmad=false",)


def kernel_name(rule: int, dtype) -> str:
    """The template instance that runs ``rule`` on params of ``dtype``."""
    p, s = PTYPES[np.dtype(dtype).name]
    return f"xopt_step<{rule}, {p}, {s}>"


def block_table(sizes, aligned=None) -> np.ndarray:
    """(tensor, chunk, aligned) per block, int32: every element of every tensor in exactly one block."""
    tensor, chunk = cut(sizes, CHUNK)
    if len(sizes) >= 2**31 or (len(chunk) and chunk[-1] >= 2**31):
        raise ValueError("too many tensors or chunks for one launch")
    flag = np.zeros(len(tensor), dtype=np.int64) if aligned is None else np.asarray(aligned, dtype=np.int64)[tensor]
    return np.stack([tensor, chunk, flag], axis=1).astype(np.int32).reshape(-1, 3)


def build(names, arch=None, log_stream=None):
    """Compile the kernel instances ``names`` as xopt does before a launch: (cubin, {name: lowered name}).

    CuPy's NVRTC (``cupy.cuda.compiler.compile_using_nvrtc``) with :data:`OPTIONS`; ``arch=None`` is
    CuPy's own choice for the current GPU (its compute capability, capped at what NVRTC knows).
    """
    from cupy.cuda import compiler

    return compiler.compile_using_nvrtc(SOURCE.read_text(), OPTIONS, arch=arch, name_expressions=tuple(names),
                                        log_stream=log_stream)


class _PinnedRow:
    """Writes one row of a device table from page-locked host memory, on the current stream.

    Two staging buffers, each rewritten only once the copy that last read it is done (an event
    each), so a step waits for the GPU only when it runs two address changes ahead of it.
    """

    def __init__(self, table, row):
        import cupy

        self.dst = table[row]
        self.memory = [cupy.cuda.alloc_pinned_memory(max(self.dst.nbytes, 1)) for _ in range(2)]
        self.host = [np.frombuffer(m, self.dst.dtype, self.dst.size) for m in self.memory]
        self.copied = [None, None]
        self.turn = 0

    def __call__(self, values):
        import cupy

        k, self.turn = self.turn, 1 - self.turn
        if self.copied[k] is not None:
            self.copied[k].synchronize()
        self.host[k][...] = values
        stream = cupy.cuda.get_current_stream()
        self.dst.data.copy_from_host_async(self.host[k].ctypes.data_as(ctypes.c_void_p), self.dst.nbytes, stream)
        self.copied[k] = stream.record()

    def __del__(self):  # the staging memory goes back to CuPy's pool: not while a copy may still read it
        for event in self.copied:
            if event is not None:
                event.synchronize()


class CupyDevice:
    """How a :class:`Table` reaches the GPU; the tests put the CPU build of the kernel in its place."""

    address = staticmethod(operator.attrgetter("data.ptr"))
    device_of = staticmethod(operator.attrgetter("data.device_id"))

    @staticmethod
    def current_device():
        import cupy

        return cupy.cuda.Device().id

    @staticmethod
    def on(device_id):
        """A context in which ``device_id`` is the current GPU."""
        import cupy

        return cupy.cuda.Device(device_id)

    @staticmethod
    def upload(host):
        import cupy

        return cupy.asarray(host)

    @staticmethod
    def download(a):
        import cupy

        return cupy.asnumpy(a)

    row_writer = _PinnedRow

    @staticmethod
    def scale(clip, dtype):
        """The clip scale (a number, or a 0-d array on the GPU: no host sync) as one element of ``dtype`` there."""
        import cupy

        return cupy.asarray(clip, dtype=dtype).reshape(1)

    @staticmethod
    def function(rule, dtype):
        import cupy

        return _function(cupy.cuda.Device().id, kernel_name(rule, dtype))

    @staticmethod
    def launch(function, n_blocks, args):
        import cupy

        function((n_blocks,), (THREADS,), args, stream=cupy.cuda.get_current_stream())


DEVICE = CupyDevice  # the tests swap in the CPU build of the same kernel


@functools.lru_cache(maxsize=None)
def _function(device_id, name):
    """The compiled kernel ``name`` on GPU ``device_id`` (current): built on first use in this process."""
    from cupy.cuda import function

    cubin, lowered = build([name])
    module = function.Module()
    module.load(cubin)
    return module.get_function(lowered[name])


def compile_all() -> float:
    """Build every kernel instance for the current GPU; returns seconds."""
    import time

    t0 = time.perf_counter()
    for rule in sorted({r for r, _, _ in KERNELS.values()}):
        for dtype in PTYPES:
            DEVICE.function(rule, dtype)
    return time.perf_counter() - t0


_shape_of = operator.attrgetter("dtype", "shape", "strides")


class Table:
    """The arrays of one launch: addresses (param, grad, buffers) per tensor, sizes, blocks.

    Each state buffer has its slot (the rule's, from :data:`~xopt.engines.kernels.KERNELS`); a
    slot the configuration does not keep holds 0 and its bit in ``live`` is clear, so the kernel
    never reads it.  A tensor whose param and buffers all start on a 16-byte boundary is flagged
    in the block table for 128-bit accesses (the kernel checks the grad's address itself).

    Memory model: the table holds every param and state buffer whose address it uploads
    (``self.arrays``), so none is freed while it may be written; the caller holds the grads
    through :meth:`run`.  Before a launch, :meth:`run` checks on the host that each of them is
    still at the address, with the dtype, shape and strides, it was built with, that every grad is
    of the params' type and shares no byte with a param or a buffer; else it launches nothing and
    returns False.
    """

    def __init__(self, opt, ps, states, dtype, gs=None):
        """``ps``: contiguous params of ``dtype``, all on one GPU, sharing no memory (checked by the caller);
        ``gs``: the grads of the first :meth:`run`, if known, uploaded with the table."""
        rule, self.scalar_order, slots = lookup(opt)
        kept = opt.buffers()
        device = DEVICE
        self.device, self.n = device, len(ps)
        self.array_type = type(ps[0]) if ps else None  # the grads' type too (a NumPy grad has no device address)
        self.device_id = device.device_of(ps[0]) if ps else None
        self.math = np.dtype(_backend.compute_dtype(np, np.dtype(dtype)))
        self.live = np.int32(sum(1 << k for k, name in enumerate(slots) if name in kept))
        addresses = np.zeros((N_SLOTS, self.n), dtype=np.uint64)
        aligned = np.ones(self.n, dtype=bool)
        self.arrays, spans = [], []
        for t, (p, st) in enumerate(zip(ps, states)):
            row = [p] + [st[name] if name in kept else None for name in slots]
            for slot, a in zip([0, *range(2, 2 + len(slots))], row):
                if a is None:
                    continue
                addresses[slot, t] = device.address(a)
                aligned[t] &= device.address(a) % ALIGN == 0
                self.arrays.append(a)
                if a.size:
                    spans.append((device.address(a), device.address(a) + a.nbytes))
        self.layouts = self._layouts(self.arrays)
        self.grad_layouts = [_shape_of(p) for p in ps]
        spans = np.array(sorted(spans), dtype=np.int64).reshape(-1, 2)
        self.starts, self.ends = spans[:, 0].copy(), spans[:, 1].copy()
        if np.any(self.starts[1:] < self.ends[:-1]):
            raise RuntimeError("xopt internal error: a table over arrays that share memory")
        sizes = np.array([p.size for p in ps], dtype=np.int64)
        self.grad_bytes = sizes * np.dtype(dtype).itemsize
        blocks = block_table(sizes, aligned)
        self.n_blocks = len(blocks)
        self.grads = None  # the grads' addresses in the device table, once there
        if gs is not None:
            self.grads = addresses[1] = np.fromiter(map(device.address, gs), np.uint64, self.n)
        self._writer = None
        with device.on(self.device_id):
            self.addresses, self.sizes, self.blocks = (device.upload(addresses), device.upload(sizes),
                                                       device.upload(blocks))
            self.function = device.function(rule, dtype) if self.n_blocks else None

    def _layouts(self, arrays):
        return list(zip(map(_shape_of, arrays), map(self.device.address, arrays), map(self.device.device_of, arrays)))

    def run(self, opt, gs, scalars, clip=None) -> bool:
        """One launch: the grads' addresses in (if changed), scalars by value, the clip scale (clip_grad_norm; None:
        off) in device memory; False (nothing launched) if an array moved or a grad is not of the params' array type."""
        if set(map(type, gs)) - {self.array_type}:
            return False
        if self._layouts(self.arrays) != self.layouts or list(map(_shape_of, gs)) != self.grad_layouts:
            return False
        if {self.device.device_of(g) for g in gs} - {self.device_id}:
            return False
        grads = np.fromiter(map(self.device.address, gs), np.uint64, self.n)
        if len(self.starts):
            lo = grads.astype(np.int64)
            j = np.searchsorted(self.starts, lo + self.grad_bytes)
            if np.any((self.grad_bytes > 0) & (j > 0) & (self.ends[np.maximum(j - 1, 0)] > lo)):
                return False
        if self.n_blocks == 0:
            return True
        values = [self.math.type(v) for v in self.scalar_order(opt, scalars)]
        values += [self.math.type(0)] * (N_SCALARS - len(values))
        with self.device.on(self.device_id):
            scale = None if clip is None else self.device.scale(clip, self.math)  # held until the launch is queued
            if self.grads is None or not np.array_equal(grads, self.grads):
                if self._writer is None:
                    self._writer = self.device.row_writer(self.addresses, 1)
                self._writer(grads)
                self.grads = grads
            self.device.launch(self.function, self.n_blocks,
                               (self.addresses, self.sizes, self.blocks, np.int32(self.n), self.live,
                                np.uint64(0 if scale is None else self.device.address(scale)), *values))
        return True


PLAN_DTYPES = tuple(PTYPES)  # half too: the kernel converts, no copies
CLIPS = True  # apply and Table take the clip scale (Entry.clip): the kernel scales each grad in the math type


def device_of(a):
    return DEVICE.device_of(a)


def supports(opt) -> bool:
    return lookup(opt) is not None and opt._hyper.get("state_dtype") is None


def _is_cupy(x) -> bool:
    return type(x).__module__.startswith("cupy")


def accepts(opt, e) -> bool:
    """CuPy float16/32/64 params with CuPy grads."""
    return _is_cupy(e.p) and _is_cupy(e.g) and not e.rebind and np.dtype(e.p.dtype).name in PTYPES


def apply(opt, entries):
    """One launch per (dtype, step, GPU) group; non-contiguous params and grads of another dtype via copies."""
    device = DEVICE
    xp = entries[0].xp if entries else None
    groups = {}
    for e in entries:
        groups.setdefault((np.dtype(e.p.dtype), e.state["step"], device.device_of(e.p)), []).append(e)
    for (dtype, _, device_id), group in groups.items():
        with device.on(device_id):
            ps, gs, write_back = [], [], []
            for e in group:
                p = e.p
                if not p.flags.c_contiguous:
                    p = xp.ascontiguousarray(p)  # C order: so is the state, below
                    write_back.append((e.p, p))
                ps.append(p)
                g = e.g
                if g.dtype != dtype or not g.flags.c_contiguous:
                    g = xp.ascontiguousarray(g, dtype=dtype)
                gs.append(g)
                for name in opt.buffers():
                    if not e.state[name].flags.c_contiguous:
                        e.state[name] = e.state[name].copy(order="C")
            table = Table(opt, ps, [e.state for e in group], dtype, gs)
            if not table.run(opt, gs, group[0].scalars, group[0].clip):
                raise RuntimeError("xopt internal error: the CUDA table refused arrays the checks passed")
            for target, source in write_back:
                target[...] = source


from .cuda_check import SelfCheck, SelfCheckWarning, self_check, trusted  # noqa: E402  (it reads this module)
