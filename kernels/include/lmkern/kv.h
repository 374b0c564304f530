/* lmkern.kv kernels (SPEC 4): KIVI quantization, attention over the quantized cache, attention
 * mass, top-k selection and per-head gather.  All arrays are C-contiguous. */
#ifndef LMKERN_KV_H
#define LMKERN_KV_H

#include "lmkern/common.h"
#include "lmkern/cuda.h" /* lk_stream for the CUDA launchers below */

#ifdef __cplusplus
extern "C" {
#endif

/* quantize / dequantize (SPEC 4.1): x (B, T, H, D) float32 or float64.
 * channel == 0 ("token"): groups of G features; codes (B, T, H, D/per), scale/zero (B, T, H, D/G).
 * channel == 1 ("channel"): groups of G tokens; codes (B, T/per, H, D), scale/zero (B, T/G, H, D).
 * per = 8 / bits codes per byte, LSB-first.  G % per == 0 and the grouped axis % G == 0. */
typedef struct {
    lk_dtype dtype;               /* of x (LK_F32 or LK_F64) */
    int64_t B, T, H, D, G;
    int bits, channel;
    void *x;                      /* quantize: read; dequantize: written */
    uint8_t *codes;               /* quantize: written; dequantize: read */
    float *scale, *zero;
} lk_kv_quant_params;

lk_status lk_kv_quantize_cpu(const lk_kv_quant_params *p);
lk_status lk_kv_dequantize_cpu(const lk_kv_quant_params *p);

/* Attention over the KIVI cache (SPEC 4.2), dequantization fused into the dot products.
 * Row b holds lens[b] tokens; keys [0, qk[b]) are quantized per channel in groups of G tokens,
 * keys [qk[b], lens[b]) are full precision at k_res slot j - qk[b]; values [0, qv[b]) quantized per
 * token in groups of G features, values [qv[b], lens[b]) at v_res slot j - qv[b].
 * Cache layout per (b, g) (head-major, so one head's cache is one contiguous stream):
 *   k_codes (B, Hkv, k_groups, D, G/per)   byte [grp][d][t/per] holds token grp*G + t of channel d
 *   k_scale, k_zero (B, Hkv, k_groups, D)
 *   k_res   (B, Hkv, k_res_cap, D)
 *   v_codes (B, Hkv, v_cap, E/per)         token-major, features packed LSB-first
 *   v_scale, v_zero (B, Hkv, v_cap, E/G)
 *   v_res   (B, Hkv, v_res_cap, E)
 * q (B, N, Hq, D), out (B, N, Hq, E), lse (B, N, Hq) or NULL; float32.  q_pos (B, N) explicit;
 * kv_pos (B, pos_cap).  Key j is admissible iff j < lens[b] and (!causal || kv_pos[b,j] <= q_pos[b,i]). */
typedef struct {
    int64_t B, N, Hq, Hkv, D, E, G;
    int bits, causal;
    double scale;
    const float *q;
    float *out, *lse;
    const uint8_t *k_codes, *v_codes;
    const float *k_scale, *k_zero, *k_res, *v_scale, *v_zero, *v_res;
    int64_t k_groups, k_res_cap, v_cap, v_res_cap, pos_cap;
    const int64_t *lens, *qk, *qv, *q_pos, *kv_pos;
} lk_kv_attend_params;

lk_status lk_kv_attend_cpu(const lk_kv_attend_params *p);

/* Attention mass (SPEC 4.3): out (B, M, Hout) float32, Hout = Hkv (reduce mean/sum/max) or Hq
 * (reduce none).  q (B, N, Hq, D), k (B, M, Hkv, D) float32; q_pos (B, N), kv_pos (B, M), kv_lens (B)
 * explicit int64.  normalize: sum of softmax probabilities; else sum of scaled logits. */
enum { LK_REDUCE_MEAN = 0, LK_REDUCE_SUM = 1, LK_REDUCE_MAX = 2, LK_REDUCE_NONE = 3 };
typedef struct {
    int64_t B, N, M, Hq, Hkv, D;
    int causal, normalize, reduce;
    double scale;
    const float *q, *k;
    float *out;
    const int64_t *q_pos, *kv_pos, *kv_lens;
} lk_kv_mass_params;

lk_status lk_kv_mass_cpu(const lk_kv_mass_params *p);

/* keep_topk (SPEC 4.5): scores (B, M, H) float32/float64 -> idx (B, K, H), K = min(budget, M). */
typedef struct {
    lk_dtype dtype;
    int64_t B, M, H, K, sink, recent;
    const void *scores;
    int64_t *idx;
} lk_kv_topk_params;

lk_status lk_kv_keep_topk_cpu(const lk_kv_topk_params *p);

/* compact (SPEC 4.5): out[b,k,h,:] = x[b, idx[b,k,h], h, :]; rows of row_bytes bytes (any dtype).
 * idx values are in [0, M) (checked by the caller). */
typedef struct {
    int64_t B, M, K, H, row_bytes;
    const void *x;
    const int64_t *idx;
    void *out;
} lk_kv_compact_params;

lk_status lk_kv_compact_cpu(const lk_kv_compact_params *p);

/* ---- CUDA launchers: quantization and the quantized cache (kernels/cuda/kv_quant.cu, kv_attend.cu) ---- */

/* quantize / dequantize on the GPU (SPEC 4.1): lk_kv_quant_params with dtype LK_F32, LK_F16 or LK_BF16
 * (x: the input of quantize, the output of dequantize); every pointer a DEVICE pointer, every array
 * C-contiguous, the layout of the CPU kernel.  Codes are computed with the CPU kernel's double-precision
 * formula, so they equal the CPU's bit for bit for the same (float32-converted) input. */
lk_status lk_kv_quantize_cuda(const lk_kv_quant_params *p, lk_stream stream);
lk_status lk_kv_dequantize_cuda(const lk_kv_quant_params *p, lk_stream stream);

/* The GPU KIVI cache (lmkern.kv.QuantizedKVCache(..., device="cuda")).  Per (b, kv head g), head-major
 * (bh = b * H + g), S = max_len:
 *   k_codes (B, H, k_groups, D, G/per)   byte [grp][d][t/per] holds token grp*G + t of channel d
 *   k_scale, k_zero (B, H, k_groups, D)  float32
 *   k_res   (B, H, k_res_cap, D)         float32; full-precision key j lives in slot j % k_res_cap (a ring)
 *   v_codes (B, H, S, E/per)             token-major, features packed LSB-first
 *   v_scale, v_zero (B, H, S, E/G)       float32
 *   v_res   (B, H, v_res_cap, E)         float32; full-precision value j lives in slot j % v_res_cap
 *   kv_pos  (B, S)                       int64 positions of the stored tokens
 * k_res_cap = min(S, residual + G) and v_res_cap = min(S, residual) hold every full-precision token
 * (SPEC 4.2: at most residual + G - 1 keys and residual values), so a token never moves once written. */

/* append: rows (B, 6) int64 on the device, per row [start, n, qk0, qk1, qv0, qv1]: the row holds `start`
 * tokens, n new ones arrive (k, v (B, T, H, D|E) of dtype, strided by token/head/batch, feature axis
 * contiguous), keys [qk0, qk1) (whole groups) and values [qv0, qv1) cross into the quantized part.
 * Three launches on `stream`: quantize the crossing key groups and value tokens (reading the ring or
 * the input), then write the new full-precision tokens into the rings.  max_* bound the grid (host
 * maxima over the rows); rows values are clamped on the device so no value reads or writes out of
 * bounds. */
typedef struct {
    lk_dtype dtype;                       /* of k and v */
    int64_t B, T, H, D, E, G, S, k_groups, k_res_cap, v_res_cap;
    int bits;
    const void *k, *v;
    int64_t k_stride[3], v_stride[3];     /* elements, for the B, T, H axes */
    const int64_t *rows;                  /* (B, 6) */
    int64_t max_kgroups, max_vtokens, max_new;
    uint8_t *k_codes, *v_codes;
    float *k_scale, *k_zero, *k_res, *v_scale, *v_zero, *v_res;
} lk_kv_cache_append_params;

lk_status lk_kv_cache_append_cuda(const lk_kv_cache_append_params *p, lk_stream stream);

/* attend (SPEC 4.2) over the cache above: q (B, N, Hq, D) and out (B, N, Hq, E) of dtype (strided, feature
 * axis contiguous), lse (B, N, Hq) float32 or NULL, rows (B, 3) int64 [len, qk, qv] per row, q_pos (B, N)
 * int64, kv_pos (B, S).  Key j < len is admissible iff !causal || kv_pos[b, j] <= q_pos[b, i].
 * num_splits > 1 splits the keys; float32 partials [m, l, acc[E]] go to scratch
 * (lk_kv_attend_cuda_scratch_floats floats) and are merged by softmax.cuh's combine_block.
 * D, E <= LK_CUDA_ATTN_MAX_HEAD_DIM. */
typedef struct {
    lk_dtype dtype;                       /* of q and out */
    int64_t B, N, Hq, Hkv, D, E, G, S, k_groups, k_res_cap, v_res_cap;
    int bits, causal;
    double scale;
    const void *q;
    int64_t q_stride[3];
    void *out;
    int64_t out_stride[3];
    float *lse;
    const uint8_t *k_codes, *v_codes;
    const float *k_scale, *k_zero, *k_res, *v_scale, *v_zero, *v_res;
    const int64_t *rows, *q_pos, *kv_pos;
    int64_t max_len;                      /* max over rows of len (host bookkeeping): sizes the splits */
} lk_kv_attend_cuda_params;

lk_status lk_kv_attend_cuda(const lk_kv_attend_cuda_params *p, int num_splits, float *scratch, lk_stream stream);
int lk_kv_attend_cuda_splits(const lk_kv_attend_cuda_params *p, int num_sms);
int64_t lk_kv_attend_cuda_scratch_floats(const lk_kv_attend_cuda_params *p, int num_splits);
/* (end of quantization launchers) */









/* ---- CUDA launchers: scoring and eviction (kernels/cuda/kv_mass.cu, kv_select.cu) ---- */

/* attention_mass on the GPU (SPEC 4.3).  q (B, N, Hq, D), k (B, M, Hkv, D) in `dtype` (LK_F32, LK_F16,
 * LK_BF16), element strides for (batch, token, head), feature axis contiguous; out (B, M, Hout) float32
 * contiguous (Hout = Hkv, or Hq for LK_REDUCE_NONE).  Index arrays are int64 device arrays or NULL:
 * q_pos[b * q_pos_bstride + i] (NULL: kv_lens[b] - N + i), kv_pos[b * kv_pos_bstride + j] (NULL: j),
 * kv_lens (NULL: M; values clamped to [0, M] on the device).  D <= LK_CUDA_ATTN_MAX_HEAD_DIM. */
typedef struct {
    lk_dtype dtype;
    int64_t B, N, M, Hq, Hkv, D;
    const void *q, *k;
    int64_t q_stride[3], k_stride[3];
    float *out;
    const int64_t *q_pos, *kv_pos, *kv_lens;
    int64_t q_pos_bstride, kv_pos_bstride;
    int causal, normalize, reduce;  /* reduce: LK_REDUCE_* */
    double scale;
} lk_kv_mass_cuda_params;

/* normalize: pass 1 splits the keys of every query row into num_splits chunks and needs `scratch` of
 * lk_kv_mass_cuda_scratch_floats(p, num_splits) float32 (row statistics); normalize == 0 needs none. */
lk_status lk_kv_mass_cuda(const lk_kv_mass_cuda_params *p, int num_splits, float *scratch, lk_stream stream);
int lk_kv_mass_cuda_splits(const lk_kv_mass_cuda_params *p, int num_sms);
int64_t lk_kv_mass_cuda_scratch_floats(const lk_kv_mass_cuda_params *p, int num_splits);

/* pool1d on the GPU (SPEC 4.4): scores (B, M, H) in dtype with element strides s_stride; out (B, M, H)
 * contiguous, same dtype.  max_mode: 0 avg (padding counted as zeros), 1 max (padding ignored). */
typedef struct {
    lk_dtype dtype;
    int64_t B, M, H, kernel_size;
    int max_mode;
    const void *scores;
    int64_t s_stride[3];
    void *out;
} lk_kv_pool_cuda_params;

lk_status lk_kv_pool1d_cuda(const lk_kv_pool_cuda_params *p, lk_stream stream);

/* keep_topk on the GPU (SPEC 4.5): scores (B, M, H) in dtype with element strides s_stride;
 * idx (B, K, H) int64 contiguous, K = min(budget, M), sink + recent <= K when K < M. */
typedef struct {
    lk_dtype dtype;
    int64_t B, M, H, K, sink, recent;
    const void *scores;
    int64_t s_stride[3];
    int64_t *idx;
} lk_kv_topk_cuda_params;

lk_status lk_kv_keep_topk_cuda(const lk_kv_topk_cuda_params *p, lk_stream stream);

/* compact on the GPU (SPEC 4.5): out[b,k,h,:] = x[b, idx[b,k,h], h, :], rows of row_bytes contiguous
 * bytes (any dtype); x addressed with BYTE strides x_stride_bytes for (batch, token, head); idx (B, K, H)
 * int64 contiguous, values clamped to [0, M - 1] on the device; out (B, K, H, row) contiguous. */
typedef struct {
    int64_t B, M, K, H, row_bytes;
    const void *x;
    int64_t x_stride_bytes[3];
    const int64_t *idx;
    void *out;
} lk_kv_compact_cuda_params;

lk_status lk_kv_compact_cuda(const lk_kv_compact_cuda_params *p, lk_stream stream);

/* (end of scoring/eviction launchers) */

#ifdef __cplusplus
}
#endif
#endif
