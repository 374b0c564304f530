/* lmkern.tpa kernels (SPEC 2): params structs and declarations.
 *
 * Factor layout (T6): A head-major (..., H, R), B rank-major (..., R, D); Q = (1/Rq) aq @ bq,
 * K = (1/Rk) ak @ bk, V = (1/Rv) av @ bv.  Every array handed to these kernels is C-contiguous. */
#ifndef LMKERN_TPA_H
#define LMKERN_TPA_H

#include "lmkern/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* out[n, h, d] = scale * sum_r a[n, h, r] b[n, r, d]  for n < rows. */
typedef struct {
    lk_dtype dtype;               /* LK_F32 or LK_F64 */
    int64_t rows, H, R, D;
    const void *a;                /* (rows, H, R) */
    const void *b;                /* (rows, R, D) */
    void *out;                    /* (rows, H, D) */
    double scale;
} lk_tpa_materialize_params;

lk_status lk_tpa_materialize_cpu(const lk_tpa_materialize_params *p);

/* Which contraction scores the keys (both give the same result up to rounding). */
typedef enum {
    LK_TPA_PATH_AUTO = 0,         /* the cheaper of the two for the ranks (see tpa_attention.c) */
    LK_TPA_PATH_FACTOR = 1,       /* <bq_r, bk_s> shared by the heads, then mixed with aq and ak */
    LK_TPA_PATH_MATERIALIZED = 2, /* Q materialized per query, contracted with bk, then ak; in
                                   * float32 prefill also value tiles V = av bv / Rv per key block */
} lk_tpa_path;

/* Prefill and decode.  out[b,i,h] = sum_j softmax_j(s_ij) V[b,j,h] over the admissible keys
 * (j < kv_lens[b] and, when causal, kv_pos[b,j] <= q_pos[b,i]); s_ij = scale <Q[b,i,h], K[b,j,h]>.
 * Defaults as lk_attention_params: kv_pos = j, q_pos = kv_lens[b] - N + i. */
typedef struct {
    lk_dtype dtype;               /* LK_F32 or LK_F64 */
    int64_t B, N, M, H, Rq, Rk, Rv, D, E;
    const void *aq;               /* (B, N, H, Rq) */
    const void *bq;               /* (B, N, Rq, D) */
    const void *ak;               /* (B, M, H, Rk) */
    const void *bk;               /* (B, M, Rk, D) */
    const void *av;               /* (B, M, H, Rv) */
    const void *bv;               /* (B, M, Rv, E) */
    void *out;                    /* (B, N, H, E) */
    void *lse;                    /* (B, N, H) or NULL */
    const int64_t *q_pos;         /* q_pos[b * q_pos_bstride + i]; NULL: kv_lens[b] - N + i */
    int64_t q_pos_bstride;
    const int64_t *kv_pos;        /* kv_pos[b * kv_pos_bstride + j]; NULL: j */
    int64_t kv_pos_bstride;
    const int64_t *kv_lens;       /* (B,), each in [0, M]; NULL: M */
    int causal;
    double scale;
    lk_tpa_path path;
    int64_t splits;               /* cache splits per query; 0: chosen from the thread count */
} lk_tpa_attention_params;

lk_status lk_tpa_attention_cpu(const lk_tpa_attention_params *p);

/* Decode (SPEC 2.4): one query per row (N = 1, every j < kv_lens[b] admissible), the FlashTPA
 * order, the cache split across threads with float32 partials and the max-stabilized combine.
 * Uses the attention params with N = 1; q_pos, kv_pos and causal are ignored. */
lk_status lk_tpa_decode_cpu(const lk_tpa_attention_params *p);

/* The split a decode / attention call uses for its shape (exposed for tests and benchmarks). */
int64_t lk_tpa_default_splits(int64_t queries, int64_t M, int threads);

#ifdef __cplusplus
}
#endif
#endif
