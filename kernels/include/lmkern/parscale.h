/* lmkern.parscale kernels (SPEC 5.3): the pieces of the fused output aggregation around the two GEMMs.
 *
 * aggregate(h) with R = B·T output rows and h viewed as (P, R, Hd), stream-major:
 *   u   = lk_parscale_gather(h)            (R, P·Hd), interleaved u[r, j·P+p] or concat u[r, p·Hd+j]
 *   x   = w1 @ u^T                          (Hh, R)   BLAS (NumPy) / cuBLAS, not here
 *   x   = lk_parscale_bias_silu(x, b1)      in place: x[o, r] = silu(x[o, r] + b1[o])
 *   z   = w2 @ x                            (P, R)    BLAS, not here
 *   y   = lk_parscale_mix(h, z, b2)         w = smoothed softmax_P(z + b2); y[r] = sum_p w[r,p] h[p,r]
 * The GEMMs are feature-major (w @ u^T rather than u @ w^T): OpenBLAS runs the few-row (decode)
 * shapes up to 1.7x faster that way round and the many-row ones no slower.
 * Every array is C-contiguous; dtype LK_F32 or LK_F64 (one per call).
 *
 * threads: 0 uses lk_get_num_threads(); lmkern.parscale.aggregate passes 1, because between two
 * multi-threaded BLAS calls an OpenMP team's idle spinning (libgomp spins after each region) takes
 * the cores the next GEMM needs: on 2 cores that made the first GEMM twice as slow. */
#ifndef LMKERN_PARSCALE_H
#define LMKERN_PARSCALE_H

#include "lmkern/common.h"
#include "lmkern/cuda.h" /* lk_stream for the CUDA launchers below */

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

/* x[o, r] = silu(x[o, r] + bias[o]) = a / (1 + e^-a), in place (bias per row). */
typedef struct {
    lk_dtype dtype;
    int64_t Hh, R;
    void *x;                      /* (Hh, R) */
    const void *bias;             /* (Hh,) or NULL */
    int threads;                  /* 0: lk_get_num_threads() */
} lk_parscale_bias_silu_params;

lk_status lk_parscale_bias_silu_cpu(const lk_parscale_bias_silu_params *p);

/* w[r, :] = (1 - smoothing) softmax_p(z[p, r] + b2[p]) + smoothing / P   (softmax in double)
 * y[r, j] = sum_p w[r, p] h[p·R + r, j]      (float32 accumulation for float32, double for float64) */
typedef struct {
    lk_dtype dtype;
    int64_t P, R, Hd;
    const void *h;                /* (P·R, Hd) */
    const void *z;                /* (P, R) logits without b2 */
    const void *b2;               /* (P,) or NULL */
    double smoothing;
    void *y;                      /* (R, Hd) */
    float *weights;               /* (R, P) float32, or NULL */
    int threads;                  /* 0: lk_get_num_threads() */
} lk_parscale_mix_params;

lk_status lk_parscale_mix_cpu(const lk_parscale_mix_params *p);

/* ---- CUDA launchers (kernels/cuda/parscale_aggregate.cu) ----
 * On the GPU the gather is the framework's own reshape (a view when the layout allows, else its copy
 * kernel) and the two GEMMs are the framework's matmul (cuBLAS), feature-major as on the CPU:
 *   x  = w1 @ u^T            (Hh, R) in the inputs' dtype (cuBLAS accumulates in float32)
 *   xs = lk_parscale_bias_silu_cuda(x, b1)    (Hh, R) float32 (may be x itself when x is float32)
 *   z  = float32(w2) @ xs    (P, R) float32
 *   y  = lk_parscale_mix_cuda(h, z, b2)
 * dtype: LK_F32, LK_F16 or LK_BF16; every pointer is a device pointer on the current device. */

/* out[o, r] = silu(x[o, r] + bias[o]) in float32.  x (Hh, R) C-contiguous of p->dtype; out (Hh, R)
 * C-contiguous float32, which may be x itself when dtype is LK_F32 (each element is read, then
 * written, by one thread).  p->threads is ignored. */
lk_status lk_parscale_bias_silu_cuda(const lk_parscale_bias_silu_params *p, float *out, lk_stream stream);

/* The mix with strided h / y (rows of the (P·B, T, Hd) h and the (B, T, Hd) y are addressed through
 * B, T and the strides below, feature axis contiguous) and float32 logits: p->z is a float32 (P, R)
 * C-contiguous array whatever p->dtype is; R = B·T.  w[r, :] and y[r, :] as the CPU mix computes them,
 * with the softmax max-stabilized in float32 (the CPU's is in double: weights agree to float32
 * rounding); p->weights is (R, P) float32 C-contiguous or NULL.
 * Returns LK_ERR_VALUE when P > LK_PARSCALE_CUDA_MAX_P (the weights of a row live in shared memory). */
#define LK_PARSCALE_CUDA_MAX_P 8192
typedef struct {
    int64_t B, T;
    int64_t h_stride[2];          /* h[p·B + b, t, j] at h + (p·B + b)·h_stride[0] + t·h_stride[1] + j */
    int64_t y_stride[2];          /* y[b, t, j] at y + b·y_stride[0] + t·y_stride[1] + j */
} lk_parscale_mix_cuda_layout;

lk_status lk_parscale_mix_cuda(const lk_parscale_mix_params *p, const lk_parscale_mix_cuda_layout *l,
                               lk_stream stream);

#ifdef __cplusplus
}
#endif
#endif
