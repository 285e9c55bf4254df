"""Fused CPU kernels (numba): one pass over memory, both cores, one call for any number of tensors.

Each optimizer's element rule below is its reference ``rule`` (in ``xopt/<name>.py``)
written as a loop: same names, same order of operations, scalars from the same
``scalars(step)``.  ``tests/test_fused.py`` holds every one to its reference.

Many tensors take one call: the kernel gets a table of array *objects* (their
``id``), reads each one's data pointer itself (the ``data`` field of NumPy's
array struct, found once at import), and walks a table of chunks spread over
the cores with ``prange``.  So a step with 2,000 small tensors costs one call,
and the user's arrays are neither copied nor moved.

Compiled code is cached on disk (``cache=True``): a second process does not
compile again.
"""

from __future__ import annotations

import ctypes
import operator
import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from . import _backend
from ._kernel_table import KERNELS, cut

__all__ = ["KERNELS", "supports", "accepts", "apply", "Table", "CHUNK", "PLAN_DTYPES", "layout", "writable",
           "device_of"]

CHUNK = 1 << 15  # elements per unit of parallel work


# -- pointers ------------------------------------------------------------------------
def _find_data_offset() -> int:
    """Where NumPy keeps an array's data pointer inside the array object (16 on CPython 64-bit)."""
    probes = [np.empty(3), np.empty((2, 2), dtype=np.float32)]
    for offset in range(8, 129, 8):
        if all(ctypes.c_int64.from_address(id(a) + offset).value == a.ctypes.data for a in probes):
            return offset
    raise ImportError("cannot find the data pointer in NumPy's array struct")


DATA_OFFSET = _find_data_offset()


@intrinsic
def _load_i64(typingctx, addr):
    """The int64 stored at address ``addr``."""
    sig = types.int64(types.int64)

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.int64)))
        return builder.load(ptr)

    return sig, codegen


@intrinsic
def _typed_ptr(typingctx, addr, proto):
    """``addr`` as a pointer to the element type of the array ``proto``."""
    sig = types.CPointer(proto.dtype)(addr, proto)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@njit(cache=True)
def _view(obj_id, offset, proto, lo, hi):
    """Elements lo:hi of the contiguous array whose object is ``obj_id``."""
    return carray(_typed_ptr(_load_i64(obj_id + offset), proto), (hi,))[lo:hi]


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
def _adam_element(pi, gi, mi, vi, v_max_i, s):
    one_minus_beta1, beta2, one_minus_beta2, eps, step_size, sqrt_bc2, l2, decay, amsgrad = (
        s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8])
    if l2 != 0.0:
        gi = gi + l2 * pi
    if decay != 1.0:
        pi = pi * decay
    mi = mi + one_minus_beta1 * (gi - mi)
    vi = beta2 * vi + one_minus_beta2 * gi * gi
    denom_v = vi
    if amsgrad != 0.0:
        v_max_i = max(v_max_i, vi)
        denom_v = v_max_i
    return pi - step_size * (mi / (np.sqrt(denom_v) / sqrt_bc2 + eps)), mi, vi, v_max_i


@njit(cache=True, error_model="numpy")
def _adam(p, g, m, v, v_max, s):
    # Two loops rather than a test of amsgrad per element: LLVM vectorizes each (measured: one
    # loop with the test inside ran 2^25 float32 elements in 180 ms, these in 28 ms).
    if s[8] != 0.0:
        for i in range(p.shape[0]):
            p[i], m[i], v[i], v_max[i] = _adam_element(p[i], g[i], m[i], v[i], v_max[i], s)
    else:
        for i in range(p.shape[0]):
            p[i], m[i], v[i], _ = _adam_element(p[i], g[i], m[i], v[i], s[8], s)


@njit(cache=True, error_model="numpy")
def _adam_bf16(p, g, m, v, v_max, s):
    """Adam with m, v (and v_max) stored as bfloat16 bits: loaded to float32, rounded back on store."""
    if s[8] != 0.0:  # two loops, as in _adam
        for i in range(p.shape[0]):
            p[i], mi, vi, v_max_i = _adam_element(p[i], g[i], _bf16_load(m[i]), _bf16_load(v[i]),
                                                  _bf16_load(v_max[i]), s)
            m[i], v[i], v_max[i] = _bf16_store(mi), _bf16_store(vi), _bf16_store(v_max_i)
    else:
        for i in range(p.shape[0]):
            p[i], mi, vi, _ = _adam_element(p[i], g[i], _bf16_load(m[i]), _bf16_load(v[i]), s[8], s)
            m[i], v[i] = _bf16_store(mi), _bf16_store(vi)


RULES = (_sgd, _momentum, _adagrad, _rmsprop, _adam, _adam_bf16)  # the kernel's ``rule`` indexes this
BF16_RULES = {4: 5}  # rule -> its form with bfloat16 state


@njit(parallel=True, cache=True, error_model="numpy")
def _kernel(rule, ids, chunks, offset, s, bits):
    """One parallel call over a table of tensors, cut into chunks of at most CHUNK elements.

    ``bits`` (an empty uint16 array) types the bfloat16 state of rule 5.  One function with
    a rule index rather than one closure per rule: numba caches no closures.
    """
    for c in prange(chunks.shape[0]):
        t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p, g = _view(ids[t, 0], offset, s, lo, hi), _view(ids[t, 1], offset, s, lo, hi)
        if rule == 5:
            _adam_bf16(p, g, _view(ids[t, 2], offset, bits, lo, hi), _view(ids[t, 3], offset, bits, lo, hi),
                       _view(ids[t, 4], offset, bits, lo, hi), s)
            continue
        b0, b1, b2 = _view(ids[t, 2], offset, s, lo, hi), _view(ids[t, 3], offset, s, lo, hi), \
            _view(ids[t, 4], offset, s, lo, hi)
        if rule == 0:
            _sgd(p, g, b0, b1, b2, s)
        elif rule == 1:
            _momentum(p, g, b0, b1, b2, s)
        elif rule == 2:
            _adagrad(p, g, b0, b1, b2, s)
        elif rule == 3:
            _rmsprop(p, g, b0, b1, b2, s)
        else:
            _adam(p, g, b0, b1, b2, s)


_FLOATS = (np.float16, np.float32, np.float64)
_BITS = np.empty(0, dtype=np.uint16)


def supports(opt) -> bool:
    return type(opt).__name__ in KERNELS


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


class Table:
    """The arrays of one call: ids of (p, g, buffer0..2) per tensor, and the chunks over them."""

    def __init__(self, opt, ps, states, dtype):
        self.rule, self.scalar_order, slots = KERNELS[type(opt).__name__]
        if _bf16_state(opt):
            self.rule = BF16_RULES[self.rule]
        self.dtype = dtype  # of params, grads, state and scalars alike: float32 or float64
        self.ids = np.empty((len(ps), 5), dtype=np.int64)
        for row, (p, st) in enumerate(zip(ps, states)):
            # A slot whose buffer this configuration does not keep points at p: never read.
            self.ids[row] = [id(p), id(p)] + [id(st.get(name, p)) for name in slots] + [id(p)] * (3 - len(slots))
        self.chunks = chunk_table([p.size for p in ps])

    def run(self, opt, gs, scalars):
        self.ids[:, 1] = np.fromiter(map(id, gs), dtype=np.int64, count=len(gs))
        s = np.array(self.scalar_order(opt, scalars), dtype=self.dtype)
        _kernel(self.rule, self.ids, self.chunks, DATA_OFFSET, s, _BITS)


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
            if p.dtype != work_dtype or not p.flags.c_contiguous:
                p = np.ascontiguousarray(p, dtype=work_dtype)
                write_back.append((e.p, p))
            ps.append(p)
            gs.append(np.ascontiguousarray(e.g, dtype=work_dtype))
        for e in group:
            _contiguous_state(e.state, names)
        table = Table(opt, ps, [e.state for e in group], work_dtype)
        table.run(opt, gs, group[0].scalars)
        for target, source in write_back:
            target[...] = source


def _contiguous_state(state, names):
    for name in names:
        if not state[name].flags.c_contiguous:
            state[name] = np.ascontiguousarray(state[name])


PLAN_DTYPES = ("float32", "float64")  # float16 goes through float32 copies: no plan
layout = operator.attrgetter("dtype", "shape", "strides")
writable = operator.attrgetter("flags.writeable")


def device_of(a):
    return "cpu"


def compile_all():
    """Compile (or load from the disk cache) every kernel for float32 and float64; returns seconds."""
    import time

    from . import Adam, AdaGrad, Momentum, RMSprop, SGD

    t0 = time.perf_counter()
    for dtype in (np.float32, np.float64):
        for opt in (SGD(momentum=0.9, impl="fused"), Momentum(impl="fused"), AdaGrad(impl="fused"),
                    RMSprop(impl="fused"), Adam(impl="fused")):
            opt.update({"p": np.ones(4, dtype=dtype)}, {"p": np.ones(4, dtype=dtype)})
    return time.perf_counter() - t0

