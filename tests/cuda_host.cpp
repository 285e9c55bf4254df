// xopt/engines/cuda/optimizers.cu built for the CPU: every block, every thread, one after another.
//
// The kernel has no shared memory and no __syncthreads, so running its threads in turn gives
// what the GPU computes (with --fmad=false there, -ffp-contract=off here).  Its 16-byte accesses
// are counted, and one at an address the GPU could not load 16 bytes from makes the launch fail
// (xopt_host_launch returns 2).  What this cannot show: anything about the GPU itself (NVRTC, the
// PTX half conversions, speed).  Built and driven by tests/test_cuda_source.py.
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

template <int RULE, typename P, typename S>
static void run(int n_blocks, int threads, const unsigned long long* ptrs, const long long* sizes, const int* blocks,
                int n_tensors, int live, const void* clip, const double* s) {
    blockDim.x = threads;
    for (int b = 0; b < n_blocks; ++b) {
        blockIdx.x = b;
        for (int t = 0; t < threads; ++t) {
            threadIdx.x = t;
            xopt_step<RULE, P, S>(ptrs, sizes, blocks, n_tensors, live, (const S*)clip, (S)s[0], (S)s[1], (S)s[2],
                                  (S)s[3], (S)s[4], (S)s[5], (S)s[6], (S)s[7], (S)s[8]);
        }
    }
}

template <int RULE>
static int run_typed(int ptype, int n_blocks, int threads, const unsigned long long* ptrs, const long long* sizes,
                     const int* blocks, int n_tensors, int live, const void* clip, const double* s) {
    switch (ptype) {
        case 16: run<RULE, xopt_half, float>(n_blocks, threads, ptrs, sizes, blocks, n_tensors, live, clip, s); return 0;
        case 32: run<RULE, float, float>(n_blocks, threads, ptrs, sizes, blocks, n_tensors, live, clip, s); return 0;
        case 64: run<RULE, double, double>(n_blocks, threads, ptrs, sizes, blocks, n_tensors, live, clip, s); return 0;
    }
    return 1;
}

// rule: 0-9 as in xopt/engines/kernels.py; ptype: the param's bits (16 half, 32 float, 64 double).
// Returns 0, 1 for no such kernel, 2 if a 16-byte access was not 16-byte aligned.
extern "C" int xopt_host_launch(int rule, int ptype, int n_blocks, int threads, const unsigned long long* ptrs,
                                const long long* sizes, const int* blocks, int n_tensors, int live, const void* clip,
                                const double* s) {
    xopt_host_wide = 0;
    xopt_host_misaligned = false;
    int rc = 1;
    switch (rule) {
        case 0: rc = run_typed<0>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, live, clip, s); break;
        case 1: rc = run_typed<1>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, live, clip, s); break;
        case 2: rc = run_typed<2>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, live, clip, s); break;
        case 3: rc = run_typed<3>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, live, clip, s); break;
        case 4: rc = run_typed<4>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, live, clip, s); break;
        case 5: rc = run_typed<5>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, live, clip, s); break;
        case 6: rc = run_typed<6>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, live, clip, s); break;
        case 7: rc = run_typed<7>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, live, clip, s); break;
        case 8: rc = run_typed<8>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, live, clip, s); break;
        case 9: rc = run_typed<9>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, live, clip, s); break;
    }
    return rc == 0 && xopt_host_misaligned ? 2 : rc;
}

// The 16-byte accesses of the last launch.
extern "C" long long xopt_host_wide_accesses() { return xopt_host_wide; }
