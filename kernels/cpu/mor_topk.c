/* Mixture-of-Recursions expert-choice selection (SPEC 3.3): per row, the k best of n scores,
 * returned in ascending position order, by selection, never by a full sort.
 *
 * 1. Each score becomes an unsigned key whose integer order is the total order we want:
 *      NaN -> 0 (below everything);  -0.0 -> +0.0 (equal numbers tie);
 *      x >= 0 -> bits | sign bit;  x < 0 -> ~bits      (the usual "float as sortable int").
 * 2. Radix select, most significant byte first: a 256-bin histogram of the current byte of the
 *    surviving keys says which byte value holds the k-th largest key; keys with a larger byte
 *    are certainly chosen (counted), keys with a smaller byte are dropped, the rest are
 *    compacted and the next byte decides among them.  After the last byte the survivors all
 *    equal the threshold key `thr`, and `want` of them are needed.  O(n) per row.
 * 3. One scan in position order emits every key > thr and the first `want` keys == thr, which
 *    is exactly "ties to the lower position", and the output is ascending with no sort at all.
 *
 * Rows are split statically over threads; the result does not depend on the thread count. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "lmkern/mor.h"

static inline uint32_t key_f32(float x) {
    if (x != x) return 0;
    if (x == 0) x = 0.0f;
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static inline uint64_t key_f64(double x) {
    if (x != x) return 0;
    if (x == 0) x = 0.0;
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

#define LK_DEFINE_TOPK(NAME, T, K, KEY)                                                           \
/* hist[b] = #{i < m : byte `shift` of src[i] == b}; four sub-histograms so that runs of equal    \
 * bytes (common: router scores share their exponent) do not serialize on one counter */         \
static void NAME##_hist(const K *src, int64_t m, int shift, int64_t *hist) {                      \
    int64_t h4[4][256];                                                                           \
    memset(h4, 0, sizeof h4);                                                                     \
    int64_t i = 0;                                                                                \
    for (; i + 4 <= m; i += 4) {                                                                  \
        h4[0][(src[i] >> shift) & 0xff]++;                                                        \
        h4[1][(src[i + 1] >> shift) & 0xff]++;                                                    \
        h4[2][(src[i + 2] >> shift) & 0xff]++;                                                    \
        h4[3][(src[i + 3] >> shift) & 0xff]++;                                                    \
    }                                                                                             \
    for (; i < m; i++) h4[0][(src[i] >> shift) & 0xff]++;                                         \
    for (int b = 0; b < 256; b++) hist[b] = (h4[0][b] + h4[1][b]) + (h4[2][b] + h4[3][b]);        \
}                                                                                                 \
                                                                                                  \
/* the threshold key of row `s` and how many keys equal to it are chosen (*want) */              \
static K NAME##_threshold(const T *s, int64_t n, int64_t k, K *keys, K *cand, int64_t *want) {   \
    int64_t hist[256];                                                                            \
    int64_t m = n, w = k;                                                                         \
    int shift = (int)(8 * sizeof(K)) - 8;                                                         \
    for (int64_t i = 0; i < n; i++) keys[i] = KEY(s[i]);                                          \
    NAME##_hist(keys, n, shift, hist);                                                            \
    const K *src = keys;                                                                          \
    for (;;) {                                                                                    \
        /* byte value d holding the w-th largest: counts of larger bytes sum to < w */           \
        int d = 255;                                                                              \
        int64_t above = 0;                                                                        \
        while (above + hist[d] < w) above += hist[d--];                                           \
        w -= above;                                                                               \
        if (hist[d] != m) { /* keep the survivors (branchless: write always, advance on match) */ \
            int64_t m2 = 0;                                                                       \
            for (int64_t i = 0; i < m; i++) {                                                     \
                const K key = src[i];                                                             \
                cand[m2] = key;                                                                   \
                m2 += (int)((key >> shift) & 0xff) == d;                                          \
            }                                                                                     \
            m = m2;                                                                               \
            src = cand;                                                                           \
        } /* else every survivor has byte d: nothing to drop */                                   \
        if (shift == 0 || m == w) break; /* m == w: every survivor is chosen */                   \
        shift -= 8;                                                                               \
        NAME##_hist(src, m, shift, hist);                                                         \
    }                                                                                             \
    /* threshold: the smallest survivor; `want` survivors equal to it are chosen (all when m == w) */ \
    K thr = src[0];                                                                               \
    for (int64_t i = 1; i < m; i++) thr = src[i] < thr ? src[i] : thr;                            \
    int64_t eq = 0;                                                                               \
    for (int64_t i = 0; i < m; i++) eq += src[i] == thr;                                          \
    *want = w - (m - eq); /* survivors above thr are all chosen */                                \
    return thr;                                                                                   \
}                                                                                                 \
                                                                                                  \
static lk_status NAME(const lk_mor_topk_params *p) {                                              \
    const int64_t B = p->B, n = p->n, k = p->k;                                                   \
    int nomem = 0;                                                                                \
    const int team_ = lk_team_for(B * n * 16);                                                    \
    _Pragma("omp parallel num_threads(team_)")                                                    \
    {                                                                                             \
        int64_t lo, hi;                                                                           \
        lk_chunk(B, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);                       \
        K *keys = NULL, *cand = NULL;                                                             \
        if (lo < hi && k < n) {                                                                   \
            keys = (K *)malloc(sizeof(K) * (size_t)n);                                            \
            cand = (K *)malloc(sizeof(K) * (size_t)n);                                            \
            if (!keys || !cand) { _Pragma("omp atomic write") nomem = 1; lo = hi; }               \
        }                                                                                         \
        for (int64_t b = lo; b < hi; b++) {                                                       \
            const T *s = (const T *)p->scores + b * n;                                            \
            const int64_t *cd = p->candidates ? p->candidates + b * n : NULL;                     \
            int64_t *idx = p->idx + b * k;                                                        \
            T *gate = (T *)p->gate + b * k;                                                       \
            int64_t j = 0;                                                                        \
            if (k == n) {                                                                         \
                for (int64_t i = 0; i < n; i++, j++) { idx[j] = cd ? cd[i] : i; gate[j] = s[i]; } \
                continue;                                                                         \
            }                                                                                     \
            int64_t want;                                                                         \
            const K thr = NAME##_threshold(s, n, k, keys, cand, &want);                           \
            /* branchless emit: write slot j always (j < k holds), advance j on a winner */        \
            for (int64_t i = 0; i < n && j < k; i++) {                                            \
                const K key = keys[i];                                                            \
                const int64_t tie = (key == thr) & (want > 0);                                    \
                want -= tie;                                                                      \
                idx[j] = cd ? cd[i] : i;                                                          \
                gate[j] = s[i];                                                                   \
                j += (key > thr) | tie;                                                           \
            }                                                                                     \
        }                                                                                         \
        free(keys);                                                                               \
        free(cand);                                                                               \
    }                                                                                             \
    return nomem ? LK_ERR_NOMEM : LK_OK;                                                          \
}

LK_DEFINE_TOPK(topk_f32, float, uint32_t, key_f32)
LK_DEFINE_TOPK(topk_f64, double, uint64_t, key_f64)

lk_status lk_mor_topk_cpu(const lk_mor_topk_params *p) {
    if (p->k < 0 || p->k > p->n) return LK_ERR_VALUE;
    if (p->B == 0 || p->k == 0) return LK_OK;
    return p->dtype == LK_F64 ? topk_f64(p) : p->dtype == LK_F32 ? topk_f32(p) : LK_ERR_DTYPE;
}
