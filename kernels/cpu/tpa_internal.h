/* What tpa_attention.c (the generic path, the dispatch) shares with the SIMD engine tpa_simd.h, which is
 * compiled once per element type (tpa_simd_f32.c, tpa_simd_f64.c). */
#ifndef LMKERN_TPA_INTERNAL_H
#define LMKERN_TPA_INTERNAL_H

#include <string.h>

#include "lmkern/common.h"
#include "lmkern/softmax.h"
#include "lmkern/tpa.h"

#ifndef LK_TPA_PREFETCH
#define LK_TPA_PREFETCH 1        /* the block ahead whose factors are prefetched, spread over the value
                                    fold of the current block (0: none; only where lk_prefetch_pays) */
#endif
#ifndef LK_TPA_BLOCK
#define LK_TPA_BLOCK 64          /* cached tokens per block in the SIMD path */
#endif
/* The value fold's register tile: LK_TPA_FOLD_G heads x LK_TPA_FOLD_NV vectors of features.  AVX-512 (32
 * registers): 4 x 4 accumulators + 4 operands.  AVX2 (16 registers): 6 x 2 accumulators + 2 operands (a
 * 4 x 4 tile spills; in a micro-benchmark of the fold on Zen 3, 6 x 2 and 8 x 1 ran at 67-87% of the FMA
 * peak, 2 x 4 at 64-79%, 4 x 2 at 53-63%, the spilling 4 x 4 at 51-59%). */
#ifndef LK_TPA_FOLD_G
#define LK_TPA_FOLD_G (LK_VREGS >= 32 ? 4 : 6)
#endif
#ifndef LK_TPA_FOLD_NV
#define LK_TPA_FOLD_NV (LK_VREGS >= 32 ? 4 : 2)
#endif
#define LK_TPA_MIN_SPLIT 512     /* fewest keys per cache split */

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* Vector FMAs per cached key of each path for `lanes`-wide vectors (1: scalar). */
static int tpa_use_factor(const lk_tpa_attention_params *p, int64_t lanes) {
    const int64_t vq = lk_cdiv(p->Rq, lanes), vh = lk_cdiv(p->H, lanes);
    const int64_t factor = p->Rk * p->D * vq + p->Rk * p->Rq * vh;
    const int64_t materialized = p->Rk * p->D * vh;
    if (p->path == LK_TPA_PATH_FACTOR) return 1;
    if (p->path == LK_TPA_PATH_MATERIALIZED) return 0;
    return factor <= materialized;
}

/* The key range and query position of task (b, i): keys [0, end) are candidates. */
static inline void tpa_query_range(const lk_tpa_attention_params *p, int64_t b, int64_t i, int64_t *end,
                                   int64_t *qp) {
    const int64_t len = p->kv_lens ? p->kv_lens[b] : p->M;
    *qp = p->q_pos ? p->q_pos[b * p->q_pos_bstride + i] : len - p->N + i;
    *end = len;
    if (p->causal && !p->kv_pos) *end = lk_max_i64(0, lk_min_i64(len, *qp + 1));
}

static inline int tpa_admissible(const lk_tpa_attention_params *p, int64_t b, int64_t j, int64_t qp) {
    return !(p->causal && p->kv_pos) || p->kv_pos[b * p->kv_pos_bstride + j] <= qp;
}

/* The split combine, run by every thread of an engine's team after its tasks (one parallel region per
 * call: a second region would wake the sleeping workers again, tens of microseconds on a VM).  Called
 * after a barrier, with *failed the same for every thread; the end of the region is its barrier. */
static void tpa_combine_splits(const lk_tpa_attention_params *p, int64_t S, void *part) {
    const int64_t rows = p->B * p->N * p->H, E = p->E;
    _Pragma("omp for schedule(static) nowait")
    for (int64_t r = 0; r < rows; r++) {
        if (p->dtype == LK_F64) {
            const double *ph = (const double *)part + r * S * (E + 2);
            lk_softmax_combine_f64(S, ph, ph + S, ph + 2 * S, E, E, (double *)p->out + r * E,
                                   p->lse ? (double *)p->lse + r : NULL);
        } else {
            const float *ph = (const float *)part + r * S * (E + 2);
            lk_softmax_combine_f32(S, ph, ph + S, ph + 2 * S, E, E, (float *)p->out + r * E,
                                   p->lse ? (float *)p->lse + r : NULL);
        }
    }
}

/* Hands a task's state to the combine: written out directly when the query has a single split,
 * else stored as partial sp of query q (layout per query and head: m[S], l[S], acc[S][E]). */
#define LK_DEFINE_TPA_FINISH(T, COMBINE)                                                          \
static void tpa_finish_##T(const lk_tpa_attention_params *p, int64_t S, int64_t q, int64_t sp,   \
                           const T *m, const T *l, const T *acc, int64_t acc_stride, T *part) {   \
    const int64_t H = p->H, E = p->E;                                                             \
    for (int64_t h = 0; h < H; h++) {                                                             \
        if (S == 1) {                                                                             \
            COMBINE(1, m + h, l + h, acc + h * acc_stride, acc_stride, E,                          \
                    (T *)p->out + (q * H + h) * E, p->lse ? (T *)p->lse + q * H + h : NULL);      \
        } else {                                                                                  \
            T *ph = part + (q * H + h) * S * (E + 2);                                             \
            ph[sp] = m[h];                                                                        \
            ph[S + sp] = l[h];                                                                    \
            memcpy(ph + 2 * S + sp * E, acc + h * acc_stride, sizeof(T) * (size_t)E);             \
        }                                                                                         \
    }                                                                                             \
}

LK_DEFINE_TPA_FINISH(float, lk_softmax_combine_f32)
LK_DEFINE_TPA_FINISH(double, lk_softmax_combine_f64)

/* Threads for a call: at most one per task, and one per LK_PAR_WORK FMAs of work (a tiny decode step runs
 * on the calling thread instead of waking, or on a busy machine waiting for, a second one).  Results never
 * depend on it: the split count S is fixed by the shape and lk_get_num_threads(). */
static inline int tpa_team(const lk_tpa_attention_params *p, int64_t tasks) {
    const int64_t per_key = p->Rk * p->Rq * p->D + p->H * (p->Rq * p->Rk + p->Rk + 2 * p->Rv) + p->H * p->Rv * p->E;
    const int by_work = lk_team_for(p->B * p->N * lk_max_i64(p->M, 1) * lk_max_i64(per_key, 1));
    const int cap = lk_team_cap(tasks);
    return by_work < cap ? by_work : cap;
}

/* The SIMD engine (float32, float64): tasks, then the split combine, in one parallel region. */
void lk_tpa_simd_f32(const lk_tpa_attention_params *p, int64_t S, float *part, int *failed);
void lk_tpa_simd_f64(const lk_tpa_attention_params *p, int64_t S, double *part, int *failed);

#endif
