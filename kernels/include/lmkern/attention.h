/* Core attention (SPEC 1.1, ParScale 5.2), RoPE (SPEC 1.2) and the plain KV cache append (SPEC 1.3). */
#ifndef LMKERN_ATTENTION_H
#define LMKERN_ATTENTION_H

#include "lmkern/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* out[b,i,h] = sum_j softmax_j(scale <q[b,i,h], k[b,j,g]>) v[b,j,g], g = h / (Hq/Hkv), over the
 * admissible keys: j < kv_lens[b] and, when causal, kv_pos[b,j] <= q_pos[b,i].
 * With a prefix (ParScale), row b first attends to prefix_k[b / prefix_rows] (L keys, always
 * admissible, no positions), then to its own keys as above.
 * Element strides are given for (batch, token, head); the feature axis is contiguous. */
typedef struct {
    lk_dtype dtype;               /* LK_F32 or LK_F64 (CPU); every float array below has it */
    int64_t B, N, M, Hq, Hkv, D, E;
    const void *q;                /* (B, N, Hq, D) */
    const void *k;                /* (B, M, Hkv, D) */
    const void *v;                /* (B, M, Hkv, E) */
    void *out;                    /* (B, N, Hq, E) */
    void *lse;                    /* (B, N, Hq) contiguous, or NULL */
    int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];
    const int64_t *q_pos;         /* q_pos[b * q_pos_bstride + i]; NULL: kv_lens[b] - N + i */
    int64_t q_pos_bstride;        /* 0 when q_pos is (N,) */
    const int64_t *kv_pos;        /* kv_pos[b * kv_pos_bstride + j]; NULL: j */
    int64_t kv_pos_bstride;
    const int64_t *kv_lens;       /* (B,), each in [0, M]; NULL: M */
    int causal;
    double scale;
    /* ParScale shared prefix, contiguous: (P, L, Hkv, D) and (P, L, Hkv, E); NULL when L = 0 */
    const void *prefix_k, *prefix_v;
    int64_t prefix_len;           /* L */
    int64_t prefix_rows;          /* rows per stream: row b uses prefix b / prefix_rows */
} lk_attention_params;

lk_status lk_attention_cpu(const lk_attention_params *p);

/* RoPE, in place on a contiguous (B, T, G, D) array; positions[b * pos_bstride + t]. */
typedef struct {
    lk_dtype dtype;
    int64_t B, T, G, D;
    void *x;
    const int64_t *positions;
    int64_t pos_bstride;          /* 0 when positions is (T,) */
    int64_t rotary_dim;           /* even, <= D */
    double base;
    int interleaved;              /* 0: pairs (i, i + r/2); 1: pairs (2i, 2i + 1) */
    int inverse;                  /* rotate by -theta */
} lk_rope_params;

lk_status lk_rope_cpu(const lk_rope_params *p);

#ifdef __cplusplus
}
#endif
#endif
