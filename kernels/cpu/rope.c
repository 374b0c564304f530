/* Rotary position embedding (SPEC 1.2), in place.
 *
 * f_i = base^(-2i/r), theta = pos * f_i, computed in double so positions up to 2^20 keep float32
 * accuracy; each pair (a, b) -> (a cos - b sin, a sin + b cos), or by -theta when inverse.
 * "half" pairs (i, i + r/2); "interleaved" pairs (2i, 2i + 1); features >= r pass through.
 * cos/sin are computed once per (b, t) row and shared by its G heads. */
#include <math.h>
#include <stdlib.h>
#include <omp.h>

#include "lmkern/attention.h"

#define LK_DEFINE_ROPE(NAME, real)                                                                   \
static lk_status NAME(const lk_rope_params *p) {                                                  \
    const int64_t half = p->rotary_dim / 2, rows = p->B * p->T, G = p->G, D = p->D;              \
    double *inv_freq = (double *)malloc(sizeof(double) * (size_t)(half > 0 ? half : 1));          \
    if (!inv_freq) return LK_ERR_NOMEM;                                                           \
    for (int64_t i = 0; i < half; i++)                                                            \
        inv_freq[i] = pow(p->base, -2.0 * (double)i / (double)p->rotary_dim);                     \
    int failed = 0;                                                                               \
    const int team_ = lk_team_for(rows * (G * D * (int64_t)sizeof(real) * 2 + half * 64));                   \
    _Pragma("omp parallel num_threads(team_)")                                                               \
    {                                                                                             \
        real *cs = (real *)malloc(sizeof(real) * (size_t)(2 * half > 0 ? 2 * half : 1));                   \
        if (!cs) { _Pragma("omp atomic write") failed = 1; }                                      \
        int64_t lo, hi;                                                                           \
        lk_chunk(rows, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);                    \
        for (int64_t row = lo; row < hi && cs; row++) {                                           \
            const int64_t b = row / p->T, t = row % p->T;                                         \
            const double pos = (double)p->positions[b * p->pos_bstride + t];                      \
            const double sign = p->inverse ? -1.0 : 1.0;                                          \
            for (int64_t i = 0; i < half; i++) {                                                  \
                const double theta = pos * inv_freq[i];                                           \
                cs[i] = (real)cos(theta);                                                            \
                cs[half + i] = (real)(sign * sin(theta));                                            \
            }                                                                                     \
            for (int64_t g = 0; g < G; g++) {                                                     \
                real *x = (real *)p->x + (row * G + g) * D;                                             \
                for (int64_t i = 0; i < half; i++) {                                              \
                    const int64_t ia = p->interleaved ? 2 * i : i;                                \
                    const int64_t ib = p->interleaved ? 2 * i + 1 : i + half;                     \
                    const real a = x[ia], bb = x[ib], c = cs[i], s = cs[half + i];                   \
                    x[ia] = a * c - bb * s;                                                       \
                    x[ib] = a * s + bb * c;                                                       \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        free(cs);                                                                                 \
    }                                                                                             \
    free(inv_freq);                                                                               \
    return failed ? LK_ERR_NOMEM : LK_OK;                                                         \
}

LK_DEFINE_ROPE(rope_f32, float)
LK_DEFINE_ROPE(rope_f64, double)

lk_status lk_rope_cpu(const lk_rope_params *p) {
    if (p->dtype == LK_F32) return rope_f32(p);
    if (p->dtype == LK_F64) return rope_f64(p);
    return LK_ERR_DTYPE;
}
