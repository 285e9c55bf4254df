// xopt/engines/cuda/optimizers.cu built for the CPU: every block, every thread, one after another.
//
// The step kernel has no shared memory and no __syncthreads, so running its threads in turn gives
// what the GPU computes (with --fmad=false there, -ffp-contract=off here).  The norm kernel's
// phases and the 8-bit step's, which __syncthreads separates on the GPU, run here each for every
// thread of a block before the next (xopt_host_norm, xopt_host_step8).  The 16-byte accesses are counted, and one at an address the
// GPU could not load 16 bytes from makes the launch fail (xopt_host_launch returns 2).  What this
// cannot show: anything about the GPU itself (NVRTC, the PTX half conversions, the atomics and
// fences of the norm pass, speed).  Built and driven by tests/test_cuda_source.py.
#include <cmath>
#include <cstdint>
#include <cstring>

#define XOPT_HOST
#define XOPT_INLINE static inline
#define __global__ static
#define __restrict__ __restrict

struct xopt_dim3 { unsigned int x; };
static xopt_dim3 blockIdx, threadIdx, blockDim;

struct uint4 { unsigned int x, y, z, w; };
typedef unsigned short xopt_half;
XOPT_INLINE float xopt_to_math(xopt_half h) { _Float16 f; std::memcpy(&f, &h, 2); return (float)f; }
XOPT_INLINE xopt_half xopt_from_math(float x, xopt_half*) {
    _Float16 f = (_Float16)x;
    xopt_half h;
    std::memcpy(&h, &f, 2);
    return h;
}
XOPT_INLINE float xopt_sqrt(float x) { return std::sqrt(x); }
XOPT_INLINE double xopt_sqrt(double x) { return std::sqrt(x); }
template <typename T>
XOPT_INLINE T xopt_ld(const T* a) { return *a; }
template <typename T>
XOPT_INLINE void xopt_st(T* a, T x) { *a = x; }
template <typename T>
XOPT_INLINE T xopt_ld_l2(const T* a) { return *a; }
XOPT_INLINE unsigned int xopt_count_done(unsigned int* done, unsigned int blocks) {  // atomicInc, one block at a time
    const unsigned int old = *done;
    *done = old >= blocks - 1 ? 0 : old + 1;
    return old;
}
#define XOPT_ALIGNED(a) (((std::uintptr_t)(a) & 15) == 0)
#define XOPT_UNROLL

static long long xopt_host_wide = 0;  // 16-byte accesses since the last launch
static bool xopt_host_misaligned = false;
XOPT_INLINE uint4 xopt_ld16(const void* a) {
    xopt_host_wide += 1;
    xopt_host_misaligned |= !XOPT_ALIGNED(a);
    uint4 x;
    std::memcpy(&x, a, 16);
    return x;
}
XOPT_INLINE void xopt_st16(void* a, uint4 x) {
    xopt_host_wide += 1;
    xopt_host_misaligned |= !XOPT_ALIGNED(a);
    std::memcpy(a, &x, 16);
}

#include "../xopt/engines/cuda/optimizers.cu"

template <int RULE, typename P, typename S, typename T>
static void run(int n_blocks, int threads, const unsigned long long* ptrs, const long long* sizes, const int* blocks,
                int n_tensors, const void* clip, const void* scalars) {
    blockDim.x = threads;
    for (int b = 0; b < n_blocks; ++b) {
        blockIdx.x = b;
        for (int t = 0; t < threads; ++t) {
            threadIdx.x = t;
            xopt_step<RULE, P, S, T>(ptrs, sizes, blocks, n_tensors, (const S*)clip, (const S*)scalars);
        }
    }
}

#define XOPT_RUN(P, S, T) run<RULE, P, S, T>(n_blocks, threads, ptrs, sizes, blocks, n_tensors, clip, scalars); return 0
template <int RULE>
static int run_typed(int ptype, int stype, int n_blocks, int threads, const unsigned long long* ptrs,
                     const long long* sizes, const int* blocks, int n_tensors, const void* clip, const void* scalars) {
    if (stype == 0) {  // the state in the math type
        switch (ptype) {
            case 16: XOPT_RUN(xopt_half, float, float);
            case 116: XOPT_RUN(xopt_bf16, float, float);
            case 32: XOPT_RUN(float, float, float);
            case 64: XOPT_RUN(double, double, double);
        }
    } else if constexpr (RULE == 4) {  // bfloat16 state: Adam's alone (fused_cuda.STATE_RULES)
        if (stype == 116) {
            switch (ptype) {
                case 16: XOPT_RUN(xopt_half, float, xopt_bf16);
                case 116: XOPT_RUN(xopt_bf16, float, xopt_bf16);
                case 32: XOPT_RUN(float, float, xopt_bf16);
            }
        }
    }
    return 1;
}
#undef XOPT_RUN

// rule: 0-10 as in xopt/engines/kernels.py; ptype: the param's type (16 half, 116 bfloat16, 32 float, 64 double);
// stype: the state's (0: the math type, 116: bfloat16).
// Returns 0, 1 for no such kernel, 2 if a 16-byte access was not 16-byte aligned.
extern "C" int xopt_host_launch(int rule, int ptype, int stype, int n_blocks, int threads,
                                const unsigned long long* ptrs, const long long* sizes, const int* blocks,
                                int n_tensors, const void* clip, const void* scalars) {
    xopt_host_wide = 0;
    xopt_host_misaligned = false;
    int rc = 1;
    switch (rule) {
#define XOPT_CASE(r) case r: rc = run_typed<r>(ptype, stype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, clip, scalars); break;
        XOPT_CASE(0) XOPT_CASE(1) XOPT_CASE(2) XOPT_CASE(3) XOPT_CASE(4)
        XOPT_CASE(5) XOPT_CASE(6) XOPT_CASE(7) XOPT_CASE(8) XOPT_CASE(9) XOPT_CASE(10)
#undef XOPT_CASE
    }
    return rc == 0 && xopt_host_misaligned ? 2 : rc;
}

// The 16-byte accesses of the last launch.
extern "C" long long xopt_host_wide_accesses() { return xopt_host_wide; }

// xopt_norm as the GPU runs it: its phases in the order its __syncthreads sets, each phase for every thread of a
// block before the next (the blocks one after another: the last one counted is the last one run).
template <typename P, typename S>
static void norm(int n_blocks, int threads, const unsigned long long* ptrs, const long long* sizes, const int* blocks,
                 int n_tensors, double* sums, unsigned int* done, double* out, S* scale, double max_norm) {
    static double sq[XOPT_THREADS], nf[XOPT_THREADS];
    for (int b = 0; b < n_blocks; ++b) {
        for (int t = 0; t < threads; ++t) xopt_norm_share<P>(ptrs, sizes, blocks, n_tensors, b, t, threads, sq, nf);
        if (!xopt_norm_block(sq, nf, threads, sums, done, b, n_blocks)) continue;
        for (int t = 0; t < threads; ++t) xopt_norm_gather(sums, n_blocks, t, threads, sq, nf);
        xopt_norm_finish<S>(sq, nf, threads, out, scale, max_norm);
    }
}

// ptype as above; returns 0, or 1 for no such kernel or more threads than the kernel's shared arrays hold.
extern "C" int xopt_host_norm(int ptype, int n_blocks, int threads, const unsigned long long* ptrs,
                              const long long* sizes, const int* blocks, int n_tensors, double* sums,
                              unsigned int* done, double* out, void* scale, double max_norm) {
    if (threads > XOPT_THREADS) return 1;
    switch (ptype) {
        case 16: norm<xopt_half, float>(n_blocks, threads, ptrs, sizes, blocks, n_tensors, sums, done, out,
                                        (float*)scale, max_norm); return 0;
        case 116: norm<xopt_bf16, float>(n_blocks, threads, ptrs, sizes, blocks, n_tensors, sums, done, out,
                                         (float*)scale, max_norm); return 0;
        case 32: norm<float, float>(n_blocks, threads, ptrs, sizes, blocks, n_tensors, sums, done, out,
                                    (float*)scale, max_norm); return 0;
        case 64: norm<double, double>(n_blocks, threads, ptrs, sizes, blocks, n_tensors, sums, done, out,
                                      (double*)scale, max_norm); return 0;
    }
    return 1;
}

// xopt_step8 as the GPU runs it: its phases in the order its __syncthreads sets, each for every thread of a block
// before the next, the blocks one after another (the scratch is the block's shared memory: never cleared, as on the
// GPU).
template <int RULE, typename P, typename S>
static void step8(int n_blocks, int threads, const unsigned long long* ptrs, const long long* sizes,
                  const int* blocks, int n_tensors, const S* clip, const S* scalars, int qblock, int maps) {
    static xopt_scratch8 sh;
    std::memset(&sh, 0xFF, sizeof sh);  // not zeroed, as shared memory is not
    for (int b = 0; b < n_blocks; ++b) {
        const S* s = scalars + XOPT_SCALARS * blocks[4 * b + 3];
        for (int t = 0; t < threads; ++t)
            xopt_step8_rule<RULE, P, S>(ptrs, sizes, blocks, n_tensors, s, clip, qblock, maps, b, t, threads, &sh);
        for (int t = 0; t < threads; ++t) xopt_step8_max(ptrs, sizes, blocks, n_tensors, qblock, b, t, threads, &sh);
        for (int t = 0; t < threads; ++t) xopt_step8_absmax(ptrs, sizes, blocks, n_tensors, qblock, b, t, threads, &sh);
        for (int t = 0; t < threads; ++t)
            xopt_step8_codes(ptrs, sizes, blocks, n_tensors, qblock, maps, b, t, threads, &sh);
    }
}

#define XOPT_RUN8(P, S) step8<RULE, P, S>(n_blocks, threads, ptrs, sizes, blocks, n_tensors, (const S*)clip, \
                                          (const S*)scalars, qblock, maps); return 0
template <int RULE>
static int step8_typed(int ptype, int n_blocks, int threads, const unsigned long long* ptrs, const long long* sizes,
                       const int* blocks, int n_tensors, const void* clip, const void* scalars, int qblock, int maps) {
    switch (ptype) {
        case 16: XOPT_RUN8(xopt_half, float);
        case 116: XOPT_RUN8(xopt_bf16, float);
        case 32: XOPT_RUN8(float, float);
        case 64: XOPT_RUN8(double, double);
    }
    return 1;
}
#undef XOPT_RUN8

// rule and ptype as xopt_host_launch's; qblock: the quantization block (XOPT_QBLOCK_MIN..XOPT_CHUNK8), maps: bit j,
// slot j on the unsigned map.  Returns 0, or 1 for no such kernel, a qblock the kernel does not take or other than
// XOPT_THREADS threads.
extern "C" int xopt_host_step8(int rule, int ptype, int n_blocks, int threads, const unsigned long long* ptrs,
                               const long long* sizes, const int* blocks, int n_tensors, const void* clip,
                               const void* scalars, int qblock, int maps) {
    if (qblock < XOPT_QBLOCK_MIN || qblock > XOPT_CHUNK8 || threads != XOPT_THREADS) return 1;
    switch (rule) {
#define XOPT_CASE(r) case r: return step8_typed<r>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, clip, \
                                                   scalars, qblock, maps);
        XOPT_CASE(0) XOPT_CASE(1) XOPT_CASE(2) XOPT_CASE(3) XOPT_CASE(4)
        XOPT_CASE(5) XOPT_CASE(6) XOPT_CASE(7) XOPT_CASE(8) XOPT_CASE(9) XOPT_CASE(10)
#undef XOPT_CASE
    }
    return 1;
}

// The codes and values of the two maps, for the tests: codes of float ys, or values of codes (as floats).
extern "C" void xopt_host_codes8(const float* y, unsigned char* out, long long n, int is_unsigned) {
    for (long long i = 0; i < n; ++i) out[i] = xopt_code8(y[i], is_unsigned != 0);
}
extern "C" void xopt_host_values8(const unsigned char* codes, float* out, long long n, int is_unsigned) {
    for (long long i = 0; i < n; ++i) out[i] = xopt_value8(codes[i], is_unsigned != 0);
}
