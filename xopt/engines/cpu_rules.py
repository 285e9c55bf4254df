"""The fused CPU kernels (numba): each optimizer's reference ``rule`` written as a loop over elements.

Each element rule below is its reference ``rule`` (in ``xopt/optimizers/<name>.py``) as a
loop: same names, same order of operations, scalars from the same ``scalars(step)`` in the
order :mod:`xopt.engines.kernels` gives.  ``tests/test_fused.py`` holds every one to its
reference.  :mod:`xopt.engines.cpu_drivers` runs them over a step's tensors.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .cpu_memory import compiled_only

__all__ = ["RULES", "ELEMENTS", "BF16_RULES", "ADAM_BF16", "bf16_load", "bf16_store"]


# -- bfloat16 bits ---------------------------------------------------------------------------
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
def bf16_load(h):
    """bfloat16 bits -> float32 (exact)."""
    return _float_from_bits(np.uint32(h) << np.uint32(16))


@njit(cache=True, inline="always")
def bf16_store(x):
    """float32 -> bfloat16 bits, rounded to nearest even as ml_dtypes does; NaN stays NaN."""
    u = np.int64(_bits_from_float(np.float32(x)))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return np.uint16((u >> 16) | 0x40)
    return np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)


@compiled_only(error_model="numpy")
def _maximum(a, b):
    """max as xp.maximum: NaN if either is NaN (Python's max drops a NaN in b)."""
    return a if (a >= b or a != a) else b


# -- element rules: the reference rules as loops ----------------------------------------
# Arguments: the param, its grad, up to three state buffers (unused ones are never read),
# and the scalars, in the order of the *_scalars functions below; all of one dtype (float16
# params arrive as float32 copies).  Flags arrive as 0.0 / 1.0.

@compiled_only(error_model="numpy")
def _sgd_element(pi, gi, bi, x1, x2, s, has_b, _flag):
    lr, weight_decay, momentum, b_decay, b_scale, nesterov = s[0], s[1], s[2], s[3], s[4], s[6]
    if weight_decay != 0.0:
        gi = gi + weight_decay * pi
    if has_b:
        bi = b_decay * bi + b_scale * gi
        gi = gi + momentum * bi if nesterov != 0.0 else bi
    return pi - lr * gi, bi, x1, x2


@njit(cache=True, inline="always")
def _sgd_flags(s):
    return s[5] != 0.0, False


@njit(cache=True, error_model="numpy", inline="always")
def _sgd_loop(p, g, b, s, has_b):
    for i in range(p.shape[0]):
        p[i], bi, _1, _2 = _sgd_element(p[i], g[i], b[i] if has_b else s[0], s[0], s[0], s, has_b, False)
        if has_b:
            b[i] = bi


@compiled_only(error_model="numpy")
def _sgd(p, g, b, _1, _2, s):
    # one loop each, as in _adam: a store under a test in the loop (b[i]) keeps LLVM from vectorizing it
    if _sgd_flags(s)[0]:
        _sgd_loop(p, g, b, s, True)
    else:
        _sgd_loop(p, g, b, s, False)


@compiled_only(error_model="numpy")
def _momentum_element(pi, gi, vi, x1, x2, s, _flag0, _flag1):
    lr, momentum, nesterov = s[0], s[1], s[2]
    vi = momentum * vi - lr * gi
    if nesterov != 0.0:
        return pi + momentum * vi - lr * gi, vi, x1, x2
    return pi + vi, vi, x1, x2


@compiled_only(error_model="numpy")
def _momentum(p, g, v, _1, _2, s):
    for i in range(p.shape[0]):
        p[i], v[i], _x1, _x2 = _momentum_element(p[i], g[i], v[i], s[0], s[0], s, False, False)


@compiled_only(error_model="numpy")
def _adagrad_element(pi, gi, hi, x1, x2, s, _flag0, _flag1):
    clr, eps, weight_decay = s[0], s[1], s[2]
    if weight_decay != 0.0:
        gi = gi + weight_decay * pi
    hi = hi + gi * gi
    return pi - clr * gi / (np.sqrt(hi) + eps), hi, x1, x2


@compiled_only(error_model="numpy")
def _adagrad(p, g, h, _1, _2, s):
    for i in range(p.shape[0]):
        p[i], h[i], _x1, _x2 = _adagrad_element(p[i], g[i], h[i], s[0], s[0], s, False, False)


@njit(cache=True, inline="always")
def _no_flags(s):
    return False, False


@compiled_only(error_model="numpy")
def _rmsprop_element(pi, gi, hi, ai, bi, s, centered, has_b):
    lr, rho, one_minus_rho, eps, momentum, weight_decay = s[0], s[1], s[2], s[3], s[4], s[5]
    if weight_decay != 0.0:
        gi = gi + weight_decay * pi
    hi = rho * hi + one_minus_rho * gi * gi
    if centered:
        ai = ai + one_minus_rho * (gi - ai)
        d = np.sqrt(hi - ai * ai) + eps
    else:
        d = np.sqrt(hi) + eps
    if has_b:
        bi = momentum * bi + gi / d
        return pi - lr * bi, hi, ai, bi
    return pi - lr * gi / d, hi, ai, bi


@njit(cache=True, inline="always")
def _rmsprop_flags(s):
    return s[6] != 0.0, s[7] != 0.0


@njit(cache=True, error_model="numpy", inline="always")
def _rmsprop_loop(p, g, h, g_avg, b, s, centered, has_b):
    for i in range(p.shape[0]):
        p[i], h[i], ai, bi = _rmsprop_element(p[i], g[i], h[i], g_avg[i] if centered else s[0],
                                              b[i] if has_b else s[0], s, centered, has_b)
        if centered:
            g_avg[i] = ai
        if has_b:
            b[i] = bi


@compiled_only(error_model="numpy")
def _rmsprop(p, g, h, g_avg, b, s):
    # one loop each, as in _adam: a store under a test in the loop (g_avg[i], b[i]) keeps LLVM from vectorizing it
    centered, has_b = _rmsprop_flags(s)
    if centered and has_b:
        _rmsprop_loop(p, g, h, g_avg, b, s, True, True)
    elif centered:
        _rmsprop_loop(p, g, h, g_avg, b, s, True, False)
    elif has_b:
        _rmsprop_loop(p, g, h, g_avg, b, s, False, True)
    else:
        _rmsprop_loop(p, g, h, g_avg, b, s, False, False)


@compiled_only(error_model="numpy")
def _moments(pi, gi, mi, vi, s):
    """Adam's, NAdam's and RAdam's weight decay (L2 or decoupled), then m and v: s[0], s[1], s[2], s[6], s[7]."""
    one_minus_beta1, beta2, one_minus_beta2, l2, decay = s[0], s[1], s[2], s[6], s[7]
    if l2 != 0.0:
        gi = gi + l2 * pi
    if decay != 1.0:
        pi = pi * decay
    return pi, gi, mi + one_minus_beta1 * (gi - mi), beta2 * vi + one_minus_beta2 * gi * gi


@compiled_only(error_model="numpy")
def _adam_element(pi, gi, mi, vi, v_max_i, s, amsgrad, divide):
    """``amsgrad`` and ``divide`` are constants at each call below (numba compiles this once per pair, and LLVM
    inlines it in its loop), so each loop is compiled without the test."""
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


@njit(cache=True, inline="always")
def _adam_flags(s):
    return s[8] != 0.0, s[5] != 1.0


@njit(cache=True, error_model="numpy", inline="always")
def _adam_loop(p, g, m, v, v_max, s, amsgrad, divide):
    for i in range(p.shape[0]):
        p[i], m[i], v[i], v_max_i = _adam_element(p[i], g[i], m[i], v[i], v_max[i] if amsgrad else s[8], s,
                                                  amsgrad, divide)
        if amsgrad:
            v_max[i] = v_max_i


@compiled_only(error_model="numpy")
def _adam(p, g, m, v, v_max, s):
    # One loop per (amsgrad, divide) rather than tests per element: LLVM vectorizes each (measured: one
    # loop with the amsgrad test inside ran 2^25 float32 elements in 180 ms, these in 28 ms).
    amsgrad, divide = _adam_flags(s)
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
        p[i], mi, vi, v_max_i = _adam_element(p[i], g[i], bf16_load(m[i]), bf16_load(v[i]),
                                              bf16_load(v_max[i]) if amsgrad else s[8], s, amsgrad, divide)
        m[i], v[i] = bf16_store(mi), bf16_store(vi)
        if amsgrad:
            v_max[i] = bf16_store(v_max_i)


@compiled_only(error_model="numpy")
def _adam_bf16(p, g, m, v, v_max, s):
    """Adam with m, v (and v_max) stored as bfloat16 bits: loaded to float32, rounded back on store."""
    amsgrad, divide = _adam_flags(s)
    if amsgrad and divide:  # one loop each, as in _adam
        _adam_bf16_loop(p, g, m, v, v_max, s, True, True)
    elif amsgrad:
        _adam_bf16_loop(p, g, m, v, v_max, s, True, False)
    elif divide:
        _adam_bf16_loop(p, g, m, v, v_max, s, False, True)
    else:
        _adam_bf16_loop(p, g, m, v, v_max, s, False, False)


@compiled_only(error_model="numpy")
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


@compiled_only(error_model="numpy")
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


@compiled_only(error_model="numpy")
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


@compiled_only(error_model="numpy")
def _radam(p, g, m, v, _2, s):
    if s[5] != 0.0:  # one loop each, as in _adam
        _radam_loop(p, g, m, v, s, True)
    else:
        _radam_loop(p, g, m, v, s, False)


@compiled_only(error_model="numpy")
def _sign(x):
    """xp.sign in x's own type: -1, 0 or 1, NaN for NaN, and +0 for -0 as NumPy (numba's np.sign keeps -0)."""
    sg = np.sign(x)
    return sg if sg != 0.0 else x - x


@compiled_only(error_model="numpy")
def _lion_element(pi, gi, mi, x1, x2, s, decayed, _flag):
    lr, beta1, one_minus_beta1, one_minus_beta2, beta2, weight_decay = s[0], s[1], s[2], s[3], s[4], s[5]
    update = _sign(one_minus_beta1 * gi + beta1 * mi)
    if decayed:
        update = update + weight_decay * pi
    return pi - lr * update, one_minus_beta2 * gi + beta2 * mi, x1, x2


@njit(cache=True, inline="always")
def _lion_flags(s):
    return s[5] != 0.0, False


@njit(cache=True, error_model="numpy", inline="always")
def _lion_loop(p, g, m, s, decayed):
    for i in range(p.shape[0]):
        p[i], m[i], _x1, _x2 = _lion_element(p[i], g[i], m[i], s[0], s[0], s, decayed, False)


@compiled_only(error_model="numpy")
def _lion(p, g, m, _1, _2, s):
    if _lion_flags(s)[0]:  # one loop each, as in _adam
        _lion_loop(p, g, m, s, True)
    else:
        _lion_loop(p, g, m, s, False)


# 10 Schedule-Free AdamW: first, beta2, one_minus_beta2, bias_correction2, eps, weight_decay, ckp1,
# one_minus_ckp1, from_z (lerp from z's end: ckp1 >= 1/2, as torch's lerp), lr, y_step
@compiled_only(error_model="numpy")
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

# The kernel's ``rule`` indexes this: 0-12 as in xopt/engines/kernels.py (11, LAMB, reads its tensors' norms
# first: its C function is xopt.engines.cpu_norms'; 12, Adafactor, is xopt.engines.cpu_factored's), then the
# bfloat16 form of Adam.
RULES = (_sgd, _momentum, _adagrad, _rmsprop, _adam, _adadelta, _adamax, _nadam, _radam, _lion, _schedule_free,
         None, None, _adam_bf16)
ADAM_BF16 = len(RULES) - 1
BF16_RULES = {4: ADAM_BF16}  # rule -> its form with bfloat16 state

# The rules of the 8-bit kernel (xopt.engines.cpu_blockwise), one element at a time: rule -> (its element function,
# its flags).  An element function takes the param, its grad, the three slots' values, the scalars and two flags
# (constants where it is compiled), and returns the new param and the three slots' new values (an unused slot's
# value passed through); the flags function gives the flags of a step's scalars (numba or Python: ``.py_func``).
# The loops above run the same functions, so the two kernels compute alike.
ELEMENTS = {0: (_sgd_element, _sgd_flags), 1: (_momentum_element, _no_flags), 2: (_adagrad_element, _no_flags),
            3: (_rmsprop_element, _rmsprop_flags), 4: (_adam_element, _adam_flags), 9: (_lion_element, _lion_flags)}
