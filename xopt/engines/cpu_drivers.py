"""The fused CPU kernel's drivers (numba): the element rules of :mod:`xopt.engines.cpu_rules` over a step's tensors.

They run through addresses that :func:`xopt.engines.cpu_memory.check_step` checked: on the calling thread
(:func:`run_serial`), or chunk by chunk from several (:func:`claim`); and the grads' norm
(``clip_grad_norm``) and finiteness (``skip_nonfinite``) passes.  The drivers are the same code for every
rule: each rule is a C function of its own (:func:`elements`, compiled for a dtype when a step of that rule
first runs), which they call through its address.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic

from .cpu_memory import compiled_only, fetch_add, typed_pointer, view as _view, yield_cpu
from .cpu_rules import ADAM_BF16, RULES

__all__ = ["CHUNK", "CLIP_BLOCK", "ELEMENTS_SIGNATURE", "elements", "run_serial", "run_rows", "claim", "claim_squares", "squares", "chunk_rows", "sum_of_squares",
           "all_finite", "wait_done", "sum_squares"]

CHUNK = 1 << 15  # elements per unit of work
CLIP_BLOCK = 1 << 11  # with clip_grad_norm, a rule's grads are scaled this many at a time (8 or 16 KiB: in L1)


# -- drivers: the rules over a step's tensors, through checked addresses ------------------------
# ``ptrs[t]``: the addresses of tensor t's param, grad and three state slots; ``scal[k]``: the scalars of
# part k of the step (one hyperparameter set at one step count), the clip scale last (1.0: none);
# ``part[t]``: tensor t's part (empty: all part 0); ``function``: the address of a rule's :func:`elements`.
@njit(cache=True, inline="always")
def _scratch(s):
    """Room for a block of grads times the clip scale (the last of the scalars ``s``; 1.0: none needed)."""
    return np.empty(CLIP_BLOCK if s[s.shape[0] - 1] != 1.0 else 0, dtype=s.dtype)


@njit(cache=True, inline="always")
def _scaled(g, clip, scratch):
    """g times ``clip``, in ``scratch``."""
    out = scratch[:g.shape[0]]
    for i in range(g.shape[0]):
        out[i] = g[i] * clip
    return out


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _elements(rule, ptrs, t, lo, hi, s, state, scratch):
    """Elements lo:hi of tensor t by the element rule ``rule`` (a function of :data:`cpu_rules.RULES`: each
    rule's C function, :func:`elements`, passes its own, so numba compiles a rule's code once per dtype, alone,
    when a step of it first runs); ``state`` an empty array of the state buffers' element type (bfloat16 state
    as uint16).  With a clip scale, the rule gets the grads in blocks of ``CLIP_BLOCK``, each times the scale in
    ``scratch`` (in L1): the caller's grads are only read."""
    clip = s[s.shape[0] - 1]
    block = hi - lo if clip == 1.0 else CLIP_BLOCK
    for a in range(lo, hi, max(block, 1)):
        b = min(a + block, hi)
        p, g = _view(ptrs[t, 0], s, a, b), _view(ptrs[t, 1], s, a, b)
        if clip != 1.0:
            g = _scaled(g, clip, scratch)
        rule(p, g, _view(ptrs[t, 2], state, a, b), _view(ptrs[t, 3], state, a, b), _view(ptrs[t, 4], state, a, b), s)


@intrinsic
def _call(typingctx, function, ptrs, t, lo, hi, s, n_s, scratch):
    """Call the C function at address ``function`` (a rule's :func:`elements`) with seven int64 arguments."""
    sig = types.void(*[types.int64] * 8)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        callee = builder.inttoptr(args[0], ir.FunctionType(ir.VoidType(), [i64] * 7).as_pointer())
        builder.call(callee, args[1:])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True, inline="always")
def _run(function, ptrs, t, lo, hi, s, scratch):
    """Elements lo:hi of tensor t by the rule at address ``function``, with the scalars ``s``."""
    _call(function, ptrs.ctypes.data, t, lo, hi, s.ctypes.data, s.shape[0], scratch.ctypes.data)


@njit(cache=True, nogil=True, error_model="numpy")
def run_serial(function, ptrs, sizes, scal, part):
    """Every tensor of the step, whole, on the calling thread, by the rule at address ``function``."""
    run_rows(function, ptrs, sizes, scal, part, _scratch(scal[0]))


@compiled_only(nogil=True, error_model="numpy")
def run_rows(function, ptrs, sizes, scal, part, scratch):
    """:func:`run_serial` with the room for scaled grads given (``_scratch``; empty where the clip scale is 1)."""
    for t in range(sizes.shape[0]):
        _run(function, ptrs, t, 0, sizes[t], scal[part[t]] if part.shape[0] else scal[0], scratch)


@njit(cache=True, nogil=True, error_model="numpy")
def claim(function, ptrs, chunks, part, counters, scal):
    """Take chunks (rows ``tensor, lo, hi``) one at a time (``counters[0]``: the next one) until none is
    left; ``counters[1]`` counts those done.  Every thread of a step runs this, so a thread the OS does
    not run soon (the cores busy with BLAS, or another process) simply takes fewer chunks: a step never
    waits for a thread that has not started, only for chunks already under way."""
    base = counters.ctypes.data
    n = chunks.shape[0]
    scratch = _scratch(scal[0])
    while True:
        c = fetch_add(base, 1)
        if c >= n:
            return
        t = chunks[c, 0]
        _run(function, ptrs, t, chunks[c, 1], chunks[c, 2], scal[part[t]] if part.shape[0] else scal[0], scratch)
        fetch_add(base + 8, 1)


# -- each rule's compiled function: the rule over elements lo:hi of one tensor -------------------
ELEMENTS_SIGNATURE = types.void(*[types.int64] * 7)


def elements(rule, dtype):
    """Rule number ``rule`` over elements lo:hi of one tensor of ``dtype`` params, as a C function
    ``(ptrs, t, lo, hi, s, n_s, scratch)`` of addresses and sizes (``ptrs``: the step's address table,
    ``s``: the ``n_s`` scalars of the tensor's part, ``scratch``: room for ``CLIP_BLOCK`` grads where the
    clip scale is not 1).  The drivers above are the same compiled code for every rule and call a rule's
    function through its address, so a rule costs one compile (and one disk-cache entry) per dtype: its
    own code, optimized once, not again inside each driver.  Not cached by numba: its machine code is kept
    in xopt's own cache (:mod:`xopt.engines.cpu_objects`), which a process loads without starting numba.
    A C function cannot raise: nothing in it does (numpy's
    error model, no bounds checks), so a step it runs is never cut short."""

    function = RULES[rule]
    state = np.uint16 if rule == ADAM_BF16 else dtype  # bfloat16 state: its slots viewed as uint16

    @cfunc(ELEMENTS_SIGNATURE, error_model="numpy")
    def rule_elements(ptrs_at, t, lo, hi, s_at, n_s, scratch_at):
        ptrs = carray(typed_pointer(ptrs_at, np.int64), (t + 1, 5))
        s = carray(typed_pointer(s_at, dtype), (n_s,))
        scratch = carray(typed_pointer(scratch_at, dtype), (CLIP_BLOCK if s[n_s - 1] != 1.0 else 0,))
        _elements(function, ptrs, t, lo, hi, s, carray(typed_pointer(0, state), (0,)), scratch)

    return rule_elements


@njit(cache=True, nogil=True)
def wait_done(counters, n):
    """Until ``n`` chunks are done (``counters[1]``): the last ones, under way on workers, are a chunk each."""
    base = counters.ctypes.data + 8
    while fetch_add(base, 0) < n:
        yield_cpu()


# -- the norm of the grads (clip_grad_norm) and their finiteness (skip_nonfinite) ------------------
@njit(cache=True, nogil=True, fastmath={"reassoc", "nsz", "contract"})
def sum_of_squares(g):
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
def squares(ptrs, chunks, first, last, proto, sums):
    """``sums[c]``: the sum of squares of chunk c's grad, in float64 (``proto`` types the grads)."""
    for c in range(first, last):
        sums[c] = sum_of_squares(_view(ptrs[chunks[c, 0], 1], proto, chunks[c, 1], chunks[c, 2]))


@njit(cache=True, nogil=True)
def claim_squares(ptrs, chunks, counters, proto, sums):
    """:func:`claim` for the norm's pass (:func:`squares`)."""
    base = counters.ctypes.data
    n = chunks.shape[0]
    while True:
        c = fetch_add(base, 1)
        if c >= n:
            return
        squares(ptrs, chunks, c, c + 1, proto, sums)
        fetch_add(base + 8, 1)


@njit(cache=True, nogil=True)
def all_finite(ptrs, sizes, proto):
    """Whether every grad of the step is finite (no NaN, no Inf)."""
    for t in range(sizes.shape[0]):
        g = _view(ptrs[t, 1], proto, 0, sizes[t])
        for i in range(g.shape[0]):
            if not np.isfinite(g[i]):
                return False
    return True


@njit(cache=True, nogil=True)
def chunk_rows(sizes, chunk):
    """(tensor, lo, hi) rows covering every element of tensors of ``sizes``, no row longer than ``chunk``."""
    n = 0
    for t in range(sizes.shape[0]):
        n += (sizes[t] + chunk - 1) // chunk
    rows = np.empty((n, 3), dtype=np.int64)
    r = 0
    for t in range(sizes.shape[0]):
        for lo in range(0, sizes[t], chunk):
            rows[r, 0], rows[r, 1], rows[r, 2] = t, lo, min(lo + chunk, sizes[t])
            r += 1
    return rows


@njit(cache=True, nogil=True)
def _chunk_squares(a, out):
    for c in range(out.shape[0]):
        out[c] = sum_of_squares(a[c * CHUNK:min((c + 1) * CHUNK, a.shape[0])])


def sum_squares(arrays) -> float:
    """The sum of the squares of NumPy arrays, in float64: per chunk of CHUNK elements, the chunks'
    sums then added by NumPy in order, as a step's own pass over its grads adds them."""
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
