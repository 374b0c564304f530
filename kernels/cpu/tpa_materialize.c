/* tpa.materialize (SPEC 2.1): out[n, h, :] = scale * sum_r a[n, h, r] b[n, r, :].
 *
 * One task per (n, h) row of the output, split statically over threads; the inner loop over the
 * feature axis is contiguous (the compiler vectorizes it). */
#include <omp.h>

#include "lmkern/tpa.h"

#define LK_DEFINE_MATERIALIZE(NAME, T)                                                            \
static void NAME(const lk_tpa_materialize_params *p) {                                            \
    const int64_t H = p->H, R = p->R, D = p->D, tasks = p->rows * p->H;                          \
    const T scale = (T)p->scale;                                                                  \
    const int team_ = lk_team_for(tasks * D * (int64_t)sizeof(T) * (R + 1));                      \
    _Pragma("omp parallel num_threads(team_)")                                                    \
    {                                                                                             \
        int64_t lo, hi;                                                                           \
        lk_chunk(tasks, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);                   \
        for (int64_t t = lo; t < hi; t++) {                                                       \
            const int64_t n = t / H;                                                              \
            const T *a = (const T *)p->a + t * R;                                                 \
            const T *b = (const T *)p->b + n * R * D;                                             \
            T *o = (T *)p->out + t * D;                                                           \
            for (int64_t d = 0; d < D; d++) o[d] = 0;                                             \
            /* o[:] += (scale a[r]) b[r, :] */                                                    \
            for (int64_t r = 0; r < R; r++) {                                                     \
                const T w = scale * a[r];                                                         \
                const T *br = b + r * D;                                                          \
                for (int64_t d = 0; d < D; d++) o[d] += w * br[d];                                \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
}

LK_DEFINE_MATERIALIZE(materialize_f32, float)
LK_DEFINE_MATERIALIZE(materialize_f64, double)

lk_status lk_tpa_materialize_cpu(const lk_tpa_materialize_params *p) {
    if (p->rows == 0 || p->H == 0 || p->D == 0) return LK_OK;
    if (p->dtype == LK_F32) materialize_f32(p);
    else if (p->dtype == LK_F64) materialize_f64(p);
    else return LK_ERR_DTYPE;
    return LK_OK;
}
