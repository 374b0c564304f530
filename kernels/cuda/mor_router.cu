/* Mixture-of-Recursions router scores (SPEC 3.1) on the GPU:
 *   z[r, c] = alpha * act(<h[r], w[:, c]> / temperature)
 *
 * One warp per token row r (ROUTER_WARPS rows per block, grid-stride over rows).  Lanes split the Dm
 * features (lane l takes d = l, l + 32, ...: coalesced reads of the h row) and accumulate up to
 * ROUTER_CC outputs at once in float32 registers; a butterfly warp sum (fixed order: deterministic)
 * gives the C logits, kept in shared memory (C <= LK_MOR_CUDA_MAX_C) for the activation, which
 * lanes apply over c.  As on the CPU, 1/temperature and the activation are evaluated in double (the
 * build's --use_fast_math would make tanhf/expf approximate to ~2^-11; double math is unaffected), so
 * results agree with the CPU to float32 rounding of the dot product.  Softmax is max-stabilized; a NaN
 * logit makes the row NaN (as the CPU kernel). */
#include <math.h>

#include "common.cuh"
#include "lmkern/mor.h"

namespace {

using namespace lk;

constexpr int ROUTER_WARPS = 4;
constexpr int ROUTER_CC = 8;

__device__ __forceinline__ bool is_nan(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }
/* max that propagates NaN (fmaxf drops it) */
__device__ __forceinline__ float nan_max(float a, float b) { return is_nan(a) || a > b ? a : b; }

template <typename T>
__global__ void __launch_bounds__(32 * ROUTER_WARPS)
router_kernel(const lk_mor_router_params p, int64_t T_len, int64_t hs0, int64_t hs1, int64_t ws0, int64_t ws1) {
    extern __shared__ float logits_s[];  // [ROUTER_WARPS][C]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t C = p.C, Dm = p.Dm;
    float *zs = logits_s + (int64_t)warp * C;
    const T *w = (const T *)p.wt;
    const double inv_temp = 1.0 / p.temperature, alpha = p.alpha;
    for (int64_t r = (int64_t)blockIdx.x * ROUTER_WARPS + warp; r < p.rows; r += (int64_t)gridDim.x * ROUTER_WARPS) {
        const int64_t b = r / T_len, t = r - b * T_len;
        const T *h = (const T *)p.h + b * hs0 + t * hs1;
        for (int64_t c0 = 0; c0 < C; c0 += ROUTER_CC) {
            float acc[ROUTER_CC];
#pragma unroll
            for (int u = 0; u < ROUTER_CC; u++) acc[u] = 0.f;
            for (int64_t d = lane; d < Dm; d += 32) {
                const float hv = to_f<T>(h[d]);
                const T *wd = w + d * ws0;
#pragma unroll
                for (int u = 0; u < ROUTER_CC; u++)
                    if (c0 + u < C) acc[u] = fmaf(hv, to_f<T>(wd[(c0 + u) * ws1]), acc[u]);
            }
#pragma unroll
            for (int u = 0; u < ROUTER_CC; u++) {
                const float v = warp_sum(acc[u]);  // every lane holds the sum
                if (lane == 0 && c0 + u < C) zs[c0 + u] = v;   // the raw dot product; scaled in double below
            }
        }
        __syncwarp();
        double m = -INFINITY, sum = 0.0;
        if (p.activation == LK_MOR_ACT_SOFTMAX) {
            float mf = -INFINITY;   // the max of the raw logits (1/temperature > 0 keeps the order)
            for (int64_t c = lane; c < C; c += 32) mf = nan_max(mf, zs[c]);
            for (int o = 16; o > 0; o >>= 1) mf = nan_max(mf, __shfl_xor_sync(0xffffffffu, mf, o));
            m = (double)mf * inv_temp;
            for (int64_t c = lane; c < C; c += 32) sum += exp((double)zs[c] * inv_temp - m);
            sum = warp_sum(sum);
        }
        T *out = (T *)p.z + r * C;
        for (int64_t c = lane; c < C; c += 32) {
            const double z = (double)zs[c] * inv_temp;
            double a;
            switch (p.activation) {
            case LK_MOR_ACT_SIGMOID: a = 1.0 / (1.0 + exp(-z)); break;
            case LK_MOR_ACT_TANH: a = tanh(z); break;
            case LK_MOR_ACT_SOFTMAX: a = exp(z - m) / sum; break;
            default: a = z; break;
            }
            out[c] = from_f<T>((float)(alpha * a));
        }
        __syncwarp();  // zs is rewritten for the next row
    }
}

template <typename T>
lk_status launch(const lk_mor_router_params *p, int64_t T_len, const int64_t hs[2], const int64_t ws[2],
                 cudaStream_t stream) {
    const int64_t blocks = grid_stride_blocks(lk_cdiv(p->rows, ROUTER_WARPS));
    const size_t smem = sizeof(float) * (size_t)(ROUTER_WARPS * p->C);
    router_kernel<T><<<(unsigned)blocks, 32 * ROUTER_WARPS, smem, stream>>>(*p, T_len, hs[0], hs[1], ws[0], ws[1]);
    return check_launch();
}

}  // namespace

extern "C" lk_status lk_mor_router_cuda(const lk_mor_router_params *p, int64_t T, const int64_t h_stride[2],
                                        const int64_t w_stride[2], lk_stream stream) {
    if (p->rows < 0 || p->C < 0 || p->Dm < 0 || p->C > LK_MOR_CUDA_MAX_C || !(p->temperature > 0)) return LK_ERR_VALUE;
    if (p->activation < LK_MOR_ACT_NONE || p->activation > LK_MOR_ACT_SOFTMAX) return LK_ERR_VALUE;
    if (p->rows == 0 || p->C == 0) return LK_OK;
    if (T <= 0) return LK_ERR_VALUE;
    cudaStream_t s = (cudaStream_t)stream;
    switch (p->dtype) {
    case LK_F32: return launch<float>(p, T, h_stride, w_stride, s);
    case LK_F16: return launch<__half>(p, T, h_stride, w_stride, s);
    case LK_BF16: return launch<__nv_bfloat16>(p, T, h_stride, w_stride, s);
    default: return LK_ERR_DTYPE;
    }
}
