/* lmkern.tpa kernels (SPEC 2): params structs and declarations.
 *
 * Factor layout (T6): A head-major (..., H, R), B rank-major (..., R, D); Q = (1/Rq) aq @ bq,
 * K = (1/Rk) ak @ bk, V = (1/Rv) av @ bv.  Every array handed to the CPU kernels is C-contiguous. */
#ifndef LMKERN_TPA_H
#define LMKERN_TPA_H

#include "lmkern/common.h"
#include "lmkern/cuda.h"

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
    LK_TPA_PATH_TENSOR_CORES = 3, /* GPU decode only: require the tensor-core kernel (f16 / bf16) */
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

/* ---- CUDA (kernels/cuda/tpa.cu) ------------------------------------------------------------------
 * Pointers are device pointers; dtype LK_F32, LK_F16 or LK_BF16 for every float array except lse
 * (float32, (B, H) contiguous).  The params structs above are reused; what the GPU adds is strides:
 * decode reads every factor with element strides for its two leading axes, the rest contiguous. */

/* Element strides of the two leading axes of the decode arrays; the trailing block of each is
 * contiguous: aq (B, H, Rq): batch, head; bq (B, Rq, D): batch, rank; ak (B, M, H, Rk), bk (B, M, Rk, D),
 * av (B, M, H, Rv), bv (B, M, Rv, E): batch, token (each token's (H, R) / (R, D) block contiguous);
 * out (B, H, E): batch, head. */
typedef struct {
    int64_t aq[2], bq[2], ak[2], bk[2], av[2], bv[2], out[2];
} lk_tpa_decode_strides;

/* Decode (N = 1) on the GPU: the FlashTPA order per (row, head group, cache split); p->path picks the
 * kernel: TENSOR_CORES the tensor-core one (f16 / bf16; LK_ERR_VALUE where the shape does not fit; not
 * yet run on a GPU), anything else the float32 CUDA-core one; kv_lens is an int64
 * device array (values clamped to [0, M] on the device) or NULL.  num_splits > 1 writes float32
 * partials to `scratch` (lk_tpa_decode_cuda_scratch_floats floats), merged by a second kernel.
 * LK_ERR_VALUE when the shape does not fit the kernel (lk_tpa_decode_cuda_supported). */
lk_status lk_tpa_decode_cuda(const lk_tpa_attention_params *p, const lk_tpa_decode_strides *s, int num_splits,
                             float *scratch, lk_stream stream);
/* 1 when the ranks and sizes fit the kernel's shared memory (D, E <= 256, moderate Rq and Rk). */
int lk_tpa_decode_cuda_supported(const lk_tpa_attention_params *p);
/* The split count the launcher would like on a GPU with num_sms multiprocessors. */
int lk_tpa_decode_cuda_splits(const lk_tpa_attention_params *p, int num_sms);
/* Floats of scratch for num_splits (0 when num_splits == 1). */
int64_t lk_tpa_decode_cuda_scratch_floats(const lk_tpa_attention_params *p, int num_splits);

/* materialize on the GPU: a, b, out C-contiguous device arrays of p->dtype (f32/f16/bf16). */
lk_status lk_tpa_materialize_cuda(const lk_tpa_materialize_params *p, lk_stream stream);

#ifdef __cplusplus
}
#endif
#endif
