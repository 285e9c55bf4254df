// Fused optimizer steps for CUDA: one launch updates any number of tensors, reading and
// writing each element once.
//
// A launch gets a table instead of a list of arguments (torch's multi_tensor_apply passes
// pointers by value and so launches once per ~36 tensors):
//   ptrs[slot * n_tensors + t]  the address of tensor t's slot: 0 param, 1 grad, 2-4 the rule's
//                               state buffers, each in its own slot (0 where the tensor's
//                               hyperparameter set does not keep it: such a slot is never read)
//   sizes[t]                    its number of elements
//   blocks[4b], [4b + 1], [4b + 2], [4b + 3]  block b's tensor, its chunk (of XOPT_CHUNK elements),
//                               1 if the tensor's param, grad and state addresses are 16-byte
//                               aligned, and the tensor's part: its row of `scalars`
//   scalars[XOPT_SCALARS * part + k]  the rule's scalars of each part of the step (a hyperparameter
//                               set at a step count), in the math type S
// built on the host by xopt/engines/fused_cuda.py for each step and uploaded in one copy with it.
//
// Shaped for bandwidth as torch's fused Adam (fused_adam_utils.cuh) and apex: each thread loads
// XOPT_W elements of every operand into registers before any math (explicit ILP), with 128-bit
// accesses where the tensor is aligned (the table's flag, and the grad's address, checked here
// as well), and a scalar path otherwise and for a chunk's last XOPT_W - 1 elements.  Every
// access to a tensor is an explicit global one (__ldcs / __stcs: streamed, read and written
// once), so no load turns generic.
//
// Each rule is the optimizer's reference rule (xopt/optimizers/<name>.py) per element, on values
// already in registers: p and g loaded, the state buffers' values in and out by reference; it
// returns the new p.  The same names, the same order of operations, and the scalars of its
// scalars(step) in the order of xopt/engines/kernels.py, computed on the host and read from the
// table in the math type S.  P is how the param is stored: float, double, half or bfloat16 (their 16
// bits, converted with xopt_to_math / xopt_from_math); S is the type of the math: float for half,
// bfloat16 and float params, double for double; T is how the state is stored: S, or bfloat16 (Adam's
// state_dtype="bfloat16", with float math), converted to S and back around the rule as the param is.
//
// clip_grad_norm and skip_nonfinite add a launch before the step: xopt_norm, over the same
// table, sums the grads' squares in double and leaves the norm, a finiteness check and the
// clip scale in device memory, where the step reads the scale (no host sync).
//
// Built by xopt/engines/fused_cuda.py through CuPy's NVRTC with --fmad=false (no a * b + c is
// fused: the reference's rounding) and without CuPy's -ftz=true (subnormals kept, as NumPy
// does).  tests/cuda_host.cpp builds the same file with the host C++ compiler and runs it block
// by block, thread by thread on the CPU (tests/test_cuda_source.py).

#ifndef XOPT_CHUNK
#define XOPT_CHUNK 16384  // elements per block; the host side reads this line
#endif
#define XOPT_THREADS 256  // threads per block; the host side reads this line
#define XOPT_SCALARS 12  // scalars per part (a rule that needs fewer gets zeros); the host side reads this line

struct xopt_bf16 { unsigned short bits; };  // the 16 bits of a bfloat16 (its conversions below, for both builds)

#ifndef XOPT_HOST
#define XOPT_INLINE __device__ __forceinline__
typedef unsigned short xopt_half;  // the 16 bits of an IEEE half
XOPT_INLINE float xopt_to_math(xopt_half h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
XOPT_INLINE xopt_half xopt_from_math(float x, xopt_half*) {  // rounded to nearest even, as NumPy does
    xopt_half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}
XOPT_INLINE float xopt_sqrt(float x) { return sqrtf(x); }
XOPT_INLINE double xopt_sqrt(double x) { return sqrt(x); }
// One element, or 16 bytes, from or to global memory, streamed (evict first).
template <typename T>
XOPT_INLINE T xopt_ld(const T* a) { return __ldcs(a); }
template <typename T>
XOPT_INLINE void xopt_st(T* a, T x) { __stcs(a, x); }
XOPT_INLINE uint4 xopt_ld16(const void* a) { return __ldcs((const uint4*)a); }
XOPT_INLINE void xopt_st16(void* a, uint4 x) { __stcs((uint4*)a, x); }
XOPT_INLINE xopt_bf16 xopt_ld(const xopt_bf16* a) { xopt_bf16 h; h.bits = __ldcs((const unsigned short*)a); return h; }
XOPT_INLINE void xopt_st(xopt_bf16* a, xopt_bf16 x) { __stcs((unsigned short*)a, x.bits); }
// Cached in L2 only: the norm pass's grads (the step reads them next) and the sums other blocks wrote.
template <typename T>
XOPT_INLINE T xopt_ld_l2(const T* a) { return __ldcg(a); }
XOPT_INLINE xopt_bf16 xopt_ld_l2(const xopt_bf16* a) { xopt_bf16 h; h.bits = __ldcg((const unsigned short*)a); return h; }
// A count of the blocks done with their sums.
XOPT_INLINE unsigned int xopt_count_done(unsigned int* done, unsigned int blocks) {
    __threadfence();  // this block's sums are seen by the block that counts last
    return atomicInc(done, blocks - 1);  // back to 0 after the last block: the count is reusable
}
#define XOPT_ALIGNED(a) (((unsigned long long)(a) & 15) == 0)
#define XOPT_UNROLL _Pragma("unroll")
#endif  // the host build defines these in tests/cuda_host.cpp

// bfloat16 in integer operations, so that the CPU build runs the same code: its bits are a float's upper half
// (exact), and a float is rounded to them to nearest even, as ml_dtypes rounds; NaN stays NaN, its sign kept.
union xopt_bits { float f; unsigned int u; };
XOPT_INLINE float xopt_to_math(xopt_bf16 h) {
    xopt_bits x;
    x.u = (unsigned int)h.bits << 16;
    return x.f;
}
XOPT_INLINE xopt_bf16 xopt_from_math(float v, xopt_bf16*) {
    xopt_bits x;
    x.f = v;
    const unsigned int u = x.u;
    xopt_bf16 h;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        h.bits = (unsigned short)(((u >> 16) & 0x8000u) | 0x7fc0u);
    } else {
        h.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return h;
}
XOPT_INLINE float xopt_to_math(float x) { return x; }
XOPT_INLINE double xopt_to_math(double x) { return x; }
XOPT_INLINE float xopt_from_math(float x, float*) { return x; }
XOPT_INLINE double xopt_from_math(double x, double*) { return x; }

// max as xp.maximum: NaN if either is NaN
template <typename S>
XOPT_INLINE S xopt_maximum(S a, S b) { return (a != a || b != b) ? a + b : (a > b ? a : b); }

// -- the element rules: (p, g, the state's values) -> the new p and state, all in registers ----
// A rule reads a state value only when its scalars say the configuration keeps that buffer.
// 0 SGD: lr, weight_decay, momentum, b_decay, b_scale, has_b, nesterov
template <typename S>
XOPT_INLINE S xopt_sgd(S p, S g, S& b, S&, S&, const S* s) {
    if (s[1] != (S)0) g = g + s[1] * p;
    if (s[5] != (S)0) {
        b = s[3] * b + s[4] * g;
        g = (s[6] != (S)0) ? g + s[2] * b : b;
    }
    return p - s[0] * g;
}

// 1 Momentum, Nesterov: lr, momentum, nesterov
template <typename S>
XOPT_INLINE S xopt_momentum(S p, S g, S& v, S&, S&, const S* s) {
    v = s[1] * v - s[0] * g;
    return (s[2] != (S)0) ? p + s[1] * v - s[0] * g : p + v;
}

// 2 AdaGrad: clr, eps, weight_decay
template <typename S>
XOPT_INLINE S xopt_adagrad(S p, S g, S& h, S&, S&, const S* s) {
    if (s[2] != (S)0) g = g + s[2] * p;
    h = h + g * g;
    return p - s[0] * g / (xopt_sqrt(h) + s[1]);
}

// 3 RMSprop: lr, decay_rate, 1 - decay_rate, eps, momentum, weight_decay, centered, has_b
template <typename S>
XOPT_INLINE S xopt_rmsprop(S p, S g, S& h, S& g_avg, S& b, const S* s) {
    if (s[5] != (S)0) g = g + s[5] * p;
    h = s[1] * h + s[2] * g * g;
    S d;
    if (s[6] != (S)0) {
        g_avg = g_avg + s[2] * (g - g_avg);
        d = xopt_sqrt(h - g_avg * g_avg) + s[3];
    } else {
        d = xopt_sqrt(h) + s[3];
    }
    if (s[7] != (S)0) {
        b = s[4] * b + g / d;
        return p - s[0] * b;
    }
    return p - s[0] * g / d;
}

// Adam's, NAdam's and RAdam's weight decay (L2 or decoupled), then m and v:
// 1 - beta1, beta2, 1 - beta2 in s[0..2], l2 and decay in s[6], s[7]
template <typename S>
XOPT_INLINE void xopt_moments(S& p, S& g, S& m, S& v, const S* s) {
    if (s[6] != (S)0) g = g + s[6] * p;
    if (s[7] != (S)1) p = p * s[7];
    m = m + s[0] * (g - m);
    v = s[1] * v + s[2] * g * g;
}

// 4 Adam, AdamW: 1 - beta1, beta2, 1 - beta2, eps, step_size, sqrt_bc2, l2, decay, amsgrad
template <typename S>
XOPT_INLINE S xopt_adam(S p, S g, S& m, S& v, S& v_max, const S* s) {
    xopt_moments(p, g, m, v, s);
    S vi = v;
    if (s[8] != (S)0) {
        v_max = xopt_maximum(v_max, v);
        vi = v_max;
    }
    return p - s[4] * (m / (xopt_sqrt(vi) / s[5] + s[3]));
}

// 5 AdaDelta: lr, rho, 1 - rho, eps, weight_decay
template <typename S>
XOPT_INLINE S xopt_adadelta(S p, S g, S& msg, S& msdx, S&, const S* s) {
    if (s[4] != (S)0) g = g + s[4] * p;
    msg = s[1] * msg + s[2] * g * g;
    S delta = xopt_sqrt(msdx + s[3]) / xopt_sqrt(msg + s[3]) * g;
    msdx = s[1] * msdx + s[2] * delta * delta;
    return p - s[0] * delta;
}

// 6 Adamax: 1 - beta1, beta2, eps, clr, weight_decay
template <typename S>
XOPT_INLINE S xopt_adamax(S p, S g, S& m, S& u, S&, const S* s) {
    if (s[4] != (S)0) g = g + s[4] * p;
    m = m + s[0] * (g - m);
    u = xopt_maximum(s[1] * u, (g < (S)0 ? -g : g) + s[2]);
    return p - s[3] * (m / u);
}

// 7 NAdam: 1 - beta1, beta2, 1 - beta2, eps, bias_correction2, g_step, l2, decay, m_step
template <typename S>
XOPT_INLINE S xopt_nadam(S p, S g, S& m, S& v, S&, const S* s) {
    xopt_moments(p, g, m, v, s);
    S d = xopt_sqrt(v / s[4]) + s[3];
    return p - s[5] * (g / d) - s[8] * (m / d);
}

// 8 RAdam: 1 - beta1, beta2, 1 - beta2, eps, step_size, rectified, l2, decay
template <typename S>
XOPT_INLINE S xopt_radam(S p, S g, S& m, S& v, S&, const S* s) {
    xopt_moments(p, g, m, v, s);
    if (s[5] != (S)0) return p - s[4] * (m / (xopt_sqrt(v) + s[3]));
    return p - s[4] * m;
}

// sign as xp.sign: -1, 0 or 1, NaN for NaN, +0 for -0
template <typename S>
XOPT_INLINE S xopt_sign(S x) { return x > (S)0 ? (S)1 : (x < (S)0 ? (S)-1 : x - x); }

// 9 Lion: lr, beta1, 1 - beta1, 1 - beta2, beta2, weight_decay
template <typename S>
XOPT_INLINE S xopt_lion(S p, S g, S& m, S&, S&, const S* s) {
    S update = xopt_sign(s[2] * g + s[1] * m);
    if (s[5] != (S)0) update = update + s[5] * p;
    m = s[3] * g + s[4] * m;
    return p - s[0] * update;
}

// 10 Schedule-Free AdamW: first, beta2, 1 - beta2, bias_correction2, eps, weight_decay, ckp1, 1 - ckp1,
// from_z (ckp1 >= 1/2: the lerp from z's end, as torch's lerp), lr, y_step
template <typename S>
XOPT_INLINE S xopt_schedule_free(S p, S g, S& z, S& v, S&, const S* s) {
    S zi = s[0] != (S)0 ? p : z;  // z starts as the param
    v = s[1] * v + s[2] * (g * g);
    S u = g / (xopt_sqrt(v / s[3]) + s[4]);
    if (s[5] != (S)0) u = u + s[5] * p;
    S y = s[8] != (S)0 ? zi - (zi - p) * s[7] : p + s[6] * (zi - p);
    z = zi - s[9] * u;
    return y + s[10] * u;
}

template <int RULE, typename S>
XOPT_INLINE S xopt_rule(S p, S g, S& b0, S& b1, S& b2, const S* s) {
    if (RULE == 0) return xopt_sgd(p, g, b0, b1, b2, s);
    if (RULE == 1) return xopt_momentum(p, g, b0, b1, b2, s);
    if (RULE == 2) return xopt_adagrad(p, g, b0, b1, b2, s);
    if (RULE == 3) return xopt_rmsprop(p, g, b0, b1, b2, s);
    if (RULE == 4) return xopt_adam(p, g, b0, b1, b2, s);
    if (RULE == 5) return xopt_adadelta(p, g, b0, b1, b2, s);
    if (RULE == 6) return xopt_adamax(p, g, b0, b1, b2, s);
    if (RULE == 7) return xopt_nadam(p, g, b0, b1, b2, s);
    if (RULE == 8) return xopt_radam(p, g, b0, b1, b2, s);
    if (RULE == 9) return xopt_lion(p, g, b0, b1, b2, s);
    return xopt_schedule_free(p, g, b0, b1, b2, s);
}

// -- the kernel ---------------------------------------------------------------------------------
template <typename P, typename T>
struct xopt_width { enum { value = sizeof(P) == 2 || sizeof(T) == 2 ? 8 : 4 }; };  // per thread: 16 bytes of 16-bit

template <typename T, int W>
union xopt_pack {  // W elements as 16-byte words
    uint4 u[W * sizeof(T) / 16];
    T x[W];
};

template <typename T, int W>
XOPT_INLINE void xopt_load(xopt_pack<T, W>& dst, const T* src) {
    XOPT_UNROLL
    for (int k = 0; k < (int)(W * sizeof(T) / 16); ++k) dst.u[k] = xopt_ld16((const uint4*)src + k);
}

template <typename T, int W>
XOPT_INLINE void xopt_store(T* dst, const xopt_pack<T, W>& src) {
    XOPT_UNROLL
    for (int k = 0; k < (int)(W * sizeof(T) / 16); ++k) xopt_st16((uint4*)dst + k, src.u[k]);
}

template <typename T, int W>
XOPT_INLINE void xopt_load_if(xopt_pack<T, W>& dst, const T* src, bool live) {
    if (live) {
        xopt_load(dst, src);
    } else {
    XOPT_UNROLL
        for (int k = 0; k < W; ++k) dst.x[k] = T();  // zero bits
    }
}

// A grad in the math type, times the clip scale *c where there is one (clip_grad_norm; c null: none), as the
// reference rule scales it: in the math type, after the conversion.
template <typename P, typename S>
XOPT_INLINE S xopt_grad(P g, const S* c) { return c ? xopt_to_math(g) * *c : xopt_to_math(g); }

// A state value in the math type and back (the identity where the state is kept in the math type).
template <typename S, typename T>
XOPT_INLINE S xopt_state(T x) { return (S)xopt_to_math(x); }

// W consecutive elements from i, every operand 16-byte aligned: all loads, then the math, then the stores.
template <int RULE, typename P, typename S, typename T, int W>
XOPT_INLINE void xopt_wide(P* p, const P* g, T* b0, T* b1, T* b2, long long i, int live, const S* s, const S* c) {
    xopt_pack<P, W> pw, gw;
    xopt_pack<T, W> w0, w1, w2;
    xopt_load(pw, p + i);
    xopt_load(gw, g + i);
    xopt_load_if(w0, b0 + i, live & 1);
    xopt_load_if(w1, b1 + i, live & 2);
    xopt_load_if(w2, b2 + i, live & 4);
    XOPT_UNROLL
    for (int k = 0; k < W; ++k) {
        S v0 = xopt_state<S>(w0.x[k]), v1 = xopt_state<S>(w1.x[k]), v2 = xopt_state<S>(w2.x[k]);
        S pk = xopt_rule<RULE, S>(xopt_to_math(pw.x[k]), xopt_grad(gw.x[k], c), v0, v1, v2, s);
        pw.x[k] = xopt_from_math(pk, p);
        w0.x[k] = xopt_from_math(v0, b0);
        w1.x[k] = xopt_from_math(v1, b0);
        w2.x[k] = xopt_from_math(v2, b0);
    }
    xopt_store(p + i, pw);
    if (live & 1) xopt_store(b0 + i, w0);
    if (live & 2) xopt_store(b1 + i, w1);
    if (live & 4) xopt_store(b2 + i, w2);
}

// Elements i, i + stride, ... (W of them, those below hi), one by one: for unaligned tensors and a chunk's tail.
template <int RULE, typename P, typename S, typename T, int W>
XOPT_INLINE void xopt_narrow(P* p, const P* g, T* b0, T* b1, T* b2, long long i, long long stride, long long hi,
                             int live, const S* s, const S* c) {
    S pv[W], gv[W], v0[W], v1[W], v2[W];
    XOPT_UNROLL
    for (int k = 0; k < W; ++k) {
        const long long j = i + k * stride;
        const bool in = j < hi;
        pv[k] = in ? xopt_to_math(xopt_ld(p + j)) : (S)0;
        gv[k] = in ? xopt_grad(xopt_ld(g + j), c) : (S)0;
        v0[k] = in && (live & 1) ? xopt_state<S>(xopt_ld(b0 + j)) : (S)0;
        v1[k] = in && (live & 2) ? xopt_state<S>(xopt_ld(b1 + j)) : (S)0;
        v2[k] = in && (live & 4) ? xopt_state<S>(xopt_ld(b2 + j)) : (S)0;
    }
    XOPT_UNROLL
    for (int k = 0; k < W; ++k) pv[k] = xopt_rule<RULE, S>(pv[k], gv[k], v0[k], v1[k], v2[k], s);
    XOPT_UNROLL
    for (int k = 0; k < W; ++k) {
        const long long j = i + k * stride;
        if (j < hi) {
            xopt_st(p + j, xopt_from_math(pv[k], p));
            if (live & 1) xopt_st(b0 + j, xopt_from_math(v0[k], b0));
            if (live & 2) xopt_st(b1 + j, xopt_from_math(v1[k], b0));
            if (live & 4) xopt_st(b2 + j, xopt_from_math(v2[k], b0));
        }
    }
}

// Block b updates chunk blocks[4b + 1] of tensor blocks[4b] with the scalars of part blocks[4b + 3]; a state slot
// whose address is 0 is not kept; clip: the clip scale in device memory (clip_grad_norm: computed on the device,
// no host sync), or null.
template <int RULE, typename P, typename S, typename T = S>
__global__ void xopt_step(const unsigned long long* __restrict__ ptrs, const long long* __restrict__ sizes,
                          const int* __restrict__ blocks, int n_tensors, const S* __restrict__ clip,
                          const S* __restrict__ scalars) {
    enum { W = xopt_width<P, T>::value };
    const int t = blocks[4 * blockIdx.x];
    const long long lo = (long long)blocks[4 * blockIdx.x + 1] * XOPT_CHUNK;
    const S* row = scalars + XOPT_SCALARS * blocks[4 * blockIdx.x + 3];
    S s[XOPT_SCALARS];
    XOPT_UNROLL
    for (int k = 0; k < XOPT_SCALARS; ++k) s[k] = row[k];
    const long long n = sizes[t];
    const long long hi = n < lo + XOPT_CHUNK ? n : lo + XOPT_CHUNK;
    P* __restrict__ p = (P*)ptrs[t];
    const P* __restrict__ g = (const P*)ptrs[n_tensors + t];
    T* __restrict__ b0 = (T*)ptrs[2 * n_tensors + t];
    T* __restrict__ b1 = (T*)ptrs[3 * n_tensors + t];
    T* __restrict__ b2 = (T*)ptrs[4 * n_tensors + t];
    const int live = (b0 != 0) | ((b1 != 0) << 1) | ((b2 != 0) << 2);
    const long long threads = blockDim.x;
    long long i = lo;
    if (blocks[4 * blockIdx.x + 2] && XOPT_ALIGNED(g)) {  // lo is a multiple of W: every group stays aligned
        const long long end = lo + (hi - lo) / W * W;
        for (long long j = lo + threadIdx.x * (long long)W; j < end; j += threads * W)
            xopt_wide<RULE, P, S, T, W>(p, g, b0, b1, b2, j, live, s, clip);
        i = end;
    }
    for (long long j = i + threadIdx.x; j < hi; j += threads * W)
        xopt_narrow<RULE, P, S, T, W>(p, g, b0, b1, b2, j, threads, hi, live, s, clip);
}

// -- the norm pass (clip_grad_norm, skip_nonfinite): one launch over the step's table, before the step --------------
// Block b sums the squares of its chunk's grad in double (exact for float and half grads: a square of a float fits
// a double), and the grad minus itself (0, or NaN where an element is not finite).  The block that finishes last
// adds the blocks' sums in block order, so the total does not depend on which block that is, and writes
// out[0] the norm, out[1] the finiteness check (0: every grad finite) and, if scale is not null, the clip scale
// min(1, max_norm / (norm + 1e-6)) in S, as torch's clip_grad_norm_ and xopt's reference compute it (NaN for a NaN
// norm).  The phases below are separated by __syncthreads in xopt_norm; the CPU build runs each phase for every
// thread of a block before the next.

// Phase 1, each thread: its share of block b's chunk (elements lo + t, lo + t + threads, ...).
template <typename P>
XOPT_INLINE void xopt_norm_share(const unsigned long long* ptrs, const long long* sizes, const int* blocks,
                                 int n_tensors, long long b, long long t, long long threads, double* sq, double* nf) {
    const int tensor = blocks[4 * b];
    const long long lo = (long long)blocks[4 * b + 1] * XOPT_CHUNK;
    const long long n = sizes[tensor];
    const long long hi = n < lo + XOPT_CHUNK ? n : lo + XOPT_CHUNK;
    const P* g = (const P*)ptrs[n_tensors + tensor];
    double s = 0.0, z = 0.0;
    for (long long j = lo + t; j < hi; j += threads) {
        const double x = (double)xopt_to_math(xopt_ld_l2(g + j));
        s += x * x;
        z += x - x;
    }
    sq[t] = s;
    nf[t] = z;
}

// Phase 2, thread 0: the block's sums (its threads' shares in order) into sums[b] and sums[n_blocks + b]; whether
// this block is the last one done.
XOPT_INLINE bool xopt_norm_block(const double* sq, const double* nf, long long threads, double* sums,
                                 unsigned int* done, long long b, long long n_blocks) {
    double s = 0.0, z = 0.0;
    for (long long t = 0; t < threads; ++t) {
        s += sq[t];
        z += nf[t];
    }
    sums[b] = s;
    sums[n_blocks + b] = z;
    return xopt_count_done(done, (unsigned int)n_blocks) == (unsigned int)(n_blocks - 1);
}

// Phase 3, each thread of the last block: its share of the blocks' sums (blocks t, t + threads, ...).
XOPT_INLINE void xopt_norm_gather(const double* sums, long long n_blocks, long long t, long long threads,
                                  double* sq, double* nf) {
    double s = 0.0, z = 0.0;
    for (long long b = t; b < n_blocks; b += threads) {
        s += xopt_ld_l2(sums + b);
        z += xopt_ld_l2(sums + n_blocks + b);
    }
    sq[t] = s;
    nf[t] = z;
}

// Phase 4, thread 0 of the last block: the total, the norm, the check, the clip scale.
template <typename S>
XOPT_INLINE void xopt_norm_finish(const double* sq, const double* nf, long long threads, double* out, S* scale,
                                  double max_norm) {
    double s = 0.0, z = 0.0;
    for (long long t = 0; t < threads; ++t) {
        s += sq[t];
        z += nf[t];
    }
    const double norm = xopt_sqrt(s);
    out[0] = norm;
    out[1] = z;
    if (scale) {
        const double c = max_norm / (norm + 1e-6);
        *scale = (S)(c != c || c < 1.0 ? c : 1.0);
    }
}

#ifndef XOPT_HOST
template <typename P, typename S>
__global__ void xopt_norm(const unsigned long long* __restrict__ ptrs, const long long* __restrict__ sizes,
                          const int* __restrict__ blocks, int n_tensors, double* sums, unsigned int* done,
                          double* out, S* scale, double max_norm) {
    __shared__ double sq[XOPT_THREADS], nf[XOPT_THREADS];
    __shared__ bool last;
    xopt_norm_share<P>(ptrs, sizes, blocks, n_tensors, blockIdx.x, threadIdx.x, blockDim.x, sq, nf);
    __syncthreads();
    if (threadIdx.x == 0) last = xopt_norm_block(sq, nf, blockDim.x, sums, done, blockIdx.x, gridDim.x);
    __syncthreads();
    if (!last) return;
    xopt_norm_gather(sums, gridDim.x, threadIdx.x, blockDim.x, sq, nf);
    __syncthreads();
    if (threadIdx.x == 0) xopt_norm_finish<S>(sq, nf, blockDim.x, out, scale, max_norm);
}
#endif  // the CPU build runs the phases itself (tests/cuda_host.cpp)

// -- 8-bit state (state_dtype="8bit", xopt/engines/blockwise.py): uint8 codes and a float32 absmax per block --------
// The same table as xopt_step's with eight address rows: 0 param, 1 grad, 2-4 the three slots' codes, 5-7 their
// absmax (0 where a slot is not kept); blocks[4b], [4b + 1], [4b + 3]: block b's tensor, its chunk (of whole
// quantization blocks: XOPT_CHUNK8 / qblock of them) and its part (blocks[4b + 2] is not read).  A CUDA block
// takes whole quantization blocks of one tensor, in four phases separated by __syncthreads (the CPU build runs
// each phase for every thread of a block before the next, as xopt_norm's):
//   1. each thread, its elements (lo + t, lo + t + threads, ...): each kept slot's code turned into its value,
//      map(code) * absmax in float, widened to S; the rule; the param written; each new state value rounded to
//      float into shared scratch;
//   2. each (slot, quantization block) pair has threads / (3 x its quantization blocks) threads (at least 1),
//      each the largest magnitude bits of its share of the pair's values (unsigned ints: floats >= 0 order as
//      their bits, a NaN's above Inf's; no atomics, which would serialize a warp on one address);
//   3. each pair: the largest of its threads' bits, its absmax (a NaN: the quiet NaN 0x7FC00000) written, and its
//      inverse, 1 / absmax (1 for 0);
//   4. each thread, its elements: the code of value * inverse written.
// The maps are small float formats relative to the absmax (blockwise.float_map: SIGNED_FORMAT, UNSIGNED_FORMAT),
// their codes and values integer arithmetic on the float bits, as xopt/engines/cpu_codes.py computes them:
// the reference's numbers (searchsorted on the midpoints, a take from the map) bit for bit.  `maps` bit j: slot j
// is on the unsigned map.  The host side is xopt/engines/cuda_blockwise.py.
#ifndef XOPT_CHUNK8
#define XOPT_CHUNK8 2048  // elements per block at most (whole quantization blocks); the host side reads this line
#endif
#define XOPT_QBLOCK_MIN 32  // the smallest quantization block the kernel takes; the host side reads this line
#define XOPT_SIGNED_M 3  // the signed map: fraction bits, emin (blockwise.SIGNED_FORMAT; the host side checks them)
#define XOPT_SIGNED_EMIN -14
#define XOPT_UNSIGNED_M 3  // the unsigned map (blockwise.UNSIGNED_FORMAT)
#define XOPT_UNSIGNED_EMIN -30

XOPT_INLINE float xopt_float_of(unsigned int u) { xopt_bits x; x.u = u; return x.f; }
XOPT_INLINE unsigned int xopt_bits_of(float f) { xopt_bits x; x.f = f; return x.u; }

// map[code] of float_map(signed, M, EMIN): magnitude codes of field >= 1 shifted into the float bits; field 0 (the
// subnormals of the format) a small integer times 2^(EMIN - M), exact.
template <int M, int EMIN>
XOPT_INLINE float xopt_map_value(unsigned int code, bool is_signed) {
    int c = (int)code;
    bool neg = false;
    if (is_signed) {
        c -= 127;
        neg = c < 0;
        if (neg) c = -c;
    }
    const unsigned int mag = (unsigned int)c;
    float x;
    if (mag < (1u << M)) {
        x = (float)mag * xopt_float_of((unsigned int)(127 + EMIN - M) << 23);  // 2^(EMIN - M), a normal float
    } else {
        x = xopt_float_of((mag << (23 - M)) + ((unsigned int)(127 + EMIN - 1) << 23));
    }
    return neg ? xopt_float_of(xopt_bits_of(x) | 0x80000000u) : x;
}

// count(mid < y) on float_map(signed, M, EMIN) (NaN: 255): the nearest value, a tie to the smaller; the float bits
// rounded to M fraction bits (|y| >= 2^EMIN), or |y| * 2^(M - EMIN) rounded (below), as cpu_codes._code_ir.
template <int M, int EMIN>
XOPT_INLINE unsigned int xopt_map_code(float y, bool is_signed) {
    const unsigned int u = xopt_bits_of(y);
    const unsigned int a = u & 0x7fffffffu;
    const unsigned int sign = u >> 31;
    const unsigned int bias = ((1u << (22 - M)) - 1u) + sign;
    const unsigned int normal = ((a + bias) >> (23 - M)) - ((unsigned int)(127 + EMIN - 1) << M);
    const bool small = a < ((unsigned int)(127 + EMIN) << 23);
    // 2^(M - EMIN + 24) as a float's bits: exact, and the product below 2^(M + 24): an int
    const float t = xopt_float_of(small ? a : 0u) * xopt_float_of((unsigned int)(127 + M - EMIN + 24) << 23);
    const unsigned int sub = ((unsigned int)(int)t + ((1u << 23) - 1u + sign)) >> 24;
    const unsigned int c = small ? sub : normal;
    int code;
    if (is_signed) {
        const unsigned int minus = 0u - sign;  // all ones if y < 0
        code = (int)(((c ^ minus) - minus) + 127u);
        code = code < 255 ? code : 255;
        code = code > 0 ? code : 0;
    } else {
        code = (int)c < 255 ? (int)c : 255;
        if (sign) code = 0;
    }
    return a > 0x7f800000u ? 255u : (unsigned int)code;
}

XOPT_INLINE float xopt_value8(unsigned char code, bool is_unsigned) {
    return is_unsigned ? xopt_map_value<XOPT_UNSIGNED_M, XOPT_UNSIGNED_EMIN>(code, false)
                       : xopt_map_value<XOPT_SIGNED_M, XOPT_SIGNED_EMIN>(code, true);
}

XOPT_INLINE unsigned char xopt_code8(float y, bool is_unsigned) {
    return (unsigned char)(is_unsigned ? xopt_map_code<XOPT_UNSIGNED_M, XOPT_UNSIGNED_EMIN>(y, false)
                                       : xopt_map_code<XOPT_SIGNED_M, XOPT_SIGNED_EMIN>(y, true));
}

// What the phases share (shared memory on the GPU): the new state values of the block's chunk, rounded to float;
// each thread's largest magnitude bits of its share of a (slot, quantization block) pair; each pair's inverse.
struct xopt_scratch8 {
    float x[3][XOPT_CHUNK8];
    unsigned int part[XOPT_THREADS];
    float inverse[3][XOPT_CHUNK8 / XOPT_QBLOCK_MIN];
};
static_assert(3 * (XOPT_CHUNK8 / XOPT_QBLOCK_MIN) <= XOPT_THREADS, "a thread for each (slot, quantization block)");

// Block b's tensor, its elements [lo, hi), its addresses.
struct xopt_where8 {
    long long lo, hi;
    void* p;
    const void* g;
    unsigned char* c[3];
    float* a[3];
    int live;
};

XOPT_INLINE xopt_where8 xopt_where_of8(const unsigned long long* ptrs, const long long* sizes, const int* blocks,
                                       int n_tensors, long long b, int qblock) {
    xopt_where8 w;
    const int t = blocks[4 * b];
    const long long chunk = (long long)(XOPT_CHUNK8 / qblock) * qblock;
    w.lo = (long long)blocks[4 * b + 1] * chunk;
    const long long n = sizes[t];
    w.hi = n < w.lo + chunk ? n : w.lo + chunk;
    w.p = (void*)ptrs[t];
    w.g = (const void*)ptrs[n_tensors + t];
    w.live = 0;
    for (int j = 0; j < 3; ++j) {
        w.c[j] = (unsigned char*)ptrs[(2 + j) * n_tensors + t];
        w.a[j] = (float*)ptrs[(5 + j) * n_tensors + t];
        w.live |= (w.c[j] != 0) << j;
    }
    return w;
}

// Phase 1, each thread: its elements through the rule.
template <int RULE, typename P, typename S>
XOPT_INLINE void xopt_step8_rule(const unsigned long long* ptrs, const long long* sizes, const int* blocks,
                                 int n_tensors, const S* s, const S* clip, int qblock, int maps, long long b,
                                 long long t, long long threads, xopt_scratch8* sh) {
    const xopt_where8 w = xopt_where_of8(ptrs, sizes, blocks, n_tensors, b, qblock);
    P* p = (P*)w.p;
    const P* g = (const P*)w.g;
    const long long q0 = w.lo / qblock;
    for (long long j = w.lo + t; j < w.hi; j += threads) {
        const int k = (int)(j - w.lo), kq = k / qblock;  // in the chunk (32-bit division)
        S v[3];
        XOPT_UNROLL
        for (int slot = 0; slot < 3; ++slot) {
            v[slot] = (w.live >> slot) & 1
                ? (S)(xopt_value8(xopt_ld(w.c[slot] + j), (maps >> slot) & 1) * xopt_ld(w.a[slot] + q0 + kq)) : (S)0;
        }
        const S pk = xopt_rule<RULE, S>(xopt_to_math(xopt_ld(p + j)), xopt_grad(xopt_ld(g + j), clip), v[0], v[1],
                                        v[2], s);
        xopt_st(p + j, xopt_from_math(pk, p));
        XOPT_UNROLL
        for (int slot = 0; slot < 3; ++slot) {
            if ((w.live >> slot) & 1) sh->x[slot][k] = (float)v[slot];
        }
    }
}

// The (slot, quantization block) pairs of a chunk of nq quantization blocks, and the threads each pair has.
XOPT_INLINE long long xopt_lanes8(long long nq, long long threads) {
    const long long lanes = threads / (3 * nq);
    return lanes > 0 ? lanes : 1;
}

// Phase 2, each thread: the largest magnitude bits of its share of one pair's values (elements lane, lane + lanes,
// ... of the quantization block).
XOPT_INLINE void xopt_step8_max(const unsigned long long* ptrs, const long long* sizes, const int* blocks,
                                int n_tensors, int qblock, long long b, long long t, long long threads,
                                xopt_scratch8* sh) {
    const xopt_where8 w = xopt_where_of8(ptrs, sizes, blocks, n_tensors, b, qblock);
    const long long nq = (w.hi - w.lo + qblock - 1) / qblock, lanes = xopt_lanes8(nq, threads);
    const long long pair = t / lanes, lane = t - pair * lanes;
    unsigned int top = 0u;
    if (pair < 3 * nq) {
        const int slot = (int)(pair / nq);
        const long long kq = pair - slot * nq, start = kq * qblock;
        const long long left = w.hi - w.lo - start, len = left < qblock ? left : qblock;
        if ((w.live >> slot) & 1) {
            const float* x = sh->x[slot] + start;
            for (long long e = lane; e < len; e += lanes) {
                const unsigned int bits = xopt_bits_of(x[e]) & 0x7fffffffu;
                top = bits > top ? bits : top;
            }
        }
    }
    sh->part[t] = top;
}

// Phase 3, each thread t < 3 x the quantization blocks: pair t's absmax written and its inverse kept.
XOPT_INLINE void xopt_step8_absmax(const unsigned long long* ptrs, const long long* sizes, const int* blocks,
                                   int n_tensors, int qblock, long long b, long long t, long long threads,
                                   xopt_scratch8* sh) {
    const xopt_where8 w = xopt_where_of8(ptrs, sizes, blocks, n_tensors, b, qblock);
    const long long nq = (w.hi - w.lo + qblock - 1) / qblock, q0 = w.lo / qblock, lanes = xopt_lanes8(nq, threads);
    if (t >= 3 * nq) return;
    const int slot = (int)(t / nq);
    const long long kq = t - slot * nq;
    if (!((w.live >> slot) & 1)) return;
    unsigned int top = 0u;
    for (long long lane = 0; lane < lanes; ++lane) {
        const unsigned int bits = sh->part[t * lanes + lane];
        top = bits > top ? bits : top;
    }
    if (top > 0x7f800000u) top = 0x7fc00000u;  // one NaN, the quiet one arithmetic makes
    const float absmax = xopt_float_of(top);
    float* a = slot == 0 ? w.a[0] : (slot == 1 ? w.a[1] : w.a[2]);  // constant indices: no local memory
    xopt_st(a + q0 + kq, absmax);
    sh->inverse[slot][kq] = 1.0f / (absmax != 0.0f ? absmax : 1.0f);
}

// Phase 4, each thread: the codes of its elements.
XOPT_INLINE void xopt_step8_codes(const unsigned long long* ptrs, const long long* sizes, const int* blocks,
                                  int n_tensors, int qblock, int maps, long long b, long long t, long long threads,
                                  xopt_scratch8* sh) {
    const xopt_where8 w = xopt_where_of8(ptrs, sizes, blocks, n_tensors, b, qblock);
    for (long long j = w.lo + t; j < w.hi; j += threads) {
        const int k = (int)(j - w.lo), kq = k / qblock;
        XOPT_UNROLL
        for (int slot = 0; slot < 3; ++slot) {
            if ((w.live >> slot) & 1)
                xopt_st(w.c[slot] + j, xopt_code8(sh->x[slot][k] * sh->inverse[slot][kq], (maps >> slot) & 1));
        }
    }
}

#ifndef XOPT_HOST
// qblock: the quantization block (block_size), XOPT_QBLOCK_MIN <= qblock <= XOPT_CHUNK8; maps: bit j, slot j unsigned;
// launched with XOPT_THREADS threads a block (a thread for each pair in phases 2 and 3).
template <int RULE, typename P, typename S>
__global__ void xopt_step8(const unsigned long long* __restrict__ ptrs, const long long* __restrict__ sizes,
                           const int* __restrict__ blocks, int n_tensors, const S* __restrict__ clip,
                           const S* __restrict__ scalars, int qblock, int maps) {
    __shared__ xopt_scratch8 sh;
    const S* row = scalars + XOPT_SCALARS * blocks[4 * blockIdx.x + 3];
    S s[XOPT_SCALARS];
    XOPT_UNROLL
    for (int k = 0; k < XOPT_SCALARS; ++k) s[k] = row[k];
    xopt_step8_rule<RULE, P, S>(ptrs, sizes, blocks, n_tensors, s, clip, qblock, maps, blockIdx.x, threadIdx.x,
                                blockDim.x, &sh);
    __syncthreads();
    xopt_step8_max(ptrs, sizes, blocks, n_tensors, qblock, blockIdx.x, threadIdx.x, blockDim.x, &sh);
    __syncthreads();
    xopt_step8_absmax(ptrs, sizes, blocks, n_tensors, qblock, blockIdx.x, threadIdx.x, blockDim.x, &sh);
    __syncthreads();
    xopt_step8_codes(ptrs, sizes, blocks, n_tensors, qblock, maps, blockIdx.x, threadIdx.x, blockDim.x, &sh);
}
#endif  // the CPU build runs the phases itself (tests/cuda_host.cpp)
