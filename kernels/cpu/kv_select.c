/* Token selection (SPEC 4.5).
 *
 * keep_topk: per (b, h), positions [0, sink) and [M - recent, M) always; the remaining K - |protected|
 * slots go to the best other positions in the order (not NaN first, larger score, lower position),
 * so ties go to the lower position and NaN ranks below every number (-inf included).  The result is
 * written in ascending position order.  One task per (b, h), split statically over threads.
 *
 * compact: out[b,k,h,:] = x[b, idx[b,k,h], h, :], a per-head gather of rows of row_bytes bytes (works for
 * every dtype); the caller has checked idx in [0, M). */
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

#include "lmkern/kv.h"

typedef struct {
    double score;
    int64_t pos;
    int nan;
} lk_ranked;

/* a before b when a ranks higher */
static int lk_rank_cmp(const void *pa, const void *pb) {
    const lk_ranked *a = (const lk_ranked *)pa, *b = (const lk_ranked *)pb;
    if (a->nan != b->nan) return a->nan - b->nan;
    if (!a->nan && a->score != b->score) return a->score > b->score ? -1 : 1;
    return (a->pos > b->pos) - (a->pos < b->pos);
}

lk_status lk_kv_keep_topk_cpu(const lk_kv_topk_params *p) {
    const int64_t B = p->B, M = p->M, H = p->H, K = p->K;
    if (K > M || K < 0 || p->sink < 0 || p->recent < 0) return LK_ERR_VALUE;
    if (B == 0 || H == 0 || K == 0) return LK_OK;
    const int64_t tasks = B * H;
    int failed = 0;
#pragma omp parallel num_threads(lk_team_for(tasks * M * 16)) reduction(|: failed)
    {
        lk_ranked *cand = (lk_ranked *)malloc(sizeof(lk_ranked) * (size_t)M);
        unsigned char *keep = (unsigned char *)malloc((size_t)M);
        int64_t lo, hi;
        lk_chunk(tasks, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
        if (!cand || !keep) failed = lo < hi;
        for (int64_t t = lo; t < hi && !failed; t++) {
            const int64_t b = t / H, h = t % H;
            int64_t n = 0, kept = 0;
            for (int64_t j = 0; j < M; j++) {
                keep[j] = j < p->sink || j >= M - p->recent;
                kept += keep[j];
                if (!keep[j]) {
                    const double s = p->dtype == LK_F64 ? ((const double *)p->scores)[(b * M + j) * H + h]
                                                        : (double)((const float *)p->scores)[(b * M + j) * H + h];
                    cand[n].score = s;
                    cand[n].pos = j;
                    cand[n].nan = s != s;
                    n++;
                }
            }
            const int64_t want = K - kept < n ? K - kept : n;
            if (want > 0 && want < n) qsort(cand, (size_t)n, sizeof(lk_ranked), lk_rank_cmp);
            for (int64_t r = 0; r < want; r++) keep[cand[r].pos] = 1;
            int64_t *out = p->idx + b * K * H + h;
            int64_t k = 0;
            for (int64_t j = 0; j < M && k < K; j++)
                if (keep[j]) out[(k++) * H] = j;
        }
        free(cand);
        free(keep);
    }
    return failed ? LK_ERR_NOMEM : LK_OK;
}

lk_status lk_kv_compact_cpu(const lk_kv_compact_params *p) {
    const int64_t B = p->B, M = p->M, K = p->K, H = p->H, rb = p->row_bytes;
    const int64_t tasks = B * K;
    if (tasks == 0 || H == 0 || rb == 0) return LK_OK;
#pragma omp parallel num_threads(lk_team_for(tasks * H * rb * 2))
    {
        int64_t lo, hi;
        lk_chunk(tasks, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
        for (int64_t t = lo; t < hi; t++) {
            const int64_t b = t / K;
            for (int64_t h = 0; h < H; h++) {
                const int64_t j = p->idx[t * H + h];
                memcpy((char *)p->out + (t * H + h) * rb, (const char *)p->x + ((b * M + j) * H + h) * rb, (size_t)rb);
            }
        }
    }
    return LK_OK;
}
