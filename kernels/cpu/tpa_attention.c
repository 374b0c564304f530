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
 * SIMD (float32, lk_simd_enabled()): lanes run over P's rows in step 1 (Rq or H, zero-padded to a
 * multiple of LK_VF), over heads in steps 2-3 (no horizontal reductions: the running max is a lane-wise
 * max), over features E in step 4 (4 heads x 4 vectors of accumulators in registers while a block of
 * bv rows streams through).  The generic path (float64, or SIMD off) is the same algorithm one key at
 * a time, in scalar code. */
#include <math.h>
#include <float.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "lmkern/tpa.h"
#include "lmkern/simd.h"
#include "lmkern/softmax.h"

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

int64_t lk_tpa_default_splits(int64_t queries, int64_t M, int threads) {
    if (threads <= 1 || queries <= 0) return 1;
    int64_t s = lk_cdiv(2 * (int64_t)threads, queries);
    int64_t cap = M / LK_TPA_MIN_SPLIT;
    if (s > cap) s = cap;
    return s < 1 ? 1 : s;
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

/* ---------------------------------------------------------------------------------------------- */
/* Generic path: float32 / float64, one key at a time.                                            */
/* ---------------------------------------------------------------------------------------------- */

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

#define LK_DEFINE_TPA_GENERIC(NAME, T, COMBINE)                                                   \
static void NAME(const lk_tpa_attention_params *p, int64_t S, T *part, int *failed) {             \
    const int64_t B = p->B, N = p->N, M = p->M, H = p->H, Rq = p->Rq, Rk = p->Rk, Rv = p->Rv;    \
    const int64_t D = p->D, E = p->E, tasks = B * N * S;                                          \
    const int factor = tpa_use_factor(p, 1);                                                      \
    const T c = (T)(p->scale / (double)(Rq * Rk)), inv_rv = (T)(1.0 / (double)Rv);                \
    _Pragma("omp parallel num_threads(lk_team_cap(tasks))")                                       \
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
                    if (m[h] == -INFINITY) continue; /* s = -inf under m = -inf: weight 0 */      \
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
LK_DEFINE_TPA_GENERIC(tpa_generic_f32, float, lk_softmax_combine_f32)
LK_DEFINE_TPA_GENERIC(tpa_generic_f64, double, lk_softmax_combine_f64)

/* ---------------------------------------------------------------------------------------------- */
/* SIMD path: float32, blocks of LK_TPA_BLOCK cached tokens.                                      */
/* ---------------------------------------------------------------------------------------------- */

/* first n lanes of p (n <= LK_VF), zeros beyond */
static inline lk_vf load_upto(const float *p, int64_t n) {
    return n >= LK_VF ? lk_vf_load(p) : lk_vf_load_n(p, (int)n);
}

/* Steps 1-2.  Y[r, :Xp] = sum_k x[r, k] PT[k, :Xp] for r < rows (x: rows x K with row stride xs,
 * PT: K x Xp, Xp = Xv LK_VF).  A tile of ROWS rows x XW vectors keeps ROWS XW independent FMA
 * chains in registers per step of k (ROWS and XW are compile-time constants at each call). */
static inline __attribute__((always_inline)) void tpa_project_tile(int ROWS, int XW, int64_t K, const float *x,
                                                                   int64_t xs, const float *pt, int64_t Xp,
                                                                   float *y) {
    lk_vf a[16][2];
    for (int r = 0; r < ROWS; r++)
        for (int v = 0; v < XW; v++) a[r][v] = lk_vf_zero();
    for (int64_t k = 0; k < K; k++) {
        lk_vf pv[2];
        for (int v = 0; v < XW; v++) pv[v] = lk_vf_load(pt + k * Xp + v * LK_VF);
        for (int r = 0; r < ROWS; r++) {
            const lk_vf xr = lk_vf_set1(x[r * xs + k]);
            for (int v = 0; v < XW; v++) a[r][v] = lk_vf_fma(xr, pv[v], a[r][v]);
        }
    }
    for (int r = 0; r < ROWS; r++)
        for (int v = 0; v < XW; v++) lk_vf_store(y + r * Xp + v * LK_VF, a[r][v]);
}

/* Tile heights: the largest keeps ROWS XW accumulators + XW operands + a broadcast within the register
 * file (32 vector registers with AVX-512, 16 with AVX2, where a 16-accumulator tile would spill every
 * FMA to the stack); the smaller ones take the remainder rows with at least 8 independent chains while
 * rows allow (an FMA's latency times two pipes). */
#ifndef LK_TPA_ROWS2
#define LK_TPA_ROWS2 (LK_VREGS >= 32 ? 8 : 6)   /* rows of a tile two vectors wide */
#endif
#ifndef LK_TPA_ROWS1
#define LK_TPA_ROWS1 (LK_VREGS >= 32 ? 16 : 12) /* rows of a tile one vector wide */
#endif

static void tpa_project(int64_t rows, int64_t K, const float *x, int64_t xs, const float *PT, int64_t Xv, float *Y) {
    const int64_t Xp = Xv * LK_VF;
#define LK_TPA_TILE(R, XW) tpa_project_tile(R, XW, K, x + r * xs, xs, PT + xv * LK_VF, Xp, Y + r * Xp + xv * LK_VF)
    int64_t xv = 0;
    for (; xv + 2 <= Xv; xv += 2) {
        int64_t r = 0;
        for (; r + LK_TPA_ROWS2 <= rows; r += LK_TPA_ROWS2) LK_TPA_TILE(LK_TPA_ROWS2, 2);
        for (; r + 4 <= rows; r += 4) LK_TPA_TILE(4, 2);
        for (; r < rows; r++) LK_TPA_TILE(1, 2);
    }
    for (; xv < Xv; xv++) {
        int64_t r = 0;
        for (; r + LK_TPA_ROWS1 <= rows; r += LK_TPA_ROWS1) LK_TPA_TILE(LK_TPA_ROWS1, 1);
        for (; r + 4 <= rows; r += 4) LK_TPA_TILE(4, 1);
        for (; r < rows; r++) LK_TPA_TILE(1, 1);
    }
#undef LK_TPA_TILE
}

/* Step 4 for heads h0 .. h0+G-1 and features e0 .. e0 + NV LK_VF (the last vector holding tail lanes):
 * acc[h, e] += sum_{t, u} W[t, u, h] bv[t, u, e].  G and NV are compile-time constants at each call.
 * Tokens with skip[t] set (inadmissible: W = 0) are left out, so that their values, however
 * non-finite, cannot turn 0 * inf into NaN. */
static inline __attribute__((always_inline)) void tpa_fold_v(int G, int NV, int64_t nt, int64_t Rv, int64_t E,
                                                             int64_t Hp, int64_t Ep, int64_t h0, int64_t e0,
                                                             int64_t tail, const float *W, const float *bv,
                                                             float *acc, const uint8_t *skip) {
    lk_vf a[LK_TPA_FOLD_G][LK_TPA_FOLD_NV];
    for (int g = 0; g < G; g++)
        for (int v = 0; v < NV; v++) a[g][v] = lk_vf_load(acc + (h0 + g) * Ep + e0 + v * LK_VF);
    const int64_t rows = nt * Rv;
    for (int64_t row = 0; row < rows; row++) {
        if (skip && skip[row / Rv]) continue;
        const float *b = bv + row * E + e0;
        const float *w = W + row * Hp + h0;
        lk_vf x[LK_TPA_FOLD_NV];
        for (int v = 0; v < NV; v++) x[v] = (v == NV - 1 && tail < LK_VF) ? lk_vf_load_n(b + v * LK_VF, (int)tail)
                                                                            : lk_vf_load(b + v * LK_VF);
        for (int g = 0; g < G; g++) {
            const lk_vf wg = lk_vf_set1(w[g]);
            for (int v = 0; v < NV; v++) a[g][v] = lk_vf_fma(wg, x[v], a[g][v]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int v = 0; v < NV; v++) lk_vf_store(acc + (h0 + g) * Ep + e0 + v * LK_VF, a[g][v]);
}

#define LK_TPA_FOLD_V(G, NV) tpa_fold_v(G, NV, nt, Rv, E, Hp, Ep, h0, e0, tail, W, bv, acc, skip)
#if LK_TPA_FOLD_NV == 4
#define LK_TPA_FOLD_BY_NV(G)                                                                      \
    switch (nv) {                                                                                 \
    case 1: LK_TPA_FOLD_V(G, 1); break;                                                           \
    case 2: LK_TPA_FOLD_V(G, 2); break;                                                           \
    case 3: LK_TPA_FOLD_V(G, 3); break;                                                           \
    default: LK_TPA_FOLD_V(G, 4); break;                                                          \
    }
#elif LK_TPA_FOLD_NV == 2
#define LK_TPA_FOLD_BY_NV(G) { if (nv == 1) LK_TPA_FOLD_V(G, 1); else LK_TPA_FOLD_V(G, 2); }
#else
#define LK_TPA_FOLD_BY_NV(G) { LK_TPA_FOLD_V(G, 1); }
#endif

static void tpa_fold_block(int64_t nt, int64_t H, int64_t Rv, int64_t E, int64_t Hp, int64_t Ep, const float *W,
                           const float *bv, float *acc, const uint8_t *skip, lk_prefetcher *pf) {
    const int64_t EW = LK_TPA_FOLD_NV * LK_VF; /* features per tile */
    const int64_t tiles = lk_max_i64(1, lk_cdiv(E, EW) * lk_cdiv(H, LK_TPA_FOLD_G)); /* E = 0 has none */
    const int64_t per_tile = lk_cdiv(lk_pf_lines(pf), tiles);
    for (int64_t e0 = 0; e0 < E; e0 += EW) {
        const int64_t width = lk_min_i64(EW, E - e0);
        const int nv = (int)lk_cdiv(width, LK_VF);
        const int64_t tail = width - (nv - 1) * LK_VF;
        int64_t h0 = 0;
        /* remainder heads in tiles of 4 (where that is smaller than the main tile), 2 and 1 */
        for (; h0 + LK_TPA_FOLD_G <= H; h0 += LK_TPA_FOLD_G) { lk_pf_step(pf, per_tile); LK_TPA_FOLD_BY_NV(LK_TPA_FOLD_G) }
        if (LK_TPA_FOLD_G > 4)
            for (; h0 + 4 <= H; h0 += 4) { lk_pf_step(pf, per_tile); LK_TPA_FOLD_BY_NV(4) }
        for (; h0 + 2 <= H; h0 += 2) { lk_pf_step(pf, per_tile); LK_TPA_FOLD_BY_NV(2) }
        for (; h0 < H; h0++) { lk_pf_step(pf, per_tile); LK_TPA_FOLD_BY_NV(1) }
    }
    lk_pf_step(pf, lk_pf_lines(pf)); /* whatever the rounding left */
}

#define LK_TPA_VTILE_G (LK_VREGS >= 32 ? 4 : 2) /* queries per register tile of the value-tile fold (x 4 vectors) */

/* Step 4 with materialized value tiles (prefill): for queries q0 .. q0+G-1 of a tile, head h and
 * features e0 .. e0 + NV LK_VF: acc_q[h, e] += sum_t W_q[t, h] V[t, h, e].  One V row load serves G
 * queries. */
static inline __attribute__((always_inline)) void tpa_fold_vtile(int G, int NV, int64_t nt, int64_t H, int64_t Hp,
                                                                 int64_t Ep, int64_t h, int64_t e0, float *const *W,
                                                                 float *const *acc, const float *V,
                                                                 const uint8_t *const *skip) {
    lk_vf a[LK_TPA_VTILE_G][4];
    for (int g = 0; g < G; g++)
        for (int v = 0; v < NV; v++) a[g][v] = lk_vf_load(acc[g] + h * Ep + e0 + v * LK_VF);
    for (int64_t t = 0; t < nt; t++) {
        const float *row = V + (t * H + h) * Ep + e0;
        lk_vf x[4];
        for (int v = 0; v < NV; v++) x[v] = lk_vf_load(row + v * LK_VF);
        for (int g = 0; g < G; g++) {
            if (skip && skip[g][t]) continue;
            const lk_vf wg = lk_vf_set1(W[g][t * Hp + h]);
            for (int v = 0; v < NV; v++) a[g][v] = lk_vf_fma(wg, x[v], a[g][v]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int v = 0; v < NV; v++) lk_vf_store(acc[g] + h * Ep + e0 + v * LK_VF, a[g][v]);
}

#define LK_TPA_VTILE_NV(G)                                                                        \
    switch (nv) {                                                                                 \
    case 1: tpa_fold_vtile(G, 1, nt, H, Hp, Ep, h, e0, W + g0, acc + g0, V, skip ? skip + g0 : NULL); break;               \
    case 2: tpa_fold_vtile(G, 2, nt, H, Hp, Ep, h, e0, W + g0, acc + g0, V, skip ? skip + g0 : NULL); break;               \
    case 3: tpa_fold_vtile(G, 3, nt, H, Hp, Ep, h, e0, W + g0, acc + g0, V, skip ? skip + g0 : NULL); break;               \
    default: tpa_fold_vtile(G, 4, nt, H, Hp, Ep, h, e0, W + g0, acc + g0, V, skip ? skip + g0 : NULL); break;              \
    }

static void tpa_fold_vtile_block(int64_t nq, int64_t nt, int64_t H, int64_t Hp, int64_t Ep, float *const *W,
                                 float *const *acc, const float *V, const uint8_t *const *skip) {
    for (int64_t h = 0; h < H; h++)
        for (int64_t e0 = 0; e0 < Ep; e0 += 4 * LK_VF) {
            const int nv = (int)lk_min_i64(4, (Ep - e0) / LK_VF);
            int64_t g0 = 0;
            for (; g0 + LK_TPA_VTILE_G <= nq; g0 += LK_TPA_VTILE_G) { LK_TPA_VTILE_NV(LK_TPA_VTILE_G) }
            for (; g0 + 2 <= nq; g0 += 2) { LK_TPA_VTILE_NV(2) }
            for (; g0 < nq; g0++) { LK_TPA_VTILE_NV(1) }
        }
}

#define LK_TPA_QTILE 8           /* queries sharing each key block in prefill */

/* Per-query state of the SIMD path. */
typedef struct {
    float *PT;    /* D x Xp: bq^T (factor) or (c Q)^T (materialized) */
    float *aqT;   /* Rq x Hp: c aq^T (factor) */
    float *W;     /* BLOCK Rv x Hp: p av / Rv (or BLOCK x Hp: p, with value tiles) */
    float *m, *l, *alpha; /* Hp */
    float *acc;   /* H x Ep */
    int64_t qp, end;      /* query position; candidate keys [0, end) */
    uint8_t skip[LK_TPA_BLOCK]; /* inadmissible tokens of the current block */
    int has_skip;
} tpa_query_state;

/* Per-thread scratch of the SIMD path. */
typedef struct {
    int64_t Hp, Ep, Xv, Xp;
    float *Y;     /* BLOCK Rk x Xp */
    float *Z;     /* BLOCK Rk x Hp: mixed scores before ak (factor path) */
    float *sc;    /* BLOCK x Hp */
    float *akd;   /* BLOCK Rk x Hp (ak de-interleaved when Rk > 1) */
    float *avd;   /* BLOCK Rv x Hp (av de-interleaved when Rv > 1) */
    float *V;     /* BLOCK x H x Ep: the materialized value tile (prefill), else unused */
    tpa_query_state q[LK_TPA_QTILE];
    float *mem;
} tpa_scratch;

static int tpa_scratch_alloc(tpa_scratch *w, const lk_tpa_attention_params *p, int factor, int64_t nq, int vtile) {
    const int64_t BL = LK_TPA_BLOCK;
    w->Hp = round_up(p->H, LK_VF);
    w->Ep = round_up(p->E, LK_VF);
    w->Xp = factor ? round_up(p->Rq, LK_VF) : w->Hp;
    w->Xv = w->Xp / LK_VF;
    int64_t sizes[6 + 7 * LK_TPA_QTILE];
    float **dst[6 + 7 * LK_TPA_QTILE];
    int n = 0;
#define LK_TPA_SLOT(ptr, size) do { dst[n] = (ptr); sizes[n] = (size); n++; } while (0)
    LK_TPA_SLOT(&w->Y, BL * p->Rk * w->Xp);
    LK_TPA_SLOT(&w->Z, BL * p->Rk * w->Hp);
    LK_TPA_SLOT(&w->sc, BL * w->Hp);
    LK_TPA_SLOT(&w->akd, BL * p->Rk * w->Hp);
    LK_TPA_SLOT(&w->avd, BL * p->Rv * w->Hp);
    LK_TPA_SLOT(&w->V, vtile ? BL * p->H * w->Ep : 0);
    for (int64_t g = 0; g < nq; g++) {
        tpa_query_state *qs = &w->q[g];
        LK_TPA_SLOT(&qs->PT, p->D * w->Xp);
        LK_TPA_SLOT(&qs->aqT, p->Rq * w->Hp);
        LK_TPA_SLOT(&qs->W, BL * p->Rv * w->Hp);
        LK_TPA_SLOT(&qs->m, w->Hp);
        LK_TPA_SLOT(&qs->l, w->Hp);
        LK_TPA_SLOT(&qs->alpha, w->Hp);
        LK_TPA_SLOT(&qs->acc, p->H * w->Ep);
    }
#undef LK_TPA_SLOT
    int64_t total = 0;
    for (int k = 0; k < n; k++) total += round_up(sizes[k], 16) + 16;
    w->mem = (float *)calloc((size_t)total, sizeof(float));
    if (!w->mem) return 0;
    float *cur = w->mem;
    for (int k = 0; k < n; k++) {
        *dst[k] = cur;
        cur += round_up(sizes[k], 16) + 16;
    }
    return 1;
}

/* Per-query setup: PT and aqT from the query's factors, fresh softmax state. */
static void tpa_simd_query(const lk_tpa_attention_params *p, int factor, const tpa_scratch *w, tpa_query_state *qs,
                           const float *aq, const float *bq) {
    const int64_t H = p->H, Rq = p->Rq, D = p->D, Hp = w->Hp, Xp = w->Xp;
    const float c = (float)(p->scale / (double)(Rq * p->Rk));
    memset(qs->PT, 0, sizeof(float) * (size_t)(D * Xp));
    if (factor) {
        memset(qs->aqT, 0, sizeof(float) * (size_t)(Rq * Hp));
        for (int64_t r = 0; r < Rq; r++)
            for (int64_t d = 0; d < D; d++) qs->PT[d * Xp + r] = bq[r * D + d];
        for (int64_t h = 0; h < H; h++)
            for (int64_t r = 0; r < Rq; r++) qs->aqT[r * Hp + h] = c * aq[h * Rq + r];
    } else {
        /* PT[d, h] = sum_r (c aq[h,r]) bq[r,d] */
        for (int64_t h = 0; h < H; h++)
            for (int64_t r = 0; r < Rq; r++) {
                const float a = c * aq[h * Rq + r];
                for (int64_t d = 0; d < D; d++) qs->PT[d * Xp + h] += a * bq[r * D + d];
            }
    }
    for (int64_t h = 0; h < Hp; h++) { qs->m[h] = -INFINITY; qs->l[h] = 0; }
    memset(qs->acc, 0, sizeof(float) * (size_t)(p->H * w->Ep));
}

/* The value tile of a block: V[t, h, :] = (1/Rv) sum_u av[t,h,u] bv[t,u,:] (tail lanes zero). */
static void tpa_simd_vtile(const lk_tpa_attention_params *p, tpa_scratch *w, const float *av, const float *bv,
                           int64_t nt) {
    const int64_t H = p->H, Rv = p->Rv, E = p->E, Ep = w->Ep;
    const float inv_rv = 1.0f / (float)Rv;
    for (int64_t t = 0; t < nt; t++)
        for (int64_t h = 0; h < H; h++) {
            float *row = w->V + (t * H + h) * Ep;
            for (int64_t e = 0; e < Ep; e += LK_VF) {
                lk_vf x = lk_vf_zero();
                for (int64_t u = 0; u < Rv; u++)
                    x = lk_vf_fma(lk_vf_set1(inv_rv * av[(t * H + h) * Rv + u]), load_upto(bv + (t * Rv + u) * E + e, E - e), x);
                lk_vf_store(row + e, x);
            }
        }
}

/* Steps 1-3 for cached tokens j0 .. j0+nt-1 of row b (nt <= LK_TPA_BLOCK) and one query:
 * scores, online softmax, the query's accumulators rescaled, and W ready for step 4:
 * W[t,u,h] = p[t,h] av[t,h,u] / Rv, or W[t,h] = p[t,h] with value tiles. */
static void tpa_simd_scores(const lk_tpa_attention_params *p, int factor, int vtile, tpa_scratch *w,
                            tpa_query_state *qs, int64_t b, int64_t j0, int64_t nt) {
    const int64_t H = p->H, Rq = p->Rq, Rk = p->Rk, D = p->D, M = p->M;
    const int64_t Rv = vtile ? 1 : p->Rv; /* value tiles: no av to fold */
    const int64_t Hp = w->Hp, Xp = w->Xp, Hv = Hp / LK_VF;
    const float *ak = (const float *)p->ak + (b * M + j0) * H * Rk;
    const float *bk = (const float *)p->bk + (b * M + j0) * Rk * D;
    const float *av = (const float *)p->av + (b * M + j0) * H * p->Rv;
    const float inv_rv = vtile ? 1.0f : 1.0f / (float)Rv;
    /* head-lane views of ak / av: row (t, u), lanes h (de-interleaved by the caller when rank > 1) */
    const float *akl = Rk > 1 ? w->akd : ak;
    const int64_t ak_row = Rk > 1 ? Hp : H;
    const float *avl = Rv > 1 ? w->avd : av;
    const int64_t av_row = Rv > 1 ? Hp : H;

    /* 1. Y[t,u,:] = bk[t,u,:] @ PT   (factor: <bk[t,u], bq[r]> for every r; materialized: <bk[t,u], cQ[h]>) */
    tpa_project(nt * Rk, D, bk, D, qs->PT, w->Xv, w->Y);
    /* 2. factor path: mix with the heads, Z[t,u,h] = sum_r Y[t,u,r] (c aq[h,r]) */
    const float *Z = w->Y;
    if (factor) {
        tpa_project(nt * Rk, Rq, w->Y, Xp, qs->aqT, Hv, w->Z);
        Z = w->Z;
    }
    /* 3. per head lane: sc[t, h] = sum_u ak[t,h,u] Z[t,u,h] (-inf for an inadmissible key), then the
     *    online softmax and W.  Inadmissible tokens are flagged first, in scalar code, and only when the
     *    block can hold one (explicit positions, or a block that runs past this query's range): decode
     *    and most prefill blocks run the vector loops below without a per-token test. */
    const int masked = p->causal && p->kv_pos;
    const int64_t lim = qs->end - j0; /* tokens t >= lim are beyond this query's range */
    int has_skip = 0;
    if (masked || lim < nt)
        for (int64_t t = 0; t < nt; t++) {
            qs->skip[t] = t >= lim || (masked && !tpa_admissible(p, b, j0 + t, qs->qp));
            has_skip |= qs->skip[t];
        }
    qs->has_skip = has_skip;
    const int64_t ak_tok = Rk * ak_row, av_tok = Rv * av_row; /* floats per token of akl / avl */
    const lk_vf scale_v = lk_vf_set1(inv_rv);
    for (int64_t hv = 0; hv < Hv; hv++) {
        const int64_t h = hv * LK_VF, nh = H - h;
        /* lanes of the ak / av loads: de-interleaved rows are Hp wide, raw rows H */
        const int64_t nk = Rk > 1 ? LK_VF : nh, nv = Rv > 1 ? LK_VF : nh;
        lk_vf mb = lk_vf_set1(-INFINITY);
        for (int64_t t = 0; t < nt; t++) {
            const float *zt = Z + t * Rk * Hp + h, *at = akl + t * ak_tok + h;
            lk_vf s = lk_vf_mul(lk_vf_load(zt), load_upto(at, nk));
            for (int64_t u = 1; u < Rk; u++) s = lk_vf_fma(lk_vf_load(zt + u * Hp), lk_vf_load(at + u * ak_row), s);
            if (has_skip && qs->skip[t]) s = lk_vf_set1(-INFINITY);
            lk_vf_store(w->sc + t * Hp + h, s);
            mb = lk_vf_max(s, mb); /* a NaN score leaves the max alone and reaches l and acc */
        }
        const lk_vf mo = lk_vf_load(qs->m + h), mn = lk_vf_max(mo, mb);
        /* all -inf so far: subtract 0 instead (weights stay 0, never NaN) */
        const lk_vf ms = lk_vf_select_lt(mn, lk_vf_set1(-FLT_MAX), lk_vf_zero(), mn);
        const lk_vf alpha = lk_vf_exp_softmax(lk_vf_sub(mo, ms));
        lk_vf l = lk_vf_mul(lk_vf_load(qs->l + h), alpha);
        lk_vf_store(qs->alpha + h, alpha);
        lk_vf_store(qs->m + h, mn);
        if (vtile) {
            for (int64_t t = 0; t < nt; t++) {
                const lk_vf pr = lk_vf_exp_softmax(lk_vf_sub(lk_vf_load(w->sc + t * Hp + h), ms));
                l = lk_vf_add(l, pr);
                lk_vf_store(qs->W + t * Hp + h, pr);
            }
        } else {
            for (int64_t t = 0; t < nt; t++) {
                const lk_vf pr = lk_vf_exp_softmax(lk_vf_sub(lk_vf_load(w->sc + t * Hp + h), ms));
                l = lk_vf_add(l, pr);
                const lk_vf pw = Rv > 1 ? lk_vf_mul(pr, scale_v) : pr;
                const float *vt = avl + t * av_tok + h;
                float *wt = qs->W + t * Rv * Hp + h;
                lk_vf_store(wt, lk_vf_mul(pw, load_upto(vt, nv)));
                for (int64_t u = 1; u < Rv; u++) lk_vf_store(wt + u * Hp, lk_vf_mul(pw, lk_vf_load(vt + u * av_row)));
            }
        }
        lk_vf_store(qs->l + h, l);
    }
    /* rescale the accumulators of heads whose max moved */
    for (int64_t h = 0; h < H; h++) {
        const float a = qs->alpha[h];
        if (a == 1.0f) continue;
        float *acc = qs->acc + h * w->Ep;
        const lk_vf av_ = lk_vf_set1(a);
        for (int64_t e = 0; e < w->Ep; e += LK_VF) lk_vf_store(acc + e, lk_vf_mul(lk_vf_load(acc + e), av_));
    }
}

/* dst[t, u, h] = src[t, h, u] for t < nt, u < R, h < H (dst rows Hp wide): rank-major head lanes.
 * Rank 2 (T6's keys and values) splits pairs with vector permutes; other ranks copy elements. */
static void tpa_deinterleave(int64_t nt, int64_t H, int64_t R, int64_t Hp, const float *src, float *dst) {
    if (R == 2) {
        for (int64_t t = 0; t < nt; t++) {
            const float *s = src + t * H * 2;
            float *d0 = dst + t * 2 * Hp, *d1 = d0 + Hp;
            for (int64_t h = 0; h < H; h += LK_VF) {
                const int64_t n = 2 * (H - h); /* floats left in this row */
                lk_vf e, o;
                lk_vf_deinterleave2(load_upto(s + 2 * h, n), load_upto(s + 2 * h + LK_VF, lk_max_i64(0, n - LK_VF)), &e, &o);
                lk_vf_store(d0 + h, e);
                lk_vf_store(d1 + h, o);
            }
        }
        return;
    }
    for (int64_t t = 0; t < nt; t++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t u = 0; u < R; u++) dst[(t * R + u) * Hp + h] = src[(t * H + h) * R + u];
}

static const uint8_t tpa_no_skip[LK_TPA_BLOCK]; /* every token admissible */

/* Value tiles pay H Rv E per key once per query tile, then H E per (query, key); the factor fold pays
 * H Rv E per (query, key).  Only prefill (several queries per tile) can profit. */
static int tpa_use_vtile(const lk_tpa_attention_params *p, int64_t nq) {
    if (nq < 2 || p->path == LK_TPA_PATH_FACTOR) return 0;
    if (p->path == LK_TPA_PATH_MATERIALIZED) return 1;
    return p->Rv + nq < p->Rv * nq;
}

static void tpa_simd_f32(const lk_tpa_attention_params *p, int64_t S, float *part, int *failed) {
    const int64_t B = p->B, N = p->N, H = p->H, Rq = p->Rq, Rk = p->Rk, Rv = p->Rv, D = p->D, E = p->E, M = p->M;
    const int factor = tpa_use_factor(p, LK_VF);
    const int64_t QT = lk_min_i64(LK_TPA_QTILE, N), tiles = lk_cdiv(N, QT), tasks = B * tiles * S;
    const int vtile = tpa_use_vtile(p, QT);
    const int64_t token_bytes = 4 * (H * (Rk + Rv) + Rk * D + Rv * E);
    const int prefetch = LK_TPA_PREFETCH > 0 && lk_prefetch_pays(B * M * token_bytes);
    _Pragma("omp parallel num_threads(lk_team_cap(tasks))")
    {
        tpa_scratch w;
        const int ok = tpa_scratch_alloc(&w, p, factor, QT, vtile);
        if (!ok) {
            _Pragma("omp atomic write")
            *failed = 1;
        }
        _Pragma("omp for schedule(dynamic, 1) nowait") /* the barrier below ends the tasks */
        for (int64_t task = 0; task < tasks; task++) {
            if (!ok) continue;
            const int64_t tile = task / S, sp = task % S, b = tile / tiles, i0 = (tile % tiles) * QT;
            const int64_t nq = lk_min_i64(QT, N - i0);
            int64_t max_end = 0, j0, j1;
            for (int64_t g = 0; g < nq; g++) {
                tpa_query_state *qs = &w.q[g];
                const int64_t q = b * N + i0 + g;
                tpa_query_range(p, b, i0 + g, &qs->end, &qs->qp);
                max_end = lk_max_i64(max_end, qs->end);
                tpa_simd_query(p, factor, &w, qs, (const float *)p->aq + q * H * Rq, (const float *)p->bq + q * Rq * D);
            }
            lk_chunk(max_end, S, sp, &j0, &j1);
            for (int64_t j = j0; j < j1; j += LK_TPA_BLOCK) {
                const int64_t nt = lk_min_i64(LK_TPA_BLOCK, j1 - j);
                lk_prefetcher pf;
                lk_pf_reset(&pf);
                if (prefetch && j + LK_TPA_PREFETCH * LK_TPA_BLOCK < j1) {
                    /* the factors of a block ahead, where that pays (lk_prefetch_pays: a cache too large
                     * for the caches, not on Intel), a few lines per tile of the value fold */
                    const int64_t jp = j + LK_TPA_PREFETCH * LK_TPA_BLOCK;
                    const int64_t np = lk_min_i64(LK_TPA_BLOCK, j1 - jp);
                    lk_pf_add(&pf, (const float *)p->ak + (b * M + jp) * H * Rk, np * H * Rk * 4);
                    lk_pf_add(&pf, (const float *)p->bk + (b * M + jp) * Rk * D, np * Rk * D * 4);
                    lk_pf_add(&pf, (const float *)p->av + (b * M + jp) * H * Rv, np * H * Rv * 4);
                    lk_pf_add(&pf, (const float *)p->bv + (b * M + jp) * Rv * E, np * Rv * E * 4);
                }
                const float *ak = (const float *)p->ak + (b * M + j) * H * Rk;
                const float *av = (const float *)p->av + (b * M + j) * H * Rv;
                const float *bv = (const float *)p->bv + (b * M + j) * Rv * E;
                /* de-interleave ak[t, h, u] -> akd[t, u, h] (and av) when the rank is > 1: head lanes */
                if (Rk > 1) tpa_deinterleave(nt, H, Rk, w.Hp, ak, w.akd);
                if (Rv > 1 && !vtile) tpa_deinterleave(nt, H, Rv, w.Hp, av, w.avd);
                if (vtile) tpa_simd_vtile(p, &w, av, bv, nt);
                /* queries whose range ends before this block skip it */
                float *Wa[LK_TPA_QTILE], *acca[LK_TPA_QTILE];
                const uint8_t *skipa[LK_TPA_QTILE];
                int64_t active = 0, any_skip = 0;
                for (int64_t g = 0; g < nq; g++) {
                    tpa_query_state *qs = &w.q[g];
                    if (j >= qs->end) continue;
                    tpa_simd_scores(p, factor, vtile, &w, qs, b, j, nt);
                    /* 4. acc[h,:] += sum_{t,u} W[t,u,h] bv[t,u,:]  (or the value tile, below) */
                    if (!vtile) tpa_fold_block(nt, H, Rv, E, w.Hp, w.Ep, qs->W, bv, qs->acc, qs->has_skip ? qs->skip : NULL, &pf);
                    Wa[active] = qs->W;
                    acca[active] = qs->acc;
                    skipa[active] = qs->has_skip ? qs->skip : tpa_no_skip; /* skip[] is only written with has_skip */
                    any_skip |= qs->has_skip;
                    active++;
                }
                if (vtile) tpa_fold_vtile_block(active, nt, H, w.Hp, w.Ep, Wa, acca, w.V, any_skip ? skipa : NULL);
            }
            for (int64_t g = 0; g < nq; g++)
                tpa_finish_float(p, S, b * N + i0 + g, sp, w.q[g].m, w.q[g].l, w.q[g].acc, w.Ep, part);
        }
        if (ok) free(w.mem);
        _Pragma("omp barrier")
        if (S > 1 && !*failed) tpa_combine_splits(p, S, part);
    }
}

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
    if (p->dtype == LK_F64) tpa_generic_f64(p, S, (double *)part, &failed);
    else if (lk_simd_enabled()) tpa_simd_f32(p, S, (float *)part, &failed);
    else tpa_generic_f32(p, S, (float *)part, &failed);
    free(part);
    return failed ? LK_ERR_NOMEM : LK_OK;
}
