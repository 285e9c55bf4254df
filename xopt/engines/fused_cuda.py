"""Fused CUDA kernels (CuPy): one launch per step for any number of tensors.

Run on one NVIDIA GPU so far, an H200 (CUDA 13, CuPy 14; ``benchmarks/results/gpu-h200-2026-12-04``), where
``pytest -m gpu`` passed and every rule equalled the reference bit for bit (float64 params with ``clip_grad_norm``
within 4.4e-16).  Elsewhere the kernel source,
``xopt/engines/cuda/optimizers.cu``, is compiled in the tests exactly as :func:`build` compiles it on a GPU
(CuPy's NVRTC, for sm_90; its SASS read for 128-bit accesses and spills, ``tests/test_cuda_build.py``) and run
thread by thread on the CPU through this module's own tables (``tests/test_cuda_source.py``).  VERIFIED below
stays False while one GPU model has run them: ``impl="auto"`` runs these kernels for a (GPU, rule, dtype) only
once :func:`self_check` has found them equal to the reference rule there, bit for bit, on edge shapes (once per
GPU, its verdict kept on disk); ``impl="fused"`` runs them without it.

A step is one launch of ``xopt_step<rule, P, S>`` over a table built on the host for that step and
uploaded in one host-to-device copy: the addresses of every tensor's param, grad and state buffers,
their sizes, which chunk of which tensor each block updates (with whether the tensor is 16-byte
aligned, for 128-bit accesses, and its part), and a row of scalars for each part of the step (a
hyperparameter set at a step count: several parts, from ``overrides=`` or params at different step
counts, share the launch).  The scalars are computed on the host by the optimizer's own
``scalars(step)`` and written in the math type (float32 for half and bfloat16 params, so a small eps
survives).  Nothing is remembered from one step to the next.

The exact-type lane (:mod:`xopt._lane`) calls :func:`kind` and :func:`step`: one compiled call
(:func:`xopt.engines.cuda_memory.gather`) reads every array's own struct, checks what the checked
path checks (exact type, dtype, shape, C order, one GPU, no shared memory) and writes the table,
or the step is declined with nothing written and the checked path (:func:`apply`) takes it.

``clip_grad_norm`` and ``skip_nonfinite`` add one launch before the step, ``xopt_norm`` over the
same table: the norm of the grads in double, left on the GPU with the clip scale, which the step
reads from device memory (no host sync); the caller's grads are read, never copied.  Only
``skip_nonfinite`` reads the norm's check back to the host (a sync), as the checked path does.

Launches on one GPU run in the order of the steps, whatever stream is current: an event is recorded after
each launch, and a step on another stream than the last launch's queues a wait for it first
(:meth:`CupyDevice.ordered <xopt.engines.cuda_device.CupyDevice.ordered>`); the host never waits.
"""

from __future__ import annotations

import functools
import math
import operator
import struct

import numpy as np

from .. import _numba
from .._atomic import together
from . import cuda_reader, cuda_tensors
from .cuda_device import (CHUNK, N_SCALARS, OPTIONS, PTYPES, SOURCE, STATE_TYPES, THREADS, CupyDevice, _scalar_bytes,
                          _sections, block_table, build, case_name, kernel_name, norm_name)
from .cuda_kinds import STATE_RULES, Kind, kind, supports  # noqa: F401  (the engine's interface)
from .kernels import CUDA_RULES

if _numba.usable():
    from . import cuda_memory
else:  # no numba, or its code cannot run here (see xopt._numba): the lane gathers through Python
    cuda_memory = None

__all__ = ["VERIFIED", "SOURCE", "CHUNK", "THREADS", "N_SCALARS", "PTYPES", "STATE_TYPES", "OPTIONS", "case_name",
           "kernel_name", "norm_name",
           "block_table", "build", "supports", "accepts", "takes_type", "AUTO_ALLOWED", "kind", "Kind", "new_state", "step", "step_tensors", "tensor_dtype", "tensor_device",
           "apply", "same_gpu", "compile_all", "device_of"]

VERIFIED = False  # True: no self-check on any GPU; kept False while one GPU model (an H200) has run the GPU tests

DEVICE = CupyDevice  # the tests swap in the CPU build of the same kernel


def compile_all() -> float:
    """Build every kernel instance for the current GPU; returns seconds."""
    import time

    from .cuda_blockwise import RULES8

    t0 = time.perf_counter()
    for dtype, (_, math) in PTYPES.items():
        for rule in CUDA_RULES:
            DEVICE.function(rule, dtype)
        if math == "float":
            for state in STATE_TYPES:
                for rule in STATE_RULES:
                    DEVICE.function(rule, dtype, state)
        DEVICE.norm_function(dtype)
        for rule in RULES8:  # 8-bit state (xopt.engines.cuda_blockwise)
            DEVICE.function8(rule, dtype)
    return time.perf_counter() - t0


CLIPS = True  # apply and step take the clip scale (Entry.clip): the kernel scales each grad in the math type


def device_of(a):
    return DEVICE.device_of(a)


def _is_cupy(x) -> bool:
    return type(x).__module__.startswith("cupy")


def accepts(opt, e) -> bool:
    """CuPy float16/bfloat16/float32/float64 params with CuPy grads (bfloat16: ml_dtypes', as CuPy 14 has it) that
    :func:`grad_fits`; with ``state_dtype="bfloat16"``, params whose math is float32 (not float64)."""
    return _is_cupy(e.p) and _is_cupy(e.g) and not e.rebind and grad_fits(e) and kind(opt, e.p.dtype) is not None


def grad_fits(e) -> bool:
    """Whether the kernel, which reads a grad as the param's type (another dtype's converted to it first), gets
    the reference's numbers from e's grad: any grad of a 32- or 64-bit param (converted to it as the reference
    converts it to the math type), a 16-bit param's of its own dtype only (a float32 grad rounded to 16 bits and
    widened again is not the reference's float32 grad)."""
    return np.dtype(e.p.dtype).itemsize != 2 or e.g.dtype == e.p.dtype


def takes_type(array_type) -> bool:
    """Whether the exact-type lane may hand this engine params of ``array_type`` (exact ``cupy.ndarray``; the
    tests' CPU build of the kernel takes NumPy arrays too)."""
    return DEVICE.takes(array_type)


def _not_yet(device_id, rule, dtype_name) -> bool:
    return False


AUTO_ALLOWED = _not_yet  # (GPU, rule, case_name) -> may impl="auto" run the kernel: set by cuda_check


# -- a step's table ---------------------------------------------------------------------------------
# -- the exact-type lane ------------------------------------------------------------------------------
_HEAD_ONE_PART = struct.Struct("17q")  # a one-part step's head: six list ids, n, the tail, three flags
_NO_PART = np.empty(0, dtype=np.int64)
_ZEROS = (0.0,) * N_SCALARS  # a row's unused scalars


def new_state(view, kind, p):
    """None: a param's first step on the GPU is the checked path's (which makes its state, and under
    ``impl="auto"`` runs the self-check); the lane takes the steps after it."""
    return None


def tensor_dtype(t):
    """The NumPy dtype of the kernel a lane step on torch tensors like ``t`` runs, or None
    (:func:`xopt.engines.cuda_tensors.dtype_of`)."""
    return cuda_tensors.dtype_of(DEVICE, t)


def tensor_device(t) -> int:
    """The GPU of torch tensor ``t``, as the self-check's verdicts name it."""
    return DEVICE.tensor_device(t)


def step_tensors(opt, kind, views, values, ps, gs, states, steps, part, commit):
    """:func:`step` on torch tensors: their addresses and facts read through torch's accessors
    (:func:`xopt.engines.cuda_tensors.gather`: no view of any tensor), the launch queued on torch's current stream
    of their GPU, their version counters bumped with the commit; None: declined, nothing written."""
    found = _slot_lists(kind, views, states)
    if found is None:
        return None
    lists, flags = found
    lists[:2], lists[5] = [ps, gs], steps
    n_parts = len(views)
    got = cuda_tensors.gather(DEVICE, kind, lists, flags, part, _scalar_bytes(n_parts, kind.math))
    if got is None:
        return None
    device_id, n_blocks, table, written = got
    # torch's current stream on the params' GPU, made and entered with that GPU current: CuPy's stream refuses to be
    # entered on another GPU than its own (tensors on cuda:1 while the current GPU is 0: torch.cuda.set_device is
    # not needed to train there).  The launch is queued on it, after torch's work on the tensors.
    with DEVICE.on(device_id):
        try:
            stream = DEVICE.tensor_stream(ps[0])
        except cuda_tensors.REFUSED:
            return None
        with stream:
            return _launch(opt, kind, values, len(ps), n_parts, device_id, n_blocks, table,
                           cuda_tensors.bumping(commit, written))


def _slot_lists(kind, views, states):
    """([None, None, the three slots' buffer lists (None: a slot no part keeps; None items: rows whose part does
    not keep it), None], the kept-slot flags of each part, three a part, one after the other); None where a
    buffer some part keeps is missing (made at the checked path's next step: an option turned on)."""
    lists = [None] * 6
    try:
        if len(views) == 1:
            flags = kind.keeps(views[0].buffers())
            for j, get in enumerate(kind.getters):
                if flags[j]:
                    lists[2 + j] = list(map(get, states))
            return lists, flags
        keeps = [kind.keeps(view.buffers()) for view in views]
        for j, name in enumerate(kind.slots):
            if all(k[j] for k in keeps):
                lists[2 + j] = list(map(kind.getters[j], states))
            elif any(k[j] for k in keeps):
                lists[2 + j] = [st.get(name) for st in states]
    except KeyError:
        return None
    return lists, [flag for k in keeps for flag in k]


def step(opt, kind, views, values, ps, gs, states, steps, part, commit):
    """The whole step in one launch (two with ``clip_grad_norm`` or ``skip_nonfinite``), committed; or None:
    declined, nothing written.

    As :func:`xopt.engines.fused_cpu.step`: ``kind`` from :func:`kind`; ``views`` the hyperparameter set of
    each part of the step and ``values`` its kernel scalars; ``part`` each tensor's part (None: all part 0);
    ``ps``, ``gs``, ``states`` and ``steps`` (their step counts) lists the caller holds; ``commit(norm,
    skipped)`` the calls that count the step, queued with the step's launch in one C-level call
    (``xopt._atomic.together``): ``norm`` the clip norm, a 0-d float64 array on the GPU (None without
    ``clip_grad_norm``), ``skipped`` True where skip_nonfinite skips the step.  Returns True.
    """
    array_type = type(ps[0])
    found = _slot_lists(kind, views, states)
    if found is None:
        return None
    lists, flags = found  # step counts: their types checked with the arrays, values by the caller
    lists[:2], lists[5] = [ps, gs], steps
    n, n_parts, dtype = len(ps), len(views), kind.dtype
    scalar_bytes = _scalar_bytes(n_parts, kind.math)
    off = None if cuda_memory is None else cuda_memory.layout(array_type)
    if off is not None:
        if n_parts == 1:
            head = np.empty(17, dtype=np.int64)
            _HEAD_ONE_PART.pack_into(head, 0, *[id(x) if x is not None else 0 for x in lists], n, *kind.tail,
                                     *flags)
        else:
            head = np.array([id(x) if x is not None else 0 for x in lists]
                            + [n, id(dtype), id(kind.state), dtype.itemsize, kind.state.itemsize, n_parts,
                               scalar_bytes, CHUNK, *flags], dtype=np.int64)
        answer, device_id, n_blocks, table = cuda_memory.gather(off, head, _NO_PART if part is None
                                                                else np.array(part, dtype=np.int64))
    else:
        keeps = [flags[i:i + 3] for i in range(0, len(flags), 3)]
        answer, device_id, n_blocks, table = cuda_reader.gather(DEVICE, array_type, lists, keeps, part, dtype,
                                                                kind.state, scalar_bytes)
    if answer:
        return None
    if device_id < 0:  # arrays without a device field (the CPU build's NumPy arrays): asked one by one
        ids = {*map(DEVICE.device_of, ps), *map(DEVICE.device_of, gs)}
        ids.update(DEVICE.device_of(b) for lst in lists[2:5] if lst is not None for b in lst if b is not None)
        if len(ids) != 1:
            return None
        device_id = ids.pop()
    return _launch(opt, kind, values, n, n_parts, device_id, n_blocks, table, commit)


def _launch(opt, kind, values, n, n_parts, device_id, n_blocks, table, commit):
    """The launches of a step whose table (``n`` tensors, ``n_blocks`` blocks) is written but for the scalars'
    rows, on GPU ``device_id`` and the current stream, committed; None where impl="auto" may not run the kernel
    there yet (its self-check), or where the checked path computes the norm (no blocks)."""
    dtype, math_dtype = kind.dtype, kind.math
    if opt.impl != "fused" and not VERIFIED and not AUTO_ALLOWED(device_id, kind.rule, kind.case):
        return None  # impl="auto" before its self-check on this GPU: the checked path runs it
    clip, skip = opt.clip_grad_norm, opt.skip_nonfinite
    if n_blocks == 0:  # nothing to write; the checked path's norm
        if clip is not None or skip:
            return None
        together(commit(None, False))
        return True
    device = DEVICE
    scalar_bytes = _scalar_bytes(n_parts, math_dtype)
    _, o_blocks, o_scalars, o_count, _ = _sections(n, n_blocks, scalar_bytes)
    if n_parts == 1:
        kind.row.pack_into(table, o_scalars, *values[0], *_ZEROS[len(values[0]):])
    else:
        rows = table[o_scalars:o_scalars + n_parts * N_SCALARS * math_dtype.itemsize].view(math_dtype).reshape(
            n_parts, N_SCALARS)  # zeroed; a view of the table
        rows[:, :len(values[0])] = values  # every part's row as long: one kind
    norm = None
    with device.on(device_id):
        recorded = device.ordered(device_id)  # after xopt's last launch on another stream, if any
        dev = device.upload(table)
        base = device.address(dev)
        tables = (np.uint64(base), np.uint64(base + 40 * n), np.uint64(base + o_blocks), np.int32(n))
        scale, scratch = 0, None
        if clip is not None or skip:
            scratch = device.scratch(24 + 16 * n_blocks)  # norm and check (float64), the clip scale, the sums
            at = device.address(scratch)
            scale = 0 if clip is None else at + 16
            device.launch(device.norm_function(dtype), n_blocks,
                          (*tables, np.uint64(at + 24), np.uint64(base + o_count), np.uint64(at), np.uint64(scale),
                           np.float64(0.0 if clip is None else clip)))
            if clip is not None:
                norm = scratch[:8].view(np.float64).reshape(())
            if skip:
                found, check = device.download(scratch[:16].view(np.float64)).tolist()
                if not (math.isfinite(found) if clip is not None else check == 0.0):
                    together(commit(norm, True))
                    return True
        together([device.launcher(device.function(kind.rule, dtype, kind.low), n_blocks,
                                  (*tables, np.uint64(scale), np.uint64(base + o_scalars))),
                  *recorded,
                  functools.partial(len, (dev, scratch)),  # the table and scratch live until the launch is queued
                  *commit(norm, False)])
    return True


# -- the checked path -----------------------------------------------------------------------------
def same_gpu(device, device_id, e, name, buf):
    """Raise (before any write) where entry ``e``'s state buffer ``name`` is on another GPU than its param: the
    launch runs on the param's GPU, where an address of another GPU's memory is not the buffer (a fault, or another
    allocation's bytes).  The checks before the step compare a grad's GPU with its param's, not the state's (a
    state kept from a run on another GPU, a param moved since)."""
    found = device.device_of(buf)
    if found != device_id:
        from .._inputs import describe

        raise ValueError(f"the state buffer {name!r} of param {describe(e.key)} is on GPU {found} but the param is "
                         f"on GPU {device_id}: move the state to the param's GPU (or load it again)")


def apply(opt, entries) -> list:
    """The writes (calls into C, for ``xopt._atomic.together``) of one launch per (dtype, step, GPU) group;
    non-contiguous params and grads of another dtype via copies, written back."""
    device = DEVICE
    xp = entries[0].xp if entries else None
    groups = {}
    for e in entries:
        groups.setdefault((np.dtype(e.p.dtype), e.state["step"], device.device_of(e.p)), []).append(e)
    names = opt.buffers()
    writes = []
    for (dtype, _, device_id), group in groups.items():
        found = kind(opt, dtype)
        ps, gs, write_back = [], [], []
        with device.on(device_id):
            for e in group:
                p = e.p
                if not p.flags.c_contiguous or device.address(p) % p.itemsize:
                    p = p.copy(order="C")  # C order, aligned: so is the state, below
                    write_back.append(functools.partial(operator.setitem, e.p, Ellipsis, p))
                ps.append(p)
                g = e.g
                if g.dtype != dtype or not g.flags.c_contiguous:
                    g = xp.ascontiguousarray(g, dtype=dtype)
                if device.address(g) % g.itemsize:
                    g = g.copy(order="C")
                gs.append(g)
            states = []
            for e in group:  # each buffer in an array the kernel takes: a copy where it must, put in place with the step
                st = dict(e.state)
                for name in names:
                    buf = e.state[name]
                    same_gpu(device, device_id, e, name, buf)
                    if not buf.flags.c_contiguous or device.address(buf) % buf.itemsize:
                        st[name] = buf.copy(order="C")
                        write_back.insert(0, functools.partial(dict.__setitem__, e.state, name, st[name]))
                states.append(st)
            keep = [name in names for name in found.slots]
            lists = [ps, gs] + [[st[name] for st in states] if k else None for name, k in zip(found.slots, keep)]
            lists += [None] * (5 - len(lists)) + [None]
            scalar_bytes = _scalar_bytes(1, found.math)
            answer, _, n_blocks, table = cuda_reader.gather(device, type(ps[0]), lists, [keep + [False] * (3 - len(keep))],
                                                        None, dtype, found.state, scalar_bytes)
            if answer:
                raise RuntimeError("xopt internal error: the CUDA table refused arrays the checks passed")
            if n_blocks == 0:
                continue
            row = np.zeros(N_SCALARS, dtype=found.math)
            values = found.order(group[0].scalars)
            row[:len(values)] = values
            n = len(ps)
            _, o_blocks, o_scalars, _, _ = _sections(n, n_blocks, scalar_bytes)
            table[o_scalars:o_scalars + row.nbytes] = row.view(np.uint8)
            clip = group[0].clip
            scale = None if clip is None else device.scale(clip, found.math)
            recorded = device.ordered(device_id)
            dev = device.upload(table)
            base = device.address(dev)
            writes += [device.select(device_id), device.launcher(
                device.function(found.rule, dtype, found.low), n_blocks,
                (np.uint64(base), np.uint64(base + 40 * n), np.uint64(base + o_blocks), np.int32(n),
                 np.uint64(0 if scale is None else device.address(scale)), np.uint64(base + o_scalars))),
                *recorded, functools.partial(len, (dev, scale, lists))]  # alive until the launch is queued
        if write_back:
            writes += [device.select(device_id), *write_back]
    if writes:
        writes.append(device.select(device.current_device()))
    return writes
