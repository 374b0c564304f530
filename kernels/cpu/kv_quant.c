/* KIVI asymmetric quantization (SPEC 4.1): per group lo = min, hi = max,
 *   scale = float32((hi - lo) / (2^bits - 1)),  zero = float32(lo),
 *   code  = clip(round_half_even((x - zero) / scale), 0, 2^bits - 1)   (0 when scale == 0 or NaN),
 *   x_hat = code * scale + zero   (in double, rounded once to the output dtype).
 * The quotient is taken in double from the stored float32 scale and zero, so |x - x_hat| <= scale / 2
 * up to the final rounding and the group minimum is reproduced exactly.  A NaN in a group makes its
 * lo, hi, scale and zero NaN (as NumPy's min/max) and its codes 0; it never crashes.
 * The NumPy twin (lmkern.reference.kv.quantize) performs the same IEEE operations, so codes match it
 * exactly.  Groups are split statically over threads. */
#include <math.h>
#include <omp.h>

#include "lmkern/kv.h"

static inline uint8_t lk_code(double x, double zero, double scale, double levels) {
    if (!(scale > 0)) return 0;
    const double v = (x - zero) / scale;
    if (!(v > 0)) return 0;                /* also NaN */
    return (uint8_t)(v < levels ? nearbyint(v) : levels);
}

/* lo/hi of the G values x[i * stride] -> the group's float32 scale and zero. */
#define LK_DEFINE_GROUP(NAME, real)                                                                  \
static inline void NAME(const real *x, int64_t stride, int64_t G, double levels, float *scale, float *zero) { \
    double lo = INFINITY, hi = -INFINITY;                                                         \
    int nan = 0;                                                                                  \
    for (int64_t i = 0; i < G; i++) {                                                             \
        const double v = (double)x[i * stride];                                                   \
        if (v != v) nan = 1;                                                                      \
        lo = v < lo ? v : lo;                                                                     \
        hi = v > hi ? v : hi;                                                                     \
    }                                                                                             \
    if (nan) lo = hi = NAN;                                                                       \
    *scale = (float)((hi - lo) / levels);                                                         \
    *zero = (float)lo;                                                                            \
}
LK_DEFINE_GROUP(group_f32, float)
LK_DEFINE_GROUP(group_f64, double)

/* Packs the per codes of x[i * stride], i < per, LSB-first into one byte. */
#define LK_DEFINE_PACK(NAME, real)                                                                   \
static inline uint8_t NAME(const real *x, int64_t stride, int per, int bits, double zero, double scale, double levels) { \
    uint8_t byte = 0;                                                                             \
    for (int k = 0; k < per; k++) byte |= (uint8_t)(lk_code((double)x[k * stride], zero, scale, levels) << (bits * k)); \
    return byte;                                                                                  \
}
LK_DEFINE_PACK(pack_f32, float)
LK_DEFINE_PACK(pack_f64, double)

/* tasks: token axis -> one task per (b, t, h) row of D features; channel axis -> one task per
 * (b, token group, h, d). */
#define LK_DEFINE_QUANTIZE(NAME, GROUP, PACK, real)                                                  \
static void NAME(const lk_kv_quant_params *p) {                                                   \
    const int64_t B = p->B, T_ = p->T, H = p->H, D = p->D, G = p->G;                              \
    const int bits = p->bits, per = 8 / bits;                                                     \
    const double levels = (double)((1 << bits) - 1);                                              \
    const int64_t tasks = p->channel ? B * (T_ / G) * H * D : B * T_ * H;                         \
    const int team_ = lk_team_for(B * T_ * H * D * (int64_t)sizeof(real) * 2);                    \
    _Pragma("omp parallel num_threads(team_)")                                                    \
    {                                                                                             \
        int64_t lo, hi;                                                                           \
        lk_chunk(tasks, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);                   \
        for (int64_t t = lo; t < hi; t++) {                                                       \
            float s, z;                                                                           \
            if (!p->channel) {                                                                    \
                const real *x = (const real *)p->x + t * D;                                             \
                uint8_t *c = p->codes + t * (D / per);                                            \
                for (int64_t g = 0; g < D / G; g++) {                                             \
                    GROUP(x + g * G, 1, G, levels, &s, &z);                                       \
                    p->scale[t * (D / G) + g] = s;                                                \
                    p->zero[t * (D / G) + g] = z;                                                 \
                    for (int64_t i = g * G; i < (g + 1) * G; i += per)                            \
                        c[i / per] = PACK(x + i, 1, per, bits, z, s, levels);                     \
                }                                                                                 \
            } else {                                                                              \
                const int64_t d = t % D, h = (t / D) % H, tg = (t / (D * H)) % (T_ / G), b = t / (D * H * (T_ / G)); \
                const real *x = (const real *)p->x + ((b * T_ + tg * G) * H + h) * D + d;               \
                GROUP(x, H * D, G, levels, &s, &z);                                               \
                p->scale[((b * (T_ / G) + tg) * H + h) * D + d] = s;                              \
                p->zero[((b * (T_ / G) + tg) * H + h) * D + d] = z;                               \
                for (int64_t i = 0; i < G; i += per)                                              \
                    p->codes[((b * (T_ / per) + (tg * G + i) / per) * H + h) * D + d] =           \
                        PACK(x + i * H * D, H * D, per, bits, z, s, levels);                      \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
}
LK_DEFINE_QUANTIZE(quantize_f32, group_f32, pack_f32, float)
LK_DEFINE_QUANTIZE(quantize_f64, group_f64, pack_f64, double)

lk_status lk_kv_quantize_cpu(const lk_kv_quant_params *p) {
    if (p->bits != 2 && p->bits != 4 && p->bits != 8) return LK_ERR_VALUE;
    if (p->G < 1 || p->G % (8 / p->bits)) return LK_ERR_VALUE;
    if ((p->channel ? p->T : p->D) % p->G) return LK_ERR_VALUE;
    if (p->B == 0 || p->T == 0 || p->H == 0 || p->D == 0) return LK_OK;
    if (p->dtype == LK_F32) quantize_f32(p);
    else if (p->dtype == LK_F64) quantize_f64(p);
    else return LK_ERR_DTYPE;
    return LK_OK;
}

/* x_hat[e] = code * scale + zero over all elements e; one task per element row of D. */
#define LK_DEFINE_DEQUANTIZE(NAME, real)                                                             \
static void NAME(const lk_kv_quant_params *p) {                                                   \
    const int64_t B = p->B, T_ = p->T, H = p->H, D = p->D, G = p->G;                              \
    const int bits = p->bits, per = 8 / bits, mask = (1 << bits) - 1;                             \
    const int64_t rows = B * T_ * H;                                                              \
    const int team_ = lk_team_for(B * T_ * H * D * (int64_t)sizeof(real) * 2);                    \
    _Pragma("omp parallel num_threads(team_)")                                                    \
    {                                                                                             \
        int64_t lo, hi;                                                                           \
        lk_chunk(rows, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);                    \
        for (int64_t r = lo; r < hi; r++) {                                                       \
            real *x = (real *)p->x + r * D;                                                             \
            if (!p->channel) {                                                                    \
                const uint8_t *c = p->codes + r * (D / per);                                      \
                const float *s = p->scale + r * (D / G), *z = p->zero + r * (D / G);              \
                for (int64_t d = 0; d < D; d++) {                                                 \
                    const int code = (c[d / per] >> (bits * (d % per))) & mask;                   \
                    x[d] = (real)((double)code * (double)s[d / G] + (double)z[d / G]);               \
                }                                                                                 \
            } else {                                                                              \
                const int64_t h = r % H, t = (r / H) % T_, b = r / (H * T_);                      \
                const uint8_t *c = p->codes + ((b * (T_ / per) + t / per) * H + h) * D;           \
                const int64_t srow = ((b * (T_ / G) + t / G) * H + h) * D;                        \
                const int shift = bits * (int)(t % per);                                          \
                for (int64_t d = 0; d < D; d++) {                                                 \
                    const int code = (c[d] >> shift) & mask;                                      \
                    x[d] = (real)((double)code * (double)p->scale[srow + d] + (double)p->zero[srow + d]); \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
}
LK_DEFINE_DEQUANTIZE(dequantize_f32, float)
LK_DEFINE_DEQUANTIZE(dequantize_f64, double)

lk_status lk_kv_dequantize_cpu(const lk_kv_quant_params *p) {
    if (p->bits != 2 && p->bits != 4 && p->bits != 8) return LK_ERR_VALUE;
    if (p->G < 1 || p->G % (8 / p->bits)) return LK_ERR_VALUE;
    if ((p->channel ? p->T : p->D) % p->G) return LK_ERR_VALUE;
    if (p->B == 0 || p->T == 0 || p->H == 0 || p->D == 0) return LK_OK;
    if (p->dtype == LK_F32) dequantize_f32(p);
    else if (p->dtype == LK_F64) dequantize_f64(p);
    else return LK_ERR_DTYPE;
    return LK_OK;
}
