// Fused optimizer steps for CUDA: one launch updates any number of tensors, reading and
// writing each element once.
//
// A launch gets a table instead of a list of arguments (torch's multi_tensor_apply passes
// pointers by value and so launches once per ~36 tensors):
//   ptrs[slot * n_tensors + t]  the address of tensor t's slot: 0 param, 1 grad, 2-4 state buffers
//                               (a slot the configuration does not keep holds the param's
//                               address and is never read)
//   sizes[t]                    its number of elements
//   blocks[2 * b], [2 * b + 1]  the tensor and the chunk (of XOPT_CHUNK elements) of block b
// built on the host by xopt/engines/fused_cuda.py, uploaded once and reused while the arrays stay
// the same; only the grad column changes from step to step.
//
// Each rule is the optimizer's reference rule (xopt/<name>.py) per element: the same names,
// the same order of operations, and the scalars of its scalars(step) in the order of
// xopt/engines/kernels.py, computed on the host and passed by value in the math type S.
// P is how the param is stored: float, double, or half (as its 16 bits, converted with
// xopt_load / xopt_store); S is the type of the math and of the state: float for half and
// float params, double for double.
//
// Built by CuPy (NVRTC) on a GPU with --fmad=false, so that no a * b + c is fused and the
// rounding is the reference's.  tests/cuda_host.cpp builds the same file with the host C++
// compiler and runs it block by block, thread by thread on the CPU (tests/test_cuda_source.py).

#ifndef XOPT_CHUNK
#define XOPT_CHUNK 16384  // elements per block; the host side reads this line
#endif

#ifndef XOPT_HOST
#define XOPT_INLINE __device__ __forceinline__
typedef unsigned short xopt_half;  // the 16 bits of an IEEE half
XOPT_INLINE float xopt_load(xopt_half h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
XOPT_INLINE void xopt_store(xopt_half* dst, float x) {  // rounded to nearest even, as NumPy does
    xopt_half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    *dst = h;
}
XOPT_INLINE float xopt_sqrt(float x) { return sqrtf(x); }
XOPT_INLINE double xopt_sqrt(double x) { return sqrt(x); }
#endif  // the host build defines these in tests/cuda_host.cpp

XOPT_INLINE float xopt_load(float x) { return x; }
XOPT_INLINE double xopt_load(double x) { return x; }
XOPT_INLINE void xopt_store(float* dst, float x) { *dst = x; }
XOPT_INLINE void xopt_store(double* dst, double x) { *dst = x; }

// max as xp.maximum: NaN if either is NaN
template <typename S>
XOPT_INLINE S xopt_maximum(S a, S b) { return (a != a || b != b) ? a + b : (a > b ? a : b); }

// -- the element rules: p and g loaded, state buffers indexed by i; returns the new p -----------
// 0 SGD: lr, weight_decay, momentum, b_decay, b_scale, has_b, nesterov
template <typename S>
XOPT_INLINE S xopt_sgd(S p, S g, S* b, S*, S*, long long i, const S* s) {
    if (s[1] != (S)0) g = g + s[1] * p;
    if (s[5] != (S)0) {
        S bi = s[3] * b[i] + s[4] * g;
        b[i] = bi;
        g = (s[6] != (S)0) ? g + s[2] * bi : bi;
    }
    return p - s[0] * g;
}

// 1 Momentum, Nesterov: lr, momentum, nesterov
template <typename S>
XOPT_INLINE S xopt_momentum(S p, S g, S* v, S*, S*, long long i, const S* s) {
    S vi = s[1] * v[i] - s[0] * g;
    v[i] = vi;
    return (s[2] != (S)0) ? p + s[1] * vi - s[0] * g : p + vi;
}

// 2 AdaGrad: clr, eps, weight_decay
template <typename S>
XOPT_INLINE S xopt_adagrad(S p, S g, S* h, S*, S*, long long i, const S* s) {
    if (s[2] != (S)0) g = g + s[2] * p;
    S hi = h[i] + g * g;
    h[i] = hi;
    return p - s[0] * g / (xopt_sqrt(hi) + s[1]);
}

// 3 RMSprop: lr, decay_rate, 1 - decay_rate, eps, momentum, weight_decay, centered, has_b
template <typename S>
XOPT_INLINE S xopt_rmsprop(S p, S g, S* h, S* g_avg, S* b, long long i, const S* s) {
    if (s[5] != (S)0) g = g + s[5] * p;
    S hi = s[1] * h[i] + s[2] * g * g;
    h[i] = hi;
    S d;
    if (s[6] != (S)0) {
        S ai = g_avg[i] + s[2] * (g - g_avg[i]);
        g_avg[i] = ai;
        d = xopt_sqrt(hi - ai * ai) + s[3];
    } else {
        d = xopt_sqrt(hi) + s[3];
    }
    if (s[7] != (S)0) {
        S bi = s[4] * b[i] + g / d;
        b[i] = bi;
        return p - s[0] * bi;
    }
    return p - s[0] * g / d;
}

// Adam's, NAdam's and RAdam's weight decay (L2 or decoupled), then m and v, stored and returned in mi, vi:
// 1 - beta1, beta2, 1 - beta2 in s[0..2], l2 and decay in s[6], s[7]
template <typename S>
XOPT_INLINE void xopt_moments(S& p, S& g, S& mi, S& vi, S* m, S* v, long long i, const S* s) {
    if (s[6] != (S)0) g = g + s[6] * p;
    if (s[7] != (S)1) p = p * s[7];
    mi = m[i] + s[0] * (g - m[i]);
    vi = s[1] * v[i] + s[2] * g * g;
    m[i] = mi;
    v[i] = vi;
}

// 4 Adam, AdamW: 1 - beta1, beta2, 1 - beta2, eps, step_size, sqrt_bc2, l2, decay, amsgrad
template <typename S>
XOPT_INLINE S xopt_adam(S p, S g, S* m, S* v, S* v_max, long long i, const S* s) {
    S mi, vi;
    xopt_moments(p, g, mi, vi, m, v, i, s);
    if (s[8] != (S)0) {
        vi = xopt_maximum(v_max[i], vi);
        v_max[i] = vi;
    }
    return p - s[4] * (mi / (xopt_sqrt(vi) / s[5] + s[3]));
}

// 5 AdaDelta: lr, rho, 1 - rho, eps, weight_decay
template <typename S>
XOPT_INLINE S xopt_adadelta(S p, S g, S* msg, S* msdx, S*, long long i, const S* s) {
    if (s[4] != (S)0) g = g + s[4] * p;
    S msg_i = s[1] * msg[i] + s[2] * g * g;
    msg[i] = msg_i;
    S delta = xopt_sqrt(msdx[i] + s[3]) / xopt_sqrt(msg_i + s[3]) * g;
    msdx[i] = s[1] * msdx[i] + s[2] * delta * delta;
    return p - s[0] * delta;
}

// 6 Adamax: 1 - beta1, beta2, eps, clr, weight_decay
template <typename S>
XOPT_INLINE S xopt_adamax(S p, S g, S* m, S* u, S*, long long i, const S* s) {
    if (s[4] != (S)0) g = g + s[4] * p;
    S mi = m[i] + s[0] * (g - m[i]);
    S ui = xopt_maximum(s[1] * u[i], (g < (S)0 ? -g : g) + s[2]);
    m[i] = mi;
    u[i] = ui;
    return p - s[3] * (mi / ui);
}

// 7 NAdam: 1 - beta1, beta2, 1 - beta2, eps, bias_correction2, g_step, l2, decay, m_step
template <typename S>
XOPT_INLINE S xopt_nadam(S p, S g, S* m, S* v, S*, long long i, const S* s) {
    S mi, vi;
    xopt_moments(p, g, mi, vi, m, v, i, s);
    S d = xopt_sqrt(vi / s[4]) + s[3];
    return p - s[5] * (g / d) - s[8] * (mi / d);
}

// 8 RAdam: 1 - beta1, beta2, 1 - beta2, eps, step_size, rectified, l2, decay
template <typename S>
XOPT_INLINE S xopt_radam(S p, S g, S* m, S* v, S*, long long i, const S* s) {
    S mi, vi;
    xopt_moments(p, g, mi, vi, m, v, i, s);
    if (s[5] != (S)0) return p - s[4] * (mi / (xopt_sqrt(vi) + s[3]));
    return p - s[4] * mi;
}

// sign as xp.sign: -1, 0 or 1, NaN for NaN, +0 for -0
template <typename S>
XOPT_INLINE S xopt_sign(S x) { return x > (S)0 ? (S)1 : (x < (S)0 ? (S)-1 : x - x); }

// 9 Lion: lr, beta1, 1 - beta1, 1 - beta2, beta2, weight_decay
template <typename S>
XOPT_INLINE S xopt_lion(S p, S g, S* m, S*, S*, long long i, const S* s) {
    S mi = m[i];
    S update = xopt_sign(s[2] * g + s[1] * mi);
    if (s[5] != (S)0) update = update + s[5] * p;
    m[i] = s[3] * g + s[4] * mi;
    return p - s[0] * update;
}

template <int RULE, typename S>
XOPT_INLINE S xopt_rule(S p, S g, S* b0, S* b1, S* b2, long long i, const S* s) {
    if (RULE == 0) return xopt_sgd(p, g, b0, b1, b2, i, s);
    if (RULE == 1) return xopt_momentum(p, g, b0, b1, b2, i, s);
    if (RULE == 2) return xopt_adagrad(p, g, b0, b1, b2, i, s);
    if (RULE == 3) return xopt_rmsprop(p, g, b0, b1, b2, i, s);
    if (RULE == 4) return xopt_adam(p, g, b0, b1, b2, i, s);
    if (RULE == 5) return xopt_adadelta(p, g, b0, b1, b2, i, s);
    if (RULE == 6) return xopt_adamax(p, g, b0, b1, b2, i, s);
    if (RULE == 7) return xopt_nadam(p, g, b0, b1, b2, i, s);
    if (RULE == 8) return xopt_radam(p, g, b0, b1, b2, i, s);
    return xopt_lion(p, g, b0, b1, b2, i, s);
}

// -- the kernel: block b updates chunk blocks[2b + 1] of tensor blocks[2b] -----------------------
template <int RULE, typename P, typename S>
__global__ void xopt_step(const unsigned long long* __restrict__ ptrs, const long long* __restrict__ sizes,
                          const int* __restrict__ blocks, int n_tensors,
                          S s0, S s1, S s2, S s3, S s4, S s5, S s6, S s7, S s8) {
    const S s[9] = {s0, s1, s2, s3, s4, s5, s6, s7, s8};
    const int t = blocks[2 * blockIdx.x];
    const long long lo = (long long)blocks[2 * blockIdx.x + 1] * XOPT_CHUNK;
    const long long n = sizes[t];
    const long long hi = n < lo + XOPT_CHUNK ? n : lo + XOPT_CHUNK;
    P* __restrict__ p = (P*)ptrs[t];
    const P* __restrict__ g = (const P*)ptrs[n_tensors + t];
    S* b0 = (S*)ptrs[2 * n_tensors + t];
    S* b1 = (S*)ptrs[3 * n_tensors + t];
    S* b2 = (S*)ptrs[4 * n_tensors + t];
    for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        xopt_store(p + i, xopt_rule<RULE, S>(xopt_load(p[i]), xopt_load(g[i]), b0, b1, b2, i, s));
    }
}
