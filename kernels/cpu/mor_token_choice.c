/* Mixture-of-Recursions token-choice routing (SPEC 3.4):
 *
 *   choice = argmax_c (probs[r, c] + bias[c]),  depth = choice + 1,  gate = probs[r, choice]
 *
 * The bias (loss-free balancing) only steers the selection; the gate is the unbiased probability.
 * Order: NaN below every number, ties to the lower c; a row of NaN chooses c = 0.
 * Tokens are split statically over threads (no reductions across tokens: thread-count free). */
#include <omp.h>

#include "lmkern/mor.h"

#define LK_DEFINE_TOKEN_CHOICE(NAME, T)                                                           \
static void NAME(const lk_mor_token_choice_params *p) {                                          \
    const int64_t rows = p->rows, C = p->C;                                                       \
    const T *bias = (const T *)p->bias;                                                           \
    const int team_ = lk_team_for(rows * C * 16);                                                 \
    _Pragma("omp parallel num_threads(team_)")                                                    \
    {                                                                                             \
        int64_t lo, hi;                                                                           \
        lk_chunk(rows, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);                    \
        for (int64_t r = lo; r < hi; r++) {                                                       \
            const T *pr = (const T *)p->probs + r * C;                                            \
            int64_t best = -1;                                                                    \
            T best_v = 0;                                                                         \
            for (int64_t c = 0; c < C; c++) {                                                     \
                const T v = bias ? pr[c] + bias[c] : pr[c];                                       \
                if (v != v) continue;                                                             \
                if (best < 0 || v > best_v) { best = c; best_v = v; }                             \
            }                                                                                     \
            if (best < 0) best = 0;                                                               \
            p->depth[r] = best + 1;                                                               \
            ((T *)p->gate)[r] = pr[best];                                                         \
        }                                                                                         \
    }                                                                                             \
}

LK_DEFINE_TOKEN_CHOICE(token_choice_f32, float)
LK_DEFINE_TOKEN_CHOICE(token_choice_f64, double)

lk_status lk_mor_token_choice_cpu(const lk_mor_token_choice_params *p) {
    if (p->rows == 0) return LK_OK;
    if (p->C == 0) return LK_ERR_VALUE;
    if (p->dtype == LK_F64) token_choice_f64(p);
    else if (p->dtype == LK_F32) token_choice_f32(p);
    else return LK_ERR_DTYPE;
    return LK_OK;
}
