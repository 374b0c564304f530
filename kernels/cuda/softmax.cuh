/* The split-KV combine on the GPU: the merge of lmkern/softmax.h in the log2 domain, one block per row.
 *
 * A split partial of one query row is float32 [m, l, acc[0..E-1]] (stride E + 2), with scores in the
 * log2 domain (s * scale * log2 e): m = max score of the split, l = sum 2^(s - m), acc = sum 2^(s - m) v.
 * An empty split has m = -inf, l = 0.  Merging: M = max_s m_s, l = sum_s 2^(m_s - M) l_s,
 * out = sum_s 2^(m_s - M) acc_s / l, lse = (M + log2 l) ln 2 (natural log); all-empty gives out = 0 and
 * lse = -inf; a NaN in any partial's m or l (a NaN score reached it) makes out and lse NaN, as on the CPU.
 * Stabilized by the maximum, float32 throughout, fixed merge order (reproducible).
 * Every split kernel (attention, tpa.decode, the quantized cache's attend) writes this layout and
 * merges it with combine_block (one block per row); attention_mass merges its statistics the same way
 * with E = 0. */
#ifndef LMKERN_CUDA_SOFTMAX_CUH
#define LMKERN_CUDA_SOFTMAX_CUH

#include "common.cuh"

namespace lk {

constexpr float LN2_F = 0.6931471805599453f;
constexpr int COMBINE_THREADS = 128;   // the block size of the combine kernels (one block per row)

/* One block of NT threads (all call it) merges the num_splits partials of one row: the statistics
 * with the threads across splits, then the accumulators with the threads across (split group,
 * feature) and a fixed-order reduction over the groups in shared memory; the summation order is fixed
 * for a given (NT, E): reproducible.  Many splits are read with NT loads in flight, not one by one. */
template <typename T, int NT>
__device__ __forceinline__ void combine_block(const float *part, int num_splits, int64_t E, T *o, float *lse) {
    static_assert(NT % 32 == 0 && NT >= 32 && NT <= 1024, "whole warps");
    constexpr int W = NT / 32;
    __shared__ float red[NT];
    __shared__ float stat[2];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t stride = E + 2;
    float mx = -INFINITY;
    int nan = 0;
    for (int s = tid; s < num_splits; s += NT) {
        const float ms = part[s * stride], ls = part[s * stride + 1];
        mx = fmaxf(mx, ms);
        nan |= ms != ms || ls != ls;
    }
    mx = warp_max(mx);
    nan = __any_sync(0xffffffffu, nan);
    if (lane == 0) {
        red[warp] = mx;
        red[W + warp] = nan ? 1.f : 0.f;
    }
    __syncthreads();
    if (tid == 0) {
        float m = -INFINITY, n = 0.f;
        for (int w = 0; w < W; w++) {
            m = fmaxf(m, red[w]);
            n += red[W + w];
        }
        stat[0] = m;
        stat[1] = n;
    }
    __syncthreads();
    mx = stat[0];
    if (stat[1] != 0.f) {
        for (int64_t e = tid; e < E; e += NT) o[e] = from_f<T>(NAN);
        if (lse && tid == 0) *lse = NAN;
        return;
    }
    float total = 0.f;
    if (mx != -INFINITY)
        for (int s = tid; s < num_splits; s += NT) {
            const float ls = part[s * stride + 1];
            if (ls != 0.f) total += exp2f(part[s * stride] - mx) * ls;
        }
    total = warp_sum(total);
    __syncthreads();   // every thread has read stat before it is rewritten
    if (lane == 0) red[warp] = total;
    __syncthreads();
    if (tid == 0) {
        float t = 0.f;
        for (int w = 0; w < W; w++) t += red[w];
        stat[0] = t;
    }
    __syncthreads();
    total = stat[0];
    const float inv = total > 0.f ? 1.f / total : 0.f;
    if (lse && tid == 0) *lse = total > 0.f ? (mx + log2f(total)) * LN2_F : -INFINITY;
    // accumulators: EL threads across features (E rounded up to a warp, at most NT), NT / EL split groups
    for (int64_t e0 = 0; e0 < E; e0 += NT) {
        const int64_t ec = E - e0 < NT ? E - e0 : NT;
        const int EL = (int)((ec + 31) / 32 * 32), groups = NT / EL;
        const int g = tid / EL, e = tid - g * EL;
        float sum = 0.f;
        if (g < groups && e < ec && mx != -INFINITY) {
#pragma unroll 4
            for (int s = g; s < num_splits; s += groups) {
                const float ls = part[s * stride + 1];
                const float a = part[s * stride + 2 + e0 + e];
                if (ls != 0.f) sum += exp2f(part[s * stride] - mx) * a;
            }
        }
        __syncthreads();   // red is free
        red[tid] = sum;
        __syncthreads();
        if (tid < ec) {
            float acc = 0.f;
            for (int k = 0; k < groups; k++) acc += red[k * EL + tid];
            o[e0 + tid] = from_f<T>(acc * inv);
        }
    }
}

}  // namespace lk

#endif
