/* Mixture-of-Recursions router scores (SPEC 3.1), fused GEMV / small GEMM + activation:
 *
 *   z[r, c] = alpha * act(<h[r], wt[c]> / temperature)
 *
 * One pass over h: each row is read once and all C dot products are taken while it is in cache
 * (the router is memory-bound: Dm reads per row for C multiply-adds).  Rows are split statically
 * over threads; each dot product has a fixed summation order, so results do not depend on the
 * thread count.  The activation is computed in double precision (C values per row: negligible). */
#include <math.h>
#include <stdlib.h>
#include <omp.h>

#include "lmkern/mor.h"
#include "lmkern/simd.h"

/* sum_d a[d] * b[d] in float32 (SIMD, four independent accumulators to hide the FMA latency) */
static float dot_f32_simd(const float *a, const float *b, int64_t n) {
    lk_vf s0 = lk_vf_zero(), s1 = lk_vf_zero(), s2 = lk_vf_zero(), s3 = lk_vf_zero();
    int64_t d = 0;
    for (; d + 4 * LK_VF <= n; d += 4 * LK_VF) {
        s0 = lk_vf_fma(lk_vf_load(a + d), lk_vf_load(b + d), s0);
        s1 = lk_vf_fma(lk_vf_load(a + d + LK_VF), lk_vf_load(b + d + LK_VF), s1);
        s2 = lk_vf_fma(lk_vf_load(a + d + 2 * LK_VF), lk_vf_load(b + d + 2 * LK_VF), s2);
        s3 = lk_vf_fma(lk_vf_load(a + d + 3 * LK_VF), lk_vf_load(b + d + 3 * LK_VF), s3);
    }
    for (; d + LK_VF <= n; d += LK_VF) s0 = lk_vf_fma(lk_vf_load(a + d), lk_vf_load(b + d), s0);
    if (d < n) s1 = lk_vf_fma(lk_vf_load_n(a + d, (int)(n - d)), lk_vf_load_n(b + d, (int)(n - d)), s1);
    return lk_vf_sum(lk_vf_add(lk_vf_add(s0, s1), lk_vf_add(s2, s3)));
}

/* sum_d a[d] * b[d], four interleaved partial sums (generic path, and float64) */
#define LK_DEFINE_DOT_GENERIC(NAME, T)                                                            \
static double NAME(const T *a, const T *b, int64_t n) {                                           \
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                                             \
    int64_t d = 0;                                                                                \
    for (; d + 4 <= n; d += 4) {                                                                  \
        s0 += a[d] * b[d]; s1 += a[d + 1] * b[d + 1];                                             \
        s2 += a[d + 2] * b[d + 2]; s3 += a[d + 3] * b[d + 3];                                     \
    }                                                                                             \
    for (; d < n; d++) s0 += a[d] * b[d];                                                         \
    return (double)((s0 + s1) + (s2 + s3));                                                       \
}
LK_DEFINE_DOT_GENERIC(dot_f32_generic, float)
LK_DEFINE_DOT_GENERIC(dot_f64_generic, double)

/* z[0..C) <- alpha * act(z / temperature), in double */
static void activate(double *z, int64_t C, int act, double alpha, double inv_temp) {
    for (int64_t c = 0; c < C; c++) z[c] *= inv_temp;
    switch (act) {
    case LK_MOR_ACT_SIGMOID:
        for (int64_t c = 0; c < C; c++) z[c] = 1.0 / (1.0 + exp(-z[c]));
        break;
    case LK_MOR_ACT_TANH:
        for (int64_t c = 0; c < C; c++) z[c] = tanh(z[c]);
        break;
    case LK_MOR_ACT_SOFTMAX: {
        /* softmax_c = e^(z_c - max) / sum e^(z_c' - max); NaN anywhere gives NaN throughout */
        double m = -INFINITY;
        for (int64_t c = 0; c < C; c++) m = z[c] > m || z[c] != z[c] ? z[c] : m;
        double s = 0;
        for (int64_t c = 0; c < C; c++) s += (z[c] = exp(z[c] - m));
        for (int64_t c = 0; c < C; c++) z[c] /= s;
        break;
    }
    default: break;
    }
    for (int64_t c = 0; c < C; c++) z[c] *= alpha;
}

#define LK_MOR_MAXC_STACK 64

#define LK_DEFINE_ROUTER(NAME, T, DOT_FAST, DOT_GENERIC)                                          \
static lk_status NAME(const lk_mor_router_params *p) {                                            \
    const int64_t rows = p->rows, C = p->C, Dm = p->Dm;                                           \
    const double inv_temp = 1.0 / p->temperature;                                                 \
    const int fast = lk_simd_enabled();                                                           \
    int nomem = 0;                                                                                \
    const int team_ = lk_team_for(rows * Dm * (C > 0 ? C : 1) * 4);                               \
    _Pragma("omp parallel num_threads(team_)")                                                    \
    {                                                                                             \
        double stack[LK_MOR_MAXC_STACK];                                                          \
        double *zr = C <= LK_MOR_MAXC_STACK ? stack : (double *)malloc(sizeof(double) * (size_t)C); \
        int64_t lo, hi;                                                                           \
        lk_chunk(rows, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);                    \
        if (!zr) { _Pragma("omp atomic write") nomem = 1; lo = hi; }                              \
        for (int64_t r = lo; r < hi; r++) {                                                       \
            T *zo = (T *)p->z + r * C;                                                            \
            if (p->h) {                                                                           \
                const T *hr = (const T *)p->h + r * Dm;                                           \
                for (int64_t c = 0; c < C; c++) {                                                 \
                    const T *wc = (const T *)p->wt + c * Dm;                                      \
                    zr[c] = fast ? DOT_FAST(hr, wc, Dm) : DOT_GENERIC(hr, wc, Dm);                \
                }                                                                                 \
            } else {                                                                              \
                for (int64_t c = 0; c < C; c++) zr[c] = (double)zo[c];                            \
            }                                                                                     \
            activate(zr, C, p->activation, p->alpha, inv_temp);                                   \
            for (int64_t c = 0; c < C; c++) zo[c] = (T)zr[c];                                     \
        }                                                                                         \
        if (zr != stack) free(zr);                                                                \
    }                                                                                             \
    return nomem ? LK_ERR_NOMEM : LK_OK;                                                          \
}

LK_DEFINE_ROUTER(router_f32, float, dot_f32_simd, dot_f32_generic)
LK_DEFINE_ROUTER(router_f64, double, dot_f64_generic, dot_f64_generic)

lk_status lk_mor_router_cpu(const lk_mor_router_params *p) {
    if (p->rows == 0 || p->C == 0) return LK_OK;
    return p->dtype == LK_F64 ? router_f64(p) : p->dtype == LK_F32 ? router_f32(p) : LK_ERR_DTYPE;
}
