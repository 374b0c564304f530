/* Mixture-of-Recursions gated residual scatter (SPEC 3.5):
 *
 *   out = h;  for j = 0, 1, ..., k-1 (in this order):  out[b, idx[b, j]] += gate[b, j] * y[b, j]
 *
 * Repeated indices accumulate in ascending j, always, so results are deterministic and do not
 * depend on the thread count.  Indices are checked before any write (LK_ERR_VALUE).
 *
 * Out of place (h != NULL) the copy and the update are fused into one pass over the tokens: a
 * per-row list links every token to the j that update it (ascending), then each output row is
 * written exactly once, as h[t] (a plain copy) or h[t] + g_j0 y_j0 (+ g_j1 y_j1 ...).  That is the
 * minimum traffic: read h and y once, write out once (a copy followed by a scattered add would
 * re-read and re-write the updated rows).
 * In place (h == NULL) only the updated rows are touched; the work is split over (row, feature
 * block) so that each element is owned by one thread and sees the j in order. */
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "lmkern/mor.h"
#include "lmkern/simd.h"

/* dst[d] = src[d] + g * y[d] (dst may equal src) */
static void axpy_f32_simd(float *dst, const float *src, float g, const float *y, int64_t n) {
    const lk_vf gv = lk_vf_set1(g);
    int64_t d = 0;
    for (; d + LK_VF <= n; d += LK_VF) lk_vf_store(dst + d, lk_vf_fma(gv, lk_vf_load(y + d), lk_vf_load(src + d)));
    if (d < n) {
        const int r = (int)(n - d);
        lk_vf_store_n(dst + d, lk_vf_fma(gv, lk_vf_load_n(y + d, r), lk_vf_load_n(src + d, r)), r);
    }
}

/* dst[d] = src[d] + g * y[d] (y == NULL: dst[d] = src[d]) with streaming stores for the aligned
 * body: each output row is written once and not read again by this kernel. */
static void axpy_f32_stream(float *dst, const float *src, float g, const float *y, int64_t n) {
    int64_t d = 0;
    const int64_t head = (int64_t)((LK_VF_ALIGN - ((uintptr_t)dst % LK_VF_ALIGN)) % LK_VF_ALIGN) / 4;
    if ((uintptr_t)dst % 4 || head >= n) {
        if (y) axpy_f32_simd(dst, src, g, y, n);
        else memcpy(dst, src, sizeof(float) * (size_t)n);
        return;
    }
    const lk_vf gv = lk_vf_set1(g);
    /* head and tail through the same vector primitive as the body (and as axpy_f32_simd), so the
     * rounding is the same whichever path a row takes */
    if (head) {
        if (y) lk_vf_store_n(dst, lk_vf_fma(gv, lk_vf_load_n(y, (int)head), lk_vf_load_n(src, (int)head)), (int)head);
        else memcpy(dst, src, sizeof(float) * (size_t)head);
        d = head;
    }
    if (y)
        for (; d + LK_VF <= n; d += LK_VF) lk_vf_stream(dst + d, lk_vf_fma(gv, lk_vf_load(y + d), lk_vf_load(src + d)));
    else
        for (; d + LK_VF <= n; d += LK_VF) lk_vf_stream(dst + d, lk_vf_load(src + d));
    if (d < n) {
        const int r = (int)(n - d);
        if (y) lk_vf_store_n(dst + d, lk_vf_fma(gv, lk_vf_load_n(y + d, r), lk_vf_load_n(src + d, r)), r);
        else memcpy(dst + d, src + d, sizeof(float) * (size_t)r);
    }
}

#define LK_DEFINE_AXPY_GENERIC(NAME, T)                                                           \
static void NAME(T *dst, const T *src, T g, const T *y, int64_t n) {                              \
    for (int64_t d = 0; d < n; d++) dst[d] = src[d] + g * y[d];                                   \
}
LK_DEFINE_AXPY_GENERIC(axpy_f32_generic, float)
LK_DEFINE_AXPY_GENERIC(axpy_f64_generic, double)

/* the generic path of a row written once: a copy (y == NULL) or one update */
#define LK_DEFINE_ROW_PLAIN(NAME, T, AXPY)                                                        \
static void NAME(T *dst, const T *src, T g, const T *y, int64_t n) {                              \
    if (y) AXPY(dst, src, g, y, n);                                                               \
    else memcpy(dst, src, sizeof(T) * (size_t)n);                                                 \
}
LK_DEFINE_ROW_PLAIN(row_f32_plain, float, axpy_f32_generic)
LK_DEFINE_ROW_PLAIN(row_f64_plain, double, axpy_f64_generic)

/* per-feature block of the in-place path (elements) */
#define LK_MOR_SCATTER_BLOCK 2048

#define LK_DEFINE_SCATTER(NAME, FT, AXPY_FAST, AXPY_GENERIC, ROW_FAST, ROW_PLAIN)                                       \
static lk_status NAME(const lk_mor_scatter_params *p) {                                           \
    const int64_t B = p->B, T_ = p->T, k = p->k, Dm = p->Dm;                                      \
    const FT *y = (const FT *)p->y, *gate = (const FT *)p->gate;                                     \
    FT *out = (FT *)p->out;                                                                         \
    void (*axpy)(FT *, const FT *, FT, const FT *, int64_t) = lk_simd_enabled() ? AXPY_FAST : AXPY_GENERIC; \
    void (*row)(FT *, const FT *, FT, const FT *, int64_t) = lk_simd_enabled() ? ROW_FAST : ROW_PLAIN; \
    if (!p->h) {                                                                                  \
        const int64_t nblk = lk_cdiv(Dm, LK_MOR_SCATTER_BLOCK);                                   \
        const int team_ = lk_team_for(B * k * Dm * (int64_t)sizeof(FT) * 3);                      \
        _Pragma("omp parallel num_threads(team_)")                                                \
        {                                                                                         \
            int64_t lo, hi;                                                                       \
            lk_chunk(B * nblk, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);            \
            for (int64_t task = lo; task < hi; task++) {                                          \
                const int64_t b = task / nblk, f0 = (task % nblk) * LK_MOR_SCATTER_BLOCK;         \
                const int64_t nf = lk_min_i64(LK_MOR_SCATTER_BLOCK, Dm - f0);                     \
                for (int64_t j = 0; j < k; j++) {                                                 \
                    FT *dst = out + (b * T_ + p->idx[b * k + j]) * Dm + f0;                        \
                    axpy(dst, dst, gate ? gate[b * k + j] : (FT)1, y + (b * k + j) * Dm + f0, nf); \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        return LK_OK;                                                                             \
    }                                                                                             \
    /* head[b*FT + t]: first j updating token t of row b (-1: none); next[b*k + j]: the following j */ \
    int64_t *head = (int64_t *)malloc(sizeof(int64_t) * (size_t)(B * T_));                       \
    int64_t *next = (int64_t *)malloc(sizeof(int64_t) * (size_t)(B * k > 0 ? B * k : 1));         \
    if (!head || !next) { free(head); free(next); return LK_ERR_NOMEM; }                          \
    const FT *h = (const FT *)p->h;                                                                 \
    const int team_ = lk_team_for(B * T_ * Dm * (int64_t)sizeof(FT) * 2);                         \
    _Pragma("omp parallel num_threads(team_)")                                                    \
    {                                                                                             \
        int64_t lo, hi;                                                                           \
        lk_chunk(B, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);                       \
        for (int64_t b = lo; b < hi; b++) {                                                       \
            int64_t *hb = head + b * T_, *nb = next + b * k;                                      \
            const int64_t *ib = p->idx + b * k;                                                   \
            for (int64_t t = 0; t < T_; t++) hb[t] = -1;                                          \
            for (int64_t j = k - 1; j >= 0; j--) { nb[j] = hb[ib[j]]; hb[ib[j]] = j; }            \
        }                                                                                         \
        _Pragma("omp barrier")                                                                    \
        lk_chunk(B * T_, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);                  \
        for (int64_t r = lo; r < hi; r++) {                                                       \
            const int64_t b = r / T_;                                                             \
            FT *dst = out + r * Dm;                                                                \
            const FT *src = h + r * Dm;                                                            \
            int64_t j = head[r];                                                                  \
            if (j < 0 || next[b * k + j] < 0) { /* written once: a copy or a single update */     \
                row(dst, src, j < 0 ? (FT)0 : gate ? gate[b * k + j] : (FT)1,                     \
                    j < 0 ? NULL : y + (b * k + j) * Dm, Dm);                                     \
                continue;                                                                         \
            }                                                                                     \
            for (; j >= 0; j = next[b * k + j]) {                                                 \
                axpy(dst, src, gate ? gate[b * k + j] : (FT)1, y + (b * k + j) * Dm, Dm);          \
                src = dst;                                                                        \
            }                                                                                     \
        }                                                                                         \
        lk_stream_fence();                                                                        \
    }                                                                                             \
    free(head);                                                                                   \
    free(next);                                                                                   \
    return LK_OK;                                                                                 \
}

LK_DEFINE_SCATTER(scatter_f32, float, axpy_f32_simd, axpy_f32_generic, axpy_f32_stream, row_f32_plain)
LK_DEFINE_SCATTER(scatter_f64, double, axpy_f64_generic, axpy_f64_generic, row_f64_plain, row_f64_plain)

lk_status lk_mor_scatter_cpu(const lk_mor_scatter_params *p) {
    for (int64_t i = 0; i < p->B * p->k; i++)
        if (p->idx[i] < 0 || p->idx[i] >= p->T) return LK_ERR_VALUE;
    if (p->B == 0 || p->T == 0 || p->Dm == 0) return LK_OK;
    if (p->dtype == LK_F64) return scatter_f64(p);
    if (p->dtype == LK_F32) return scatter_f32(p);
    return LK_ERR_DTYPE;
}
