/* The SIMD paths of attention.c, written once for both element types (simd_real.h): lk_real is float
 * or double, lk_v a vector of LK_VL of them.  Included by attention_simd_f32.c and attention_simd_f64.c
 * only; the entry point is lk_attention_simd_f32 / _f64.  See attention.c for the math and the paths. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "attention_internal.h"
#include "lmkern/simd_real.h"

#define LK_BK (4 * LK_VL) /* keys per block: 4 vectors */
/* rows per microkernel call of a prefill tile: LK_MR x 4 accumulators + 4 key (value) vectors + a
 * broadcast fit the register file (AVX-512: 6 x 4 + 5 of 32; AVX2: 3 x 4 + 5 of 16, where 6 rows spilled
 * every FMA to the stack: causal GQA prefill N = M = 1024 on a Zen 3 guest went from 118 to 94 ms).
 * Decode tiles (up to 4 rows: one GQA group) take all their rows in one call even where that spills,
 * so that the value rows stream from memory once (two passes measured 7% slower on that guest). */
#define LK_MR (LK_VREGS >= 32 ? 6 : 3)
#define LK_MR_MAX 6 /* accumulator array rows: the largest NR of any call */
#define LK_SUB 16         /* keys per memory-order step of the split path */
#define LK_SPLIT 4         /* key chunks per thread in the split path */
#define LK_KT_BYTES ((size_t)64 << 20) /* bound on the transposed-key copy of one pass */
#define LK_TILE_ROWS 64   /* target rows (queries x group heads) per prefill tile */
#define LK_INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------------------------------------ */
/* SIMD building blocks                                                                        */
/* ------------------------------------------------------------------------------------------ */

/* The online-softmax state of `rows` query rows: packed prescaled queries, the score block, the
 * unnormalized output, and the running max / sum. */
typedef struct {
    int64_t rows, D, E, Ep;   /* Ep: E rounded up to LK_VL (row stride of o) */
    const lk_real *q;           /* rows x D, already multiplied by scale */
    lk_real *s;                 /* rows x LK_BK: scores, then probabilities */
    lk_real *o;                 /* rows x Ep */
    lk_real *m, *l, *alpha;     /* rows */
    const int64_t *qpos;      /* rows: the position of each row's query */
    int64_t qmin, qmax;
    lk_real *vbuf;              /* LK_BK x Ep: a packed copy of the value block (tile path), or NULL */
} lk_tile;

/* One online-softmax step of one row over a block of scores s0..s3 (already masked with -inf):
 * m' = max(m, max_j s_j), alpha = e^(m - m'), p_j = e^(s_j - m') stored to srow,
 * l = alpha l + sum_j p_j.  A row that has seen no admissible key keeps m = -inf, l = 0, p = 0,
 * unless a score is NaN (the max ignores NaN): then m = l = NaN and the row ends NaN. */
LK_INLINE void lk_softmax_row(lk_v s0, lk_v s1, lk_v s2, lk_v s3, lk_real *srow, lk_real *m, lk_real *l, lk_real *alpha) {
    const lk_real bmax = lk_v_hmax(lk_v_max(lk_v_max(s0, s1), lk_v_max(s2, s3)));
    const lk_real m_old = *m;
    const lk_real m_new = bmax > m_old ? bmax : m_old;
    if (m_new == -INFINITY) {
        const lk_real nan_check = lk_v_sum(lk_v_add(lk_v_add(s0, s1), lk_v_add(s2, s3)));
        lk_v_store(srow, lk_v_zero()); lk_v_store(srow + LK_VL, lk_v_zero());
        lk_v_store(srow + 2 * LK_VL, lk_v_zero()); lk_v_store(srow + 3 * LK_VL, lk_v_zero());
        *alpha = 1;
        if (nan_check != nan_check) *m = *l = NAN;
        return;
    }
    const lk_v mv = lk_v_set1(m_new);
    s0 = lk_v_exp_softmax(lk_v_sub(s0, mv)); s1 = lk_v_exp_softmax(lk_v_sub(s1, mv));
    s2 = lk_v_exp_softmax(lk_v_sub(s2, mv)); s3 = lk_v_exp_softmax(lk_v_sub(s3, mv));
    lk_v_store(srow, s0); lk_v_store(srow + LK_VL, s1); lk_v_store(srow + 2 * LK_VL, s2); lk_v_store(srow + 3 * LK_VL, s3);
    const lk_real a = m_old == -INFINITY ? 0 : lk_real_exp(m_old - m_new);
    *alpha = a;
    *l = *l * a + lk_v_sum(lk_v_add(lk_v_add(s0, s1), lk_v_add(s2, s3)));
    *m = m_new;
}

/* s[r][0:4 VF] = sum_d q[r][d] kt[d][0:4 VF] for NR rows (outer products; kt is a transposed block);
 * with m given, also the softmax step of those rows (lk_softmax_row), s then holding p. */
LK_INLINE void lk_qk_packed_micro(int NR, const lk_real *q, int64_t D, const lk_real *kt, lk_real *s, lk_real *m, lk_real *l,
                                  lk_real *alpha) {
    lk_v acc[LK_MR_MAX][4];
#pragma GCC unroll 6
    for (int r = 0; r < NR; r++)
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) acc[r][c] = lk_v_zero();
    for (int64_t d = 0; d < D; d++) {
        const lk_real *kd = kt + d * LK_BK;
        const lk_v k0 = lk_v_load(kd), k1 = lk_v_load(kd + LK_VL), k2 = lk_v_load(kd + 2 * LK_VL),
                    k3 = lk_v_load(kd + 3 * LK_VL);
#pragma GCC unroll 6
        for (int r = 0; r < NR; r++) {
            const lk_v qb = lk_v_set1(q[r * D + d]);
            acc[r][0] = lk_v_fma(qb, k0, acc[r][0]);
            acc[r][1] = lk_v_fma(qb, k1, acc[r][1]);
            acc[r][2] = lk_v_fma(qb, k2, acc[r][2]);
            acc[r][3] = lk_v_fma(qb, k3, acc[r][3]);
        }
    }
    if (m) {
        /* a full unmasked block: the softmax step straight from the registers */
#pragma GCC unroll 6
        for (int r = 0; r < NR; r++)
            lk_softmax_row(acc[r][0], acc[r][1], acc[r][2], acc[r][3], s + r * LK_BK, m + r, l + r, alpha + r);
        return;
    }
#pragma GCC unroll 6
    for (int r = 0; r < NR; r++)
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) lk_v_store(s + r * LK_BK + c * LK_VL, acc[r][c]);
}

/* S = Q K^T for the whole tile against one transposed key block (fused: and the softmax step) */
#define LK_QK_CALL(NR) \
    lk_qk_packed_micro(NR, t->q + r * t->D, t->D, kt, t->s + r * LK_BK, fused ? t->m + r : NULL, t->l + r, t->alpha + r)
static void lk_qk_packed(const lk_tile *t, const lk_real *kt, int fused) {
    int64_t r = 0;
    for (; r + LK_MR <= t->rows; r += LK_MR) LK_QK_CALL(LK_MR);
    switch (t->rows - r) {
#if LK_VREGS >= 32
    case 5: LK_QK_CALL(5); break;
    case 4: LK_QK_CALL(4); break;
    case 3: LK_QK_CALL(3); break;
#endif
    case 2: LK_QK_CALL(2); break;
    case 1: LK_QK_CALL(1); break;
    default: break;
    }
}

/* S = Q K^T by dot products straight from the keys (no transpose): decode / few rows.
 * s[r][col0 + j] = sum_d q[r][d] k_j[d], blocks of 4 rows x 4 keys (16 accumulators, each key
 * and query vector loaded once per block), reduced by lk_v_sum4. */
static void lk_qk_dot(const lk_tile *t, const lk_real *k, int64_t kstride, int64_t nk, int64_t col0) {
    const int64_t D = t->D, Dv = D / LK_VL * LK_VL;
    const int tail = (int)(D - Dv);
    for (int64_t r0 = 0; r0 < t->rows; r0 += 4) {
        const int nr = (int)lk_min_i64(4, t->rows - r0);
        const lk_real *qr[4];
        for (int r = 0; r < 4; r++) qr[r] = t->q + (r0 + (r < nr ? r : nr - 1)) * D;
        for (int64_t j0 = 0; j0 < nk; j0 += 4) {
            const int nj = (int)lk_min_i64(4, nk - j0);
            const lk_real *kj[4];
            for (int c = 0; c < 4; c++) kj[c] = k + (j0 + (c < nj ? c : nj - 1)) * kstride;
            lk_v acc[4][4];
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++) acc[r][c] = lk_v_zero();
            int64_t d = 0;
            for (; d < Dv; d += LK_VL) {
                lk_v kv[4];
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++) kv[c] = lk_v_load(kj[c] + d);
#pragma GCC unroll 4
                for (int r = 0; r < 4; r++) {
                    const lk_v qv = lk_v_load(qr[r] + d);
#pragma GCC unroll 4
                    for (int c = 0; c < 4; c++) acc[r][c] = lk_v_fma(qv, kv[c], acc[r][c]);
                }
            }
            if (tail) {
                lk_v kv[4];
                for (int c = 0; c < 4; c++) kv[c] = lk_v_load_n(kj[c] + d, tail);
                for (int r = 0; r < 4; r++) {
                    const lk_v qv = lk_v_load_n(qr[r] + d, tail);
                    for (int c = 0; c < 4; c++) acc[r][c] = lk_v_fma(qv, kv[c], acc[r][c]);
                }
            }
            for (int r = 0; r < nr; r++) {
                lk_real sums[4];
                lk_v_sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], sums);
                lk_real *s = t->s + (r0 + r) * LK_BK + col0 + j0;
                for (int c = 0; c < nj; c++) s[c] = sums[c];
            }
        }
    }
}

/* 0, 1, ..., LK_BK - 1: key indices within a block (exact in float and double) */
static const lk_real lk_iota[64] = {
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31,
    32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60,
    61, 62, 63,
};
_Static_assert(LK_BK <= 64, "lk_iota covers one key block");

/* Masks the score block (keys >= nk; when kpos is given, keys with kpos[j] > qpos[r]; with
 * kpos_first != INT64_MIN, keys kpos_first + j > qpos[r]), then one softmax step per row. */
static void lk_softmax_step(const lk_tile *t, int64_t nk, const int64_t *kpos, int64_t kpos_first) {
    for (int64_t r = 0; r < t->rows; r++) {
        lk_real *s = t->s + r * LK_BK;
        /* keys j >= limit are masked: the block tail, and with default positions kpos_first + j,
         * keys j > qp - kpos_first (kpos_first >= 0) */
        int64_t limit = nk;
        if (kpos) {
            const int64_t qp = t->qpos[r];
            for (int64_t j = 0; j < nk; j++)
                if (kpos[j] > qp) s[j] = -INFINITY;
        } else if (kpos_first != INT64_MIN) {
            const int64_t qp = t->qpos[r];
            limit = qp < kpos_first ? 0 : qp - kpos_first >= nk ? nk : qp - kpos_first + 1; /* no overflow */
        }
        lk_v s0 = lk_v_load(s), s1 = lk_v_load(s + LK_VL), s2 = lk_v_load(s + 2 * LK_VL), s3 = lk_v_load(s + 3 * LK_VL);
        if (limit < LK_BK) {
            /* lanes with index >= limit get -inf (indices are exact) */
            const lk_v lim = lk_v_set1((lk_real)limit - (lk_real)0.5), ninf = lk_v_set1(-INFINITY);
            s0 = lk_v_select_lt(lim, lk_v_load(lk_iota), ninf, s0);
            s1 = lk_v_select_lt(lim, lk_v_load(lk_iota + LK_VL), ninf, s1);
            s2 = lk_v_select_lt(lim, lk_v_load(lk_iota + 2 * LK_VL), ninf, s2);
            s3 = lk_v_select_lt(lim, lk_v_load(lk_iota + 3 * LK_VL), ninf, s3);
        }
        lk_softmax_row(s0, s1, s2, s3, s, t->m + r, t->l + r, t->alpha + r);
    }
}

/* o[r][e0 : e0 + NV VF] = alpha[r] o[r][...] + sum_{j < nk} p[r][j] v_j[...] for NR rows (no
 * rescaling when alpha is NULL); the last vector holds `last` (<= LK_VL) valid features of v. */
LK_INLINE void lk_pv_micro(int NR, int NV, const lk_real *p, const lk_real *alpha, lk_real *o, int64_t Ep,
                           const lk_real *v, int64_t vstride, int64_t nk, int last) {
    lk_v acc[LK_MR_MAX][4];
#pragma GCC unroll 6
    for (int r = 0; r < NR; r++) {
        const lk_v a = lk_v_set1(alpha ? alpha[r] : 1);
#pragma GCC unroll 4
        for (int c = 0; c < NV; c++)
            acc[r][c] = alpha ? lk_v_mul(a, lk_v_load(o + r * Ep + c * LK_VL)) : lk_v_load(o + r * Ep + c * LK_VL);
    }
#define LK_PV_LOOP(LOAD_LAST)                                                                     \
    for (int64_t j = 0; j < nk; j++) {                                                            \
        const lk_real *vj = v + j * vstride;                                                        \
        lk_v vv[4];                                                                              \
        _Pragma("GCC unroll 4")                                                                   \
        for (int c = 0; c < NV - 1; c++) vv[c] = lk_v_load(vj + c * LK_VL);                      \
        vv[NV - 1] = LOAD_LAST;                                                                   \
        _Pragma("GCC unroll 6")                                                                   \
        for (int r = 0; r < NR; r++) {                                                            \
            const lk_v pb = lk_v_set1(p[r * LK_BK + j]);                                        \
            _Pragma("GCC unroll 4")                                                               \
            for (int c = 0; c < NV; c++) acc[r][c] = lk_v_fma(pb, vv[c], acc[r][c]);             \
        }                                                                                         \
    }
    if (last == LK_VL) LK_PV_LOOP(lk_v_load(vj + (NV - 1) * LK_VL))
    else LK_PV_LOOP(lk_v_load_n(vj + (NV - 1) * LK_VL, last))
#undef LK_PV_LOOP
#pragma GCC unroll 6
    for (int r = 0; r < NR; r++)
#pragma GCC unroll 4
        for (int c = 0; c < NV; c++) lk_v_store(o + r * Ep + c * LK_VL, acc[r][c]);
}

/* lk_pv_micro over the tile's rows for features e0 .. e0 + NV LK_VL (NV a literal at every call) */
LK_INLINE void lk_pv_rows(const lk_tile *t, const int NV, const lk_real *alpha_all, const lk_real *v, int64_t vstride,
                          int64_t nk, int64_t col0, int64_t e0, int last) {
    const int64_t Ep = t->Ep;
#define LK_PV_MICRO(NR) \
    lk_pv_micro(NR, NV, t->s + r * LK_BK + col0, alpha_all ? alpha_all + r : NULL, t->o + r * Ep + e0, Ep, v + e0, vstride, nk, last)
    int64_t r = 0;
    if (t->rows > 4)
        for (; r + LK_MR <= t->rows; r += LK_MR) LK_PV_MICRO(LK_MR);
    switch (t->rows - r) {
#if LK_VREGS >= 32
    case 5: LK_PV_MICRO(5); break;
#endif
    case 4: LK_PV_MICRO(4); break;
    case 3: LK_PV_MICRO(3); break;
    case 2: LK_PV_MICRO(2); break;
    case 1: LK_PV_MICRO(1); break;
    default: break;
    }
#undef LK_PV_MICRO
}

/* O = diag(alpha) O + P[:, col0 : col0 + nk] V for the whole tile (alpha only when rescale) */
static void lk_pv(const lk_tile *t, const lk_real *v, int64_t vstride, int64_t nk, int64_t col0, int rescale) {
    const int64_t Ep = t->Ep, E = t->E;
    const lk_real *alpha_all = rescale ? t->alpha : NULL;
    for (int64_t e0 = 0; e0 < Ep; e0 += 4 * LK_VL) {
        const int nv = (int)lk_min_i64(4, (Ep - e0) / LK_VL);
        const int last = (int)lk_min_i64(LK_VL, E - (e0 + (nv - 1) * LK_VL));
        switch (nv) {
        case 4: lk_pv_rows(t, 4, alpha_all, v, vstride, nk, col0, e0, last); break;
        case 3: lk_pv_rows(t, 3, alpha_all, v, vstride, nk, col0, e0, last); break;
        case 2: lk_pv_rows(t, 2, alpha_all, v, vstride, nk, col0, e0, last); break;
        default: lk_pv_rows(t, 1, alpha_all, v, vstride, nk, col0, e0, last); break;
        }
    }
}

/* Whether the nk value rows (E features, row stride vstride) hold an inf or a NaN (x - x is NaN exactly
 * for those). */
static int lk_values_nonfinite(const lk_real *v, int64_t vstride, int64_t nk, int64_t E) {
    const int64_t Ev = E / LK_VL * LK_VL;
    lk_v acc = lk_v_zero();
    lk_real tail = 0;
    for (int64_t j = 0; j < nk; j++) {
        const lk_real *vj = v + j * vstride;
        int64_t e = 0;
        for (; e < Ev; e += LK_VL) {
            const lk_v x = lk_v_load(vj + e);
            acc = lk_v_add(acc, lk_v_sub(x, x));
        }
        for (; e < E; e++) tail += vj[e] - vj[e];
    }
    const lk_real sum = lk_v_sum(acc) + tail;
    return sum != sum;
}

/* lk_pv for a masked block (kpos, or kpos_first != INT64_MIN) whose values hold an inf or a NaN: a key
 * masked for a row adds nothing to that row, where the vector kernels would add 0 * inf = NaN; an
 * admissible key adds p v as IEEE arithmetic says.  Scalar, and only for such blocks, so finite data
 * never comes here and keeps its results bit for bit. */
static void lk_pv_exact(const lk_tile *t, const lk_real *v, int64_t vstride, int64_t nk, int64_t col0, int rescale,
                        const int64_t *kpos, int64_t kpos_first) {
    for (int64_t r = 0; r < t->rows; r++) {
        lk_real *o = t->o + r * t->Ep;
        const lk_real *pr = t->s + r * LK_BK + col0;
        const int64_t qp = t->qpos[r];
        if (rescale)
            for (int64_t e = 0; e < t->E; e++) o[e] *= t->alpha[r];
        for (int64_t j = 0; j < nk; j++) {
            if (kpos ? kpos[j] > qp : kpos_first + j > qp) continue;
            for (int64_t e = 0; e < t->E; e++) o[e] += pr[j] * v[j * vstride + e];
        }
    }
}

static void lk_tile_reset(const lk_tile *t) {
    memset(t->o, 0, sizeof(lk_real) * (size_t)(t->rows * t->Ep));
    for (int64_t r = 0; r < t->rows; r++) { t->m[r] = -INFINITY; t->l[r] = 0; t->alpha[r] = 1; }
}

/* One key block of the tile: scores (from a transposed block kt, or straight from k), mask,
 * softmax step, P V.  Keys are block-relative; own keys carry positions (kpos or kpos_first + j),
 * prefix keys none (kpos == NULL, kpos_first == INT64_MIN). */
static void lk_tile_block(const lk_tile *t, const lk_real *kt, const lk_real *k, int64_t kstride,
                          const lk_real *v, int64_t vstride, int64_t nk, const int64_t *kpos, int64_t kpos_first) {
    if (t->vbuf) {
        /* the value block, contiguous: P V then streams it from L1 at unit stride for every row
         * block of the tile (~10% faster than the strided rows; the copy is 1/rows of the work) */
        const int64_t Ev = t->E / LK_VL * LK_VL;
        const int tail = (int)(t->E - Ev);
        for (int64_t j = 0; j < nk; j++) {
            const lk_real *src = v + j * vstride;
            lk_real *dst = t->vbuf + j * t->Ep;
            int64_t e = 0;
            for (; e < Ev; e += LK_VL) lk_v_store(dst + e, lk_v_load(src + e));
            if (tail) lk_v_store_n(dst + e, lk_v_load_n(src + e, tail), tail);
        }
        v = t->vbuf;
        vstride = t->Ep;
    }
    if (kt && nk == LK_BK && !kpos && kpos_first == INT64_MIN) {
        lk_qk_packed(t, kt, 1);
    } else {
        if (kt) lk_qk_packed(t, kt, 0);
        else lk_qk_dot(t, k, kstride, nk, 0);
        lk_softmax_step(t, nk, kpos, kpos_first);
        if ((kpos || kpos_first != INT64_MIN) && lk_values_nonfinite(v, vstride, nk, t->E)) {
            lk_pv_exact(t, v, vstride, nk, 0, 1, kpos, kpos_first);
            return;
        }
    }
    lk_pv(t, v, vstride, nk, 0, 1);
}

/* Visits the own-key block [j0, j0 + nk) of row b for a tile: skipped when fully masked
 * (causal and min position > max query position), masked only when it straddles the diagonal. */
static void lk_own_block(const lk_attention_params *p, const lk_tile *t, int64_t b, int64_t j0, int64_t nk,
                         const lk_real *kt, const lk_real *k, const lk_real *v, int64_t kmin, int64_t kmax) {
    const int64_t kstride = p->k_stride[1], vstride = p->v_stride[1];
    if (p->causal && kmin > t->qmax) return;
    const int need_mask = p->causal && kmax > t->qmin;
    const int64_t *kpos = need_mask && p->kv_pos ? p->kv_pos + b * p->kv_pos_bstride + j0 : NULL;
    const int64_t first = need_mask && !p->kv_pos ? j0 : INT64_MIN;
    lk_tile_block(t, kt, k + j0 * kstride, kstride, v + j0 * vstride, vstride, nk, kpos, first);
}

static void lk_block_pos_range(const lk_attention_params *p, int64_t b, int64_t j0, int64_t nk,
                               int64_t *kmin, int64_t *kmax) {
    if (!p->kv_pos) { *kmin = j0; *kmax = j0 + nk - 1; return; }
    const int64_t *kp = p->kv_pos + b * p->kv_pos_bstride + j0;
    int64_t lo = INT64_MAX, hi = INT64_MIN;
    for (int64_t j = 0; j < nk; j++) { lo = kp[j] < lo ? kp[j] : lo; hi = kp[j] > hi ? kp[j] : hi; }
    *kmin = lo; *kmax = hi;
}

/* Packs the tile's query rows r = iq * G + hl (query i0 + iq, head g G + hl), times scale, and their
 * positions. */
static void lk_pack_queries(const lk_attention_params *p, int64_t b, int64_t g, int64_t i0, int64_t nq,
                            lk_real *qdst, int64_t *qpos, int64_t *qmin, int64_t *qmax) {
    const int64_t G = p->Hq / p->Hkv, D = p->D, len = lk_row_len(p, b);
    const lk_real scale = (lk_real)p->scale;
    int64_t lo = INT64_MAX, hi = INT64_MIN;
    for (int64_t iq = 0; iq < nq; iq++) {
        const int64_t i = i0 + iq, qp = lk_q_position(p, b, i, len);
        lo = qp < lo ? qp : lo; hi = qp > hi ? qp : hi;
        for (int64_t hl = 0; hl < G; hl++) {
            const lk_real *src = (const lk_real *)p->q + b * p->q_stride[0] + i * p->q_stride[1] + (g * G + hl) * p->q_stride[2];
            lk_real *dst = qdst + (iq * G + hl) * D;
            for (int64_t d = 0; d < D; d++) dst[d] = src[d] * scale;
            qpos[iq * G + hl] = qp;
        }
    }
    *qmin = lo; *qmax = hi;
}

/* Per-thread scratch for `rows` rows. */
typedef struct { lk_real *q, *s, *o, *m, *l, *alpha, *vbuf; int64_t *qpos; } lk_scratch;

static int lk_scratch_alloc(lk_scratch *w, int64_t rows, int64_t D, int64_t Ep) {
    const size_t R = (size_t)(rows > 0 ? rows : 1);
    w->q = (lk_real *)malloc(sizeof(lk_real) * (R * (size_t)(D > 0 ? D : 1)));
    w->s = (lk_real *)aligned_alloc(64, sizeof(lk_real) * R * LK_BK);
    w->o = (lk_real *)malloc(sizeof(lk_real) * (R * (size_t)(Ep > 0 ? Ep : 1)));
    w->m = (lk_real *)malloc(sizeof(lk_real) * 3 * R);
    w->qpos = (int64_t *)malloc(sizeof(int64_t) * R);
    w->vbuf = (lk_real *)aligned_alloc(64, sizeof(lk_real) * LK_BK * (size_t)(Ep > 0 ? Ep : LK_VL));
    w->l = w->m ? w->m + R : NULL;
    w->alpha = w->m ? w->m + 2 * R : NULL;
    return w->q && w->s && w->o && w->m && w->qpos && w->vbuf;
}

static void lk_scratch_free(lk_scratch *w) {
    free(w->q); free(w->s); free(w->o); free(w->m); free(w->qpos); free(w->vbuf);
}

static lk_tile lk_tile_of(const lk_scratch *w, int64_t row0, int64_t rows, int64_t D, int64_t E, int64_t Ep) {
    lk_tile t = {rows, D, E, Ep, w->q + row0 * D, w->s, w->o + row0 * Ep, w->m + row0, w->l + row0,
                 w->alpha + row0, w->qpos + row0, 0, 0, NULL};
    return t;
}

/* Writes out[b, i, h] (and lse) of tile row r = iq * G + hl from a single state (combine of one). */
static void lk_tile_finish(const lk_attention_params *p, const lk_tile *t, int64_t b, int64_t g, int64_t i0, int64_t nq) {
    const int64_t G = p->Hq / p->Hkv;
    for (int64_t iq = 0; iq < nq; iq++)
        for (int64_t hl = 0; hl < G; hl++) {
            const int64_t r = iq * G + hl, i = i0 + iq, h = g * G + hl;
            lk_real *o = (lk_real *)p->out + b * p->out_stride[0] + i * p->out_stride[1] + h * p->out_stride[2];
            lk_real *lse = p->lse ? (lk_real *)p->lse + (b * p->N + i) * p->Hq + h : NULL;
            lk_real_softmax_combine(1, t->m + r, t->l + r, t->o + r * t->Ep, t->Ep, t->E, o, lse);
        }
}

/* ------------------------------------------------------------------------------------------ */
/* prefill: tiles                                                                              */
/* ------------------------------------------------------------------------------------------ */

/* kt[d][j] = k[j][d] for nk <= LK_BK keys; keys nk.. are zero */
static void lk_transpose_block(const lk_real *k, int64_t kstride, int64_t nk, int64_t D, lk_real *kt) {
    lk_real_transpose(k, kstride, nk, D, kt, LK_BK);
    if (nk < LK_BK)
        for (int64_t d = 0; d < D; d++)
            for (int64_t j = nk; j < LK_BK; j++) kt[d * LK_BK + j] = 0;
}

static lk_status attention_tiles(const lk_attention_params *p) {
    const int64_t B = p->B, N = p->N, Hkv = p->Hkv, G = p->Hq / p->Hkv, D = p->D, E = p->E;
    const int64_t Ep = lk_cdiv(E, LK_VL) * LK_VL, L = p->prefix_len;
    const int64_t Bq = lk_max_i64(1, LK_TILE_ROWS / G), nqb = lk_cdiv(N, Bq), rows_max = Bq * G;
    const int64_t nbp = lk_cdiv(L, LK_BK), nbo = lk_cdiv(p->M, LK_BK), nbt = nbp + nbo;
    const size_t blk = (size_t)LK_BK * (size_t)(D > 0 ? D : 1);
    /* transposed keys of every (b, g) of a pass: nbp prefix blocks then nbo own blocks; a pass
     * takes as many batch rows as fit in LK_KT_BYTES (at least one), so the copy stays bounded */
    const size_t row_bytes = sizeof(lk_real) * blk * (size_t)(Hkv * nbt > 0 ? Hkv * nbt : 1);
    const int64_t Bc = lk_max_i64(1, lk_min_i64(B, (int64_t)(LK_KT_BYTES / row_bytes)));
    lk_real *kt = (lk_real *)aligned_alloc(64, row_bytes * (size_t)Bc);
    int64_t *kmin = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * Bc * nbo + 1));
    if (!kt || !kmin) { free(kt); free(kmin); return LK_ERR_NOMEM; }
    int64_t *kmax = kmin + Bc * nbo;
    int failed = 0;
    for (int64_t b0 = 0; b0 < B && !failed; b0 += Bc) {
    const int64_t nb = lk_min_i64(Bc, B - b0);
#pragma omp parallel num_threads(lk_team(p, nb * Hkv * nqb))
    {
#pragma omp for schedule(static)
        for (int64_t u = 0; u < nb * Hkv * nbt; u++) {
            const int64_t bl = u / (Hkv * nbt), b = b0 + bl, g = (u / nbt) % Hkv, kb = u % nbt;
            lk_real *dst = kt + (size_t)u * blk;
            if (kb < nbp) {
                const int64_t j0 = kb * LK_BK, nk = lk_min_i64(LK_BK, L - j0);
                const lk_real *src = (const lk_real *)p->prefix_k + (((b / p->prefix_rows) * L + j0) * Hkv + g) * D;
                lk_transpose_block(src, Hkv * D, nk, D, dst);
            } else {
                const int64_t j0 = (kb - nbp) * LK_BK, nk = lk_min_i64(LK_BK, lk_row_len(p, b) - j0);
                if (nk > 0) {
                    const lk_real *src = (const lk_real *)p->k + b * p->k_stride[0] + j0 * p->k_stride[1] + g * p->k_stride[2];
                    lk_transpose_block(src, p->k_stride[1], nk, D, dst);
                    if (g == 0) lk_block_pos_range(p, b, j0, nk, &kmin[bl * nbo + kb - nbp], &kmax[bl * nbo + kb - nbp]);
                }
            }
        }
        lk_scratch w;
        const int ok = lk_scratch_alloc(&w, rows_max, D, Ep);
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
        /* heaviest tiles first: the last query blocks see the most causal keys */
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < nb * Hkv * nqb; task++) {
            if (!ok) continue;
            const int64_t qb = nqb - 1 - task % nqb, g = (task / nqb) % Hkv, bl = task / (nqb * Hkv), b = b0 + bl;
            const int64_t i0 = qb * Bq, nq = lk_min_i64(Bq, N - i0), len = lk_row_len(p, b);
            lk_tile t = lk_tile_of(&w, 0, nq * G, D, E, Ep);
            t.vbuf = w.vbuf;
            lk_pack_queries(p, b, g, i0, nq, w.q, w.qpos, &t.qmin, &t.qmax);
            lk_tile_reset(&t);
            const lk_real *ktb = kt + (size_t)(bl * Hkv + g) * (size_t)nbt * blk;
            for (int64_t kb = 0; kb < nbp; kb++) {
                const int64_t j0 = kb * LK_BK, nk = lk_min_i64(LK_BK, L - j0);
                const lk_real *vp = (const lk_real *)p->prefix_v + (((b / p->prefix_rows) * L + j0) * Hkv + g) * E;
                lk_tile_block(&t, ktb + kb * blk, NULL, 0, vp, Hkv * E, nk, NULL, INT64_MIN);
            }
            const lk_real *kb0 = (const lk_real *)p->k + b * p->k_stride[0] + g * p->k_stride[2];
            const lk_real *vb0 = (const lk_real *)p->v + b * p->v_stride[0] + g * p->v_stride[2];
            for (int64_t kb = 0; kb * LK_BK < len; kb++) {
                const int64_t j0 = kb * LK_BK, nk = lk_min_i64(LK_BK, len - j0);
                lk_own_block(p, &t, b, j0, nk, ktb + (nbp + kb) * blk, kb0, vb0, kmin[bl * nbo + kb], kmax[bl * nbo + kb]);
            }
            lk_tile_finish(p, &t, b, g, i0, nq);
        }
        lk_scratch_free(&w);
    }
    }
    free(kt);
    free(kmin);
    return failed ? LK_ERR_NOMEM : LK_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* decode: keys split across threads, partial states merged by the one combine                 */
/* ------------------------------------------------------------------------------------------ */

static lk_status attention_split(const lk_attention_params *p) {
    const int64_t B = p->B, N = p->N, Hq = p->Hq, Hkv = p->Hkv, G = Hq / Hkv, D = p->D, E = p->E;
    const int64_t Ep = lk_cdiv(E, LK_VL) * LK_VL, L = p->prefix_len, rows = N * Hq, grows = N * G;
    /* Work units (b, c): the keys of row b in C chunks, C = ceil(LK_SPLIT threads / B), so there are
     * about LK_SPLIT units per thread (a long single decode is split LK_SPLIT x threads ways; a big
     * batch is not split at all and the partials stay small).  Units are handed out dynamically: a
     * thread the OS preempts (a shared machine) leaves its units to the others.  C depends on B and
     * the thread count only, and each unit is computed the same way whichever thread takes it, so
     * results stay reproducible. */
    const int64_t C = lk_max_i64(1, lk_cdiv(LK_SPLIT * (int64_t)lk_get_num_threads(), B));
    /* partials of row R = (b N + i) Hq + h, chunk c: m, l at R C + c, acc at (R C + c) E */
    const size_t nR = (size_t)(B * rows) * (size_t)C;
    lk_real *pm = (lk_real *)malloc(sizeof(lk_real) * (2 * nR + 1));
    lk_real *pacc = (lk_real *)malloc(sizeof(lk_real) * (nR * (size_t)E + 1));
    if (!pm || !pacc) { free(pm); free(pacc); return LK_ERR_NOMEM; }
    lk_real *pl = pm + nR;
    int failed = 0;
#pragma omp parallel num_threads(lk_team(p, B * C))
    {
        lk_scratch w;
        /* the score block serves one KV head at a time: grows rows; q, o, m, l for all rows */
        lk_tile *tg = (lk_tile *)malloc(sizeof(lk_tile) * (size_t)Hkv);
        const int ok = lk_scratch_alloc(&w, rows, D, Ep) && tg;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1) nowait  /* the barrier below ends the units */
        for (int64_t u = 0; u < B * C; u++) {
            if (!ok) continue;
            {
                const int64_t b = u / C, c = u % C;
                const int64_t len = lk_row_len(p, b), nbp = lk_cdiv(L, LK_BK), nbt = nbp + lk_cdiv(len, LK_BK);
                int64_t lo, hi;
                lk_chunk(nbt, C, c, &lo, &hi);
                int64_t qmin = INT64_MAX, qmax = INT64_MIN;
                for (int64_t g = 0; g < Hkv; g++) {
                    tg[g] = lk_tile_of(&w, g * grows, grows, D, E, Ep);
                    tg[g].s = w.s + g * grows * LK_BK;
                    lk_pack_queries(p, b, g, 0, N, (lk_real *)tg[g].q, (int64_t *)tg[g].qpos, &qmin, &qmax);
                    lk_tile_reset(&tg[g]);
                }
                for (int64_t g = 0; g < Hkv; g++) { tg[g].qmin = qmin; tg[g].qmax = qmax; }
                const lk_real *kb0 = (const lk_real *)p->k + b * p->k_stride[0];
                const lk_real *vb0 = (const lk_real *)p->v + b * p->v_stride[0];
                for (int64_t kb = lo; kb < hi; kb++) {
                    int64_t kmin = 0, kmax = 0, j0, nk;
                    const lk_real *kbase, *vbase;
                    int64_t kstride, vstride, hkstride, hvstride;
                    const int64_t *kpos = NULL;
                    int64_t first = INT64_MIN;
                    if (kb >= nbp) {
                        j0 = (kb - nbp) * LK_BK;
                        nk = lk_min_i64(LK_BK, len - j0);
                        lk_block_pos_range(p, b, j0, nk, &kmin, &kmax);
                        if (p->causal && kmin > qmax) continue;
                        if (p->causal && kmax > qmin) {
                            if (p->kv_pos) kpos = p->kv_pos + b * p->kv_pos_bstride + j0;
                            else first = j0;
                        }
                        kstride = p->k_stride[1]; vstride = p->v_stride[1];
                        hkstride = p->k_stride[2]; hvstride = p->v_stride[2];
                        kbase = kb0 + j0 * kstride;
                        vbase = vb0 + j0 * vstride;
                    } else {
                        j0 = kb * LK_BK;
                        nk = lk_min_i64(LK_BK, L - j0);
                        const int64_t off = ((b / p->prefix_rows) * L + j0) * Hkv;
                        kstride = Hkv * D; vstride = Hkv * E; hkstride = D; hvstride = E;
                        kbase = (const lk_real *)p->prefix_k + off * D;
                        vbase = (const lk_real *)p->prefix_v + off * E;
                    }
                    /* keys in memory order (token-major: all KV heads of a few tokens at a time),
                     * so the hardware prefetchers see one sequential stream */
                    for (int64_t js = 0; js < nk; js += LK_SUB) {
                        const int64_t ns = lk_min_i64(LK_SUB, nk - js);
                        for (int64_t g = 0; g < Hkv; g++)
                            lk_qk_dot(&tg[g], kbase + js * kstride + g * hkstride, kstride, ns, js);
                    }
                    for (int64_t g = 0; g < Hkv; g++) lk_softmax_step(&tg[g], nk, kpos, first);
                    int exact = 0; /* a masked block with inf or NaN values: lk_pv_exact */
                    if (kpos || first != INT64_MIN)
                        for (int64_t g = 0; g < Hkv && !exact; g++)
                            exact = lk_values_nonfinite(vbase + g * hvstride, vstride, nk, E);
                    for (int64_t js = 0; js < nk; js += LK_SUB) {
                        const int64_t ns = lk_min_i64(LK_SUB, nk - js);
                        for (int64_t g = 0; g < Hkv; g++) {
                            const lk_real *vg = vbase + js * vstride + g * hvstride;
                            if (exact)
                                lk_pv_exact(&tg[g], vg, vstride, ns, js, js == 0, kpos ? kpos + js : NULL,
                                            first != INT64_MIN ? first + js : INT64_MIN);
                            else
                                lk_pv(&tg[g], vg, vstride, ns, js, js == 0);
                        }
                    }
                }
                /* partial states of this chunk; tile row g grows + iq G + hl is head h = g G + hl */
                for (int64_t g = 0; g < Hkv; g++)
                    for (int64_t i = 0; i < N; i++)
                        for (int64_t hl = 0; hl < G; hl++) {
                            const int64_t r = g * grows + i * G + hl, R = (b * N + i) * Hq + g * G + hl;
                            const size_t at = (size_t)R * (size_t)C + (size_t)c;
                            pm[at] = w.m[r];
                            pl[at] = w.l[r];
                            memcpy(pacc + at * (size_t)E, w.o + r * Ep, sizeof(lk_real) * (size_t)E);
                        }
            }
        }
        lk_scratch_free(&w);
        free(tg);
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static) nowait
            for (int64_t R = 0; R < B * rows; R++) {
                const int64_t b = R / rows, i = (R / Hq) % N, h = R % Hq;
                lk_real *o = (lk_real *)p->out + b * p->out_stride[0] + i * p->out_stride[1] + h * p->out_stride[2];
                lk_real *lse = p->lse ? (lk_real *)p->lse + R : NULL;
                const size_t at = (size_t)R * (size_t)C;
                lk_real_softmax_combine(C, pm + at, pl + at, pacc + at * (size_t)E, E, E, o, lse);
            }
        }
    }
    free(pm);
    free(pacc);
    return failed ? LK_ERR_NOMEM : LK_OK;
}

/* Tiles when there are enough query rows to amortize transposing K and enough tiles for every
 * thread; otherwise split the keys. */
lk_status LK_REAL_NAME(lk_attention_simd)(const lk_attention_params *p) {
    const int64_t G = p->Hq / p->Hkv, threads = lk_get_num_threads();
    const int64_t Bq = lk_max_i64(1, LK_TILE_ROWS / G), tiles = p->B * p->Hkv * lk_cdiv(p->N, Bq);
    if (p->N * G >= 32 && tiles >= 2 * threads) return attention_tiles(p);
    return attention_split(p);
}
