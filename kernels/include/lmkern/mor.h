/* lmkern.mor kernels (SPEC 3, Mixture-of-Recursions): params structs and declarations.
 *
 * All arrays are C-contiguous (the bindings copy strided inputs); float arrays are float32 or
 * float64 as `dtype` says; index arrays are int64.  Every kernel is deterministic for a fixed
 * input (results do not depend on the thread count at all). */
#ifndef LMKERN_MOR_H
#define LMKERN_MOR_H

#include "lmkern/common.h"
#include "lmkern/cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    LK_MOR_ACT_NONE = 0,
    LK_MOR_ACT_SIGMOID = 1,
    LK_MOR_ACT_TANH = 2,
    LK_MOR_ACT_SOFTMAX = 3, /* over the C scores of a row */
} lk_mor_activation;

/* router_scores: z[r, c] = alpha * act(<h[r], wt[c]> / temperature) for r < rows, c < C.
 * h (rows, Dm), wt (C, Dm) (the transposed router weight).  With h == NULL the products are
 * already in z (e.g. from BLAS) and only the activation is applied, in place. */
typedef struct {
    lk_dtype dtype;
    int64_t rows, C, Dm;
    const void *h;
    const void *wt;
    void *z; /* (rows, C) */
    int activation;
    double alpha, temperature;
} lk_mor_router_params;
lk_status lk_mor_router_cpu(const lk_mor_router_params *p);

/* expert_choice: per row b of scores (B, n), the k best scores (larger first, ties to the lower
 * position, NaN below everything); idx (B, k) ascending, gate (B, k) the chosen scores.
 * candidates (B, n) or NULL: idx holds candidates[b, chosen] instead of the position. */
typedef struct {
    lk_dtype dtype;
    int64_t B, n, k;
    const void *scores;
    const int64_t *candidates;
    int64_t *idx;
    void *gate;
} lk_mor_topk_params;
lk_status lk_mor_topk_cpu(const lk_mor_topk_params *p);

/* token_choice: per token r of probs (rows, C), choice = argmax_c(probs + bias) (NaN lowest,
 * ties to the lower c; all-NaN rows choose 0); depth = choice + 1; gate = probs[r, choice]. */
typedef struct {
    lk_dtype dtype;
    int64_t rows, C;
    const void *probs;
    const void *bias; /* (C,) or NULL */
    int64_t *depth;
    void *gate;
} lk_mor_token_choice_params;
lk_status lk_mor_token_choice_cpu(const lk_mor_token_choice_params *p);

/* gather: out[b, j] = h[b, idx[b, j]]; h (B, T, Dm), idx (B, k), out (B, k, Dm). */
typedef struct {
    lk_dtype dtype;
    int64_t B, T, k, Dm;
    const void *h;
    const int64_t *idx;
    void *out;
} lk_mor_gather_params;
lk_status lk_mor_gather_cpu(const lk_mor_gather_params *p);

/* scatter_residual: out = h, then for j = 0, 1, ..., k-1 in order
 *   out[b, idx[b, j]] += gate[b, j] * y[b, j]            (gate == NULL: 1)
 * h (B, T, Dm), idx (B, k), y (B, k, Dm), gate (B, k) or NULL, out (B, T, Dm).
 * h == NULL: in place on out.  Any idx outside [0, T) returns LK_ERR_VALUE before any write. */
typedef struct {
    lk_dtype dtype;
    int64_t B, T, k, Dm;
    const void *h;
    const int64_t *idx;
    const void *y;
    const void *gate;
    void *out;
} lk_mor_scatter_params;
lk_status lk_mor_scatter_cpu(const lk_mor_scatter_params *p);

/* Router losses (forward values), reduced in double over fixed blocks of LK_MOR_LOSS_BLOCK rows
 * whose partials are added in block order: the result does not depend on the thread count.
 *   LK_MOR_LOSS_BALANCE: x = probs (rows, C), depth (rows,) in [1, C]:
 *       sum_i f_i P_i,  P_i = mean_r x[r, i],  f_i = C * #{r : depth[r] == i + 1} / rows
 *   LK_MOR_LOSS_Z:  x = logits (rows, C): mean_r logsumexp(x[r])^2  (C == 1: mean_r x[r]^2)
 *   LK_MOR_LOSS_BCE: x = logits (rows,), target (rows,) double, eligible (rows,) or NULL:
 *       mean over eligible r of max(x, 0) - x t + log(1 + e^-|x|)
 * A mean over zero rows is NaN. */
typedef enum { LK_MOR_LOSS_BALANCE = 0, LK_MOR_LOSS_Z = 1, LK_MOR_LOSS_BCE = 2 } lk_mor_loss_kind;
#define LK_MOR_LOSS_BLOCK 4096
typedef struct {
    lk_dtype dtype;
    int kind;
    int64_t rows, C;
    const void *x;
    const int64_t *depth;
    const double *target;
    const uint8_t *eligible;
    double result;
} lk_mor_loss_params;
lk_status lk_mor_loss_cpu(lk_mor_loss_params *p);

/* ---- CUDA launchers (kernels/cuda/mor_*.cu) ----------------------------------------------------
 * Device pointers on the current device; dtype LK_F32, LK_F16 or LK_BF16 (all float arrays of a call
 * in one dtype); index arrays int64 and C-contiguous; outputs the launcher writes (idx, gate, depth,
 * z) C-contiguous.  Strides are in elements; the feature (last) axis is always contiguous.  Launchers
 * only enqueue on `stream`.  Index values read from device memory (idx, candidates) are never trusted
 * as addresses: out-of-range token indices gather a zero row and are skipped by the scatter (the
 * Python layer range-checks host index arrays before the launch, raising ValueError). */
/* expert_choice; scores row b at scores + b * scores_stride; n < 2^31 (else LK_ERR_VALUE). */
lk_status lk_mor_topk_cuda(const lk_mor_topk_params *p, int64_t scores_stride, lk_stream stream);
/* router_scores; h (B, T, Dm) with rows = B * T and h_stride = (batch, token) strides; p->wt is the
 * weight w (Dm, C) addressed as wt[d * w_stride[0] + c * w_stride[1]]; z (rows, C) contiguous.
 * C <= LK_MOR_CUDA_MAX_C (else LK_ERR_VALUE). */
#define LK_MOR_CUDA_MAX_C 1024
lk_status lk_mor_router_cuda(const lk_mor_router_params *p, int64_t T, const int64_t h_stride[2],
                             const int64_t w_stride[2], lk_stream stream);
/* token_choice; probs (B, T, C) with rows = B * T and probs_stride = (batch, token) strides. */
lk_status lk_mor_token_choice_cuda(const lk_mor_token_choice_params *p, int64_t T, const int64_t probs_stride[2],
                                   lk_stream stream);
/* gather; h_stride / out_stride = (batch, token) strides. */
lk_status lk_mor_gather_cuda(const lk_mor_gather_params *p, const int64_t h_stride[2], const int64_t out_stride[2],
                             lk_stream stream);
/* scatter_residual; h == NULL: in place on out; else out = h first (h and out must not overlap).
 * Repeated indices: each feature of an output row is updated by one thread in ascending j, each
 * step out = round(fma(gate, y, out)) in out's dtype (float32 arithmetic), as the CPU kernel. */
lk_status lk_mor_scatter_cuda(const lk_mor_scatter_params *p, const int64_t h_stride[2], const int64_t y_stride[2],
                              const int64_t out_stride[2], lk_stream stream);

#ifdef __cplusplus
}
#endif
#endif
