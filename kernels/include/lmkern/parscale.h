/* lmkern.parscale kernels (SPEC 5.3): the pieces of the fused output aggregation around the two GEMMs.
 *
 * aggregate(h) with R = B·T output rows and h viewed as (P, R, Hd), stream-major:
 *   u   = lk_parscale_gather(h)            (R, P·Hd), interleaved u[r, j·P+p] or concat u[r, p·Hd+j]
 *   x   = u @ w1^T                          (R, Hh)   BLAS (NumPy) / cuBLAS, not here
 *   x   = lk_parscale_bias_silu(x, b1)      in place: x = silu(x + b1)
 *   z   = x @ w2^T                          (R, P)    BLAS, not here
 *   y   = lk_parscale_mix(h, z, b2)         w = smoothed softmax_P(z + b2); y[r] = sum_p w[r,p] h[p,r]
 * Every array is C-contiguous; dtype LK_F32 or LK_F64 (one per call).
 *
 * threads: 0 uses lk_get_num_threads(); lmkern.parscale.aggregate passes 1, because between two
 * multi-threaded BLAS calls an OpenMP team's idle spinning (libgomp spins after each region) takes
 * the cores the next GEMM needs: on 2 cores that made the first GEMM twice as slow. */
#ifndef LMKERN_PARSCALE_H
#define LMKERN_PARSCALE_H

#include "lmkern/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* u[r, j·P + p] (interleaved) or u[r, p·Hd + j] (concat) = h[p·R + r, j]. */
typedef struct {
    lk_dtype dtype;
    int64_t P, R, Hd;
    const void *h;                /* (P·R, Hd) */
    void *u;                      /* (R, P·Hd) */
    int interleaved;              /* 1: u[j·P + p]; 0: u[p·Hd + j] */
    int threads;                  /* 0: lk_get_num_threads() */
} lk_parscale_gather_params;

lk_status lk_parscale_gather_cpu(const lk_parscale_gather_params *p);

/* x[r, o] = silu(x[r, o] + bias[o]) = a / (1 + e^-a), in place. */
typedef struct {
    lk_dtype dtype;
    int64_t R, Hh;
    void *x;                      /* (R, Hh) */
    const void *bias;             /* (Hh,) or NULL */
    int threads;                  /* 0: lk_get_num_threads() */
} lk_parscale_bias_silu_params;

lk_status lk_parscale_bias_silu_cpu(const lk_parscale_bias_silu_params *p);

/* w[r, :] = (1 - smoothing) softmax_p(z[r, p] + b2[p]) + smoothing / P   (softmax in double)
 * y[r, j] = sum_p w[r, p] h[p·R + r, j]      (float32 accumulation for float32, double for float64) */
typedef struct {
    lk_dtype dtype;
    int64_t P, R, Hd;
    const void *h;                /* (P·R, Hd) */
    const void *z;                /* (R, P) logits without b2 */
    const void *b2;               /* (P,) or NULL */
    double smoothing;
    void *y;                      /* (R, Hd) */
    float *weights;               /* (R, P) float32, or NULL */
    int threads;                  /* 0: lk_get_num_threads() */
} lk_parscale_mix_params;

lk_status lk_parscale_mix_cpu(const lk_parscale_mix_params *p);

#ifdef __cplusplus
}
#endif
#endif
