/* The SIMD engine of tpa_attention.c, written once for both element types (simd_real.h): lk_real is float
 * or double, lk_v a vector of LK_VL of them.  Included by tpa_simd_f32.c and tpa_simd_f64.c only; the
 * entry point is lk_tpa_simd_f32 / _f64.  See tpa_attention.c for the math, the paths and the split. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "tpa_internal.h"
#include "lmkern/simd_real.h"

#ifdef LK_REAL_F64
#define tpa_finish_real tpa_finish_double
#else
#define tpa_finish_real tpa_finish_float
#endif

/* ---------------------------------------------------------------------------------------------- */
/* SIMD path: blocks of LK_TPA_BLOCK cached tokens.                                               */
/* ---------------------------------------------------------------------------------------------- */

/* first n lanes of p (n <= LK_VL), zeros beyond */
static inline lk_v load_upto(const lk_real *p, int64_t n) {
    return n >= LK_VL ? lk_v_load(p) : lk_v_load_n(p, (int)n);
}

/* Steps 1-2.  Y[r, :Xp] = sum_k x[r, k] PT[k, :Xp] for r < rows (x: rows x K with row stride xs,
 * PT: K x Xp, Xp = Xv LK_VL).  A tile of ROWS rows x XW vectors keeps ROWS XW independent FMA
 * chains in registers per step of k (ROWS and XW are compile-time constants at each call). */
static inline __attribute__((always_inline)) void tpa_project_tile(int ROWS, int XW, int64_t K, const lk_real *x,
                                                                   int64_t xs, const lk_real *pt, int64_t Xp,
                                                                   lk_real *y) {
    lk_v a[16][2];
    for (int r = 0; r < ROWS; r++)
        for (int v = 0; v < XW; v++) a[r][v] = lk_v_zero();
    for (int64_t k = 0; k < K; k++) {
        lk_v pv[2];
        for (int v = 0; v < XW; v++) pv[v] = lk_v_load(pt + k * Xp + v * LK_VL);
        for (int r = 0; r < ROWS; r++) {
            const lk_v xr = lk_v_set1(x[r * xs + k]);
            for (int v = 0; v < XW; v++) a[r][v] = lk_v_fma(xr, pv[v], a[r][v]);
        }
    }
    for (int r = 0; r < ROWS; r++)
        for (int v = 0; v < XW; v++) lk_v_store(y + r * Xp + v * LK_VL, a[r][v]);
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

static void tpa_project(int64_t rows, int64_t K, const lk_real *x, int64_t xs, const lk_real *PT, int64_t Xv, lk_real *Y) {
    const int64_t Xp = Xv * LK_VL;
#define LK_TPA_TILE(R, XW) tpa_project_tile(R, XW, K, x + r * xs, xs, PT + xv * LK_VL, Xp, Y + r * Xp + xv * LK_VL)
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

/* Step 4 for heads h0 .. h0+G-1 and features e0 .. e0 + NV LK_VL (the last vector holding tail lanes):
 * acc[h, e] += sum_{t, u} W[t, u, h] bv[t, u, e].  G and NV are compile-time constants at each call.
 * Tokens with skip[t] set (inadmissible: W = 0) are left out, so that their values, however
 * non-finite, cannot turn 0 * inf into NaN. */
static inline __attribute__((always_inline)) void tpa_fold_v(int G, int NV, int64_t nt, int64_t Rv, int64_t E,
                                                             int64_t Hp, int64_t Ep, int64_t h0, int64_t e0,
                                                             int64_t tail, const lk_real *W, const lk_real *bv,
                                                             lk_real *acc, const uint8_t *skip) {
    lk_v a[LK_TPA_FOLD_G][LK_TPA_FOLD_NV];
    for (int g = 0; g < G; g++)
        for (int v = 0; v < NV; v++) a[g][v] = lk_v_load(acc + (h0 + g) * Ep + e0 + v * LK_VL);
    const int64_t rows = nt * Rv;
    for (int64_t row = 0; row < rows; row++) {
        if (skip && skip[row / Rv]) continue;
        const lk_real *b = bv + row * E + e0;
        const lk_real *w = W + row * Hp + h0;
        lk_v x[LK_TPA_FOLD_NV];
        for (int v = 0; v < NV; v++) x[v] = (v == NV - 1 && tail < LK_VL) ? lk_v_load_n(b + v * LK_VL, (int)tail)
                                                                            : lk_v_load(b + v * LK_VL);
        for (int g = 0; g < G; g++) {
            const lk_v wg = lk_v_set1(w[g]);
            for (int v = 0; v < NV; v++) a[g][v] = lk_v_fma(wg, x[v], a[g][v]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int v = 0; v < NV; v++) lk_v_store(acc + (h0 + g) * Ep + e0 + v * LK_VL, a[g][v]);
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

static void tpa_fold_block(int64_t nt, int64_t H, int64_t Rv, int64_t E, int64_t Hp, int64_t Ep, const lk_real *W,
                           const lk_real *bv, lk_real *acc, const uint8_t *skip, lk_prefetcher *pf) {
    const int64_t EW = LK_TPA_FOLD_NV * LK_VL; /* features per tile */
    const int64_t tiles = lk_max_i64(1, lk_cdiv(E, EW) * lk_cdiv(H, LK_TPA_FOLD_G)); /* E = 0 has none */
    const int64_t per_tile = lk_cdiv(lk_pf_lines(pf), tiles);
    for (int64_t e0 = 0; e0 < E; e0 += EW) {
        const int64_t width = lk_min_i64(EW, E - e0);
        const int nv = (int)lk_cdiv(width, LK_VL);
        const int64_t tail = width - (nv - 1) * LK_VL;
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
#define LK_TPA_QTILE 8           /* queries sharing each key block in prefill */
/* Bytes of one value tile: the block's heads go in groups whose tile stays in L2 while the tile's
 * queries fold it (all 34 heads of T6-small take 557 KiB).  On a Zen 3 guest, ranks 6/3/3 with 16 heads
 * (a 256 KiB tile) ran 1-15% faster in groups of 8 heads. */
#define LK_TPA_VTILE_BYTES (128 * 1024)

/* Step 4 with materialized value tiles (prefill): for queries q0 .. q0+G-1 of a tile, head h and
 * features e0 .. e0 + NV LK_VL: acc_q[h, e] += sum_t W_q[t, h] V[t, h, e].  One V row load serves G
 * queries. */
static inline __attribute__((always_inline)) void tpa_fold_vtile(int G, int NV, int64_t nt, int64_t H, int64_t Hp,
                                                                 int64_t Ep, int64_t h, int64_t e0, lk_real *const *W,
                                                                 lk_real *const *acc, const lk_real *V,
                                                                 const uint8_t *const *skip) {
    lk_v a[LK_TPA_VTILE_G][4];
    for (int g = 0; g < G; g++)
        for (int v = 0; v < NV; v++) a[g][v] = lk_v_load(acc[g] + h * Ep + e0 + v * LK_VL);
    for (int64_t t = 0; t < nt; t++) {
        const lk_real *row = V + (t * H + h) * Ep + e0;
        lk_v x[4];
        for (int v = 0; v < NV; v++) x[v] = lk_v_load(row + v * LK_VL);
        for (int g = 0; g < G; g++) {
            if (skip && skip[g][t]) continue;
            const lk_v wg = lk_v_set1(W[g][t * Hp + h]);
            for (int v = 0; v < NV; v++) a[g][v] = lk_v_fma(wg, x[v], a[g][v]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int v = 0; v < NV; v++) lk_v_store(acc[g] + h * Ep + e0 + v * LK_VL, a[g][v]);
}

#define LK_TPA_VTILE_NV(G)                                                                        \
    switch (nv) {                                                                                 \
    case 1: tpa_fold_vtile(G, 1, nt, H, Hp, Ep, h, e0, W + g0, acc + g0, V, skip ? skip + g0 : NULL); break;               \
    case 2: tpa_fold_vtile(G, 2, nt, H, Hp, Ep, h, e0, W + g0, acc + g0, V, skip ? skip + g0 : NULL); break;               \
    case 3: tpa_fold_vtile(G, 3, nt, H, Hp, Ep, h, e0, W + g0, acc + g0, V, skip ? skip + g0 : NULL); break;               \
    default: tpa_fold_vtile(G, 4, nt, H, Hp, Ep, h, e0, W + g0, acc + g0, V, skip ? skip + g0 : NULL); break;              \
    }

/* The fold of heads h0 .. h0+H-1 against their value tile V (rows t * H + h - h0, built by tpa_simd_vtile). */
static void tpa_fold_vtile_block(int64_t nq, int64_t nt, int64_t h0, int64_t H, int64_t Hp, int64_t Ep,
                                 lk_real *const *Wq, lk_real *const *accq, const lk_real *V,
                                 const uint8_t *const *skip) {
    lk_real *W[LK_TPA_QTILE], *acc[LK_TPA_QTILE];   /* the queries' W and acc from head h0 on */
    for (int64_t g = 0; g < nq; g++) { W[g] = Wq[g] + h0; acc[g] = accq[g] + h0 * Ep; }
    for (int64_t h = 0; h < H; h++)
        for (int64_t e0 = 0; e0 < Ep; e0 += 4 * LK_VL) {
            const int nv = (int)lk_min_i64(4, (Ep - e0) / LK_VL);
            int64_t g0 = 0;
            for (; g0 + LK_TPA_VTILE_G <= nq; g0 += LK_TPA_VTILE_G) { LK_TPA_VTILE_NV(LK_TPA_VTILE_G) }
            for (; g0 + 2 <= nq; g0 += 2) { LK_TPA_VTILE_NV(2) }
            for (; g0 < nq; g0++) { LK_TPA_VTILE_NV(1) }
        }
}

/* Per-query state of the SIMD path. */
typedef struct {
    lk_real *PT;    /* D x Xp: bq^T (factor) or (c Q)^T (materialized) */
    lk_real *aqT;   /* Rq x Hp: c aq^T (factor) */
    lk_real *W;     /* BLOCK Rv x Hp: p av / Rv (or BLOCK x Hp: p, with value tiles) */
    lk_real *m, *l, *alpha; /* Hp */
    lk_real *acc;   /* H x Ep */
    int64_t qp, end;      /* query position; candidate keys [0, end) */
    uint8_t skip[LK_TPA_BLOCK]; /* inadmissible tokens of the current block */
    int has_skip;
} tpa_query_state;

/* Per-thread scratch of the SIMD path. */
typedef struct {
    int64_t Hp, Ep, Xv, Xp;
    lk_real *Y;     /* BLOCK Rk x Xp */
    lk_real *Z;     /* BLOCK Rk x Hp: mixed scores before ak (factor path) */
    lk_real *sc;    /* BLOCK x Hp */
    lk_real *akd;   /* BLOCK Rk x Hp (ak de-interleaved when Rk > 1) */
    lk_real *avd;   /* BLOCK Rv x Hp (av de-interleaved when Rv > 1) */
    lk_real *V;     /* BLOCK x H x Ep: the materialized value tile (prefill), else unused */
    tpa_query_state q[LK_TPA_QTILE];
    lk_real *mem;
} tpa_scratch;

static int tpa_scratch_alloc(tpa_scratch *w, const lk_tpa_attention_params *p, int factor, int64_t nq, int vtile) {
    const int64_t BL = LK_TPA_BLOCK;
    w->Hp = round_up(p->H, LK_VL);
    w->Ep = round_up(p->E, LK_VL);
    w->Xp = factor ? round_up(p->Rq, LK_VL) : w->Hp;
    w->Xv = w->Xp / LK_VL;
    int64_t sizes[6 + 7 * LK_TPA_QTILE];
    lk_real **dst[6 + 7 * LK_TPA_QTILE];
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
    w->mem = (lk_real *)calloc((size_t)total, sizeof(lk_real));
    if (!w->mem) return 0;
    lk_real *cur = w->mem;
    for (int k = 0; k < n; k++) {
        *dst[k] = cur;
        cur += round_up(sizes[k], 16) + 16;
    }
    return 1;
}

/* Per-query setup: PT and aqT from the query's factors, fresh softmax state. */
static void tpa_simd_query(const lk_tpa_attention_params *p, int factor, const tpa_scratch *w, tpa_query_state *qs,
                           const lk_real *aq, const lk_real *bq) {
    const int64_t H = p->H, Rq = p->Rq, D = p->D, Hp = w->Hp, Xp = w->Xp;
    const lk_real c = (lk_real)(p->scale / (double)(Rq * p->Rk));
    memset(qs->PT, 0, sizeof(lk_real) * (size_t)(D * Xp));
    if (factor) {
        memset(qs->aqT, 0, sizeof(lk_real) * (size_t)(Rq * Hp));
        for (int64_t r = 0; r < Rq; r++)
            for (int64_t d = 0; d < D; d++) qs->PT[d * Xp + r] = bq[r * D + d];
        for (int64_t h = 0; h < H; h++)
            for (int64_t r = 0; r < Rq; r++) qs->aqT[r * Hp + h] = c * aq[h * Rq + r];
    } else {
        /* PT[d, h] = sum_r (c aq[h,r]) bq[r,d] */
        for (int64_t h = 0; h < H; h++)
            for (int64_t r = 0; r < Rq; r++) {
                const lk_real a = c * aq[h * Rq + r];
                for (int64_t d = 0; d < D; d++) qs->PT[d * Xp + h] += a * bq[r * D + d];
            }
    }
    for (int64_t h = 0; h < Hp; h++) { qs->m[h] = -INFINITY; qs->l[h] = 0; }
    memset(qs->acc, 0, sizeof(lk_real) * (size_t)(p->H * w->Ep));
}

/* The value tile of a block: V[t, h, :] = (1/Rv) sum_u av[t,h,u] bv[t,u,:] (tail lanes zero). */
static void tpa_simd_vtile(const lk_tpa_attention_params *p, tpa_scratch *w, const lk_real *av, const lk_real *bv,
                           int64_t nt, int64_t h0, int64_t hg) {
    const int64_t H = p->H, Rv = p->Rv, E = p->E, Ep = w->Ep;
    const lk_real inv_rv = (lk_real)1 / (lk_real)Rv;
    for (int64_t t = 0; t < nt; t++)
        for (int64_t h = h0; h < h0 + hg; h++) {
            lk_real *row = w->V + (t * hg + h - h0) * Ep;
            for (int64_t e = 0; e < Ep; e += LK_VL) {
                lk_v x = lk_v_zero();
                for (int64_t u = 0; u < Rv; u++)
                    x = lk_v_fma(lk_v_set1(inv_rv * av[(t * H + h) * Rv + u]), load_upto(bv + (t * Rv + u) * E + e, E - e), x);
                lk_v_store(row + e, x);
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
    const int64_t Hp = w->Hp, Xp = w->Xp, Hv = Hp / LK_VL;
    const lk_real *ak = (const lk_real *)p->ak + (b * M + j0) * H * Rk;
    const lk_real *bk = (const lk_real *)p->bk + (b * M + j0) * Rk * D;
    const lk_real *av = (const lk_real *)p->av + (b * M + j0) * H * p->Rv;
    const lk_real inv_rv = vtile ? (lk_real)1 : (lk_real)1 / (lk_real)Rv;
    /* head-lane views of ak / av: row (t, u), lanes h (de-interleaved by the caller when rank > 1) */
    const lk_real *akl = Rk > 1 ? w->akd : ak;
    const int64_t ak_row = Rk > 1 ? Hp : H;
    const lk_real *avl = Rv > 1 ? w->avd : av;
    const int64_t av_row = Rv > 1 ? Hp : H;

    /* 1. Y[t,u,:] = bk[t,u,:] @ PT   (factor: <bk[t,u], bq[r]> for every r; materialized: <bk[t,u], cQ[h]>) */
    tpa_project(nt * Rk, D, bk, D, qs->PT, w->Xv, w->Y);
    /* 2. factor path: mix with the heads, Z[t,u,h] = sum_r Y[t,u,r] (c aq[h,r]) */
    const lk_real *Z = w->Y;
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
    const int64_t ak_tok = Rk * ak_row, av_tok = Rv * av_row; /* lk_reals per token of akl / avl */
    const lk_v scale_v = lk_v_set1(inv_rv);
    for (int64_t hv = 0; hv < Hv; hv++) {
        const int64_t h = hv * LK_VL, nh = H - h;
        /* lanes of the ak / av loads: de-interleaved rows are Hp wide, raw rows H */
        const int64_t nk = Rk > 1 ? LK_VL : nh, nv = Rv > 1 ? LK_VL : nh;
        lk_v mb = lk_v_set1(-INFINITY);
        for (int64_t t = 0; t < nt; t++) {
            const lk_real *zt = Z + t * Rk * Hp + h, *at = akl + t * ak_tok + h;
            lk_v s = lk_v_mul(lk_v_load(zt), load_upto(at, nk));
            for (int64_t u = 1; u < Rk; u++) s = lk_v_fma(lk_v_load(zt + u * Hp), lk_v_load(at + u * ak_row), s);
            if (has_skip && qs->skip[t]) s = lk_v_set1(-INFINITY);
            lk_v_store(w->sc + t * Hp + h, s);
            mb = lk_v_max(s, mb); /* a NaN score leaves the max alone and reaches l and acc */
        }
        const lk_v mo = lk_v_load(qs->m + h), mn = lk_v_max(mo, mb);
        /* all -inf so far: subtract 0 instead (weights stay 0, never NaN) */
        const lk_v ms = lk_v_select_lt(mn, lk_v_set1(-LK_REAL_MAX), lk_v_zero(), mn);
        const lk_v alpha = lk_v_exp_softmax(lk_v_sub(mo, ms));
        lk_v l = lk_v_mul(lk_v_load(qs->l + h), alpha);
        lk_v_store(qs->alpha + h, alpha);
        lk_v_store(qs->m + h, mn);
        if (vtile) {
            for (int64_t t = 0; t < nt; t++) {
                const lk_v pr = lk_v_exp_softmax(lk_v_sub(lk_v_load(w->sc + t * Hp + h), ms));
                l = lk_v_add(l, pr);
                lk_v_store(qs->W + t * Hp + h, pr);
            }
        } else {
            for (int64_t t = 0; t < nt; t++) {
                const lk_v pr = lk_v_exp_softmax(lk_v_sub(lk_v_load(w->sc + t * Hp + h), ms));
                l = lk_v_add(l, pr);
                const lk_v pw = Rv > 1 ? lk_v_mul(pr, scale_v) : pr;
                const lk_real *vt = avl + t * av_tok + h;
                lk_real *wt = qs->W + t * Rv * Hp + h;
                lk_v_store(wt, lk_v_mul(pw, load_upto(vt, nv)));
                for (int64_t u = 1; u < Rv; u++) lk_v_store(wt + u * Hp, lk_v_mul(pw, lk_v_load(vt + u * av_row)));
            }
        }
        lk_v_store(qs->l + h, l);
    }
    /* rescale the accumulators of heads whose max moved */
    for (int64_t h = 0; h < H; h++) {
        const lk_real a = qs->alpha[h];
        if (a == 1) continue;
        lk_real *acc = qs->acc + h * w->Ep;
        const lk_v av_ = lk_v_set1(a);
        for (int64_t e = 0; e < w->Ep; e += LK_VL) lk_v_store(acc + e, lk_v_mul(lk_v_load(acc + e), av_));
    }
}

/* dst[t, u, h] = src[t, h, u] for t < nt, u < R, h < H (dst rows Hp wide): rank-major head lanes.
 * Rank 2 (T6's keys and values) splits pairs with vector permutes; other ranks copy elements. */
static void tpa_deinterleave(int64_t nt, int64_t H, int64_t R, int64_t Hp, const lk_real *src, lk_real *dst) {
    if (R == 2) {
        for (int64_t t = 0; t < nt; t++) {
            const lk_real *s = src + t * H * 2;
            lk_real *d0 = dst + t * 2 * Hp, *d1 = d0 + Hp;
            for (int64_t h = 0; h < H; h += LK_VL) {
                const int64_t n = 2 * (H - h); /* lk_reals left in this row */
                lk_v e, o;
                lk_v_deinterleave2(load_upto(s + 2 * h, n), load_upto(s + 2 * h + LK_VL, lk_max_i64(0, n - LK_VL)), &e, &o);
                lk_v_store(d0 + h, e);
                lk_v_store(d1 + h, o);
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
    /* With 16 vector registers (AVX2) building the tile costs about as many instructions as it saves at
     * Rv = 2: on a Zen 3 guest (interleaved A/B, N = M = 1024) T6-small (H = 34, ranks 6/2/2) prefill ran
     * 7-26% faster with the factor fold and T6-medium up to 16% (one run 6% slower); ranks 6/3/3 were
     * the same either way.  AVX-512 measured value tiles faster at Rv = 2 (T6-small, 185 against 222 ms). */
    if (LK_VREGS < 32 && p->Rv < 3) return 0;
    return p->Rv + nq < p->Rv * nq;
}

void LK_REAL_NAME(lk_tpa_simd)(const lk_tpa_attention_params *p, int64_t S, lk_real *part, int *failed) {
    const int64_t B = p->B, N = p->N, H = p->H, Rq = p->Rq, Rk = p->Rk, Rv = p->Rv, D = p->D, E = p->E, M = p->M;
    const int factor = tpa_use_factor(p, LK_VL);
    const int64_t QT = lk_min_i64(LK_TPA_QTILE, N), tiles = lk_cdiv(N, QT), tasks = B * tiles * S;
    const int vtile = tpa_use_vtile(p, QT);
    const int64_t vt_row = lk_max_i64(round_up(E, LK_VL), LK_VL) * (int64_t)sizeof(lk_real);   /* E = 0: no division by 0 */
    const int64_t vt_heads = lk_max_i64(1, LK_TPA_VTILE_BYTES / (LK_TPA_BLOCK * vt_row));
    const int64_t es = (int64_t)sizeof(lk_real), token_bytes = es * (H * (Rk + Rv) + Rk * D + Rv * E);
    const int prefetch = LK_TPA_PREFETCH > 0 && lk_prefetch_pays(B * M * token_bytes);
    _Pragma("omp parallel num_threads(tpa_team(p, tasks))")
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
                tpa_simd_query(p, factor, &w, qs, (const lk_real *)p->aq + q * H * Rq, (const lk_real *)p->bq + q * Rq * D);
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
                    lk_pf_add(&pf, (const lk_real *)p->ak + (b * M + jp) * H * Rk, np * H * Rk * es);
                    lk_pf_add(&pf, (const lk_real *)p->bk + (b * M + jp) * Rk * D, np * Rk * D * es);
                    lk_pf_add(&pf, (const lk_real *)p->av + (b * M + jp) * H * Rv, np * H * Rv * es);
                    lk_pf_add(&pf, (const lk_real *)p->bv + (b * M + jp) * Rv * E, np * Rv * E * es);
                }
                const lk_real *ak = (const lk_real *)p->ak + (b * M + j) * H * Rk;
                const lk_real *av = (const lk_real *)p->av + (b * M + j) * H * Rv;
                const lk_real *bv = (const lk_real *)p->bv + (b * M + j) * Rv * E;
                /* de-interleave ak[t, h, u] -> akd[t, u, h] (and av) when the rank is > 1: head lanes */
                if (Rk > 1) tpa_deinterleave(nt, H, Rk, w.Hp, ak, w.akd);
                if (Rv > 1 && !vtile) tpa_deinterleave(nt, H, Rv, w.Hp, av, w.avd);
                /* queries whose range ends before this block skip it */
                lk_real *Wa[LK_TPA_QTILE], *acca[LK_TPA_QTILE];
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
                if (vtile) /* value tiles of head groups that stay in L2, each folded by every query */
                    for (int64_t h0 = 0; h0 < H; h0 += vt_heads) {
                        const int64_t hg = lk_min_i64(vt_heads, H - h0);
                        tpa_simd_vtile(p, &w, av, bv, nt, h0, hg);
                        tpa_fold_vtile_block(active, nt, h0, hg, w.Hp, w.Ep, Wa, acca, w.V, any_skip ? skipa : NULL);
                    }
            }
            for (int64_t g = 0; g < nq; g++)
                tpa_finish_real(p, S, b * N + i0 + g, sp, w.q[g].m, w.q[g].l, w.q[g].acc, w.Ep, part);
        }
        if (ok) free(w.mem);
        _Pragma("omp barrier")
        if (S > 1 && !*failed) tpa_combine_splits(p, S, part);
    }
}
