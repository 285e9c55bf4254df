"""The CUDA kernel of 8-bit state (``state_dtype="8bit"``, format in :mod:`xopt.engines.blockwise`) on CuPy params:
the host side of ``xopt_step8`` in ``xopt/engines/cuda/optimizers.cu``.

Run on one NVIDIA GPU, an H200, where every rule's params, codes and absmax equalled the reference rule's bit for
bit (as the rest of :mod:`xopt.engines.fused_cuda`).  Without a GPU the kernel is compiled for sm_90 in
``tests/test_cuda_build.py`` and run block by block, phase by phase, thread by thread on the CPU
(``tests/test_cuda_8bit.py``), where its params and state equal the reference rule's
(:func:`xopt.engines.blockwise.apply_reference`) bit for bit.  So ``impl="fused"`` runs it; ``impl="auto"`` runs it
on a GPU once the self-check of its case (``cuda_check.self_check(rule, "float32/8bit")``: the rule's
configurations that take 8-bit state, with ``min_8bit_size=1``) has passed there, the reference rule until then
(and where it failed), as for the float kernels.

A CUDA block takes whole quantization blocks of one tensor (``XOPT_CHUNK8 // block_size`` of them): the rule on
each element with its state decoded from the codes, the new state rounded to float32 into shared memory; each
quantization block's largest magnitude (a reduction over its threads' shares, no atomics); the absmax; the
codes.  A ``block_size`` outside ``XOPT_QBLOCK_MIN..XOPT_CHUNK8`` (32..2048) is declined: the reference rule
runs then (``impl="fused"`` raises).  One launch per
(param dtype, GPU) and step, all the 8-bit tensors of one hyperparameter set in it (a part of scalars per step
count), over a table uploaded in one copy: eight address rows (param, grad, the three slots' codes, their
absmax), the sizes, the blocks (tensor, chunk, 0, part) and the rows of scalars.
"""

from __future__ import annotations

import functools
import operator
import re

import numpy as np

from . import blockwise
from .blockwise import SUFFIX, UNSIGNED, map_of
from .cuda_device import N_SCALARS, PTYPES, SOURCE, step8_name
from .kernels import CUDA_RULES, cut, lookup

__all__ = ["CHUNK8", "QBLOCK_MIN", "RULES8", "step8_name", "supports", "takes_block", "accepts", "why_not", "trusted",
           "check_configs", "apply", "chunk_of"]

_TEXT = SOURCE.read_text()
CHUNK8 = int(re.search(r"#define XOPT_CHUNK8 (\d+)", _TEXT).group(1))  # elements per CUDA block at most
QBLOCK_MIN = int(re.search(r"#define XOPT_QBLOCK_MIN (\d+)", _TEXT).group(1))
_FORMATS = tuple(int(re.search(rf"#define XOPT_{name} (-?\d+)", _TEXT).group(1))
                 for name in ("SIGNED_M", "SIGNED_EMIN", "UNSIGNED_M", "UNSIGNED_EMIN"))
if _FORMATS != (*blockwise.SIGNED_FORMAT, *blockwise.UNSIGNED_FORMAT):  # the kernel's maps are the format's
    raise ImportError(f"xopt: the CUDA source's 8-bit maps {_FORMATS} are not blockwise's "
                      f"{(*blockwise.SIGNED_FORMAT, *blockwise.UNSIGNED_FORMAT)}")
N_ROWS = 8  # address rows: param, grad, three slots' codes, their absmax
RULES8 = (0, 1, 2, 3, 4, 9)  # the rules of the optimizers that take state_dtype="8bit" (StateStorage's): SGD,
# Momentum/Nesterov, AdaGrad, RMSprop, Adam/AdamW, Lion (tests/test_cuda_8bit.py holds them equal)


def chunk_of(block: int) -> int:
    """Elements per CUDA block: whole quantization blocks of ``block`` elements."""
    return CHUNK8 // block * block


def takes_block(block) -> bool:
    return QBLOCK_MIN <= block <= CHUNK8


def supports(opt) -> bool:
    """An element rule of the CUDA source (not one that reads whole tensors' norms) and a block_size the kernel
    takes."""
    found = lookup(opt)
    return found is not None and found.rule in CUDA_RULES and not found.norms and takes_block(
        opt._hyper["block_size"])


def _takes(e) -> bool:
    """CuPy float16/bfloat16/float32/float64 params with CuPy grads, not rebound (the tests' CPU build: NumPy); a
    16-bit param's grad of its own dtype (the kernel reads a grad as the param's type: another grad rounded to a
    16-bit type would not be the reference's, which takes it to float32 directly)."""
    from .fused_cuda import _is_cupy

    return _is_cupy(e.p) and _is_cupy(e.g) and not e.rebind and _dtypes_ok(e)


def _dtypes_ok(e) -> bool:
    from .fused_cuda import grad_fits

    return np.dtype(e.p.dtype).name in PTYPES and grad_fits(e)


def accepts(opt, e) -> bool:
    """Entry ``e``'s arrays are the kernel's (:func:`_takes`) and the impl lets it run: ``impl="fused"``, or
    :func:`trusted`."""
    return _takes(e) and (opt.impl == "fused" or trusted(opt, e))


def why_not(opt, e) -> str:
    """Why the kernel declines entry ``e``, as " (...)" for an error message; "" where it does not say."""
    block = opt._hyper["block_size"]
    if not takes_block(block):
        return f" (the CUDA kernel takes block_size {QBLOCK_MIN} to {CHUNK8}, not {block})"
    if not _dtypes_ok(e):
        return (f" (its grad is {np.dtype(e.g.dtype).name}: the CUDA kernel takes a 16-bit param's grad in the "
                "param's dtype)")
    return ""


def trusted(opt, e) -> bool:
    """May ``impl="auto"`` run the kernel for entry ``e``: the kernels verified, or the self-check of the case
    "DTYPE/8bit" (:mod:`xopt.engines.cuda_check`) passed on e's GPU for ``opt``'s rule."""
    from . import cuda_check, fused_cuda

    if fused_cuda.VERIFIED:
        return True
    return cuda_check.trusted_on(opt, fused_cuda.device_of(e.p), fused_cuda.case_name(e.p.dtype, "8bit"))


def check_configs(rule, configs) -> list:
    """The self-check's configurations of ``rule`` (``cuda_check.CONFIGS[rule]``) that take 8-bit state, each with
    ``state_dtype="8bit"`` and ``min_8bit_size=1`` (every tensor but an empty one 8-bit); the others refuse it (SGD
    without momentum, RMSprop centered)."""
    import xopt

    if rule not in RULES8:
        raise ValueError(f"rule {rule} has no kernel with 8bit state")
    found = []
    for name, hyper, *rest in configs:
        hyper = {**hyper, "state_dtype": "8bit", "min_8bit_size": 1}
        try:
            getattr(xopt, name)(**hyper)
        except (TypeError, ValueError):  # not an 8-bit configuration
            continue
        found.append((name, hyper, *rest))
    return found


def _table(n, ptrs, sizes, part, chunk, rows):
    """The launch's table (uint8) and its blocks: addresses (8 x n), sizes, (tensor, chunk, 0, part) per block,
    then the scalars' rows."""
    tensor, piece = cut(sizes, chunk)
    if len(sizes) >= 2**31 or (len(piece) and piece[-1] >= 2**31):
        raise ValueError("too many tensors or chunks for one launch")
    blocks = np.zeros((len(tensor), 4), dtype=np.int32)
    blocks[:, 0], blocks[:, 1], blocks[:, 3] = tensor, piece, np.asarray(part, dtype=np.int64)[tensor]
    o_sizes, o_blocks = 8 * N_ROWS * n, 8 * (N_ROWS + 1) * n
    o_scalars = o_blocks + blocks.nbytes
    table = np.zeros(o_scalars + rows.nbytes, dtype=np.uint8)
    table[:o_sizes] = ptrs.reshape(-1).view(np.uint8)
    table[o_sizes:o_blocks] = np.asarray(sizes, dtype=np.int64).view(np.uint8)
    table[o_blocks:o_scalars] = blocks.reshape(-1).view(np.uint8)
    table[o_scalars:] = rows.reshape(-1).view(np.uint8)
    return len(tensor), table, (o_sizes, o_blocks, o_scalars)


def apply(opt, entries) -> list:
    """The checked path's call: the writes (calls into C) of one launch per (param dtype, GPU) over ``entries``
    (params of at least ``min_8bit_size`` elements, their state made by :func:`xopt.state_8bit.state_for`);
    non-contiguous params and grads of another dtype via copies, written back."""
    from .fused_cuda import DEVICE as device, same_gpu

    block = opt._hyper["block_size"]
    chunk = chunk_of(block)
    kernel = lookup(opt)
    names = opt.buffers()
    slots = [name if name in names else None for name in kernel.slots] + [None] * (3 - len(kernel.slots))
    maps = sum(1 << j for j, name in enumerate(slots) if name is not None and map_of(opt, name) is UNSIGNED)
    xp = entries[0].xp if entries else None
    groups = {}
    for e in entries:
        groups.setdefault((np.dtype(e.p.dtype), device.device_of(e.p)), []).append(e)
    writes = []
    for (dtype, device_id), group in groups.items():
        math = np.dtype(np.float64 if dtype == np.float64 else np.float32)
        keep, write_back, parts = [], [], {}
        n = len(group)
        ptrs = np.zeros((N_ROWS, n), dtype=np.uint64)
        sizes = np.zeros(n, dtype=np.int64)
        part = np.zeros(n, dtype=np.int64)
        with device.on(device_id):
            for i, e in enumerate(group):
                p = e.p
                if not p.flags.c_contiguous or device.address(p) % p.itemsize:
                    p = p.copy(order="C")
                    write_back.append(functools.partial(operator.setitem, e.p, Ellipsis, p))
                g = e.g
                if g.dtype != dtype or not g.flags.c_contiguous:
                    g = xp.ascontiguousarray(g, dtype=dtype)
                if device.address(g) % g.itemsize:
                    g = g.copy(order="C")
                keep += [p, g]
                ptrs[0, i], ptrs[1, i] = device.address(p), device.address(g)
                for j, name in enumerate(slots):
                    if name is not None:
                        codes, absmax = e.state[name], e.state[name + SUFFIX]
                        same_gpu(device, device_id, e, name, codes)  # the kernel reads them on the param's GPU
                        same_gpu(device, device_id, e, name + SUFFIX, absmax)
                        keep += [codes, absmax]
                        ptrs[2 + j, i], ptrs[5 + j, i] = device.address(codes), device.address(absmax)
                sizes[i] = p.size
                part[i] = parts.setdefault(e.state["step"], len(parts))
            firsts = {}
            for e in group:
                firsts.setdefault(e.state["step"], e)
            rows = np.zeros((len(parts), N_SCALARS), dtype=math)
            for step, row in parts.items():
                values = kernel.order(firsts[step].scalars)
                rows[row, :len(values)] = values
            n_blocks, table, (o_sizes, o_blocks, o_scalars) = _table(n, ptrs.view(np.int64), sizes, part, chunk, rows)
            if n_blocks == 0:
                continue
            clip = group[0].clip
            scale = None if clip is None else device.scale(clip, math)
            recorded = device.ordered(device_id)
            dev = device.upload(table)
            base = device.address(dev)
            writes += [device.select(device_id), device.launcher(
                device.function8(kernel.rule, dtype), n_blocks,
                (np.uint64(base), np.uint64(base + o_sizes), np.uint64(base + o_blocks), np.int32(n),
                 np.uint64(0 if scale is None else device.address(scale)), np.uint64(base + o_scalars),
                 np.int32(block), np.int32(maps))),
                *recorded, functools.partial(len, (dev, scale, keep))]  # alive until the launch is queued
        if write_back:
            writes += [device.select(device_id), *write_back]
    if writes:
        writes.append(device.select(device.current_device()))
    return writes
