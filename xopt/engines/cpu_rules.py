"""The fused CPU kernels (numba): each optimizer's reference ``rule`` written as a loop over elements.

Each element rule below is its reference ``rule`` (in ``xopt/optimizers/<name>.py``) as a
loop: same names, same order of operations, scalars from the same ``scalars(step)`` in the
order :mod:`xopt.engines.kernels` gives.  ``tests/test_fused.py`` holds every one to its
reference.  The drivers at the end run them over a step's tensors through addresses that
:func:`xopt.engines.cpu_memory.check_step` checked: on the calling thread (:func:`run_serial`),
or chunk by chunk from several (:func:`claim`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.core import errors
from numba.extending import overload

from .cpu_memory import bf16_load as _bf16_load, bf16_store as _bf16_store, fetch_add, view as _view, yield_cpu

__all__ = ["RULES", "BF16_RULES", "CHUNK", "CLIP_BLOCK", "run_serial", "claim", "claim_squares", "squares", "chunk_rows",
           "sum_of_squares", "all_finite", "wait_done"]

CHUNK = 1 << 15  # elements per unit of work
CLIP_BLOCK = 1 << 11  # with clip_grad_norm, a rule's grads are scaled this many at a time (8 or 16 KiB: in L1)


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



# 10 Schedule-Free AdamW: first, beta2, one_minus_beta2, bias_correction2, eps, weight_decay, ckp1,
# one_minus_ckp1, from_z (lerp from z's end: ckp1 >= 1/2, as torch's lerp), lr, y_step
@njit(cache=True, error_model="numpy")
def _schedule_free(p, g, z, v, _2, s):
    first, beta2, one_minus_beta2, bias_correction2, eps, weight_decay = s[0], s[1], s[2], s[3], s[4], s[5]
    ckp1, one_minus_ckp1, from_z, lr, y_step = s[6], s[7], s[8], s[9], s[10]
    for i in range(p.shape[0]):
        pi, gi = p[i], g[i]
        zi = pi if first != 0.0 else z[i]  # z starts as the param
        vi = beta2 * v[i] + one_minus_beta2 * (gi * gi)
        u = gi / (np.sqrt(vi / bias_correction2) + eps)
        if weight_decay != 0.0:
            u = u + weight_decay * pi
        y = zi - (zi - pi) * one_minus_ckp1 if from_z != 0.0 else pi + ckp1 * (zi - pi)
        p[i] = y + y_step * u
        z[i] = zi - lr * u
        v[i] = vi

# The kernel's ``rule`` indexes this: 0-10 as in xopt/engines/kernels.py, then the bfloat16 form of Adam.
RULES = (_sgd, _momentum, _adagrad, _rmsprop, _adam, _adadelta, _adamax, _nadam, _radam, _lion, _schedule_free,
         _adam_bf16)
ADAM_BF16 = len(RULES) - 1
BF16_RULES = {4: ADAM_BF16}  # rule -> its form with bfloat16 state


# -- drivers: the rules over a step's tensors, through checked addresses ------------------------
# ``ptrs[t]``: the addresses of tensor t's param, grad and three state slots; ``scal[k]``: the scalars of
# part k of the step (one hyperparameter set at one step count), the clip scale last (1.0: none);
# ``part[t]``: tensor t's part (empty: all part 0); ``bits``: an empty uint16 array that types bfloat16 state.
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


def _apply(rule, ptrs, t, a, b, p, g, s, bits):
    """Rule number ``rule`` on elements a:b of tensor t (``p``, ``g`` their views).  Compiled code only, with
    ``rule`` a compile-time constant (see :func:`_elements`): each rule's code is typed and compiled only
    where a step of that rule runs."""
    raise TypeError("xopt.engines.cpu_rules._apply runs in compiled code only")


@overload(_apply, prefer_literal=True, inline="always")
def _apply_rule(rule, ptrs, t, a, b, p, g, s, bits):
    if not isinstance(rule, types.IntegerLiteral):
        raise errors.TypingError("xopt: a kernel's rule must be a compile-time constant (see fused_cpu.compiled)")
    f = RULES[rule.literal_value]
    if rule.literal_value == ADAM_BF16:  # bfloat16 state: its slots viewed as uint16
        def apply_bf16(rule, ptrs, t, a, b, p, g, s, bits):
            f(p, g, _view(ptrs[t, 2], bits, a, b), _view(ptrs[t, 3], bits, a, b), _view(ptrs[t, 4], bits, a, b), s)
        return apply_bf16

    def apply(rule, ptrs, t, a, b, p, g, s, bits):
        f(p, g, _view(ptrs[t, 2], s, a, b), _view(ptrs[t, 3], s, a, b), _view(ptrs[t, 4], s, a, b), s)
    return apply


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _elements(rule, ptrs, t, lo, hi, s, bits, scratch):
    """Elements lo:hi of tensor t.  ``rule`` is a compile-time constant here: the drivers below are
    called from one small compiled entry per rule (``fused_cpu.compiled``) that passes its own rule number,
    so numba compiles each driver once per rule and dtype, with that rule's code alone, when a step of it
    first runs (not every rule at a process's first step).  With a clip scale, the rule gets the grads in
    blocks of ``CLIP_BLOCK``, each times the scale in ``scratch`` (in L1): the caller's grads are only read."""
    clip = s[s.shape[0] - 1]
    block = hi - lo if clip == 1.0 else CLIP_BLOCK
    for a in range(lo, hi, max(block, 1)):
        b = min(a + block, hi)
        p, g = _view(ptrs[t, 0], s, a, b), _view(ptrs[t, 1], s, a, b)
        if clip != 1.0:
            g = _scaled(g, clip, scratch)
        _apply(rule, ptrs, t, a, b, p, g, s, bits)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def run_serial(rule, ptrs, sizes, scal, part, bits):
    """Every tensor of the step, whole, on the calling thread."""
    scratch = _scratch(scal[0])
    for t in range(sizes.shape[0]):
        _elements(rule, ptrs, t, 0, sizes[t], scal[part[t]] if part.shape[0] else scal[0], bits, scratch)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def claim(rule, ptrs, chunks, part, counters, scal, bits):
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
        _elements(rule, ptrs, t, chunks[c, 1], chunks[c, 2], scal[part[t]] if part.shape[0] else scal[0], bits,
                  scratch)
        fetch_add(base + 8, 1)


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
