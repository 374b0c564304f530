/* Attention mass (SPEC 4.3): how much attention each key receives, without an N x M matrix.
 *
 *   normalize:  mass_h[j] = sum_i exp(s_ij - lse_i)   over admissible (i, j)
 *   otherwise:  mass_h[j] = sum_i s_ij                 (raw scaled logits, ScaleKV)
 * then reduced over the query heads of each KV head (mean, sum, max) or kept per head (none).
 *
 * Streaming, two passes, per (b, key split, block of KV heads), each key chunk of LK_KC keys taken by
 * every KV head g of the block in turn (the keys are read in memory order):
 *   pass 1: for each chunk and head (keys packed transposed, D x LK_KC, into scratch) and every row
 *           r = (hh, i) of the head's group, the partial online-softmax state (m, l) of the split;
 *           the per-row lse is the one softmax combine (softmax.h, E = 0) of the split states.
 *   pass 2: the same scores again, p = exp(s - lse), summed per head over the rows into the chunk's
 *           mass, reduced over the group and written; splits own disjoint key ranges (no atomics).
 * Extra memory: per thread D x LK_KC + group x LK_KC floats, plus (m, l, lse) per row and split.
 * The score tile is a register-blocked micro-kernel: 4 rows x LK_KC keys, one FMA per (row, key, d). */
#include <math.h>
#include <stdlib.h>
#include <omp.h>

#include "lmkern/kv.h"
#include "lmkern/simd.h"
#include "lmkern/softmax.h"

#define LK_KC (4 * LK_VF)   /* keys per chunk: 4 vectors */
#define LK_RT 4             /* rows per tile */

typedef struct {
    const lk_kv_mass_params *p;
    int64_t b, g, group, rows;   /* rows = group * N, row r = hh * N + i */
} lk_mass_ctx;

static inline const float *lk_mass_qrow(const lk_mass_ctx *c, int64_t r) {
    const lk_kv_mass_params *p = c->p;
    const int64_t hh = r / p->N, i = r % p->N;
    return p->q + ((c->b * p->N + i) * p->Hq + c->g * c->group + hh) * p->D;
}

/* kt[d * LK_KC + jj] = k[b, j0 + jj, g, d] for jj < nk, 0 beyond. */
static void lk_mass_pack(const lk_mass_ctx *c, int64_t j0, int64_t nk, float *kt) {
    const lk_kv_mass_params *p = c->p;
    const int64_t D = p->D;
    lk_transpose(p->k + ((c->b * p->M + j0) * p->Hkv + c->g) * D, p->Hkv * D, nk, D, kt, LK_KC);
    if (nk < LK_KC)
        for (int64_t d = 0; d < D; d++)
            for (int64_t jj = nk; jj < LK_KC; jj++) kt[d * LK_KC + jj] = 0.0f;
}

/* s[rr * LK_KC + jj] = scale * <q_row(r0 + rr), k_(j0 + jj)> for rr < nr, masked to -inf (normalize) or
 * 0 (raw) where (i, j) is not admissible. */
static void lk_mass_scores(const lk_mass_ctx *c, int64_t r0, int64_t nr, int64_t j0, int64_t nk, int64_t maxpos,
                           const float *kt, float *s) {
    const lk_kv_mass_params *p = c->p;
    const int64_t D = p->D;
    const float scale = (float)p->scale;
    const float *qr[LK_RT];
    for (int rr = 0; rr < LK_RT; rr++) qr[rr] = lk_mass_qrow(c, r0 + (rr < nr ? rr : 0));
    if (lk_simd_enabled()) {
        lk_vf acc[LK_RT][4];
        for (int rr = 0; rr < LK_RT; rr++)
            for (int v = 0; v < 4; v++) acc[rr][v] = lk_vf_zero();
        /* acc[rr][v] += q[rr][d] * kt[d][v*LK_VF ...] */
        for (int64_t d = 0; d < D; d++) {
            const float *kd = kt + d * LK_KC;
            const lk_vf k0 = lk_vf_load(kd), k1 = lk_vf_load(kd + LK_VF), k2 = lk_vf_load(kd + 2 * LK_VF),
                        k3 = lk_vf_load(kd + 3 * LK_VF);
            for (int rr = 0; rr < LK_RT; rr++) {
                const lk_vf qv = lk_vf_set1(qr[rr][d]);
                acc[rr][0] = lk_vf_fma(qv, k0, acc[rr][0]);
                acc[rr][1] = lk_vf_fma(qv, k1, acc[rr][1]);
                acc[rr][2] = lk_vf_fma(qv, k2, acc[rr][2]);
                acc[rr][3] = lk_vf_fma(qv, k3, acc[rr][3]);
            }
        }
        const lk_vf sv = lk_vf_set1(scale);
        for (int rr = 0; rr < LK_RT; rr++)
            for (int v = 0; v < 4; v++) lk_vf_store(s + rr * LK_KC + v * LK_VF, lk_vf_mul(acc[rr][v], sv));
    } else {
        for (int rr = 0; rr < nr; rr++)
            for (int64_t jj = 0; jj < nk; jj++) {
                float dot = 0;
                for (int64_t d = 0; d < D; d++) dot += qr[rr][d] * kt[d * LK_KC + jj];
                s[rr * LK_KC + jj] = dot * scale;
            }
    }
    /* masking: keys past the chunk (nk .. LK_KC; j0 + nk <= kv_lens[b] already) and, when causal, keys
     * after the query; a row whose position is >= every key position of the chunk needs no test */
    const float off = p->normalize ? -INFINITY : 0.0f;
    for (int rr = 0; rr < nr; rr++) {
        float *sr = s + rr * LK_KC;
        for (int64_t jj = nk; jj < LK_KC; jj++) sr[jj] = off;
        if (!p->causal) continue;
        const int64_t qp = p->q_pos[c->b * p->N + (r0 + rr) % p->N];
        if (qp >= maxpos) continue;
        const int64_t *kp = p->kv_pos + c->b * p->M + j0;
        for (int64_t jj = 0; jj < nk; jj++)
            if (kp[jj] > qp) sr[jj] = off;
    }
}

/* One key chunk [j0, j0 + nk) of KV head c->g in pass 1 (the rows' online (m, l) of split sp, in pm /
 * pl) or pass 2 (the chunk's mass from the rows' lse ls, written to out). */
static void lk_mass_chunk(const lk_mass_ctx *c, int pass, int64_t sp, int64_t nsplit, int64_t j0, int64_t nk,
                          int64_t maxpos, float *pm, float *pl, const float *ls, float *kt, float *s, float *hm) {
    const lk_kv_mass_params *p = c->p;
    const int64_t b = c->b, g = c->g, group = c->group, rows = c->rows, N = p->N, M = p->M;
    const int64_t Hout = p->reduce == LK_REDUCE_NONE ? p->Hq : p->Hkv;
    lk_mass_pack(c, j0, nk, kt);
    if (pass == 2)
        for (int64_t e = 0; e < group * LK_KC; e++) hm[e] = 0.0f;
    for (int64_t r0 = 0; r0 < rows; r0 += LK_RT) {
        const int64_t nr = lk_min_i64(LK_RT, rows - r0);
        lk_mass_scores(c, r0, nr, j0, nk, maxpos, kt, s);
        for (int64_t rr = 0; rr < nr; rr++) {
            const int64_t r = r0 + rr;
            float *sr = s + rr * LK_KC;
            if (pass == 1) {
                /* online (m, l) over this chunk */
                lk_vf mx = lk_vf_load(sr);
                for (int v = 1; v < 4; v++) mx = lk_vf_max(mx, lk_vf_load(sr + v * LK_VF));
                const float bm = lk_vf_hmax(mx);
                float *m = pm + r * nsplit + sp, *l = pl + r * nsplit + sp;
                /* a NaN score (or +inf beside a masked key) poisons the row: its lse is NaN
                 * (the max above may hide a NaN lane; a sum never does) */
                lk_vf chk = lk_vf_load(sr);
                for (int v = 1; v < 4; v++) chk = lk_vf_add(chk, lk_vf_load(sr + v * LK_VF));
                const float cs = lk_vf_sum(chk);
                if (cs != cs) { *m = NAN; *l = NAN; continue; }
                if (bm == -INFINITY) continue;
                if (bm > *m) { *l *= *m == -INFINITY ? 0.0f : expf(*m - bm); *m = bm; }
                const lk_vf mv = lk_vf_set1(*m);
                lk_vf acc = lk_vf_zero();
                for (int v = 0; v < 4; v++)
                    acc = lk_vf_add(acc, lk_vf_exp_softmax(lk_vf_sub(lk_vf_load(sr + v * LK_VF), mv)));
                *l += lk_vf_sum(acc);
            } else {
                float *h = hm + (r / N) * LK_KC;
                if (p->normalize) {
                    /* p_ij = exp(s_ij - lse_i); -inf (masked) gives 0 */
                    const float lr = ls[r];
                    if (lr == -INFINITY) continue;
                    if (lr != lr) {   /* a NaN row: NaN on its admissible keys, 0 elsewhere */
                        for (int jj = 0; jj < LK_KC; jj++)
                            if (sr[jj] != -INFINITY) h[jj] = NAN;
                        continue;
                    }
                    const lk_vf lv = lk_vf_set1(lr);
                    for (int v = 0; v < 4; v++)
                        lk_vf_store(h + v * LK_VF, lk_vf_add(lk_vf_load(h + v * LK_VF),
                            lk_vf_exp_softmax(lk_vf_sub(lk_vf_load(sr + v * LK_VF), lv))));
                } else {
                    for (int jj = 0; jj < LK_KC; jj++) h[jj] += sr[jj];
                }
            }
        }
    }
    if (pass == 2) {
        for (int64_t jj = 0; jj < nk; jj++) {
            float *o = p->out + ((b * M + j0 + jj) * Hout);
            if (p->reduce == LK_REDUCE_NONE) {
                for (int64_t hh = 0; hh < group; hh++) o[g * group + hh] = hm[hh * LK_KC + jj];
            } else {
                float acc = p->reduce == LK_REDUCE_MAX ? -INFINITY : 0.0f;
                for (int64_t hh = 0; hh < group; hh++) {
                    const float v = hm[hh * LK_KC + jj];
                    acc = p->reduce == LK_REDUCE_MAX ? (v > acc || v != v ? v : acc) : acc + v;
                }
                o[g] = p->reduce == LK_REDUCE_MEAN ? acc / (float)group : acc;
            }
        }
    }
}

static inline void lk_mass_split(int64_t M, int64_t nsplit, int64_t s, int64_t *lo, int64_t *hi) {
    const int64_t chunks = lk_cdiv(M, LK_KC);
    int64_t c0, c1;
    lk_chunk(chunks, nsplit, s, &c0, &c1);
    *lo = c0 * LK_KC;
    *hi = lk_min_i64(c1 * LK_KC, M);
}

lk_status lk_kv_mass_cpu(const lk_kv_mass_params *p) {
    const int64_t B = p->B, N = p->N, M = p->M, Hq = p->Hq, Hkv = p->Hkv, D = p->D;
    const int64_t Hout = p->reduce == LK_REDUCE_NONE ? Hq : Hkv;
    for (int64_t e = 0; e < B * M * Hout; e++) p->out[e] = 0.0f;
    if (B == 0 || M == 0 || Hkv == 0 || Hq == 0 || N == 0) return LK_OK;
    const int64_t group = Hq / Hkv, rows = group * N;
    const int threads = lk_get_num_threads();
    /* small problems run on fewer threads (lk_team_for; about 2 FMAs per byte-equivalent) */
    const int team = lk_team_for(B * N * Hq * lk_max_i64(M, 1) * lk_max_i64(D, 1) / 2);
    /* items are (b, key split, block of KV heads); each walks its keys chunk by chunk with every KV head
     * of its block in turn, so the keys stream from memory in order (token-major: a chunk is LK_KC rows
     * of Hkv x D floats).  One head per item would read rows Hkv D floats apart, a new page per key for
     * D = 128 and Hkv = 8, which the hardware prefetchers do not follow.  The split count bounds the
     * partials (2 B N Hq nsplit floats: 8 MiB at N = 16384, Hq = 32, Hkv = 8 on 2 threads); heads are
     * cut into blocks only as far as it takes to give every thread work (short caches, many threads). */
    int64_t nsplit = lk_cdiv(8 * (int64_t)threads, B * Hkv);
    nsplit = lk_max_i64(1, lk_min_i64(nsplit, lk_cdiv(M, LK_KC)));
    const int64_t hblocks = lk_max_i64(1, lk_min_i64(Hkv, lk_cdiv((int64_t)threads, B * nsplit)));
    const int64_t items = B * nsplit * hblocks;
    float *part_m = NULL, *part_l = NULL, *lse = NULL;
    if (p->normalize) {
        part_m = (float *)malloc(sizeof(float) * (size_t)(B * Hkv * rows * nsplit));
        part_l = (float *)malloc(sizeof(float) * (size_t)(B * Hkv * rows * nsplit));
        lse = (float *)malloc(sizeof(float) * (size_t)(B * Hkv * rows));
        if (!part_m || !part_l || !lse) { free(part_m); free(part_l); free(lse); return LK_ERR_NOMEM; }
    }
    int failed = 0;
    for (int pass = p->normalize ? 1 : 2; pass <= 2 && !failed; pass++) {
#pragma omp parallel num_threads(team) reduction(|: failed)
        {
            float *kt = (float *)malloc(sizeof(float) * (size_t)((D > 0 ? D : 1) * LK_KC));
            float *s = (float *)malloc(sizeof(float) * LK_RT * LK_KC);
            float *hm = (float *)malloc(sizeof(float) * (size_t)(group * LK_KC));
            const int ok = !(!kt || !s || !hm);
            failed = !ok;
            /* items are claimed dynamically (balance, and robust to a preempted thread); each item's result
             * depends only on the item, and partials are merged in a fixed order, so results stay bitwise
             * reproducible for a fixed thread count */
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < items; it++) {
                if (!ok) continue;
                const int64_t b = it / (nsplit * hblocks), sp = (it / hblocks) % nsplit;
                int64_t k0, k1, g0, g1;
                lk_mass_split(M, nsplit, sp, &k0, &k1);
                lk_chunk(Hkv, hblocks, it % hblocks, &g0, &g1);
                const int64_t len = lk_min_i64(k1, p->kv_lens[b]);
                if (pass == 1)
                    for (int64_t t = (b * Hkv + g0) * rows; t < (b * Hkv + g1) * rows; t++) {
                        part_m[t * nsplit + sp] = -INFINITY;
                        part_l[t * nsplit + sp] = 0;
                    }
                for (int64_t j0 = k0; j0 < len; j0 += LK_KC) {
                    const int64_t nk = lk_min_i64(LK_KC, len - j0);
                    int64_t maxpos = INT64_MIN;
                    if (p->causal)
                        for (int64_t jj = 0; jj < nk; jj++) maxpos = lk_max_i64(maxpos, p->kv_pos[b * M + j0 + jj]);
                    for (int64_t g = g0; g < g1; g++) {
                        const lk_mass_ctx c = {p, b, g, group, rows};
                        const int64_t at = (b * Hkv + g) * rows;
                        lk_mass_chunk(&c, pass, sp, nsplit, j0, nk, maxpos, part_m ? part_m + at * nsplit : NULL,
                                      part_l ? part_l + at * nsplit : NULL, lse ? lse + at : NULL, kt, s, hm);
                    }
                }
            }
            free(kt); free(s); free(hm);
        }
        if (pass == 1 && !failed) {
            /* lse per row: the one softmax combine of the split states (no values: E = 0) */
#pragma omp parallel for num_threads(team) schedule(static)
            for (int64_t t = 0; t < B * Hkv * rows; t++)
                lk_softmax_combine_f32(nsplit, part_m + t * nsplit, part_l + t * nsplit, NULL, 0, 0, NULL, lse + t);
        }
    }
    free(part_m); free(part_l); free(lse);
    return failed ? LK_ERR_NOMEM : LK_OK;
}
