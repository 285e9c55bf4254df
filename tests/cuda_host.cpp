// xopt/engines/cuda/optimizers.cu built for the CPU: every block, every thread, one after another.
//
// The kernel has no shared memory and no __syncthreads, so running its threads in turn gives
// what the GPU computes (with --fmad=false there, -ffp-contract=off here).  What this cannot
// show: anything about the GPU itself (NVRTC, the PTX half conversions, speed).  Built and
// driven by tests/test_cuda_source.py.
#include <cmath>
#include <cstdint>
#include <cstring>

#define XOPT_HOST
#define XOPT_INLINE static inline
#define __global__ static
#define __restrict__ __restrict

struct xopt_dim3 { unsigned int x; };
static xopt_dim3 blockIdx, threadIdx, blockDim;

typedef unsigned short xopt_half;
XOPT_INLINE float xopt_load(xopt_half h) { _Float16 f; std::memcpy(&f, &h, 2); return (float)f; }
XOPT_INLINE void xopt_store(xopt_half* dst, float x) { _Float16 f = (_Float16)x; std::memcpy(dst, &f, 2); }
XOPT_INLINE float xopt_sqrt(float x) { return std::sqrt(x); }
XOPT_INLINE double xopt_sqrt(double x) { return std::sqrt(x); }

#include "../xopt/engines/cuda/optimizers.cu"

template <int RULE, typename P, typename S>
static void run(int n_blocks, int threads, const unsigned long long* ptrs, const long long* sizes, const int* blocks,
                int n_tensors, const double* s) {
    blockDim.x = threads;
    for (int b = 0; b < n_blocks; ++b) {
        blockIdx.x = b;
        for (int t = 0; t < threads; ++t) {
            threadIdx.x = t;
            xopt_step<RULE, P, S>(ptrs, sizes, blocks, n_tensors, (S)s[0], (S)s[1], (S)s[2], (S)s[3], (S)s[4],
                                  (S)s[5], (S)s[6], (S)s[7], (S)s[8]);
        }
    }
}

template <int RULE>
static int run_typed(int ptype, int n_blocks, int threads, const unsigned long long* ptrs, const long long* sizes,
                     const int* blocks, int n_tensors, const double* s) {
    switch (ptype) {
        case 16: run<RULE, xopt_half, float>(n_blocks, threads, ptrs, sizes, blocks, n_tensors, s); return 0;
        case 32: run<RULE, float, float>(n_blocks, threads, ptrs, sizes, blocks, n_tensors, s); return 0;
        case 64: run<RULE, double, double>(n_blocks, threads, ptrs, sizes, blocks, n_tensors, s); return 0;
    }
    return 1;
}

// rule: 0-9 as in xopt/engines/kernels.py; ptype: the param's bits (16 half, 32 float, 64 double).
extern "C" int xopt_host_launch(int rule, int ptype, int n_blocks, int threads, const unsigned long long* ptrs,
                                const long long* sizes, const int* blocks, int n_tensors, const double* s) {
    switch (rule) {
        case 0: return run_typed<0>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, s);
        case 1: return run_typed<1>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, s);
        case 2: return run_typed<2>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, s);
        case 3: return run_typed<3>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, s);
        case 4: return run_typed<4>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, s);
        case 5: return run_typed<5>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, s);
        case 6: return run_typed<6>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, s);
        case 7: return run_typed<7>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, s);
        case 8: return run_typed<8>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, s);
        case 9: return run_typed<9>(ptype, n_blocks, threads, ptrs, sizes, blocks, n_tensors, s);
    }
    return 1;
}
