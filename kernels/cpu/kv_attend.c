/* Attention over the KIVI cache (SPEC 4.2) straight from the packed codes.
 *
 * Keys, quantized per channel (group of G tokens shares scale_d, zero_d per feature d):
 *   s_j = sum_d q_d (code_jd scale_d + zero_d) = sum_d (q_d scale_d) code_jd + sum_d q_d zero_d,
 * so per key group and query row qs_d = q_d scale_d and qz = sum_d q_d zero_d are formed once and the
 * inner loop is codes x vector: for each d, LK_VF consecutive tokens' codes are unpacked to floats
 * (lk_vf_codes) and FMA'd with the broadcast qs_d of every row of the tile (all query heads of the
 * GQA group and all N queries share each decoded byte).
 * Values, quantized per token (group of G features shares scale_jg, zero_jg):
 *   o_e = sum_j p_j (code_je scale_jg + zero_jg).
 * code * scale + zero is formed in registers once per decoded vector (one FMA with the broadcast scale
 * and zero) and FMA'd into every row of the tile (all GQA heads and queries share it); it is never
 * stored.  A single row (MHA decode) whose chunk of features lies in one group instead folds p_j scale_jg
 * into a broadcast weight and sums p_j zero_jg as a scalar: one FMA per vector instead of two (11% faster
 * on AVX2).  (Per-token weights kept in memory for every row measured slower, on AVX-512 and on AVX2.)
 * Full-precision residual tokens use the same loops with plain loads.  No dequantized copy is made.
 *
 * Work items (b, KV head g, split of the row's tokens), split statically over threads; each keeps an
 * online softmax state (m, l, acc) per row and processes blocks of G tokens.  The split states are
 * merged by the one softmax combine (softmax.h).  The generic path (lk_simd_enabled() == 0, or G or
 * E not a multiple of LK_VF) does the same math with scalar loops. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "lmkern/kv.h"
#include "lmkern/simd.h"
#include "lmkern/softmax.h"

#define LK_ALWAYS_INLINE static inline __attribute__((always_inline))
#ifndef LK_PREFETCH_BLOCKS
#define LK_PREFETCH_BLOCKS 8   /* blocks of G tokens prefetched ahead */
#endif

typedef struct {
    const lk_kv_attend_params *p;
    int64_t b, g, group, rows;   /* row r = i * group + hh */
    int simd;
    float *qsc;                  /* rows x D: scale * q */
    float *qs;                   /* rows x D: qsc * key scale of the current group */
    float *qz;                   /* rows */
    float *S;                    /* rows x G: scores, then probabilities */
    float *acc;                  /* rows x E */
    float *m, *l;                /* rows */
} lk_attend_ctx;

/* ---------------------------------------------------------------------------------------- keys */

/* S[r][t] = qz[r] + sum_d qs[r][d] * code(t, d) for rows r0 .. r0+rt-1 and the G tokens of a group.
 * tv token vectors per pass (1 or 2; a pair of vectors is decoded from one word, lk_vf_codes2); dual:
 * two features per step into separate accumulators, which hides the FMA latency when the tile has few
 * accumulators and costs registers when it has many. */
LK_ALWAYS_INLINE void lk_keys_tile(const lk_attend_ctx *c, const uint8_t *kc, int64_t r0, const int rt, const int bits,
                                   const int tv, const int dual) {
    const int64_t D = c->p->D, G = c->p->G, per = 8 / bits, bpd = G / per; /* bytes per channel */
    for (int64_t tc = 0; tc < G; tc += tv * LK_VF) {
        lk_vf a[4][2], a2[4][2];
        for (int r = 0; r < rt; r++)
            for (int v = 0; v < tv; v++) a[r][v] = a2[r][v] = lk_vf_zero();
        const uint8_t *base = kc + tc / per;
        int64_t d = 0;
        /* 2 bits, 2 vectors: the codes come scaled by 4^lane (lk_vf_codes2_scaled), undone at the end */
        const int scaled = tv == 2 && bits == 2;
#define LK_KEY_CODES(cv, ptr)                                                                     \
        if (scaled) lk_vf_codes2_scaled(ptr, &cv[0], &cv[1]);                                     \
        else if (tv == 2) lk_vf_codes2(ptr, bits, &cv[0], &cv[1]);                                \
        else cv[0] = lk_vf_codes(ptr, bits);
        if (dual)
            for (; d + 1 < D; d += 2) {
                const uint8_t *b0 = base + d * bpd, *b1 = b0 + bpd;
                lk_vf c0[2], c1[2];
                LK_KEY_CODES(c0, b0)
                LK_KEY_CODES(c1, b1)
                for (int r = 0; r < rt; r++) {
                    const float *qs = c->qs + (r0 + r) * D + d;
                    const lk_vf w0 = lk_vf_set1(qs[0]), w1 = lk_vf_set1(qs[1]);
                    for (int v = 0; v < tv; v++) {
                        a[r][v] = lk_vf_fma(w0, c0[v], a[r][v]);
                        a2[r][v] = lk_vf_fma(w1, c1[v], a2[r][v]);
                    }
                }
            }
        for (; d < D; d++) {
            lk_vf c0[2];
            LK_KEY_CODES(c0, base + d * bpd)
            for (int r = 0; r < rt; r++) {
                const lk_vf w0 = lk_vf_set1(c->qs[(r0 + r) * D + d]);
                for (int v = 0; v < tv; v++) a[r][v] = lk_vf_fma(w0, c0[v], a[r][v]);
            }
        }
#undef LK_KEY_CODES
        const lk_vf unscale = lk_vf_codes2_unscale();
        for (int r = 0; r < rt; r++) {
            const lk_vf z = lk_vf_set1(c->qz[r0 + r]);
            for (int v = 0; v < tv; v++) {
                lk_vf s = dual ? lk_vf_add(a[r][v], a2[r][v]) : a[r][v];
                if (scaled) s = lk_vf_mul(s, unscale);
                lk_vf_store(c->S + (r0 + r) * G + tc + v * LK_VF, lk_vf_add(s, z));
            }
        }
    }
}

/* rt, bits, tv and dual are literals at every call so the accumulator arrays live in registers: with
 * AVX-512's 32 registers, 4 rows x 2 vectors x 2 features (16 accumulators); with AVX2's 16, a 4-row
 * tile drops the second feature (8 accumulators + 2 codes + a broadcast), since 16 would spill. */
LK_ALWAYS_INLINE void lk_keys_rows_tv(const lk_attend_ctx *c, const uint8_t *kc, const int bits, const int tv) {
    int64_t r0 = 0;
    for (; r0 + 4 <= c->rows; r0 += 4) lk_keys_tile(c, kc, r0, 4, bits, tv, LK_VREGS >= 32 || tv == 1);
    for (; r0 + 2 <= c->rows; r0 += 2) lk_keys_tile(c, kc, r0, 2, bits, tv, 1);
    for (; r0 < c->rows; r0++) lk_keys_tile(c, kc, r0, 1, bits, tv, 1);
}

LK_ALWAYS_INLINE void lk_keys_rows(const lk_attend_ctx *c, const uint8_t *kc, const int bits) {
    if (c->p->G % (2 * LK_VF) == 0) lk_keys_rows_tv(c, kc, bits, 2);
    else lk_keys_rows_tv(c, kc, bits, 1);
}

/* Scores of the quantized key group grp for every row. */
static void lk_keys_quantized(const lk_attend_ctx *c, int64_t grp) {
    const lk_kv_attend_params *p = c->p;
    const int64_t D = p->D, G = p->G, per = 8 / p->bits, head = c->b * p->Hkv + c->g;
    const float *ks = p->k_scale + (head * p->k_groups + grp) * D, *kz = p->k_zero + (head * p->k_groups + grp) * D;
    const uint8_t *kc = p->k_codes + (head * p->k_groups + grp) * D * (G / per);
    for (int64_t r = 0; r < c->rows; r++) {
        const float *q = c->qsc + r * D;
        float *qs = c->qs + r * D, z = 0;
        int64_t d = 0;
        if (c->simd) {
            lk_vf zv = lk_vf_zero();
            for (; d + LK_VF <= D; d += LK_VF) {
                const lk_vf qv = lk_vf_load(q + d);
                lk_vf_store(qs + d, lk_vf_mul(qv, lk_vf_load(ks + d)));
                zv = lk_vf_fma(qv, lk_vf_load(kz + d), zv);
            }
            z = lk_vf_sum(zv);
        }
        for (; d < D; d++) { qs[d] = q[d] * ks[d]; z += q[d] * kz[d]; }
        c->qz[r] = z;
    }
    if (c->simd) {
        if (p->bits == 2) lk_keys_rows(c, kc, 2);
        else if (p->bits == 4) lk_keys_rows(c, kc, 4);
        else lk_keys_rows(c, kc, 8);
        return;
    }
    const int bits = p->bits, mask = (1 << bits) - 1;
    for (int64_t r = 0; r < c->rows; r++)
        for (int64_t t = 0; t < G; t++) {
            float s = 0;
            for (int64_t d = 0; d < D; d++)
                s += c->qs[r * D + d] * (float)((kc[d * (G / per) + t / per] >> (bits * (t % per))) & mask);
            c->S[r * G + t] = s + c->qz[r];
        }
}

/* Scores of nb full-precision keys starting at token j0 (residual slots j0 - qk ...). */
static void lk_keys_full(const lk_attend_ctx *c, int64_t j0, int64_t nb) {
    const lk_kv_attend_params *p = c->p;
    const int64_t D = p->D, G = p->G, head = c->b * p->Hkv + c->g;
    const float *kr = p->k_res + (head * p->k_res_cap + (j0 - p->qk[c->b])) * D;
    for (int64_t t = 0; t < nb; t++)
        for (int64_t r = 0; r < c->rows; r++) {
            const float *q = c->qsc + r * D, *k = kr + t * D;
            float s = 0;
            int64_t d = 0;
            if (c->simd) {
                lk_vf a = lk_vf_zero();
                for (; d + LK_VF <= D; d += LK_VF) a = lk_vf_fma(lk_vf_load(q + d), lk_vf_load(k + d), a);
                s = lk_vf_sum(a);
            }
            for (; d < D; d++) s += q[d] * k[d];
            c->S[r * G + t] = s;
        }
}

/* -------------------------------------------------------------------------------------- values */

/* acc[r][e] += sum_t p[r][t] * x_t[e] over the block's nb tokens for rows r0 .. r0+rt-1, features e0 ..
 * e0 + nv*LK_VF.  x_t is the residual row (j >= qv) or, for a quantized token, code_te * scale_tg + zero_tg.
 * grouped (one row; every run of vpg vectors of the chunk lies in one feature group): acc += (p_t scale_tg)
 * code_t, and p_t zero_tg summed as one scalar per group, added at the end: one FMA per vector.  Each pair
 * of code vectors is decoded and FMA'd at once, so 8 accumulators fit AVX2's registers; at 2 bits the
 * codes come scaled by 4^lane (lk_vf_codes2_scaled: no per-lane shifts), the accumulators are scaled on
 * loading and unscaled at the end, exactly.  Otherwise x_t is formed in registers once per decoded vector
 * and shared by every row of the tile (never stored). */
LK_ALWAYS_INLINE void lk_values_chunk(const lk_attend_ctx *c, int64_t j0, int64_t nb, int64_t r0, const int rt,
                                      const int bits, int64_t e0, const int nv, const int grouped, const int vpg) {
    const lk_kv_attend_params *p = c->p;
    const int64_t E = p->E, G = p->G, EG = E / G, per = 8 / bits, head = c->b * p->Hkv + c->g;
    const int64_t nq = lk_max_i64(0, lk_min_i64(nb, p->qv[c->b] - j0));   /* quantized tokens of the block */
    const int64_t cstride = E / per;
    const uint8_t *vc = p->v_codes + (head * p->v_cap + j0) * cstride + e0 / per;
    const float *vs = p->v_scale + (head * p->v_cap + j0) * EG, *vz = p->v_zero + (head * p->v_cap + j0) * EG;
    const float *vr = p->v_res + (head * p->v_res_cap + (j0 + nq - p->qv[c->b])) * E + e0;
    const float *S = c->S + r0 * G;
    const int scaled = grouped && bits == 2 && nv % 2 == 0;
    int64_t gi[8];                       /* feature group of each vector */
    for (int v = 0; v < nv; v++) gi[v] = (e0 + v * LK_VF) / G;
    lk_vf a[4][8];
    float zs[2] = {0, 0};                /* grouped: sum_t p_t zero_t of each group of the chunk */
    for (int r = 0; r < rt; r++)
        for (int v = 0; v < nv; v++) {
            a[r][v] = lk_vf_load(c->acc + (r0 + r) * E + e0 + v * LK_VF);
            if (scaled) a[r][v] = lk_vf_mul(a[r][v], lk_vf_codes2_scale());
        }
    for (int64_t t = 0; t < nq; t++, vc += cstride, vs += EG, vz += EG) {
        if (grouped) {
            const float pr = S[t];
            lk_vf w[2];
            for (int q = 0; q < nv / vpg; q++) {
                w[q] = lk_vf_set1(pr * vs[gi[q * vpg]]);
                zs[q] += pr * vz[gi[q * vpg]];
            }
            int v = 0;
            for (; v + 1 < nv; v += 2) {
                lk_vf x0, x1;
                if (scaled) lk_vf_codes2_scaled(vc + v * LK_VF / per, &x0, &x1);
                else lk_vf_codes2(vc + v * LK_VF / per, bits, &x0, &x1);
                a[0][v] = lk_vf_fma(w[v / vpg], x0, a[0][v]);
                a[0][v + 1] = lk_vf_fma(w[(v + 1) / vpg], x1, a[0][v + 1]);
            }
            if (v < nv) a[0][v] = lk_vf_fma(w[v / vpg], lk_vf_codes(vc + v * LK_VF / per, bits), a[0][v]);
            continue;
        }
        lk_vf x[4];
        int v = 0;
        for (; v + 1 < nv; v += 2) lk_vf_codes2(vc + v * LK_VF / per, bits, &x[v], &x[v + 1]);
        if (v < nv) x[v] = lk_vf_codes(vc + v * LK_VF / per, bits);
        for (v = 0; v < nv; v++) x[v] = lk_vf_fma(x[v], lk_vf_set1(vs[gi[v]]), lk_vf_set1(vz[gi[v]]));
        for (int r = 0; r < rt; r++) {
            const lk_vf pr = lk_vf_set1(S[r * G + t]);
            for (int v = 0; v < nv; v++) a[r][v] = lk_vf_fma(pr, x[v], a[r][v]);
        }
    }
    if (grouped)
        for (int v = 0; v < nv; v++) {
            if (scaled) a[0][v] = lk_vf_mul(a[0][v], lk_vf_codes2_unscale());
            a[0][v] = lk_vf_add(a[0][v], lk_vf_set1(zs[v / vpg]));
        }
    for (int64_t t = nq; t < nb; t++, vr += E)
        for (int r = 0; r < rt; r++) {
            const lk_vf pr = lk_vf_set1(S[r * G + t]);
            for (int v = 0; v < nv; v++) a[r][v] = lk_vf_fma(pr, lk_vf_load(vr + v * LK_VF), a[r][v]);
        }
    for (int r = 0; r < rt; r++)
        for (int v = 0; v < nv; v++) lk_vf_store(c->acc + (r0 + r) * E + e0 + v * LK_VF, a[r][v]);
}

/* Feature vectors per chunk (nv): rt x nv accumulators + nv values + a broadcast must fit the register
 * file, so AVX2's 16 registers take 2 vectors for a 4-row tile and 4 for smaller ones; AVX-512 takes 4.
 * A single row whose chunks are group-aligned (grouped) takes 8 vectors on AVX2 at 2 bits (8
 * accumulators, decoded a pair at a time): the per-token scalar work is shared by 64 features. */
LK_ALWAYS_INLINE void lk_values_tile(const lk_attend_ctx *c, int64_t j0, int64_t nb, int64_t r0, const int rt,
                                     const int bits) {
    const int64_t E = c->p->E;
    const int64_t G = c->p->G;
    const int nv = LK_VREGS >= 32 || rt < 4 ? 4 : 2;
    int64_t e0 = 0;
    if (rt == 1 && LK_VREGS < 32 && bits == 2 && (G % (8 * LK_VF) == 0 || G == 4 * LK_VF)) {
        if (G == 4 * LK_VF)
            for (; e0 + 8 * LK_VF <= E; e0 += 8 * LK_VF) lk_values_chunk(c, j0, nb, r0, 1, bits, e0, 8, 1, 4);
        else
            for (; e0 + 8 * LK_VF <= E; e0 += 8 * LK_VF) lk_values_chunk(c, j0, nb, r0, 1, bits, e0, 8, 1, 8);
    }
#define LK_VALUES_CHUNK(NV)                                                                         \
    if (rt == 1 && G % ((NV) * LK_VF) == 0) lk_values_chunk(c, j0, nb, r0, rt, bits, e0, NV, 1, NV);  \
    else lk_values_chunk(c, j0, nb, r0, rt, bits, e0, NV, 0, NV);
    if (nv == 4)
        for (; e0 + 4 * LK_VF <= E; e0 += 4 * LK_VF) { LK_VALUES_CHUNK(4) }
    for (; e0 + 2 * LK_VF <= E; e0 += 2 * LK_VF) { LK_VALUES_CHUNK(2) }
    for (; e0 < E; e0 += LK_VF) { LK_VALUES_CHUNK(1) }
#undef LK_VALUES_CHUNK
}

LK_ALWAYS_INLINE void lk_values_rows(const lk_attend_ctx *c, int64_t j0, int64_t nb, const int bits) {
    int64_t r0 = 0;
    for (; r0 + 4 <= c->rows; r0 += 4) lk_values_tile(c, j0, nb, r0, 4, bits);
    for (; r0 + 2 <= c->rows; r0 += 2) lk_values_tile(c, j0, nb, r0, 2, bits);
    for (; r0 < c->rows; r0++) lk_values_tile(c, j0, nb, r0, 1, bits);
}

/* Values of the block: SIMD path above; the generic path folds p_t * scale_tg into a weight and sums
 * the zero points per group (the same math in another order), and skips the tokens a row's causal mask
 * excludes.  exact: take the generic path (a masked block whose value data hold an inf or a NaN, where
 * the SIMD path would add 0 * inf = NaN for the masked tokens). */
static void lk_values(const lk_attend_ctx *c, int64_t j0, int64_t nb, int exact) {
    const lk_kv_attend_params *p = c->p;
    if (c->simd && !exact) {
        if (p->bits == 2) lk_values_rows(c, j0, nb, 2);
        else if (p->bits == 4) lk_values_rows(c, j0, nb, 4);
        else lk_values_rows(c, j0, nb, 8);
        return;
    }
    const int64_t E = p->E, G = p->G, EG = E / G, head = c->b * p->Hkv + c->g, qv = p->qv[c->b];
    const int bits = p->bits, per = 8 / bits, mask = (1 << bits) - 1;
    for (int64_t t = 0; t < nb; t++) {
        const int64_t j = j0 + t;
        const uint8_t *vc = p->v_codes + (head * p->v_cap + j) * (E / per);
        const float *vs = p->v_scale + (head * p->v_cap + j) * EG, *vz = p->v_zero + (head * p->v_cap + j) * EG;
        for (int64_t r = 0; r < c->rows; r++) {
            const float pr = c->S[r * G + t];
            float *acc = c->acc + r * E;
            if (p->causal && p->kv_pos[c->b * p->pos_cap + j] > p->q_pos[c->b * p->N + r / c->group]) continue;
            if (j < qv) {
                for (int64_t ge = 0; ge < EG; ge++) {
                    const float w = pr * vs[ge];
                    float z = pr * vz[ge];
                    for (int64_t e = ge * G; e < (ge + 1) * G; e++)
                        acc[e] += w * (float)((vc[e / per] >> (bits * (e % per))) & mask) + z;
                }
            } else {
                const float *vr = p->v_res + (head * p->v_res_cap + (j - qv)) * E;
                for (int64_t e = 0; e < E; e++) acc[e] += pr * vr[e];
            }
        }
    }
}

/* ------------------------------------------------------------------------------------ one item */

/* Whether the value data of tokens [j0, j0 + nb) hold an inf or a NaN: the scales and zeros of quantized
 * tokens, the rows of full-precision ones (x - x is NaN exactly for those). */
static int lk_values_nonfinite(const lk_attend_ctx *c, int64_t j0, int64_t nb) {
    const lk_kv_attend_params *p = c->p;
    const int64_t E = p->E, EG = E / p->G, head = c->b * p->Hkv + c->g, qv = p->qv[c->b];
    float sum = 0;
    for (int64_t j = j0; j < j0 + nb; j++) {
        if (j < qv) {
            const float *vs = p->v_scale + (head * p->v_cap + j) * EG, *vz = p->v_zero + (head * p->v_cap + j) * EG;
            for (int64_t g = 0; g < EG; g++) sum += (vs[g] - vs[g]) + (vz[g] - vz[g]);
        } else {
            const float *vr = p->v_res + (head * p->v_res_cap + (j - qv)) * E;
            for (int64_t e = 0; e < E; e++) sum += vr[e] - vr[e];
        }
    }
    return sum != sum;
}

/* Prefetch the quantized data of the block starting at token j0 (if any). */
static void lk_attend_prefetch(const lk_attend_ctx *c, int64_t j0) {
    const lk_kv_attend_params *p = c->p;
    const int64_t G = p->G, D = p->D, E = p->E, per = 8 / p->bits, head = c->b * p->Hkv + c->g, b = c->b;
    if (j0 + G <= p->qk[b]) {
        const int64_t grp = head * p->k_groups + j0 / G;
        lk_prefetch(p->k_codes + grp * D * (G / per), D * (G / per));
        lk_prefetch(p->k_scale + grp * D, D * 4);
        lk_prefetch(p->k_zero + grp * D, D * 4);
    }
    if (j0 + G <= p->qv[b]) {
        const int64_t tok = head * p->v_cap + j0;
        lk_prefetch(p->v_codes + tok * (E / per), G * (E / per));
        lk_prefetch(p->v_scale + tok * (E / G), G * (E / G) * 4);
        lk_prefetch(p->v_zero + tok * (E / G), G * (E / G) * 4);
    }
}

static void lk_attend_block(lk_attend_ctx *c, int64_t j0, int64_t nb) {
    const lk_kv_attend_params *p = c->p;
    const int64_t G = p->G, E = p->E, b = c->b;
    if (LK_PREFETCH_BLOCKS) lk_attend_prefetch(c, j0 + LK_PREFETCH_BLOCKS * G);
    if (j0 < p->qk[b]) lk_keys_quantized(c, j0 / G);
    else lk_keys_full(c, j0, nb);
    int64_t maxpos = INT64_MIN;   /* a row whose q_pos is >= every position of the block needs no mask */
    if (p->causal)
        for (int64_t t = 0; t < nb; t++) maxpos = lk_max_i64(maxpos, p->kv_pos[b * p->pos_cap + j0 + t]);
    int masked = 0;               /* some token of the block is masked for some row */
    for (int64_t r = 0; r < c->rows; r++) {
        float *s = c->S + r * G;
        const int64_t qp = p->q_pos[b * p->N + r / c->group];
        const int row_masked = p->causal && maxpos > qp;
        masked |= row_masked;
        if (row_masked)
            for (int64_t t = 0; t < nb; t++)
                if (p->kv_pos[b * p->pos_cap + j0 + t] > qp) s[t] = -INFINITY;
        float bm = -INFINITY;
        int64_t t0 = 0;
        if (c->simd && nb >= LK_VF) {
            lk_vf mx = lk_vf_load(s);
            for (t0 = LK_VF; t0 + LK_VF <= nb; t0 += LK_VF) mx = lk_vf_max(mx, lk_vf_load(s + t0));
            bm = lk_vf_hmax(mx);
        }
        for (; t0 < nb; t0++) bm = s[t0] > bm ? s[t0] : bm;
        if (bm == -INFINITY) {
            /* the max skips NaN: a block of NaN scores (a NaN or inf query) lands here too, and must
             * make the row NaN (as the twin and lmkern.attention do), not vanish */
            int nan = 0;
            for (int64_t t = 0; t < nb; t++) nan |= s[t] != s[t];
            if (nan) {
                c->m[r] = c->l[r] = NAN;     /* later blocks and the combine keep it NaN */
                for (int64_t t = 0; t < nb; t++) s[t] = NAN;
                continue;
            }
            for (int64_t t = 0; t < nb; t++) s[t] = 0; /* nothing admissible (or all -inf): no contribution */
            continue;
        }
        if (bm > c->m[r]) {
            /* rescale what was accumulated under the old max */
            const float f = c->m[r] == -INFINITY ? 0.0f : expf(c->m[r] - bm);
            c->l[r] *= f;
            for (int64_t e = 0; e < E; e++) c->acc[r * E + e] *= f;
            c->m[r] = bm;
        }
        const float m = c->m[r];
        float l = 0;
        int64_t t = 0;
        if (c->simd) {
            lk_vf lv = lk_vf_zero();
            const lk_vf mv = lk_vf_set1(m);
            for (; t + LK_VF <= nb; t += LK_VF) {
                const lk_vf e = lk_vf_exp_softmax(lk_vf_sub(lk_vf_load(s + t), mv));
                lk_vf_store(s + t, e);
                lv = lk_vf_add(lv, e);
            }
            l = lk_vf_sum(lv);
        }
        for (; t < nb; t++) { s[t] = expf(s[t] - m); l += s[t]; }
        c->l[r] += l;
    }
    lk_values(c, j0, nb, masked && lk_values_nonfinite(c, j0, nb));
}

lk_status lk_kv_attend_cpu(const lk_kv_attend_params *p) {
    const int64_t B = p->B, N = p->N, Hq = p->Hq, Hkv = p->Hkv, D = p->D, E = p->E, G = p->G;
    if (p->bits != 2 && p->bits != 4 && p->bits != 8) return LK_ERR_VALUE;
    if (G < 1 || G % (8 / p->bits) || E % G) return LK_ERR_VALUE;
    if (B == 0 || N == 0 || Hq == 0) return LK_OK;
    if (Hkv == 0 || Hq % Hkv) return LK_ERR_VALUE;
    const int64_t group = Hq / Hkv, rows = N * group;
    int64_t maxlen = 0;
    for (int64_t b = 0; b < B; b++) maxlen = lk_max_i64(maxlen, p->lens[b]);
    const int threads = lk_get_num_threads();
    int64_t nsplit = lk_cdiv(8 * (int64_t)threads, B * Hkv);
    nsplit = lk_max_i64(1, lk_min_i64(nsplit, lk_cdiv(maxlen, 8 * G)));
    const int64_t items = B * Hkv * nsplit;
    float *part_m = (float *)malloc(sizeof(float) * (size_t)(items * rows));
    float *part_l = (float *)malloc(sizeof(float) * (size_t)(items * rows));
    float *part_acc = (float *)malloc(sizeof(float) * (size_t)(items * rows * (E > 0 ? E : 1)));
    if (!part_m || !part_l || !part_acc) { free(part_m); free(part_l); free(part_acc); return LK_ERR_NOMEM; }
    const int simd = lk_simd_enabled() && G % LK_VF == 0 && E % LK_VF == 0;
    int failed = 0;
    /* one thread per LK_PAR_WORK FMAs (a tiny decode step stays on the calling thread), at most one per
     * item; results do not depend on it (nsplit follows lk_get_num_threads()) */
    const int team = lk_min_i64(lk_team_cap(items), lk_team_for(B * Hkv * lk_max_i64(maxlen, 1) * rows * (D + E)));
#pragma omp parallel num_threads(team)
    {
        lk_attend_ctx c = {0};
        c.p = p; c.group = group; c.rows = rows; c.simd = simd;
        const size_t fl = sizeof(float);
        c.qsc = (float *)malloc(fl * (size_t)(rows * D + 1));
        c.qs = (float *)malloc(fl * (size_t)(rows * D + 1));
        c.qz = (float *)malloc(fl * (size_t)rows);
        c.S = (float *)malloc(fl * (size_t)(rows * G));
        c.acc = (float *)malloc(fl * (size_t)(rows * E + 1));
        c.m = (float *)malloc(fl * (size_t)rows);
        c.l = (float *)malloc(fl * (size_t)rows);
        const int ok = !(!c.qsc || !c.qs || !c.qz || !c.S || !c.acc || !c.m || !c.l);
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
        /* items are claimed dynamically (balance, and robust to a preempted thread); each item's result
         * depends only on the item, and partials are merged in a fixed order, so results stay bitwise
         * reproducible for a fixed thread count */
#pragma omp for schedule(dynamic, 1) nowait  /* the barrier below ends the items */
        for (int64_t it = 0; it < items; it++) {
            if (!ok) continue;
            const int64_t b = it / (Hkv * nsplit), g = (it / nsplit) % Hkv, sp = it % nsplit;
            c.b = b; c.g = g;
            for (int64_t r = 0; r < rows; r++) {
                const int64_t i = r / group, h = g * group + r % group;
                const float *q = p->q + ((b * N + i) * Hq + h) * D;
                for (int64_t d = 0; d < D; d++) c.qsc[r * D + d] = (float)p->scale * q[d];
                c.m[r] = -INFINITY;
                c.l[r] = 0;
            }
            memset(c.acc, 0, fl * (size_t)(rows * E));
            int64_t c0, c1;
            const int64_t len = p->lens[b];
            lk_chunk(lk_cdiv(len, G), nsplit, sp, &c0, &c1);
            for (int64_t j0 = c0 * G; j0 < lk_min_i64(c1 * G, len); j0 += G)
                lk_attend_block(&c, j0, lk_min_i64(G, len - j0));
            for (int64_t r = 0; r < rows; r++) {
                const int64_t slot = ((b * Hkv + g) * rows + r) * nsplit + sp;
                part_m[slot] = c.m[r];
                part_l[slot] = c.l[r];
                memcpy(part_acc + slot * E, c.acc + r * E, fl * (size_t)E);
            }
        }
        free(c.qsc); free(c.qs); free(c.qz); free(c.S); free(c.acc); free(c.m); free(c.l);
        /* the split combine in the same parallel region: a second region would wake the sleeping
         * workers again (tens of microseconds on a VM); one barrier between the phases, none doubled */
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static) nowait
            for (int64_t t = 0; t < B * Hkv * rows; t++) {
                const int64_t b = t / (Hkv * rows), g = (t / rows) % Hkv, r = t % rows;
                const int64_t i = r / group, h = g * group + r % group;
                const int64_t orow = (b * N + i) * Hq + h;
                lk_softmax_combine_f32(nsplit, part_m + t * nsplit, part_l + t * nsplit, part_acc + t * nsplit * E, E,
                                       E, p->out + orow * E, p->lse ? p->lse + orow : NULL);
            }
        }
    }
    free(part_m); free(part_l); free(part_acc);
    return failed ? LK_ERR_NOMEM : LK_OK;
}
