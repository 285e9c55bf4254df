"""Fused CPU kernels (numba): one pass over memory, one call for any number of tensors.

Each optimizer's element rule below is its reference ``rule`` (in ``xopt/<name>.py``)
written as a loop: same names, same order of operations, scalars from the same
``scalars(step)``.  ``tests/test_fused.py`` holds every one to its reference.

A step is one :class:`Table` run: every tensor of the step cut into chunks of at most
``CHUNK`` elements.  Small steps run on the calling thread; a step of at least
``PARALLEL_MIN`` elements is split over ``get_num_threads()`` threads (the caller and
a pool of idle workers that sleep, never spin, between steps, so they leave the cores
to BLAS between the steps of a training loop).  See :func:`set_num_threads`.

Memory model (how the kernel never touches memory that is not the step's):
    A :class:`Table` holds a strong reference to every param and state buffer it names,
    for its whole life, and the caller holds the grads for the length of :meth:`Table.run` (or
    :meth:`Table.quick`): every object id in the table is a live NumPy array and no id can be
    reused by another.  Addresses are never taken on trust.  Before each run, ``_vouch``
    (compiled) reads each array's own struct (data pointer, dims, flags, dtype) and checks it
    is what the checked path saw when the table was built: each param and state buffer at the
    same address and shape, C-contiguous, aligned, writeable, of the same native float type;
    each grad (an exact ``numpy.ndarray``: a subclass is the general path's to check) of its
    param's shape and type, C-contiguous and aligned, sharing no byte with any param or state
    buffer (which share none with each other: checked at build).  Only then are the vouched
    addresses handed to the kernel, which reads and writes through them alone.  If anything
    differs, nothing is written and ``run`` (or ``quick``) returns False: the plan hands the
    step to the checked path, which explains.  Calls on one optimizer are serialised by its lock.
    :meth:`Table.quick` (a plan's repeated step) adds, in the same compiled call and before
    anything else: the ids it is handed must be those :meth:`Table.watch` expects (ids only
    compared, never read through), and each grad, held by the caller's list, must be an exact
    ``numpy.ndarray`` (its object header's type slot, found on probes at import, is read).

Compiled code is cached on disk (``cache=True``): a second process does not compile again.
"""

from __future__ import annotations

import ctypes
import operator
import struct
import sys
import time

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

from .. import _backend
from .kernels import KERNELS, cut, lookup
from .._threads import get_num_threads, pool as _pool

__all__ = ["KERNELS", "supports", "accepts", "apply", "Table", "CHUNK", "PARALLEL_MIN", "PLAN_DTYPES",
           "device_of", "byte_bounds", "sum_squares", "CLIPS"]

CHUNK = 1 << 15  # elements per unit of work
CLIP_BLOCK = 1 << 11  # with clip_grad_norm, a rule's grads are scaled this many at a time (8 or 16 KiB: in L1)
# Below this many elements a step runs on the calling thread alone.  Measured on this project's 2-core
# EPYC (benchmarks/thread_threshold.py, results/thread-threshold-2026-11-25.json, Adam float32): alone, a
# second thread lost 4-32 % up to 2^20 elements (waking it costs more than it takes) and won from 2^21 on
# (0.53-0.63x the one-thread time); in a loop with a matmul before each step it neither won nor lost (1.01-1.09x
# from 2^19 on: OpenBLAS's threads spin on the other core for a while after a matmul, so a worker gets
# few chunks; see _claim).
PARALLEL_MIN = 1 << 21
# How many threads: xopt.set_num_threads (xopt/_threads.py).


# -- reading NumPy's array struct ------------------------------------------------------
def _read(obj, offset, ctype=ctypes.c_int64):
    return ctype.from_address(id(obj) + offset).value


def _find_struct():
    """Offsets in NumPy's array struct (PyArrayObject_fields) and dtype struct, checked on probes.

    The public layout (data, nd, dimensions, strides, base, descr, flags) is the same in NumPy 1
    and 2; only where it starts depends on the object header, so it is found, then every field
    is checked on arrays whose values are known.  Any mismatch: this engine is not used.
    """
    probes = [np.empty(3), np.empty((2, 5), dtype=np.float32)[:, ::2], np.empty((), dtype=np.float16),
              np.empty(4, dtype=np.dtype(">f8"))]
    probes[0].flags.writeable = False
    for data in range(8, 129, 8):
        if all(_read(a, data) == a.__array_interface__["data"][0] for a in probes):
            break
    else:
        raise ImportError("cannot find the data pointer in NumPy's array struct")
    off = dict(data=data, nd=data + 8, dims=data + 16, strides=data + 24, descr=data + 40, flags=data + 48,
               type_num=28, byteorder=26)
    for a in probes:
        dims, strides = _read(a, off["dims"]), _read(a, off["strides"])
        ok = (_read(a, off["nd"], ctypes.c_int32) == a.ndim
              and [ctypes.c_int64.from_address(dims + 8 * d).value for d in range(a.ndim)] == list(a.shape)
              and [ctypes.c_int64.from_address(strides + 8 * d).value for d in range(a.ndim)] == list(a.strides)
              and _read(a, off["descr"]) == id(a.dtype)
              and _read(a, off["flags"], ctypes.c_int32) == a.flags.num
              and _read(a.dtype, off["type_num"], ctypes.c_int32) == a.dtype.num
              and _read(a.dtype, off["byteorder"], ctypes.c_char) == a.dtype.byteorder.encode())
        if not ok:
            raise ImportError("NumPy's array struct is not laid out as xopt.engines.fused_cpu expects")
    return off


def _find_type_slot():
    """Where an object's header keeps its type (``ob_type``), checked on probes; None if not found (then
    :meth:`Table.quick` is off and every repeated step takes :meth:`Table.run`)."""
    probes = [np.empty(3), 1.5, "x", [], {}, np.float64(1.0)]
    for at in range(8, 33, 8):
        if all(_read(a, at) == id(type(a)) for a in probes):
            return at
    return None


_OFF = _find_struct()
_OB_TYPE = _find_type_slot()
DATA, ND, DIMS, STRIDES = _OFF["data"], _OFF["nd"], _OFF["dims"], _OFF["strides"]
DESCR, FLAGS = _OFF["descr"], _OFF["flags"]
TYPE_NUM, BYTEORDER = _OFF["type_num"], _OFF["byteorder"]
C_CONTIGUOUS, ALIGNED, WRITEABLE = 0x0001, 0x0100, 0x0400
READ_FLAGS = C_CONTIGUOUS | ALIGNED
WRITE_FLAGS = C_CONTIGUOUS | ALIGNED | WRITEABLE
FOREIGN_ORDER = ord(">" if sys.byteorder == "little" else "<")  # the byte-order mark of a swapped dtype
# _vouch reads the first eight; _serial_step the last two: where an object's type is, and NumPy's ndarray type
_OFFSETS = np.array([DATA, ND, DIMS, DESCR, FLAGS, TYPE_NUM, BYTEORDER, FOREIGN_ORDER, _OB_TYPE or 0, id(np.ndarray)],
                    dtype=np.int64)
_BOUNDS_OFFSETS = np.array([DATA, ND, DIMS, STRIDES], dtype=np.int64)


def _loader(bits, signed):
    """An intrinsic: the ``bits``-bit integer stored at an address, widened to int64."""

    @intrinsic
    def load(typingctx, addr):
        sig = types.int64(types.int64)

        def codegen(context, builder, signature, args):
            value = builder.load(builder.inttoptr(args[0], ir.PointerType(ir.IntType(bits))))
            if bits == 64:
                return value
            return (builder.sext if signed else builder.zext)(value, ir.IntType(64))

        return sig, codegen

    return load


_load_i64, _load_i32, _load_i8 = _loader(64, True), _loader(32, True), _loader(8, False)


@intrinsic
def _typed_ptr(typingctx, addr, proto):
    """``addr`` as a pointer to the element type of the array ``proto``."""
    sig = types.CPointer(proto.dtype)(addr, proto)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@intrinsic
def _fetch_add(typingctx, addr, value):
    """Atomically add ``value`` to the int64 at ``addr``; returns what was there."""
    sig = types.int64(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.PointerType(ir.IntType(64)))
        return builder.atomic_rmw("add", ptr, args[1], "seq_cst")

    return sig, codegen


@njit(cache=True, inline="always")
def _view(addr, proto, lo, hi):
    """Elements lo:hi of the contiguous array at the (vouched) address ``addr``."""
    return carray(_typed_ptr(addr, proto), (hi,))[lo:hi]


_NDARRAY = {np.ndarray}


def _is_ndarray(a) -> bool:
    return isinstance(a, np.ndarray)


@njit(cache=True, nogil=True)
def _bounds(off, ids, itemsizes, lo, hi):
    """The byte range [lo, hi) each array in ``ids`` (live NumPy arrays) can reach; lo == hi if empty."""
    data_at, nd_at, dims_at, strides_at = off[0], off[1], off[2], off[3]
    for i in range(ids.shape[0]):
        obj = ids[i]
        first = last = _load_i64(obj + data_at)
        dims, strides = _load_i64(obj + dims_at), _load_i64(obj + strides_at)
        empty = False
        for d in range(_load_i32(obj + nd_at)):
            n, stride = _load_i64(dims + 8 * d), _load_i64(strides + 8 * d)
            if n == 0:
                empty = True
            elif stride > 0:
                last += (n - 1) * stride
            else:
                first += (n - 1) * stride
        lo[i] = first
        hi[i] = first if empty else last + itemsizes[i]


def byte_bounds(arrays):
    """(lo, hi) int64 arrays: the byte range each NumPy array in ``arrays`` can reach (one compiled pass)."""
    if not all(map(_is_ndarray, arrays)):  # the pass reads each object as an array struct
        raise TypeError("byte_bounds takes NumPy arrays only")
    ids = np.fromiter(map(id, arrays), dtype=np.int64, count=len(arrays))
    itemsizes = np.fromiter(map(operator.attrgetter("itemsize"), arrays), dtype=np.int64, count=len(arrays))
    lo, hi = np.empty_like(ids), np.empty_like(ids)
    _bounds(_BOUNDS_OFFSETS, ids, itemsizes, lo, hi)
    return lo, hi


@njit(cache=True, nogil=True)
def _vouch(off, ids, want, type_nums, shapes, shape_at, nbytes, starts, ends, ptrs):
    """0 if every array named in ``ids`` is what the table was built for, else 1 + the first row that is not.

    ``off``: DATA, ND, DIMS, DESCR, FLAGS, TYPE_NUM, BYTEORDER, FOREIGN_ORDER.  Row t holds the ids of
    param, grad and three state buffers (0: a buffer this configuration does not keep); ``want`` their
    data pointers (grad's unused); ``type_nums`` their dtype numbers; ``shapes[shape_at[t]:shape_at[t+1]]``
    the param's shape; ``nbytes[t]`` the grad's byte count; ``starts``/``ends`` the sorted, disjoint
    byte ranges of every param and state buffer.  On success ``ptrs`` holds the vouched addresses
    (an unused slot gets the param's, and is never read).
    """
    data, nd_at, dims_at, descr_at, flags_at, type_num_at, order_at, foreign = (
        off[0], off[1], off[2], off[3], off[4], off[5], off[6], off[7])
    for t in range(ids.shape[0]):
        nd = shape_at[t + 1] - shape_at[t]
        for slot in range(5):
            obj = ids[t, slot]
            if obj == 0:
                ptrs[t, slot] = ptrs[t, 0]
                continue
            address = _load_i64(obj + data)
            if slot != 1 and address != want[t, slot]:
                return t + 1
            need = 0x0101 if slot == 1 else 0x0501  # C-contiguous, aligned (, writeable)
            if _load_i32(obj + flags_at) & need != need:
                return t + 1
            descr = _load_i64(obj + descr_at)
            if _load_i32(descr + type_num_at) != type_nums[t, slot] or _load_i8(descr + order_at) == foreign:
                return t + 1
            if _load_i32(obj + nd_at) != nd:
                return t + 1
            dims = _load_i64(obj + dims_at)
            for d in range(nd):
                if _load_i64(dims + 8 * d) != shapes[shape_at[t] + d]:
                    return t + 1
            ptrs[t, slot] = address
        if nbytes[t] > 0 and starts.shape[0] > 0:  # the grad overlaps no param or state buffer
            lo = ptrs[t, 1]
            j = np.searchsorted(starts, lo + nbytes[t])  # ranges before j start below the grad's end;
            if j > 0 and ends[j - 1] > lo:  # they are disjoint, so only the last of them can reach it
                return t + 1
    return 0


@intrinsic
def _float_from_bits(typingctx, bits):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _bits_from_float(typingctx, x):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(cache=True, inline="always")
def _bf16_load(h):
    """bfloat16 bits -> float32 (exact)."""
    return _float_from_bits(np.uint32(h) << np.uint32(16))


@njit(cache=True, inline="always")
def _bf16_store(x):
    """float32 -> bfloat16 bits, rounded to nearest even as ml_dtypes does; NaN stays NaN."""
    u = np.int64(_bits_from_float(np.float32(x)))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return np.uint16((u >> 16) | 0x40)
    return np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)


@njit(cache=True, error_model="numpy", inline="always")
def _maximum(a, b):
    """max as xp.maximum: NaN if either is NaN (Python's max drops a NaN in b)."""
    return a if (a >= b or a != a) else b


# -- element rules: the reference rules as loops ----------------------------------------
# Arguments: the param, its grad, up to three state buffers (unused ones are never read),
# and the scalars, in the order of the *_scalars functions below; all of one dtype (float16
# params arrive as float32 copies).  Flags arrive as 0.0 / 1.0.

@njit(cache=True, error_model="numpy")
def _sgd(p, g, b, _1, _2, s):
    lr, weight_decay, momentum, b_decay, b_scale, has_b, nesterov = s[0], s[1], s[2], s[3], s[4], s[5], s[6]
    for i in range(p.shape[0]):
        gi = g[i]
        if weight_decay != 0.0:
            gi = gi + weight_decay * p[i]
        if has_b != 0.0:
            bi = b_decay * b[i] + b_scale * gi
            b[i] = bi
            gi = gi + momentum * bi if nesterov != 0.0 else bi
        p[i] = p[i] - lr * gi


@njit(cache=True, error_model="numpy")
def _momentum(p, g, v, _1, _2, s):
    lr, momentum, nesterov = s[0], s[1], s[2]
    for i in range(p.shape[0]):
        vi = momentum * v[i] - lr * g[i]
        v[i] = vi
        if nesterov != 0.0:
            p[i] = p[i] + momentum * vi - lr * g[i]
        else:
            p[i] = p[i] + vi


@njit(cache=True, error_model="numpy")
def _adagrad(p, g, h, _1, _2, s):
    clr, eps, weight_decay = s[0], s[1], s[2]
    for i in range(p.shape[0]):
        gi = g[i]
        if weight_decay != 0.0:
            gi = gi + weight_decay * p[i]
        hi = h[i] + gi * gi
        h[i] = hi
        p[i] = p[i] - clr * gi / (np.sqrt(hi) + eps)


@njit(cache=True, error_model="numpy")
def _rmsprop(p, g, h, g_avg, b, s):
    lr, rho, one_minus_rho, eps, momentum, weight_decay, centered, has_b = (
        s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7])
    for i in range(p.shape[0]):
        gi = g[i]
        if weight_decay != 0.0:
            gi = gi + weight_decay * p[i]
        hi = rho * h[i] + one_minus_rho * gi * gi
        h[i] = hi
        if centered != 0.0:
            ai = g_avg[i] + one_minus_rho * (gi - g_avg[i])
            g_avg[i] = ai
            d = np.sqrt(hi - ai * ai) + eps
        else:
            d = np.sqrt(hi) + eps
        if has_b != 0.0:
            bi = momentum * b[i] + gi / d
            b[i] = bi
            p[i] = p[i] - lr * bi
        else:
            p[i] = p[i] - lr * gi / d


@njit(cache=True, error_model="numpy", inline="always")
def _moments(pi, gi, mi, vi, s):
    """Adam's, NAdam's and RAdam's weight decay (L2 or decoupled), then m and v: s[0], s[1], s[2], s[6], s[7]."""
    one_minus_beta1, beta2, one_minus_beta2, l2, decay = s[0], s[1], s[2], s[6], s[7]
    if l2 != 0.0:
        gi = gi + l2 * pi
    if decay != 1.0:
        pi = pi * decay
    return pi, gi, mi + one_minus_beta1 * (gi - mi), beta2 * vi + one_minus_beta2 * gi * gi


@njit(cache=True, error_model="numpy", inline="always")
def _adam_element(pi, gi, mi, vi, v_max_i, s, amsgrad, divide):
    """``amsgrad`` and ``divide`` are constants at each call below, so each loop is compiled without the test."""
    eps, step_size, sqrt_bc2 = s[3], s[4], s[5]
    pi, gi, mi, vi = _moments(pi, gi, mi, vi, s)
    denom_v = vi
    if amsgrad:
        v_max_i = _maximum(v_max_i, vi)
        denom_v = v_max_i
    root = np.sqrt(denom_v)
    if divide:  # not when sqrt_bc2 is 1.0 (eps_hat=True): x / 1.0 is x, bit for bit, and a division is dear
        root = root / sqrt_bc2
    return pi - step_size * (mi / (root + eps)), mi, vi, v_max_i


@njit(cache=True, error_model="numpy", inline="always")
def _adam_loop(p, g, m, v, v_max, s, amsgrad, divide):
    for i in range(p.shape[0]):
        p[i], m[i], v[i], v_max_i = _adam_element(p[i], g[i], m[i], v[i], v_max[i] if amsgrad else s[8], s,
                                                  amsgrad, divide)
        if amsgrad:
            v_max[i] = v_max_i


@njit(cache=True, error_model="numpy")
def _adam(p, g, m, v, v_max, s):
    # One loop per (amsgrad, divide) rather than tests per element: LLVM vectorizes each (measured: one
    # loop with the amsgrad test inside ran 2^25 float32 elements in 180 ms, these in 28 ms).
    amsgrad, divide = s[8] != 0.0, s[5] != 1.0
    if amsgrad and divide:
        _adam_loop(p, g, m, v, v_max, s, True, True)
    elif amsgrad:
        _adam_loop(p, g, m, v, v_max, s, True, False)
    elif divide:
        _adam_loop(p, g, m, v, v_max, s, False, True)
    else:
        _adam_loop(p, g, m, v, v_max, s, False, False)


@njit(cache=True, error_model="numpy", inline="always")
def _adam_bf16_loop(p, g, m, v, v_max, s, amsgrad, divide):
    for i in range(p.shape[0]):
        p[i], mi, vi, v_max_i = _adam_element(p[i], g[i], _bf16_load(m[i]), _bf16_load(v[i]),
                                              _bf16_load(v_max[i]) if amsgrad else s[8], s, amsgrad, divide)
        m[i], v[i] = _bf16_store(mi), _bf16_store(vi)
        if amsgrad:
            v_max[i] = _bf16_store(v_max_i)


@njit(cache=True, error_model="numpy")
def _adam_bf16(p, g, m, v, v_max, s):
    """Adam with m, v (and v_max) stored as bfloat16 bits: loaded to float32, rounded back on store."""
    amsgrad, divide = s[8] != 0.0, s[5] != 1.0
    if amsgrad and divide:  # one loop each, as in _adam
        _adam_bf16_loop(p, g, m, v, v_max, s, True, True)
    elif amsgrad:
        _adam_bf16_loop(p, g, m, v, v_max, s, True, False)
    elif divide:
        _adam_bf16_loop(p, g, m, v, v_max, s, False, True)
    else:
        _adam_bf16_loop(p, g, m, v, v_max, s, False, False)


@njit(cache=True, error_model="numpy")
def _adadelta(p, g, msg, msdx, _2, s):
    lr, rho, one_minus_rho, eps, weight_decay = s[0], s[1], s[2], s[3], s[4]
    for i in range(p.shape[0]):
        gi = g[i]
        if weight_decay != 0.0:
            gi = gi + weight_decay * p[i]
        msg_i = rho * msg[i] + one_minus_rho * gi * gi
        msg[i] = msg_i
        delta = np.sqrt(msdx[i] + eps) / np.sqrt(msg_i + eps) * gi
        msdx[i] = rho * msdx[i] + one_minus_rho * delta * delta
        p[i] = p[i] - lr * delta


@njit(cache=True, error_model="numpy")
def _adamax(p, g, m, u, _2, s):
    one_minus_beta1, beta2, eps, clr, weight_decay = s[0], s[1], s[2], s[3], s[4]
    for i in range(p.shape[0]):
        gi = g[i]
        if weight_decay != 0.0:
            gi = gi + weight_decay * p[i]
        mi = m[i] + one_minus_beta1 * (gi - m[i])
        ui = _maximum(beta2 * u[i], np.abs(gi) + eps)
        m[i], u[i] = mi, ui
        p[i] = p[i] - clr * (mi / ui)


@njit(cache=True, error_model="numpy")
def _nadam(p, g, m, v, _2, s):
    eps, bias_correction2, g_step, m_step = s[3], s[4], s[5], s[8]
    for i in range(p.shape[0]):
        pi, gi, mi, vi = _moments(p[i], g[i], m[i], v[i], s)
        m[i], v[i] = mi, vi
        d = np.sqrt(vi / bias_correction2) + eps
        p[i] = pi - g_step * (gi / d) - m_step * (mi / d)


@njit(cache=True, error_model="numpy", inline="always")
def _radam_loop(p, g, m, v, s, rectified):
    eps, step_size = s[3], s[4]
    for i in range(p.shape[0]):
        pi, _, mi, vi = _moments(p[i], g[i], m[i], v[i], s)
        m[i], v[i] = mi, vi
        if rectified:
            p[i] = pi - step_size * (mi / (np.sqrt(vi) + eps))
        else:
            p[i] = pi - step_size * mi


@njit(cache=True, error_model="numpy")
def _radam(p, g, m, v, _2, s):
    if s[5] != 0.0:  # one loop each, as in _adam
        _radam_loop(p, g, m, v, s, True)
    else:
        _radam_loop(p, g, m, v, s, False)


@njit(cache=True, error_model="numpy", inline="always")
def _sign(x):
    """xp.sign in x's own type: -1, 0 or 1, NaN for NaN, and +0 for -0 as NumPy (numba's np.sign keeps -0)."""
    sg = np.sign(x)
    return sg if sg != 0.0 else x - x


@njit(cache=True, error_model="numpy", inline="always")
def _lion_loop(p, g, m, s, decayed):
    lr, beta1, one_minus_beta1, one_minus_beta2, beta2, weight_decay = s[0], s[1], s[2], s[3], s[4], s[5]
    for i in range(p.shape[0]):
        gi, mi = g[i], m[i]
        update = _sign(one_minus_beta1 * gi + beta1 * mi)
        if decayed:
            update = update + weight_decay * p[i]
        p[i] = p[i] - lr * update
        m[i] = one_minus_beta2 * gi + beta2 * mi


@njit(cache=True, error_model="numpy")
def _lion(p, g, m, _1, _2, s):
    if s[5] != 0.0:  # one loop each, as in _adam
        _lion_loop(p, g, m, s, True)
    else:
        _lion_loop(p, g, m, s, False)


# The kernel's ``rule`` indexes this: 0-9 as in xopt/engines/kernels.py, then the bfloat16 form of Adam.
RULES = (_sgd, _momentum, _adagrad, _rmsprop, _adam, _adadelta, _adamax, _nadam, _radam, _lion, _adam_bf16)
ADAM_BF16 = len(RULES) - 1
BF16_RULES = {4: ADAM_BF16}  # rule -> its form with bfloat16 state


@njit(cache=True, inline="always")
def _scratch(s):
    """Room for a block of grads times the clip scale (the last of the scalars ``s``; 1.0: none needed)."""
    return np.empty(CLIP_BLOCK if s[s.shape[0] - 1] != 1.0 else 0, dtype=s.dtype)


@njit(cache=True, nogil=True, error_model="numpy")
def _kernel(rule, ptrs, chunks, first, last, s, bits):
    """Chunks ``first:last`` of a table, on the calling thread, through the vouched addresses ``ptrs``."""
    _chunks(rule, ptrs, chunks, first, last, s, bits, _scratch(s))


@njit(cache=True, nogil=True, error_model="numpy")
def _chunks(rule, ptrs, chunks, first, last, s, bits, scratch):
    """:func:`_kernel`'s work, with the scratch block of the calling thread.

    ``bits`` (an empty uint16 array) types the bfloat16 state of rule ADAM_BF16.  One function with
    a rule index rather than one closure per rule: numba caches no closures.  The last of the
    scalars ``s`` is the clip scale (clip_grad_norm; 1.0 when off).  With one, a chunk goes to
    its rule in blocks of ``CLIP_BLOCK`` elements, each with its grads times the scale in
    ``scratch`` (in L1): every rule gets scaled grads, and the caller's are only read.
    """
    clip = s[s.shape[0] - 1]
    for c in range(first, last):
        t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        block = hi - lo if clip == 1.0 else CLIP_BLOCK
        for a in range(lo, hi, max(block, 1)):
            b = min(a + block, hi)
            p, g = _view(ptrs[t, 0], s, a, b), _view(ptrs[t, 1], s, a, b)
            if clip != 1.0:
                g = _scaled(g, clip, scratch)
            if rule == ADAM_BF16:
                _adam_bf16(p, g, _view(ptrs[t, 2], bits, a, b), _view(ptrs[t, 3], bits, a, b),
                           _view(ptrs[t, 4], bits, a, b), s)
                continue
            b0, b1, b2 = _view(ptrs[t, 2], s, a, b), _view(ptrs[t, 3], s, a, b), _view(ptrs[t, 4], s, a, b)
            if rule == 0:
                _sgd(p, g, b0, b1, b2, s)
            elif rule == 1:
                _momentum(p, g, b0, b1, b2, s)
            elif rule == 2:
                _adagrad(p, g, b0, b1, b2, s)
            elif rule == 3:
                _rmsprop(p, g, b0, b1, b2, s)
            elif rule == 4:
                _adam(p, g, b0, b1, b2, s)
            elif rule == 5:
                _adadelta(p, g, b0, b1, b2, s)
            elif rule == 6:
                _adamax(p, g, b0, b1, b2, s)
            elif rule == 7:
                _nadam(p, g, b0, b1, b2, s)
            elif rule == 8:
                _radam(p, g, b0, b1, b2, s)
            else:
                _lion(p, g, b0, b1, b2, s)


@njit(cache=True, inline="always")
def _scaled(g, clip, scratch):
    """g times ``clip``, in ``scratch``."""
    out = scratch[:g.shape[0]]
    for i in range(g.shape[0]):
        out[i] = g[i] * clip
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def _serial_step(rule, off, packed, n, n_dims, n_spans, n_chunks, n_expect, watch, step, s, bits):
    """A whole step on the calling thread in one compiled call: the grads' ids and the scalars taken
    from the tail of ``packed`` (where :meth:`Table.run` or :meth:`Table.quick` wrote them), ``_vouch``,
    then, only if every array is what it was, ``_kernel`` over every chunk.  ``packed`` holds the
    table's int64 arrays end to end (see :meth:`Table.pack`): one argument instead of ten, since a
    small step's cost is mostly calls, and cold ones at that in a training loop
    (``benchmarks/cold_call.py``).  ``s``: the table's scalars array (the param dtype), filled here.

    ``watch`` (from :meth:`Table.quick`): first, the ``n_expect`` ids written after the scalars must
    be those :meth:`Table.watch` expects, the ``n`` step counts after them all ``step``, and every
    grad an exact ``numpy.ndarray`` (its header's type read at ``off[8]``); else -1, nothing written.
    Returns 0 when the step is done, else ``_vouch``'s answer (nothing written)."""
    ids, want, type_nums, ptrs, shape_at, shapes, nbytes, starts, ends, chunks, at = _unpack(
        packed, n, n_dims, n_spans, n_chunks)
    grads = at + n_expect  # the tail: grad ids, scalars (float64 bits), then what quick() watches
    k = s.shape[0]
    if watch:
        seen = grads + n + k
        for i in range(n_expect):
            if packed[seen + i] != packed[at + i]:
                return -1
        for t in range(n):
            if packed[seen + n_expect + t] != step or _load_i64(packed[grads + t] + off[8]) != off[9]:
                return -1
    for t in range(n):
        ids[t, 1] = packed[grads + t]
    values = packed[grads + n:grads + n + k].view(np.float64)
    for i in range(k):
        s[i] = values[i]  # rounded to the param dtype as np.array(..., dtype) rounds
    bad = _vouch(off, ids, want, type_nums, shapes, shape_at, nbytes, starts, ends, ptrs)
    if bad == 0:
        _kernel(rule, ptrs, chunks, 0, n_chunks, s, bits)
    return bad


@njit(cache=True, inline="always")
def _unpack(packed, n, n_dims, n_spans, n_chunks):
    """The views :meth:`Table.pack` laid end to end, in its order, and where they end."""
    at = 0
    ids = packed[at:at + 5 * n].reshape((n, 5))
    at += 5 * n
    want = packed[at:at + 5 * n].reshape((n, 5))
    at += 5 * n
    type_nums = packed[at:at + 5 * n].reshape((n, 5))
    at += 5 * n
    ptrs = packed[at:at + 5 * n].reshape((n, 5))
    at += 5 * n
    shape_at = packed[at:at + n + 1]
    at += n + 1
    shapes = packed[at:at + n_dims]
    at += n_dims
    nbytes = packed[at:at + n]
    at += n
    starts = packed[at:at + n_spans]
    at += n_spans
    ends = packed[at:at + n_spans]
    at += n_spans
    chunks = packed[at:at + 3 * n_chunks].reshape((n_chunks, 3))
    at += 3 * n_chunks
    return ids, want, type_nums, ptrs, shape_at, shapes, nbytes, starts, ends, chunks, at


@njit(cache=True, nogil=True, error_model="numpy")
def _claim(rule, ptrs, chunks, counters, s, bits):
    """Take chunks one at a time (``counters[0]``: the next one) until none is left; ``counters[1]``
    counts those done.  Every thread of a step runs this, so a thread that the OS does not run
    soon (the cores busy with BLAS, or another process) simply takes fewer chunks: a step never
    waits for a thread that has not started, only for chunks already under way."""
    base = counters.ctypes.data
    n = chunks.shape[0]
    scratch = _scratch(s)
    while True:
        c = _fetch_add(base, 1)
        if c >= n:
            return
        _chunks(rule, ptrs, chunks, c, c + 1, s, bits, scratch)
        _fetch_add(base + 8, 1)


@njit(cache=True, nogil=True)
def _claim_squares(ptrs, chunks, counters, proto, sums):
    """:func:`_claim` for the norm's pass (:func:`_squares`)."""
    base = counters.ctypes.data
    n = chunks.shape[0]
    while True:
        c = _fetch_add(base, 1)
        if c >= n:
            return
        _squares(ptrs, chunks, c, c + 1, proto, sums)
        _fetch_add(base + 8, 1)


@njit(cache=True, nogil=True)
def _squares(ptrs, chunks, first, last, proto, sums):
    """``sums[c]``: the sum of squares of chunk c's grad, in float64 (``proto`` types the grads)."""
    for c in range(first, last):
        sums[c] = _sum_of_squares(_view(ptrs[chunks[c, 0], 1], proto, chunks[c, 1], chunks[c, 2]))


@njit(cache=True, nogil=True, fastmath={"reassoc", "nsz", "contract"})
def _sum_of_squares(g):
    """In float64.  Four quarters read side by side: four streams keep more loads in flight than one
    (2^25 float32 on one thread: 16 -> 12 ms); reassociated so LLVM vectorizes (the order is fixed
    for a given chunk)."""
    q = g.shape[0] // 4
    a0 = a1 = a2 = a3 = 0.0
    for i in range(q):
        x0, x1, x2, x3 = np.float64(g[i]), np.float64(g[q + i]), np.float64(g[2 * q + i]), np.float64(g[3 * q + i])
        a0 += x0 * x0
        a1 += x1 * x1
        a2 += x2 * x2
        a3 += x3 * x3
    for i in range(4 * q, g.shape[0]):
        x = np.float64(g[i])
        a0 += x * x
    return (a0 + a1) + (a2 + a3)


@njit(cache=True, nogil=True)
def _done(counters):
    """How many chunks are done (an atomic read)."""
    return _fetch_add(counters.ctypes.data + 8, 0)


# -- what the engine takes ---------------------------------------------------------------
_FLOATS = (np.float16, np.float32, np.float64)
_BITS = np.empty(0, dtype=np.uint16)


def supports(opt) -> bool:
    return lookup(opt) is not None


def _bf16_state(opt) -> bool:
    return opt._hyper.get("state_dtype") == "bfloat16"


def accepts(opt, e) -> bool:
    """NumPy float16/32/64 params whose grads are NumPy arrays (or scalars) too; float16/32 for bfloat16 state."""
    if type(e.p) is not np.ndarray or not isinstance(e.g, (np.ndarray, np.generic)) or e.rebind:
        return False
    if _bf16_state(opt):
        return e.p.dtype in (np.float16, np.float32)
    return e.p.dtype in _FLOATS


# -- tables ------------------------------------------------------------------------------
def chunk_table(sizes) -> np.ndarray:
    """(tensor, lo, hi) rows covering every element, no row longer than CHUNK."""
    tensor, piece = cut(sizes, CHUNK)
    lo = piece * CHUNK
    hi = np.minimum(lo + CHUNK, np.asarray(sizes, dtype=np.int64)[tensor])
    return np.stack([tensor, lo, hi], axis=1) if len(tensor) else np.zeros((0, 3), dtype=np.int64)


def _address(a) -> int:
    return a.__array_interface__["data"][0]




class Table:
    """The arrays of one call: param, grad and three state slots per tensor, and the chunks over them.

    See the module's docstring for the memory model: ``self.arrays`` keeps every param and
    state buffer named in ``self.ids`` alive; ``run`` vouches for them (and the grads) first.
    """

    def __init__(self, opt, ps, states, dtype):
        """``ps``: C-contiguous native params of ``dtype`` (float32/64), ``states`` their state dicts,
        all checked by the general path: no two of these arrays share memory."""
        self.rule, self.scalar_order, slots = lookup(opt)
        if _bf16_state(opt):
            self.rule = BF16_RULES[self.rule]
        kept = opt.buffers()
        self.dtype = np.dtype(dtype)  # of params, grads, scalars (and state, but for bfloat16 bits)
        self.n = n = len(ps)
        self.arrays = []  # every array named below, kept alive for as long as the table lives
        self.ids = np.zeros((n, 5), dtype=np.int64)
        self.want = np.zeros((n, 5), dtype=np.int64)
        self.type_nums = np.zeros((n, 5), dtype=np.int64)
        self.ptrs = np.zeros((n, 5), dtype=np.int64)
        shapes, spans = [], []
        for t, (p, st) in enumerate(zip(ps, states)):
            row = [p, None] + [st[name] if name in kept else None for name in slots]
            row += [None] * (5 - len(row))
            for slot, a in enumerate(row):
                if a is None:
                    continue
                if not isinstance(a, np.ndarray):  # _vouch reads it as an array struct
                    raise RuntimeError("xopt internal error: a table over something that is not a NumPy array")
                self.arrays.append(a)
                self.ids[t, slot], self.want[t, slot], self.type_nums[t, slot] = id(a), _address(a), a.dtype.num
                if a.size:
                    spans.append((self.want[t, slot], self.want[t, slot] + a.nbytes))
            self.type_nums[t, 1] = self.dtype.num
            shapes.append(p.shape)
        self.shape_at = np.zeros(n + 1, dtype=np.int64)
        self.shape_at[1:] = np.cumsum([len(s) for s in shapes])
        self.shapes = np.array([d for s in shapes for d in s], dtype=np.int64)
        sizes = np.array([p.size for p in ps], dtype=np.int64)
        self.nbytes = sizes * self.dtype.itemsize
        spans = np.array(sorted(spans), dtype=np.int64).reshape(-1, 2)
        self.starts, self.ends = np.ascontiguousarray(spans[:, 0]), np.ascontiguousarray(spans[:, 1])
        if np.any(self.starts[1:] < self.ends[:-1]):
            raise RuntimeError("xopt internal error: a table over arrays that share memory")
        self.chunks = chunk_table(sizes)
        self.elements = int(sizes.sum())
        self.expect = np.zeros(0, dtype=np.int64)  # the ids quick() must be handed: none until watch()
        self.pack()

    def pack(self, n_scalars=0):
        """Lay the int64 arrays end to end in one buffer (``_unpack`` cuts it again) and make the named
        ones views of it, so the kernel gets one argument.  Then what :meth:`watch` expects, and a tail
        of ``n`` + ``n_scalars`` slots for a step's grad ids and scalars (float64 bits), written by one
        ``struct.pack_into``, and room for what :meth:`quick` is handed to compare."""
        parts = (self.ids, self.want, self.type_nums, self.ptrs, self.shape_at, self.shapes, self.nbytes,
                 self.starts, self.ends, self.chunks)
        expect = self.expect
        watched = len(expect) + self.n if len(expect) else 0
        tail = np.zeros(self.n + n_scalars + watched, dtype=np.int64)
        self.packed = np.concatenate([np.ascontiguousarray(a, dtype=np.int64).reshape(-1) for a in parts]
                                     + [expect, tail])
        self.s = np.zeros(n_scalars, dtype=self.dtype)  # the kernel's scalars, filled by _serial_step
        self.tail = struct.Struct(f"{self.n}q{n_scalars}d")
        self.quick_tail = struct.Struct(f"{self.n}q{n_scalars}d{watched}q")
        self.tail_at = (self.packed.size - len(tail)) * 8
        views, at = [], 0
        for a in parts:
            views.append(self.packed[at:at + a.size].reshape(a.shape))
            at += a.size
        (self.ids, self.want, self.type_nums, self.ptrs, self.shape_at, self.shapes, self.nbytes,
         self.starts, self.ends, self.chunks) = views
        self.grad_ids = self.ids[:, 1]
        self.counts = (self.n, len(self.shapes), len(self.starts), len(self.chunks), len(expect))

    def run(self, opt, gs, scalars, clip=None) -> bool:
        """One step with grads ``gs``; False (and nothing written) if any array is not what it was."""
        if self._threads() <= 1:  # ids and scalars written at once, vouch and kernel in one compiled call
            if len(gs) != self.n or set(map(type, gs)) != _NDARRAY:
                return False  # see _take
            values = self.scalar_order(opt, scalars) + (1.0 if clip is None else clip,)
            if len(values) != len(self.s):
                self.pack(len(values))
            self.tail.pack_into(self.packed, self.tail_at, *map(id, gs), *values)
            return not _serial_step(self.rule, _OFFSETS, self.packed, *self.counts, False, 0, self.s, _BITS)
        if not self._take(gs):
            return False
        s = self._scalars(opt, scalars, clip)
        if not self._vouched():
            return False
        self._parallel(_kernel, _claim, (self.rule, self.ptrs, self.chunks), (s, _BITS))
        return True

    @property
    def can_watch(self) -> bool:
        """Whether :meth:`quick` can take this table's steps: a step on the calling thread, and a type slot found."""
        return self.elements < PARALLEL_MIN and _OB_TYPE is not None

    def watch(self, expect):
        """Ids (ints) that :meth:`quick` must be handed again, in order, for a step to be taken.

        The caller holds every object named in ``expect`` for as long as it watches, so no id in it
        can come to name another object; the ids are only compared, never read through."""
        self.expect = np.array(expect, dtype=np.int64).reshape(-1)
        self.pack(len(self.s))

    def quick(self, gs, values, step, watched) -> bool:
        """A step in one compiled call that checks, before it writes, what a plan's :meth:`Plan.try_step`
        would: ``watched`` (an iterable of ints) must be what :meth:`watch` expects and then one step
        count per tensor, each equal to ``step``; ``gs`` (a list the caller holds) must be exact
        ``numpy.ndarray`` grads that :func:`_vouch` accepts.  ``values``: the kernel's scalars, clip
        scale last.  False: declined, nothing written."""
        if len(gs) != self.n:
            return False
        if len(values) != len(self.s):
            self.pack(len(values))
        self.quick_tail.pack_into(self.packed, self.tail_at, *map(id, gs), *values, *watched)
        return not _serial_step(self.rule, _OFFSETS, self.packed, *self.counts, True, step, self.s, _BITS)

    def _take(self, gs) -> bool:
        """The grads' ids into the table, if they are as many NumPy arrays as the table has tensors."""
        if len(gs) != self.n or set(map(type, gs)) != _NDARRAY:
            # _vouch reads each grad as an array struct.  A subclass goes to the general path, which refuses
            # some (a masked array: the kernel would read the masked values; np.matrix) and converts the others.
            return False
        self.grad_ids[:] = list(map(id, gs))
        return True

    def _vouched(self) -> bool:
        return not _vouch(_OFFSETS, self.ids, self.want, self.type_nums, self.shapes, self.shape_at, self.nbytes,
                          self.starts, self.ends, self.ptrs)

    def _scalars(self, opt, scalars, clip):
        """The kernel's scalars: the rule's, then the clip scale (1.0: none)."""
        return np.array(self.scalar_order(opt, scalars) + (1.0 if clip is None else clip,), dtype=self.dtype)

    def _threads(self) -> int:
        return min(get_num_threads(), len(self.chunks)) if self.elements >= PARALLEL_MIN else 1

    def vouch(self, gs) -> bool:
        """Whether ``gs`` and the table's arrays are what the table was built for; the kernel's addresses if so."""
        return self._take(gs) and self._vouched()

    def sum_squares(self) -> float:
        """The sum of the squares of the vouched grads, in float64: one more pass, over the same chunks."""
        sums = np.empty(len(self.chunks), dtype=np.float64)
        self._parallel(_squares, _claim_squares, (self.ptrs, self.chunks), (np.empty(0, dtype=self.dtype), sums))
        return float(sums.sum())

    def launch(self, opt, scalars, clip=None):
        """The step through the vouched addresses; ``clip``: the scale of the grads (None: 1)."""
        self._parallel(_kernel, _claim, (self.rule, self.ptrs, self.chunks), (self._scalars(opt, scalars, clip), _BITS))

    def _parallel(self, run, claim, head, tail):
        """``run(*head, first, last, *tail)`` over every chunk, on this thread, or for a large step
        ``claim(*head, counters, *tail)`` on several."""
        n = len(self.chunks)
        threads = self._threads()
        if threads <= 1:
            run(*head, 0, n, *tail)
            return
        # Fresh counters each step: a worker that starts only after its step is over finds no chunk left
        # and touches nothing.  The caller takes chunks too and waits only for chunks under way.
        counters = np.zeros(2, dtype=np.int64)
        pool = _pool(threads)
        for _ in range(threads - 1):
            pool.submit(claim, *head, counters, *tail)
        claim(*head, counters, *tail)
        while _done(counters) < n:
            time.sleep(0)  # a worker is finishing its last chunk


def _kernel_ready(a):
    """A state buffer the kernel can take: C-contiguous, aligned, writeable, native byte order."""
    if type(a) is np.ndarray and a.flags.c_contiguous and a.flags.aligned and a.flags.writeable and a.dtype.isnative:
        return a
    return np.array(a, dtype=a.dtype.newbyteorder("="), order="C")


def apply(opt, entries):
    """One fused call per (dtype, step) group; arrays the kernel can't take directly go through a copy."""
    groups = {}
    for e in entries:
        groups.setdefault((np.dtype(e.p.dtype), e.state["step"]), []).append(e)
    names = opt.buffers()
    for (dtype, _), group in groups.items():
        ps, gs, write_back = [], [], []
        work_dtype = np.dtype(_backend.compute_dtype(np, dtype))  # float16 via float32 copies: numba has none
        for e in group:
            p = e.p
            if p.dtype != work_dtype or not (p.flags.c_contiguous and p.flags.aligned):
                p = np.array(p, dtype=work_dtype, order="C")  # a fresh, aligned copy
                write_back.append((e.p, p))
            ps.append(p)
            g = np.asarray(e.g)
            if g.dtype is not work_dtype or not (g.flags.c_contiguous and g.flags.aligned) or g.shape != p.shape:
                g = np.array(g, dtype=work_dtype, order="C").reshape(p.shape)
            gs.append(g)
        for e in group:
            for name in names:
                e.state[name] = _kernel_ready(e.state[name])
        table = Table(opt, ps, [e.state for e in group], work_dtype)
        if not table.run(opt, gs, group[0].scalars, group[0].clip):
            raise RuntimeError("xopt internal error: the fused CPU kernel refused arrays the checks passed")
        for target, source in write_back:
            target[...] = source


PLAN_DTYPES = ("float32", "float64")  # float16 goes through float32 copies: no plan
CLIPS = True  # apply and Table take the clip scale (Entry.clip) and scale the grads as they read them


def sum_squares(arrays) -> float:
    """The sum of the squares of NumPy arrays, in float64, by chunks of CHUNK as :meth:`Table.sum_squares`."""
    sums = []
    for a in arrays:
        a = np.asarray(a)
        if a.dtype not in (np.float32, np.float64) or not a.dtype.isnative:
            a = a.astype(np.float32 if a.dtype.itemsize <= 4 else np.float64)  # float16: exact in float32
        a = np.ascontiguousarray(a).reshape(-1)
        out = np.empty(-(-a.size // CHUNK), dtype=np.float64)
        _chunk_squares(a, out)
        sums.append(out)
    return float(np.concatenate(sums).sum()) if sums else 0.0


@njit(cache=True, nogil=True)
def _chunk_squares(a, out):
    for c in range(out.shape[0]):
        out[c] = _sum_of_squares(a[c * CHUNK:min((c + 1) * CHUNK, a.shape[0])])


def device_of(a):
    return "cpu"


def compile_all():
    """Compile (or load from the disk cache) every kernel for float32 and float64; returns seconds."""
    import time

    from .. import AdaDelta, Adam, Adamax, AdaGrad, Lion, Momentum, NAdam, RAdam, RMSprop, SGD

    t0 = time.perf_counter()
    for dtype in (np.float32, np.float64):
        for opt in (SGD(momentum=0.9, impl="fused"), Momentum(impl="fused"), AdaGrad(impl="fused"),
                    RMSprop(impl="fused"), Adam(impl="fused"), AdaDelta(impl="fused"), Adamax(impl="fused"),
                    NAdam(impl="fused"), RAdam(impl="fused"), Lion(impl="fused")):
            opt.update({"p": np.ones(4, dtype=dtype)}, {"p": np.ones(4, dtype=dtype)})
    return time.perf_counter() - t0
