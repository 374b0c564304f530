/* ParScale output aggregation (SPEC 5.3): the kernels around the two GEMMs (which stay in BLAS).
 *
 *   gather     u[r, j·P + p] (or u[r, p·Hd + j]) = h[p·R + r, j]        the GEMM's input, one pass
 *   bias_silu  x = silu(x + b1), in place on the first GEMM's output
 *   mix        w = (1 - s) softmax_P(z + b2) + s / P;  y[r] = sum_p w[r,p] h[p·R + r]
 *
 * Work is split statically (lk_chunk) over (row, column block) items, so a fixed thread count gives
 * bitwise identical results, and a single decode row (R = 1) still uses every thread.
 * float32 has a SIMD path beside the generic one (lk_simd_enabled() picks); float64 is generic. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "lmkern/parscale.h"
#include "lmkern/simd.h"

/* the team size: params.threads, or lmkern's setting when 0 */
static inline int lk_parscale_threads(int threads) { return threads > 0 ? threads : lk_get_num_threads(); }

/* columns per work item: 1 KiB of float32 per stream row, small enough to split a decode row */
#define LK_PARSCALE_BLOCK 256

/* ---------------------------------------------------------------- gather */

#define LK_GATHER_ROW(T, NP, ur, hr, stream, j0, j1)                                              \
    for (int64_t j = (j0); j < (j1); j++)                                                          \
        for (int64_t s = 0; s < (NP); s++) (ur)[j * (NP) + s] = (hr)[s * (stream) + j]

#define LK_DEFINE_GATHER(NAME, T)                                                                  \
static void NAME(const lk_parscale_gather_params *p) {                                             \
    const int64_t P = p->P, R = p->R, Hd = p->Hd, nblk = lk_cdiv(Hd, LK_PARSCALE_BLOCK);           \
    const T *h = (const T *)p->h;                                                                  \
    T *u = (T *)p->u;                                                                              \
    _Pragma("omp parallel num_threads(lk_parscale_threads(p->threads))")                           \
    {                                                                                              \
        int64_t lo, hi;                                                                            \
        lk_chunk(R * nblk, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);                 \
        for (int64_t t = lo; t < hi; t++) {                                                        \
            const int64_t r = t / nblk, j0 = (t % nblk) * LK_PARSCALE_BLOCK;                       \
            const int64_t j1 = lk_min_i64(j0 + LK_PARSCALE_BLOCK, Hd);                             \
            T *ur = u + r * P * Hd;                                                                \
            if (p->interleaved) {                                                                  \
                /* u[r, j·P + p] = h[p·R + r, j]: write the row in order, read P streams;          \
                 * a constant P for the common counts lets the compiler unroll the inner loop */   \
                const T *hr = h + r * Hd;                                                          \
                const int64_t stream = R * Hd;                                                     \
                switch (P) {                                                                       \
                case 2: LK_GATHER_ROW(T, 2, ur, hr, stream, j0, j1); break;                        \
                case 4: LK_GATHER_ROW(T, 4, ur, hr, stream, j0, j1); break;                        \
                case 8: LK_GATHER_ROW(T, 8, ur, hr, stream, j0, j1); break;                        \
                default: LK_GATHER_ROW(T, P, ur, hr, stream, j0, j1); break;                       \
                }                                                                                  \
            } else {                                                                               \
                /* u[r, p·Hd + j] = h[p·R + r, j] */                                               \
                for (int64_t s = 0; s < P; s++)                                                    \
                    memcpy(ur + s * Hd + j0, h + (s * R + r) * Hd + j0, sizeof(T) * (size_t)(j1 - j0)); \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}

LK_DEFINE_GATHER(lk_gather_f32, float)
LK_DEFINE_GATHER(lk_gather_f64, double)

lk_status lk_parscale_gather_cpu(const lk_parscale_gather_params *p) {
    if (p->P < 1 || p->R < 0 || p->Hd < 0) return LK_ERR_VALUE;
    if (p->R == 0 || p->Hd == 0) return LK_OK;
    if (p->dtype == LK_F32) lk_gather_f32(p);
    else if (p->dtype == LK_F64) lk_gather_f64(p);
    else return LK_ERR_DTYPE;
    return LK_OK;
}

/* ---------------------------------------------------------------- bias + SiLU */

#define LK_DEFINE_BIAS_SILU(NAME, T, EXP)                                                          \
static void NAME(const lk_parscale_bias_silu_params *p) {                                          \
    const int64_t R = p->R, Hh = p->Hh;                                                            \
    T *x = (T *)p->x;                                                                              \
    const T *bias = (const T *)p->bias;                                                            \
    _Pragma("omp parallel num_threads(lk_parscale_threads(p->threads))")                           \
    {                                                                                              \
        int64_t lo, hi;                                                                            \
        lk_chunk(R, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);                        \
        for (int64_t r = lo; r < hi; r++) {                                                        \
            T *xr = x + r * Hh;                                                                    \
            /* a = x + b;  x = a / (1 + e^-a)  (a -> -inf gives -0, a -> +inf gives a) */          \
            for (int64_t o = 0; o < Hh; o++) {                                                     \
                const T a = xr[o] + (bias ? bias[o] : (T)0);                                       \
                xr[o] = a / ((T)1 + EXP(-a));                                                      \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}

LK_DEFINE_BIAS_SILU(lk_bias_silu_f32_generic, float, expf)
LK_DEFINE_BIAS_SILU(lk_bias_silu_f64, double, exp)

static void lk_bias_silu_f32_simd(const lk_parscale_bias_silu_params *p) {
    const int64_t R = p->R, Hh = p->Hh;
    float *x = (float *)p->x;
    const float *bias = (const float *)p->bias;
    const lk_vf one = lk_vf_set1(1.0f), zero = lk_vf_zero();
    #pragma omp parallel num_threads(lk_parscale_threads(p->threads))
    {
        int64_t lo, hi;
        lk_chunk(R, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
        for (int64_t r = lo; r < hi; r++) {
            float *xr = x + r * Hh;
            /* a = x + b;  x = a / (1 + e^-a) */
            for (int64_t o = 0; o < Hh; o += LK_VF) {
                const int n = (int)lk_min_i64(LK_VF, Hh - o);
                lk_vf a = n == LK_VF ? lk_vf_load(xr + o) : lk_vf_load_n(xr + o, n);
                if (bias) a = lk_vf_add(a, n == LK_VF ? lk_vf_load(bias + o) : lk_vf_load_n(bias + o, n));
                const lk_vf s = lk_vf_div(a, lk_vf_add(one, lk_vf_exp(lk_vf_sub(zero, a))));
                if (n == LK_VF) lk_vf_store(xr + o, s);
                else lk_vf_store_n(xr + o, s, n);
            }
        }
    }
}

lk_status lk_parscale_bias_silu_cpu(const lk_parscale_bias_silu_params *p) {
    if (p->R < 0 || p->Hh < 0) return LK_ERR_VALUE;
    if (p->R == 0 || p->Hh == 0) return LK_OK;
    if (p->dtype == LK_F32) {
        if (lk_simd_enabled()) lk_bias_silu_f32_simd(p);
        else lk_bias_silu_f32_generic(p);
    } else if (p->dtype == LK_F64) {
        lk_bias_silu_f64(p);
    } else {
        return LK_ERR_DTYPE;
    }
    return LK_OK;
}

/* ---------------------------------------------------------------- softmax over P + smoothing + weighted sum */

/* w[p] = (1 - s) softmax_p(z[p] + b2[p]) + s / P, in double (max-subtracted: finite for any finite z).
 * NaN logits give NaN weights (IEEE), as do +inf ones. */
#define LK_DEFINE_MIX_WEIGHTS(NAME, T)                                                             \
static void NAME(const lk_parscale_mix_params *p, int64_t r, double *w) {                          \
    const int64_t P = p->P;                                                                        \
    const T *z = (const T *)p->z + r * P, *b2 = (const T *)p->b2;                                  \
    double m = -INFINITY, sum = 0;                                                                 \
    for (int64_t s = 0; s < P; s++) {                                                              \
        w[s] = (double)z[s] + (b2 ? (double)b2[s] : 0.0);                                          \
        if (w[s] > m) m = w[s];                                                                    \
    }                                                                                              \
    for (int64_t s = 0; s < P; s++) sum += (w[s] = exp(w[s] - m));                                 \
    for (int64_t s = 0; s < P; s++) w[s] = w[s] / sum * (1.0 - p->smoothing) + p->smoothing / (double)P; \
}

LK_DEFINE_MIX_WEIGHTS(lk_mix_weights_f32, float)
LK_DEFINE_MIX_WEIGHTS(lk_mix_weights_f64, double)

/* ACC: float for float32 (SPEC: accumulate in at least float32), double for float64. */
#define LK_DEFINE_MIX(NAME, T, WEIGHTS, SIMD)                                                      \
static lk_status NAME(const lk_parscale_mix_params *p) {                                           \
    const int64_t P = p->P, R = p->R, Hd = p->Hd;                                                  \
    const int64_t nblk = Hd > 0 ? lk_cdiv(Hd, LK_PARSCALE_BLOCK) : 1;                              \
    const T *h = (const T *)p->h;                                                                  \
    T *y = (T *)p->y;                                                                              \
    int failed = 0;                                                                                \
    _Pragma("omp parallel num_threads(lk_parscale_threads(p->threads)) reduction(|:failed)")       \
    {                                                                                              \
        double *w = (double *)malloc(sizeof(double) * (size_t)P);                                  \
        T *wt = (T *)malloc(sizeof(T) * (size_t)P);                                                \
        int64_t lo, hi;                                                                            \
        lk_chunk(R * nblk, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);                 \
        if (!w || !wt) failed = 1;                                                                 \
        for (int64_t t = lo; t < hi && !failed; t++) {                                             \
            const int64_t r = t / nblk, blk = t % nblk, j0 = blk * LK_PARSCALE_BLOCK;              \
            const int64_t j1 = lk_min_i64(j0 + LK_PARSCALE_BLOCK, Hd);                             \
            WEIGHTS(p, r, w);                                                                      \
            for (int64_t s = 0; s < P; s++) wt[s] = (T)w[s];                                       \
            if (p->weights && blk == 0)                                                            \
                for (int64_t s = 0; s < P; s++) p->weights[r * P + s] = (float)w[s];               \
            const T *hr = h + r * Hd;                                                              \
            T *yr = y + r * Hd;                                                                    \
            if (SIMD) {                                                                            \
                lk_mix_row_simd((const float *)hr, (float *)yr, (const float *)wt, P, R * Hd, j0, j1); \
            } else {                                                                               \
                /* y[j] = sum_p w[p] h[p·R + r, j] */                                              \
                for (int64_t j = j0; j < j1; j++) {                                                \
                    T acc = 0;                                                                     \
                    for (int64_t s = 0; s < P; s++) acc += wt[s] * hr[s * R * Hd + j];             \
                    yr[j] = acc;                                                                   \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        free(w);                                                                                   \
        free(wt);                                                                                  \
    }                                                                                              \
    return failed ? LK_ERR_NOMEM : LK_OK;                                                          \
}

/* y[j] = sum_p w[p] h[p·stream + j] for j in [j0, j1): four vectors in flight, masked tail. */
static inline void lk_mix_row_simd(const float *hr, float *yr, const float *w, int64_t P, int64_t stream,
                                   int64_t j0, int64_t j1) {
    int64_t j = j0;
    for (; j + 4 * LK_VF <= j1; j += 4 * LK_VF) {
        lk_vf a0 = lk_vf_zero(), a1 = lk_vf_zero(), a2 = lk_vf_zero(), a3 = lk_vf_zero();
        for (int64_t s = 0; s < P; s++) {
            const float *hs = hr + s * stream + j;
            const lk_vf ws = lk_vf_set1(w[s]);
            a0 = lk_vf_fma(ws, lk_vf_load(hs), a0);
            a1 = lk_vf_fma(ws, lk_vf_load(hs + LK_VF), a1);
            a2 = lk_vf_fma(ws, lk_vf_load(hs + 2 * LK_VF), a2);
            a3 = lk_vf_fma(ws, lk_vf_load(hs + 3 * LK_VF), a3);
        }
        lk_vf_store(yr + j, a0);
        lk_vf_store(yr + j + LK_VF, a1);
        lk_vf_store(yr + j + 2 * LK_VF, a2);
        lk_vf_store(yr + j + 3 * LK_VF, a3);
    }
    for (; j < j1; j += LK_VF) {
        const int n = (int)lk_min_i64(LK_VF, j1 - j);
        lk_vf a = lk_vf_zero();
        for (int64_t s = 0; s < P; s++)
            a = lk_vf_fma(lk_vf_set1(w[s]), lk_vf_load_n(hr + s * stream + j, n), a);
        lk_vf_store_n(yr + j, a, n);
    }
}

LK_DEFINE_MIX(lk_mix_f32_simd, float, lk_mix_weights_f32, 1)
LK_DEFINE_MIX(lk_mix_f32_generic, float, lk_mix_weights_f32, 0)
LK_DEFINE_MIX(lk_mix_f64, double, lk_mix_weights_f64, 0)

lk_status lk_parscale_mix_cpu(const lk_parscale_mix_params *p) {
    if (p->P < 1 || p->R < 0 || p->Hd < 0 || !(p->smoothing >= 0.0 && p->smoothing <= 1.0)) return LK_ERR_VALUE;
    if (p->R == 0) return LK_OK;
    if (p->dtype == LK_F32) return lk_simd_enabled() ? lk_mix_f32_simd(p) : lk_mix_f32_generic(p);
    if (p->dtype == LK_F64) return lk_mix_f64(p);
    return LK_ERR_DTYPE;
}
