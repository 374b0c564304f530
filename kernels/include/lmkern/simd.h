/* The one place lmkern touches SIMD intrinsics (ggml's simd-mappings.h idea).
 *
 * lk_vf is a vector of LK_VF floats: AVX-512 (16), AVX2+FMA (8) or a portable GCC-vector
 * fallback (8).  Kernels use only the inline helpers below, never raw intrinsics, and keep a
 * scalar generic path beside every SIMD loop; lk_simd_enabled() == 0 forces the generic path
 * (lmkern._core._set_simd(False)) so tests can diff the two.
 *
 * Tails: lk_vf_load_n / lk_vf_store_n move the first n (< LK_VF) lanes and zero the rest. */
#ifndef LMKERN_SIMD_H
#define LMKERN_SIMD_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define LK_SIMD_NAME "AVX-512"
#define LK_VF 16
typedef __m512 lk_vf;
static inline lk_vf lk_vf_zero(void) { return _mm512_setzero_ps(); }
static inline lk_vf lk_vf_set1(float x) { return _mm512_set1_ps(x); }
static inline lk_vf lk_vf_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void lk_vf_store(float *p, lk_vf v) { _mm512_storeu_ps(p, v); }
static inline lk_vf lk_vf_load_n(const float *p, int n) {
    return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
}
static inline void lk_vf_store_n(float *p, lk_vf v, int n) {
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), v);
}
static inline lk_vf lk_vf_add(lk_vf a, lk_vf b) { return _mm512_add_ps(a, b); }
static inline lk_vf lk_vf_sub(lk_vf a, lk_vf b) { return _mm512_sub_ps(a, b); }
static inline lk_vf lk_vf_mul(lk_vf a, lk_vf b) { return _mm512_mul_ps(a, b); }
static inline lk_vf lk_vf_div(lk_vf a, lk_vf b) { return _mm512_div_ps(a, b); }
static inline lk_vf lk_vf_fma(lk_vf a, lk_vf b, lk_vf c) { return _mm512_fmadd_ps(a, b, c); } /* a*b+c */
static inline lk_vf lk_vf_max(lk_vf a, lk_vf b) { return _mm512_max_ps(a, b); }
static inline lk_vf lk_vf_min(lk_vf a, lk_vf b) { return _mm512_min_ps(a, b); }
static inline float lk_vf_sum(lk_vf v) { return _mm512_reduce_add_ps(v); }
static inline float lk_vf_hmax(lk_vf v) { return _mm512_reduce_max_ps(v); }
static inline lk_vf lk_vf_round(lk_vf v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* 2^n for integral-valued n in [-126, 127] */
static inline lk_vf lk_vf_pow2i(lk_vf n) {
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_castsi512_ps(e);
}
/* lanes where a < b get c, others keep v */
static inline lk_vf lk_vf_select_lt(lk_vf a, lk_vf b, lk_vf c, lk_vf v) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), v, c);
}
/* lanes where x is NaN get x, others y */
static inline lk_vf lk_vf_keep_nan(lk_vf x, lk_vf y) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), y, x);
}

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LK_SIMD_NAME "AVX2+FMA"
#define LK_VF 8
typedef __m256 lk_vf;
static inline __m256i lk__mask8(int n) {
    const int32_t idx[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_loadu_si256((const __m256i *)idx));
}
static inline lk_vf lk_vf_zero(void) { return _mm256_setzero_ps(); }
static inline lk_vf lk_vf_set1(float x) { return _mm256_set1_ps(x); }
static inline lk_vf lk_vf_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void lk_vf_store(float *p, lk_vf v) { _mm256_storeu_ps(p, v); }
static inline lk_vf lk_vf_load_n(const float *p, int n) { return _mm256_maskload_ps(p, lk__mask8(n)); }
static inline void lk_vf_store_n(float *p, lk_vf v, int n) { _mm256_maskstore_ps(p, lk__mask8(n), v); }
static inline lk_vf lk_vf_add(lk_vf a, lk_vf b) { return _mm256_add_ps(a, b); }
static inline lk_vf lk_vf_sub(lk_vf a, lk_vf b) { return _mm256_sub_ps(a, b); }
static inline lk_vf lk_vf_mul(lk_vf a, lk_vf b) { return _mm256_mul_ps(a, b); }
static inline lk_vf lk_vf_div(lk_vf a, lk_vf b) { return _mm256_div_ps(a, b); }
static inline lk_vf lk_vf_fma(lk_vf a, lk_vf b, lk_vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline lk_vf lk_vf_max(lk_vf a, lk_vf b) { return _mm256_max_ps(a, b); }
static inline lk_vf lk_vf_min(lk_vf a, lk_vf b) { return _mm256_min_ps(a, b); }
static inline float lk_vf_sum(lk_vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float lk_vf_hmax(lk_vf v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline lk_vf lk_vf_round(lk_vf v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline lk_vf lk_vf_pow2i(lk_vf n) {
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_castsi256_ps(e);
}
static inline lk_vf lk_vf_select_lt(lk_vf a, lk_vf b, lk_vf c, lk_vf v) {
    return _mm256_blendv_ps(v, c, _mm256_cmp_ps(a, b, _CMP_LT_OQ));
}
static inline lk_vf lk_vf_keep_nan(lk_vf x, lk_vf y) {
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

#else
#define LK_SIMD_NAME "generic"
#define LK_VF 8
typedef float lk_vf __attribute__((vector_size(32)));
typedef int32_t lk__vi __attribute__((vector_size(32)));
static inline lk_vf lk_vf_zero(void) { return (lk_vf){0}; }
static inline lk_vf lk_vf_set1(float x) { return (lk_vf){x, x, x, x, x, x, x, x}; }
static inline lk_vf lk_vf_load(const float *p) { lk_vf v; memcpy(&v, p, sizeof v); return v; }
static inline void lk_vf_store(float *p, lk_vf v) { memcpy(p, &v, sizeof v); }
static inline lk_vf lk_vf_load_n(const float *p, int n) { lk_vf v = {0}; for (int i = 0; i < n; i++) v[i] = p[i]; return v; }
static inline void lk_vf_store_n(float *p, lk_vf v, int n) { for (int i = 0; i < n; i++) p[i] = v[i]; }
static inline lk_vf lk_vf_add(lk_vf a, lk_vf b) { return a + b; }
static inline lk_vf lk_vf_sub(lk_vf a, lk_vf b) { return a - b; }
static inline lk_vf lk_vf_mul(lk_vf a, lk_vf b) { return a * b; }
static inline lk_vf lk_vf_div(lk_vf a, lk_vf b) { return a / b; }
static inline lk_vf lk_vf_fma(lk_vf a, lk_vf b, lk_vf c) { return a * b + c; }
static inline lk_vf lk_vf_max(lk_vf a, lk_vf b) { return a > b ? a : b; }
static inline lk_vf lk_vf_min(lk_vf a, lk_vf b) { return a < b ? a : b; }
static inline float lk_vf_sum(lk_vf v) { float s = 0; for (int i = 0; i < LK_VF; i++) s += v[i]; return s; }
static inline float lk_vf_hmax(lk_vf v) { float m = v[0]; for (int i = 1; i < LK_VF; i++) m = v[i] > m ? v[i] : m; return m; }
static inline lk_vf lk_vf_round(lk_vf v) { for (int i = 0; i < LK_VF; i++) v[i] = nearbyintf(v[i]); return v; }
static inline lk_vf lk_vf_pow2i(lk_vf n) {
    lk_vf r; for (int i = 0; i < LK_VF; i++) r[i] = ldexpf(1.0f, (int)n[i]); return r;
}
static inline lk_vf lk_vf_select_lt(lk_vf a, lk_vf b, lk_vf c, lk_vf v) { return a < b ? c : v; }
static inline lk_vf lk_vf_keep_nan(lk_vf x, lk_vf y) { return x != x ? x : y; }
#endif

/* e^x, |relative error| < 2e-7 on [-87.3, 88.7]; e^x = 0 below -87.3 (so exp(-inf) = 0) and
 * +inf above 88.7; NaN in, NaN out.  Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then a
 * degree-6 polynomial for e^r. */
static inline lk_vf lk_vf_exp(lk_vf x) {
    const lk_vf hi = lk_vf_set1(88.7228391f), lo = lk_vf_set1(-87.3365448f);
    lk_vf xc = lk_vf_min(lk_vf_max(x, lo), hi);
    lk_vf n = lk_vf_round(lk_vf_mul(xc, lk_vf_set1(1.44269504088896341f)));
    lk_vf r = lk_vf_fma(n, lk_vf_set1(-0.693359375f), xc);
    r = lk_vf_fma(n, lk_vf_set1(2.12194440e-4f), r);
    lk_vf p = lk_vf_set1(1.9875691500e-4f);
    p = lk_vf_fma(p, r, lk_vf_set1(1.3981999507e-3f));
    p = lk_vf_fma(p, r, lk_vf_set1(8.3334519073e-3f));
    p = lk_vf_fma(p, r, lk_vf_set1(4.1665795894e-2f));
    p = lk_vf_fma(p, r, lk_vf_set1(1.6666665459e-1f));
    p = lk_vf_fma(p, r, lk_vf_set1(5.0000001201e-1f));
    lk_vf r2 = lk_vf_mul(r, r);
    p = lk_vf_fma(p, r2, lk_vf_add(r, lk_vf_set1(1.0f)));
    /* n can reach 128 at the top of the range: split 2^n = 2^(n-1) * 2 to stay in range */
    lk_vf y = lk_vf_mul(lk_vf_mul(p, lk_vf_pow2i(lk_vf_sub(n, lk_vf_set1(1.0f)))), lk_vf_set1(2.0f));
    y = lk_vf_select_lt(x, lo, lk_vf_zero(), y);                      /* underflow (and -inf) -> 0 */
    y = lk_vf_select_lt(hi, x, lk_vf_set1(INFINITY), y);              /* overflow (and +inf) -> inf */
    return lk_vf_keep_nan(x, y); /* min/max may have dropped a NaN input: restore it */
}

/* Non-temporal (streaming) stores for bandwidth-bound kernels that write large outputs once
 * (lmkern.mor scatter): no read-for-ownership of the destination lines.  lk_vf_stream needs p
 * aligned to LK_VF_ALIGN bytes; lk_stream_fence() orders them before the kernel returns. */
#if defined(__AVX512F__)
#define LK_VF_ALIGN 64
static inline void lk_vf_stream(float *p, lk_vf v) { _mm512_stream_ps(p, v); }
static inline void lk_stream_fence(void) { _mm_sfence(); }
#elif defined(__AVX2__) && defined(__FMA__)
#define LK_VF_ALIGN 32
static inline void lk_vf_stream(float *p, lk_vf v) { _mm256_stream_ps(p, v); }
static inline void lk_stream_fence(void) { _mm_sfence(); }
#else
#define LK_VF_ALIGN 32
static inline void lk_vf_stream(float *p, lk_vf v) { lk_vf_store(p, v); }
static inline void lk_stream_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
#endif

/* Runtime switch between the SIMD and the generic path (tests diff the two). */
int lk_simd_enabled(void);
void lk_set_simd_enabled(int on);

#endif
