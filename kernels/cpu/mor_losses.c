/* Mixture-of-Recursions router losses, forward values (SPEC 3.7): balance_loss, z_loss, router_bce.
 *
 * All three are a reduction over tokens.  The rows are cut into fixed blocks of LK_MOR_LOSS_BLOCK;
 * each block's partial sums (double) are computed by whichever thread owns it and then added in
 * block order, so the result is the same for every thread count.  Per token:
 *   balance: add probs[r, :] to the block's C sums; count depth[r]
 *   z:       lse = m + log sum_c e^(x_c - m) (m = max_c x_c; m = +-inf gives lse = m), add lse^2;
 *            C == 1 (one sigmoid logit per token): add x^2
 *   bce:     if eligible: add max(x, 0) - x t + log1p(e^-|x|) (never overflows), count 1 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "lmkern/mor.h"

#define LK_DEFINE_LOSS_BLOCK(NAME, T)                                                             \
/* partial sums of rows [lo, hi): sums[0..C) and counts[0..C) for balance, sums[0], counts[0] else */ \
static void NAME(const lk_mor_loss_params *p, int64_t lo, int64_t hi, double *sums, double *counts) { \
    const int64_t C = p->C;                                                                       \
    const T *x = (const T *)p->x;                                                                 \
    switch (p->kind) {                                                                            \
    case LK_MOR_LOSS_BALANCE:                                                                     \
        for (int64_t r = lo; r < hi; r++) {                                                       \
            for (int64_t c = 0; c < C; c++) sums[c] += (double)x[r * C + c];                      \
            const int64_t d = p->depth[r];                                                        \
            if (d >= 1 && d <= C) counts[d - 1] += 1;                                             \
        }                                                                                         \
        break;                                                                                    \
    case LK_MOR_LOSS_Z:                                                                           \
        for (int64_t r = lo; r < hi; r++) {                                                       \
            const T *xr = x + r * C;                                                              \
            double lse;                                                                           \
            if (C == 1) {                                                                         \
                lse = (double)xr[0];                                                              \
            } else {                                                                              \
                double m = -INFINITY;                                                             \
                for (int64_t c = 0; c < C; c++) m = (double)xr[c] > m || xr[c] != xr[c] ? (double)xr[c] : m; \
                if (isinf(m) || m != m) {                                                         \
                    lse = m;                                                                      \
                } else {                                                                          \
                    double s = 0;                                                                 \
                    for (int64_t c = 0; c < C; c++) s += exp((double)xr[c] - m);                  \
                    lse = m + log(s);                                                             \
                }                                                                                 \
            }                                                                                     \
            sums[0] += lse * lse;                                                                 \
        }                                                                                         \
        counts[0] += (double)(hi - lo);                                                           \
        break;                                                                                    \
    default: /* LK_MOR_LOSS_BCE */                                                                \
        for (int64_t r = lo; r < hi; r++) {                                                       \
            if (p->eligible && !p->eligible[r]) continue;                                         \
            const double xv = (double)x[r];                                                       \
            sums[0] += (xv > 0 ? xv : 0) - xv * p->target[r] + log1p(exp(-fabs(xv)));            \
            counts[0] += 1;                                                                       \
        }                                                                                         \
        break;                                                                                    \
    }                                                                                             \
}

LK_DEFINE_LOSS_BLOCK(loss_block_f32, float)
LK_DEFINE_LOSS_BLOCK(loss_block_f64, double)

lk_status lk_mor_loss_cpu(lk_mor_loss_params *p) {
    if (p->dtype != LK_F32 && p->dtype != LK_F64) return LK_ERR_DTYPE;
    const int64_t rows = p->rows;
    const int64_t width = p->kind == LK_MOR_LOSS_BALANCE ? (p->C > 0 ? p->C : 1) : 1;
    const int64_t nblk = lk_cdiv(rows, LK_MOR_LOSS_BLOCK);
    double *part = (double *)calloc((size_t)(nblk > 0 ? nblk : 1) * 2 * (size_t)width, sizeof(double));
    if (!part) return LK_ERR_NOMEM;
    #pragma omp parallel num_threads(lk_team_for(rows * width * 16))
    {
        int64_t lo, hi;
        lk_chunk(nblk, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
        for (int64_t blk = lo; blk < hi; blk++) {
            double *sums = part + blk * 2 * width, *counts = sums + width;
            const int64_t r0 = blk * LK_MOR_LOSS_BLOCK, r1 = lk_min_i64(rows, r0 + LK_MOR_LOSS_BLOCK);
            if (p->dtype == LK_F64) loss_block_f64(p, r0, r1, sums, counts);
            else loss_block_f32(p, r0, r1, sums, counts);
        }
    }
    /* combine the blocks in order */
    for (int64_t blk = 1; blk < nblk; blk++)
        for (int64_t c = 0; c < 2 * width; c++) part[c] += part[blk * 2 * width + c];
    if (p->kind == LK_MOR_LOSS_BALANCE) {
        double total = 0;
        for (int64_t c = 0; c < p->C; c++) {
            const double P = part[c] / (double)rows, f = (double)p->C * part[width + c] / (double)rows;
            total += f * P;
        }
        p->result = rows > 0 ? total : NAN;
    } else {
        p->result = part[1] > 0 ? part[0] / part[1] : NAN;
    }
    free(part);
    return LK_OK;
}
