"""Fused CUDA kernels (CuPy): one launch per step for any number of tensors.

UNVERIFIED ON A GPU: the kernel source, ``xopt/engines/cuda/optimizers.cu``, is compiled by
``nvcc`` and run thread by thread on the CPU in the tests (``tests/test_cuda_source.py``,
through this module's own tables), but it has not yet run on an NVIDIA GPU.  Until
``tests/test_fused_gpu.py`` has passed on one, with the GPU benchmark committed under
``benchmarks/results/`` and VERIFIED below set to True, ``impl="auto"`` keeps CuPy
arrays on the array-API reference rule; ``impl="fused"`` runs these kernels.

A step is one launch of ``xopt_step<rule, P, S>`` over a :class:`Table`: the addresses
of every tensor's param, grad and state buffers, their sizes, and which chunk of which
tensor each block updates.  The table is built on the host and uploaded once; while
the arrays stay the same (see :mod:`xopt._plan`) a step uploads only the grads'
addresses and launches.  Scalars are computed on the host by the optimizer's own
``scalars(step)`` and passed by value in the math type (float32 for half params, so a
small eps survives).
"""

from __future__ import annotations

import functools
import operator
import re
from pathlib import Path

import numpy as np

from .. import _backend
from .kernels import KERNELS, cut, lookup

__all__ = ["VERIFIED", "SOURCE", "CHUNK", "THREADS", "PTYPES", "kernel_name", "block_table", "Table",
           "supports", "accepts", "apply", "compile_all", "PLAN_DTYPES", "device_of"]

VERIFIED = False  # set True only with a committed GPU test and benchmark run of these kernels

SOURCE = Path(__file__).with_name("cuda") / "optimizers.cu"
CHUNK = int(re.search(r"#define XOPT_CHUNK (\d+)", SOURCE.read_text()).group(1))  # elements per block
THREADS = 256  # threads per block
N_SCALARS = 9  # the kernel's s0..s8; a rule that needs fewer gets zeros
N_SLOTS = 5  # rows of the address table: param, grad, three state buffers

# param dtype -> (its C type in the kernel, the C type of the math and the state)
PTYPES = {"float16": ("unsigned short", "float"), "float32": ("float", "float"), "float64": ("double", "double")}
OPTIONS = ("--fmad=false",)  # no a * b + c fused: the reference's rounding


def kernel_name(rule: int, dtype) -> str:
    """The template instance that runs ``rule`` on params of ``dtype``."""
    p, s = PTYPES[np.dtype(dtype).name]
    return f"xopt_step<{rule}, {p}, {s}>"


def block_table(sizes) -> np.ndarray:
    """(tensor, chunk) per block, int32: every element of every tensor in exactly one block."""
    tensor, chunk = cut(sizes, CHUNK)
    if len(sizes) >= 2**31 or (len(chunk) and chunk[-1] >= 2**31):
        raise ValueError("too many tensors or chunks for one launch")
    return np.stack([tensor, chunk], axis=1).astype(np.int32).reshape(-1, 2)


class CupyDevice:
    """How a :class:`Table` reaches the GPU; the tests put the CPU build of the kernel in its place."""

    address = staticmethod(operator.attrgetter("data.ptr"))
    device_of = staticmethod(operator.attrgetter("data.device_id"))

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
    def set_row(table, row, host):
        table[row].set(host)

    @staticmethod
    def function(rule, dtype):
        return _function(kernel_name(rule, dtype))

    @staticmethod
    def launch(function, n_blocks, args):
        function((n_blocks,), (THREADS,), args)


DEVICE = CupyDevice  # the tests swap in the CPU build of the same kernel


@functools.lru_cache(maxsize=None)
def _function(name):
    """The compiled kernel ``name``: built on first use, cached by CuPy in memory and on disk."""
    import cupy

    module = cupy.RawModule(code=SOURCE.read_text(), options=OPTIONS, name_expressions=(name,))
    return module.get_function(name)


def compile_all() -> float:
    """Build (or load from CuPy's disk cache) every kernel instance; returns seconds."""
    import time

    t0 = time.perf_counter()
    for rule in sorted({r for r, _, _ in KERNELS.values()}):
        for dtype in PTYPES:
            _function(kernel_name(rule, dtype))
    return time.perf_counter() - t0


_shape_of = operator.attrgetter("dtype", "shape", "strides")


class Table:
    """The arrays of one launch: addresses (param, grad, buffers) per tensor, sizes, blocks.

    Memory model: the table holds every param and state buffer whose address it uploads
    (``self.arrays``), so none is freed while it may be written; the caller holds the grads
    through :meth:`run`.  Before a launch, :meth:`run` checks on the host that each of them is
    still at the address, with the dtype, shape and strides, it was built with, and that no
    grad shares a byte with a param or a buffer; else it launches nothing and returns False.
    """

    def __init__(self, opt, ps, states, dtype):
        """``ps``: contiguous params of ``dtype``, all on one GPU, sharing no memory (checked by the caller)."""
        rule, self.scalar_order, slots = lookup(opt)
        kept = opt.buffers()
        device = DEVICE
        self.device, self.n = device, len(ps)
        self.device_id = device.device_of(ps[0]) if ps else None
        self.math = np.dtype(_backend.compute_dtype(np, np.dtype(dtype)))
        addresses = np.empty((N_SLOTS, self.n), dtype=np.uint64)
        self.arrays, spans = [], []
        for t, (p, st) in enumerate(zip(ps, states)):
            # A slot this configuration does not keep points at p and is never read.
            buffers = [st[name] for name in slots if name in kept]
            row = [p, p] + buffers + [p] * (N_SLOTS - 2 - len(buffers))
            addresses[:, t] = [device.address(a) for a in row]
            for a in [p] + buffers:
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
        blocks = block_table(sizes)
        self.n_blocks = len(blocks)
        with device.on(self.device_id):
            self.addresses, self.sizes, self.blocks = (device.upload(addresses), device.upload(sizes),
                                                       device.upload(blocks))
        self.function = device.function(rule, dtype)

    def _layouts(self, arrays):
        return list(zip(map(_shape_of, arrays), map(self.device.address, arrays), map(self.device.device_of, arrays)))

    def run(self, opt, gs, scalars) -> bool:
        """One launch: the grads' addresses in, scalars by value; False (nothing launched) if an array moved."""
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
            self.device.set_row(self.addresses, 1, grads)
            self.device.launch(self.function, self.n_blocks,
                               (self.addresses, self.sizes, self.blocks, np.int32(self.n), *values))
        return True


PLAN_DTYPES = tuple(PTYPES)  # half too: the kernel converts, no copies


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
            table = Table(opt, ps, [e.state for e in group], dtype)
            if not table.run(opt, gs, group[0].scalars):
                raise RuntimeError("xopt internal error: the CUDA table refused arrays the checks passed")
            for target, source in write_back:
                target[...] = source
