/* Attention (SPEC 1.1) with an optional ParScale shared prefix (SPEC 5.2).
 *
 * Math, per batch row b, query i, head h, KV head g = h / G (G = Hq / Hkv):
 *   s_j = scale <q[b,i,h], k[b,j,g]> over the admissible keys j (the L prefix keys of the row's
 *   stream, always admissible; then j < kv_lens[b] and, when causal, kv_pos[b,j] <= q_pos[b,i]);
 *   online softmax m = max_j s_j, l = sum_j e^(s_j - m), acc = sum_j e^(s_j - m) v_j;
 *   out = acc / l, lse = m + log l (the one combine in softmax.h); no key: out 0, lse -inf.
 * No N x M matrix is ever formed.
 *
 * Three paths:
 * - generic (when lk_simd_enabled() == 0): one task per (b, h, i), scalar.
 * - SIMD tiles (prefill; attention_simd.h, compiled for float32 and for float64): a task is (b, g,
 *   block of queries); its rows are the G query heads of
 *   the group times the queries of the block, so every K/V block is read once per group.  K is
 *   transposed once per call into key blocks of LK_BK keys (kt[d][j]), so S = Q K^T is a
 *   register-blocked outer-product microkernel (LK_MR rows x 4 vectors of keys) with the online
 *   softmax step (lk_v_exp_softmax) fused in for full unmasked blocks; O = alpha O + P V with a LK_MR
 *   rows x 4 vectors of E microkernel over a contiguous copy of the value block.  Causal key blocks whose
 *   smallest position exceeds every query position of the tile are skipped (per-block min/max of
 *   the positions, so explicit positions skip too); blocks straddling the diagonal are masked
 *   exactly, element by element.  Tasks are handed out dynamically, heaviest first; each tile is
 *   computed the same way whichever thread takes it.  The transposed-K copy is bounded to
 *   LK_KT_BYTES per pass over the batch rows.
 * - SIMD split keys (decode / few query rows; attention_simd.h too): the keys of each row are cut into
 *   C chunks (about 4 units (row, chunk) per thread), each a contiguous range of key blocks for all
 *   heads, with dot-product scores (no transpose); the partial states (m, l, acc) are merged by
 *   the softmax combine (float32 partials for float32, float64 for float64).  A single long decode
 *   uses every thread; units are handed out dynamically.
 * float64 runs the same SIMD code on vectors of doubles (half the lanes; the exponential is a
 * double-precision one, lk_vd_exp_softmax).  Before, float64 took the generic path: 3.8x slower
 * than torch's float64 SDPA on causal prefill and 16x slower than float32 decode on a Zen 3 guest.
 * For a fixed thread count every path is bitwise reproducible.
 *
 * Non-finite data: NaN and inf propagate as IEEE arithmetic says, over the admissible keys only.  A
 * masked key's score is -inf (its weight 0), and a masked block whose values hold an inf or a NaN takes
 * lk_pv_exact, which skips the masked keys (the vector kernels would add 0 * inf = NaN); keys beyond
 * kv_lens and skipped causal blocks are never read. */
#include <math.h>
#include <stdlib.h>
#include <omp.h>

#include "attention_internal.h"
#include "lmkern/simd.h"

/* ------------------------------------------------------------------------------------------ */
/* Generic path                                                                                */
/* ------------------------------------------------------------------------------------------ */

#define LK_DEFINE_ATTENTION_GENERIC(NAME, T)                                                      \
static lk_status NAME(const lk_attention_params *p) {                                             \
    const int64_t B = p->B, N = p->N, Hq = p->Hq, D = p->D, E = p->E, L = p->prefix_len;         \
    const int64_t group = p->Hq / p->Hkv;                                                         \
    const int64_t tasks = B * Hq * N;                                                             \
    const T scale = (T)p->scale;                                                                  \
    int failed = 0;                                                                               \
    _Pragma("omp parallel num_threads(lk_get_num_threads())")                                     \
    {                                                                                             \
        T *acc = (T *)malloc(sizeof(T) * (size_t)(E > 0 ? E : 1));                                \
        if (!acc) { _Pragma("omp atomic write") failed = 1; }                                     \
        int64_t lo, hi;                                                                           \
        lk_chunk(tasks, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);                   \
        for (int64_t t = lo; t < hi && acc; t++) {                                                \
            const int64_t b = t / (Hq * N), h = (t / N) % Hq, i = t % N, g = h / group;           \
            const T *qv = (const T *)p->q + b * p->q_stride[0] + i * p->q_stride[1] + h * p->q_stride[2]; \
            T *o = (T *)p->out + b * p->out_stride[0] + i * p->out_stride[1] + h * p->out_stride[2]; \
            const int64_t len = lk_row_len(p, b);                                                 \
            const int64_t qp = lk_q_position(p, b, i, len);                                       \
            T m = -INFINITY, l = 0;                                                               \
            for (int64_t e = 0; e < E; e++) acc[e] = 0;                                           \
            /* keys: the L prefix keys of this row's stream, then the row's own keys */           \
            for (int64_t j = -L; j < len; j++) {                                                  \
                const T *kv, *vv;                                                                 \
                if (j < 0) {                                                                      \
                    const int64_t row = ((b / p->prefix_rows) * L + (j + L)) * p->Hkv + g;        \
                    kv = (const T *)p->prefix_k + row * D;                                        \
                    vv = (const T *)p->prefix_v + row * E;                                        \
                } else {                                                                          \
                    if (p->causal && lk_kv_position(p, b, j) > qp) continue;                     \
                    kv = (const T *)p->k + b * p->k_stride[0] + j * p->k_stride[1] + g * p->k_stride[2]; \
                    vv = (const T *)p->v + b * p->v_stride[0] + j * p->v_stride[1] + g * p->v_stride[2]; \
                }                                                                                 \
                T s = 0;                                                                          \
                for (int64_t d = 0; d < D; d++) s += qv[d] * kv[d];                               \
                s *= scale;                                                                       \
                if (s > m) {                                                                      \
                    /* rescale what was accumulated under the old max */                          \
                    const T c = m == -INFINITY ? 0 : (T)exp((double)(m - s));                     \
                    l *= c;                                                                       \
                    for (int64_t e = 0; e < E; e++) acc[e] *= c;                                  \
                    m = s;                                                                        \
                }                                                                                 \
                const T w = (T)exp((double)(s - m));                                              \
                l += w;                                                                           \
                for (int64_t e = 0; e < E; e++) acc[e] += w * vv[e];                              \
            }                                                                                     \
            /* l == 0: no admissible key; l NaN (a NaN score) keeps out and lse NaN */            \
            const T inv = l != 0 ? (T)1 / l : 0;                                                  \
            for (int64_t e = 0; e < E; e++) o[e] = acc[e] * inv;                                  \
            if (p->lse) ((T *)p->lse)[(b * N + i) * Hq + h] =                                     \
                l != 0 ? m + (T)log((double)l) : -INFINITY;                                       \
        }                                                                                         \
        free(acc);                                                                                \
    }                                                                                             \
    return failed ? LK_ERR_NOMEM : LK_OK;                                                         \
}

LK_DEFINE_ATTENTION_GENERIC(attention_generic_f32, float)
LK_DEFINE_ATTENTION_GENERIC(attention_generic_f64, double)

lk_status lk_attention_cpu(const lk_attention_params *p) {
    if (p->B == 0 || p->N == 0 || p->Hq == 0) return LK_OK;
    if (p->Hkv <= 0 || p->Hq % p->Hkv) return LK_ERR_VALUE;
    if (p->dtype == LK_F32) return lk_simd_enabled() ? lk_attention_simd_f32(p) : attention_generic_f32(p);
    if (p->dtype == LK_F64) return lk_simd_enabled() ? lk_attention_simd_f64(p) : attention_generic_f64(p);
    return LK_ERR_DTYPE;
}
