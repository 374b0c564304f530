/* The split-KV combine on the GPU: the merge of lmkern/softmax.h in the log2 domain, one warp per row.
 *
 * A split partial of one query row is float32 [m, l, acc[0..E-1]] (stride E + 2), with scores in the
 * log2 domain (s * scale * log2 e): m = max score of the split, l = sum 2^(s - m), acc = sum 2^(s - m) v.
 * An empty split has m = -inf, l = 0.  Merging: M = max_s m_s, l = sum_s 2^(m_s - M) l_s,
 * out = sum_s 2^(m_s - M) acc_s / l, lse = (M + log2 l) ln 2 (natural log); all-empty gives out = 0 and
 * lse = -inf; a NaN in any partial's m or l (a NaN score reached it) makes out and lse NaN, as on the CPU.
 * Stabilized by the maximum, float32 throughout, fixed merge order (reproducible).
 * Every split kernel (attention, tpa.decode, the quantized cache's attend) writes this layout and
 * merges it with combine_row. */
#ifndef LMKERN_CUDA_SOFTMAX_CUH
#define LMKERN_CUDA_SOFTMAX_CUH

#include "common.cuh"

namespace lk {

constexpr float LN2_F = 0.6931471805599453f;

/* One warp (all 32 lanes call it) merges the num_splits partials at `part` into o[0..E-1] (contiguous
 * feature axis, the output dtype T) and, when lse != NULL, lane 0 writes the natural-log lse. */
template <typename T>
__device__ __forceinline__ void combine_row(const float *part, int num_splits, int64_t E, T *o, float *lse) {
    const int lane = threadIdx.x & 31;
    const int64_t stride = E + 2;
    float mx = -INFINITY;
    bool nan = false;
    for (int s = 0; s < num_splits; s++) {
        const float ms = part[s * stride], ls = part[s * stride + 1];
        mx = fmaxf(mx, ms);
        nan |= ms != ms || ls != ls;
    }
    if (nan) {
        for (int64_t e = lane; e < E; e += 32) o[e] = from_f<T>(NAN);
        if (lse && lane == 0) *lse = NAN;
        return;
    }
    float total = 0.f;
    if (mx != -INFINITY)
        for (int s = 0; s < num_splits; s++) {
            const float ls = part[s * stride + 1];
            if (ls != 0.f) total += exp2f(part[s * stride] - mx) * ls;
        }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    for (int64_t e = lane; e < E; e += 32) {
        float sum = 0.f;
        if (mx != -INFINITY)
            for (int s = 0; s < num_splits; s++) {
                const float ls = part[s * stride + 1];
                if (ls != 0.f) sum += exp2f(part[s * stride] - mx) * part[s * stride + 2 + e];
            }
        o[e] = from_f<T>(sum * inv);
    }
    if (lse && lane == 0) *lse = total > 0.f ? (mx + log2f(total)) * LN2_F : -INFINITY;
}

}  // namespace lk

#endif
