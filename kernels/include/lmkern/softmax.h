/* The one softmax combine: merging online-softmax partial states (split-KV / split-cache kernels).
 *
 * A partial state over a subset S of keys is (m, l, acc[E]) with m = max_{j in S} s_j,
 * l = sum_{j in S} e^(s_j - m), acc = sum_{j in S} e^(s_j - m) v_j.  Merging states s = 0..n-1:
 *   M = max_s m_s,  l = sum_s e^(m_s - M) l_s,  acc = sum_s e^(m_s - M) acc_s,
 *   out = acc / l,  lse = M + log l.
 * Stabilized by the maximum (not the minimum), so no partial can overflow; an empty partial has
 * m = -inf, l = 0 and contributes nothing; all-empty gives out = 0, lse = -inf.  Partials are kept in
 * float32 for float32 inputs and float64 for float64 inputs.  A NaN in any partial's m or l (a NaN
 * score reached it) makes out and lse NaN, as IEEE arithmetic over the whole row would.  The merge order is fixed (s = 0..n-1),
 * so results are bitwise reproducible. */
#ifndef LMKERN_SOFTMAX_H
#define LMKERN_SOFTMAX_H

#include <math.h>
#include <stdint.h>

#define LK_DEFINE_SOFTMAX_COMBINE(NAME, real)                                                     \
static inline void NAME(int64_t n, const real *m, const real *l, const real *acc, int64_t acc_stride, \
                        int64_t E, real *out, real *lse) {                                        \
    real mx = -INFINITY;                                                                          \
    int nan = 0;                                                                                  \
    for (int64_t s = 0; s < n; s++) {                                                             \
        mx = m[s] > mx ? m[s] : mx;                                                               \
        nan |= m[s] != m[s] || l[s] != l[s];                                                      \
    }                                                                                             \
    if (nan) {                                                                                    \
        for (int64_t e = 0; e < E; e++) out[e] = (real)NAN;                                       \
        if (lse) *lse = (real)NAN;                                                                \
        return;                                                                                   \
    }                                                                                             \
    real total = 0;                                                                               \
    for (int64_t e = 0; e < E; e++) out[e] = 0;                                                   \
    if (mx != -INFINITY) {                                                                        \
        for (int64_t s = 0; s < n; s++) {                                                         \
            if (l[s] == 0) continue;                                                              \
            const real w = (real)exp((double)(m[s] - mx));                                        \
            total += w * l[s];                                                                    \
            for (int64_t e = 0; e < E; e++) out[e] += w * acc[s * acc_stride + e];                \
        }                                                                                         \
    }                                                                                             \
    const real inv = total > 0 ? (real)1 / total : (real)0;                                       \
    for (int64_t e = 0; e < E; e++) out[e] *= inv;                                                \
    if (lse) *lse = total > 0 ? mx + (real)log((double)total) : -INFINITY;                        \
}

LK_DEFINE_SOFTMAX_COMBINE(lk_softmax_combine_f32, float)
LK_DEFINE_SOFTMAX_COMBINE(lk_softmax_combine_f64, double)

#endif
