/* Mixture-of-Recursions token-choice routing (SPEC 3.4) on the GPU:
 *   choice = argmax_c(probs[r, c] + bias[c]);  depth = choice + 1;  gate = probs[r, choice]
 *
 * One thread per token row (C, the number of recursion depths, is small).  The sum is formed in
 * float32 (as the CPU kernel does for float32 data); NaN ranks below every number, ties go to the
 * lower c (strict >), an all-NaN row chooses c = 0.  The gate is the unbiased probability, copied
 * bit for bit.  Indexing is 64-bit. */
#include "common.cuh"
#include "lmkern/mor.h"

namespace {

using namespace lk;

constexpr int TC_THREADS = 256;

template <typename T>
__global__ void __launch_bounds__(TC_THREADS)
token_choice_kernel(const lk_mor_token_choice_params p, int64_t T_len, int64_t ps0, int64_t ps1) {
    const T *bias = (const T *)p.bias;
    for (int64_t r = (int64_t)blockIdx.x * TC_THREADS + threadIdx.x; r < p.rows; r += (int64_t)gridDim.x * TC_THREADS) {
        const int64_t b = r / T_len, t = r - b * T_len;
        const T *pr = (const T *)p.probs + b * ps0 + t * ps1;
        int64_t best_c = -1;
        float best = 0.f;
        for (int64_t c = 0; c < p.C; c++) {
            const float v = to_f<T>(pr[c]) + (bias ? to_f<T>(bias[c]) : 0.f);
            const bool nan = (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u;
            if (!nan && (best_c < 0 || v > best)) {
                best = v;
                best_c = c;
            }
        }
        const int64_t c = best_c < 0 ? 0 : best_c;
        p.depth[r] = c + 1;
        ((T *)p.gate)[r] = pr[c];
    }
}

template <typename T>
lk_status launch(const lk_mor_token_choice_params *p, int64_t T_len, const int64_t ps[2], cudaStream_t stream) {
    const int64_t blocks = grid_stride_blocks(lk_cdiv(p->rows, TC_THREADS));
    token_choice_kernel<T><<<(unsigned)blocks, TC_THREADS, 0, stream>>>(*p, T_len, ps[0], ps[1]);
    return check_launch();
}

}  // namespace

extern "C" lk_status lk_mor_token_choice_cuda(const lk_mor_token_choice_params *p, int64_t T,
                                              const int64_t probs_stride[2], lk_stream stream) {
    if (p->rows < 0 || p->C < 0) return LK_ERR_VALUE;
    if (p->rows == 0) return LK_OK;
    if (p->C == 0 || T <= 0) return LK_ERR_VALUE;  // no depth to choose
    cudaStream_t s = (cudaStream_t)stream;
    switch (p->dtype) {
    case LK_F32: return launch<float>(p, T, probs_stride, s);
    case LK_F16: return launch<__half>(p, T, probs_stride, s);
    case LK_BF16: return launch<__nv_bfloat16>(p, T, probs_stride, s);
    default: return LK_ERR_DTYPE;
    }
}
