/* Tensor Product Attention over factors (SPEC 2.2 prefill, 2.4 decode): the FlashTPA engine.
 *
 * Math.  With c = scale / (Rq Rk):
 *   s[h,j] = c sum_{r,s} aq[h,r] ak[j,h,s] <bq[r], bk[j,s]>
 *   o[h]   = sum_j softmax_j(s[h,j]) (1/Rv) sum_u av[j,h,u] bv[j,u,:]
 * K and V are never formed.  Per block of cached tokens (FlashTPA, T6 paper Algorithm 2):
 *   1. Y = bk_block @ P^T: every cached bk row is contracted once with a small per-query matrix P,
 *   2. scores: head mixing of Y, multiplied by ak,
 *   3. online softmax per head (running max m, sum l, accumulator acc),
 *   4. W = p * av / Rv (fold av into the probabilities), acc[h] += sum_j,u W[j,u,h] bv[j,u,:].
 * Two contractions for steps 1-2 (the "path"), both exact rewrites of the same sum:
 *   factor:       P = bq (Rq x D): Y[j,s,r] = <bq[r], bk[j,s]>, shared by all heads, then
 *                 s[h,j] = sum_s ak[j,h,s] sum_r (c aq[h,r]) Y[j,s,r]       (Rq Rk D + H Rq Rk per key)
 *   materialized: P = Q = c aq @ bq (H x D, once per query): s[h,j] = sum_s ak[j,h,s] <Q[h], bk[j,s]>
 *                                                                           (H Rk D per key)
 * LK_TPA_PATH_AUTO takes the one with fewer vector FMAs per key for the ranks (tpa_use_factor).
 * Step 4 likewise has two forms: the factor fold above (H Rv E per query and key, bv rows shared by
 * all heads), or, in prefill, a materialized value tile V[t,h,:] = (1/Rv) sum_u av[t,h,u] bv[t,u,:]
 * built once per key block and shared by a tile of LK_TPA_QTILE queries (H Rv E per key and tile,
 * then H E per query and key); tpa_use_vtile picks it when that is cheaper (Rv >= 2 in practice).
 * LK_TPA_PATH_MATERIALIZED forces Q materialization and, with several queries, value tiles.
 * Decode reads each cached factor exactly once.
 *
 * Work split.  Tasks are (row b, tile of up to LK_TPA_QTILE queries, cache split s); each task runs
 * the online softmax of each of its queries over its slice of the admissible keys (key blocks are read
 * once per tile) and hands its state (m, l, acc) to lk_softmax_combine (softmax.h, the
 * one combine: max-stabilized, partials in the input precision, float32 for float32).  Tasks are
 * independent, so dynamic scheduling keeps results bitwise reproducible for a fixed split count,
 * and the split count depends only on the shape and the thread count.
 *
 * Masking.  Keys at or beyond kv_lens never enter a block; with default positions the causal range is
 * cut to j <= q_pos; any other inadmissible key (explicit kv_pos, or beyond one query's range inside a
 * query tile) scores -inf and is skipped by the value folds, so that non-finite data there cannot
 * leak in as 0 * inf.  A partial last block is simply a shorter block (there is no padded tail to
 * forget to mask).
 *
 * SIMD (tpa_simd.h, compiled for float32 and for float64; lk_simd_enabled()): lanes run over P's rows in
 * step 1 (Rq or H, zero-padded to a multiple of the vector width), over heads in steps 2-3 (no horizontal
 * reductions: the running max is a lane-wise max), over features E in step 4 (a register tile of heads x
 * vectors of accumulators while a block of bv rows streams through).  The generic path (SIMD off) is
 * the same algorithm one key at a time, in scalar code. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "tpa_internal.h"
#include "lmkern/simd.h"

int64_t lk_tpa_default_splits(int64_t queries, int64_t M, int threads) {
    if (threads <= 1 || queries <= 0) return 1;
    int64_t s = lk_cdiv(2 * (int64_t)threads, queries);
    int64_t cap = M / LK_TPA_MIN_SPLIT;
    if (s > cap) s = cap;
    return s < 1 ? 1 : s;
}

/* ---------------------------------------------------------------------------------------------- */
/* Generic path: float32 / float64, one key at a time.                                            */
/* ---------------------------------------------------------------------------------------------- */

#define LK_DEFINE_TPA_GENERIC(NAME, T, COMBINE)                                                   \
static void NAME(const lk_tpa_attention_params *p, int64_t S, T *part, int *failed) {             \
    const int64_t B = p->B, N = p->N, M = p->M, H = p->H, Rq = p->Rq, Rk = p->Rk, Rv = p->Rv;    \
    const int64_t D = p->D, E = p->E, tasks = B * N * S;                                          \
    const int factor = tpa_use_factor(p, 1);                                                      \
    const T c = (T)(p->scale / (double)(Rq * Rk)), inv_rv = (T)(1.0 / (double)Rv);                \
    _Pragma("omp parallel num_threads(tpa_team(p, tasks))")                                       \
    {                                                                                             \
        /* per query: aqs = c aq (H x Rq) and, materialized path, Q (H x D); per key: P, s */     \
        const size_t ws = (size_t)(H * Rq + (factor ? Rq * Rk : H * D) + 3 * H + H * E + 1);      \
        T *work = (T *)malloc(sizeof(T) * ws);                                                    \
        T *aqs = work, *aux = aqs + H * Rq, *s = aux + (factor ? Rq * Rk : H * D);               \
        T *m = s + H, *l = m + H, *acc = l + H;                                                   \
        if (!work) { _Pragma("omp atomic write") *failed = 1; }                                   \
        _Pragma("omp for schedule(dynamic, 1) nowait")                                            \
        for (int64_t task = 0; task < tasks; task++) {                                            \
            if (!work) continue;                                                                  \
            const int64_t q = task / S, sp = task % S, b = q / N, i = q % N;                      \
            int64_t end, qp, j0, j1;                                                              \
            tpa_query_range(p, b, i, &end, &qp);                                                  \
            lk_chunk(end, S, sp, &j0, &j1);                                                       \
            const T *aq = (const T *)p->aq + q * H * Rq, *bq = (const T *)p->bq + q * Rq * D;    \
            for (int64_t x = 0; x < H * Rq; x++) aqs[x] = c * aq[x];                              \
            if (!factor) /* Q[h,:] = sum_r aqs[h,r] bq[r,:] */                                    \
                for (int64_t h = 0; h < H; h++) {                                                 \
                    for (int64_t d = 0; d < D; d++) aux[h * D + d] = 0;                           \
                    for (int64_t r = 0; r < Rq; r++)                                              \
                        for (int64_t d = 0; d < D; d++) aux[h * D + d] += aqs[h * Rq + r] * bq[r * D + d]; \
                }                                                                                 \
            for (int64_t h = 0; h < H; h++) { m[h] = -INFINITY; l[h] = 0; }                       \
            for (int64_t x = 0; x < H * E; x++) acc[x] = 0;                                       \
            for (int64_t j = j0; j < j1; j++) {                                                   \
                if (!tpa_admissible(p, b, j, qp)) continue;                                       \
                const T *ak = (const T *)p->ak + (b * M + j) * H * Rk;                            \
                const T *bk = (const T *)p->bk + (b * M + j) * Rk * D;                            \
                const T *av = (const T *)p->av + (b * M + j) * H * Rv;                            \
                const T *bv = (const T *)p->bv + (b * M + j) * Rv * E;                            \
                if (factor) {                                                                     \
                    /* P[r,u] = <bq[r], bk[u]> (shared by the heads) */                           \
                    for (int64_t r = 0; r < Rq; r++)                                              \
                        for (int64_t u = 0; u < Rk; u++) {                                        \
                            T dot = 0;                                                            \
                            for (int64_t d = 0; d < D; d++) dot += bq[r * D + d] * bk[u * D + d]; \
                            aux[r * Rk + u] = dot;                                                \
                        }                                                                         \
                    /* s[h] = sum_u ak[h,u] sum_r aqs[h,r] P[r,u] */                              \
                    for (int64_t h = 0; h < H; h++) {                                             \
                        T sh = 0;                                                                 \
                        for (int64_t u = 0; u < Rk; u++) {                                        \
                            T mix = 0;                                                            \
                            for (int64_t r = 0; r < Rq; r++) mix += aqs[h * Rq + r] * aux[r * Rk + u]; \
                            sh += ak[h * Rk + u] * mix;                                           \
                        }                                                                         \
                        s[h] = sh;                                                                \
                    }                                                                             \
                } else {                                                                          \
                    /* s[h] = sum_u ak[h,u] <Q[h], bk[u]> */                                      \
                    for (int64_t h = 0; h < H; h++) {                                             \
                        T sh = 0;                                                                 \
                        for (int64_t u = 0; u < Rk; u++) {                                        \
                            T dot = 0;                                                            \
                            for (int64_t d = 0; d < D; d++) dot += aux[h * D + d] * bk[u * D + d]; \
                            sh += ak[h * Rk + u] * dot;                                           \
                        }                                                                         \
                        s[h] = sh;                                                                \
                    }                                                                             \
                }                                                                                 \
                for (int64_t h = 0; h < H; h++) {                                                 \
                    if (s[h] > m[h]) { /* rescale what was accumulated under the old max */       \
                        const T alpha = m[h] == -INFINITY ? 0 : (T)exp((double)(m[h] - s[h]));    \
                        l[h] *= alpha;                                                            \
                        for (int64_t e = 0; e < E; e++) acc[h * E + e] *= alpha;                  \
                        m[h] = s[h];                                                              \
                    }                                                                             \
                    /* s = -inf under m = -inf: weight 0; a NaN s (never > m) must reach l and acc */   \
                    if (m[h] == -INFINITY && s[h] == -INFINITY) continue;                         \
                    const T w = (T)exp((double)(s[h] - m[h]));                                    \
                    l[h] += w;                                                                    \
                    /* acc[h] += (w / Rv) sum_u av[h,u] bv[u,:] */                                \
                    for (int64_t u = 0; u < Rv; u++) {                                            \
                        const T wu = w * inv_rv * av[h * Rv + u];                                 \
                        for (int64_t e = 0; e < E; e++) acc[h * E + e] += wu * bv[u * E + e];     \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
            tpa_finish_##T(p, S, q, sp, m, l, acc, E, part);                                      \
        }                                                                                         \
        free(work);                                                                               \
        _Pragma("omp barrier")                                                                    \
        if (S > 1 && !*failed) tpa_combine_splits(p, S, part);                                    \
    }                                                                                             \
}

LK_DEFINE_TPA_GENERIC(tpa_generic_f32, float, lk_softmax_combine_f32)
LK_DEFINE_TPA_GENERIC(tpa_generic_f64, double, lk_softmax_combine_f64)

/* ---------------------------------------------------------------------------------------------- */

lk_status lk_tpa_attention_cpu(const lk_tpa_attention_params *p) {
    if (p->B == 0 || p->N == 0 || p->H == 0) return LK_OK;
    if (p->dtype != LK_F32 && p->dtype != LK_F64) return LK_ERR_DTYPE;
    if (p->Rq < 1 || p->Rk < 1 || p->Rv < 1) return LK_ERR_VALUE;
    const int64_t S = p->splits > 0 ? p->splits : lk_tpa_default_splits(p->B * p->N, p->M, lk_get_num_threads());
    const size_t esize = p->dtype == LK_F64 ? sizeof(double) : sizeof(float);
    void *part = NULL;
    if (S > 1) {
        part = malloc(esize * (size_t)(p->B * p->N * p->H * S * (p->E + 2)));
        if (!part) return LK_ERR_NOMEM;
    }
    int failed = 0;
    if (p->dtype == LK_F64) {
        if (lk_simd_enabled()) lk_tpa_simd_f64(p, S, (double *)part, &failed);
        else tpa_generic_f64(p, S, (double *)part, &failed);
    } else if (lk_simd_enabled()) lk_tpa_simd_f32(p, S, (float *)part, &failed);
    else tpa_generic_f32(p, S, (float *)part, &failed);
    free(part);
    return failed ? LK_ERR_NOMEM : LK_OK;
}
