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
#define LK_VREGS 32 /* vector registers: register tiles (accumulators + operands) are sized to fit */
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
/* out[0..3] = horizontal sums of a, b, c, d (one transposing reduction instead of four) */
static inline void lk_vf_sum4(lk_vf a, lk_vf b, lk_vf c, lk_vf d, float *out) {
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    /* 128-bit lanes: [a, b, c, d] partials of 4 floats each */
    __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));
    t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));
    const __m512 r = _mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), t);
    _mm_storeu_ps(out, _mm512_castps512_ps128(r));
}
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
/* LK_VF unsigned codes of `bits` (2, 4 or 8) bits packed LSB-first from p, as floats.  Reads
 * LK_VF * bits / 8 bytes.  Call with a constant `bits` so the branches fold.  2 and 4 bits: the word is
 * broadcast (from memory), shifted per lane, and the low 4 bits of each lane index a 16-float table
 * (vpermps), which masks and converts in one instruction. */
static inline lk_vf lk_vf_codes(const uint8_t *p, int bits) {
    if (bits == 8) return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
    if (bits == 2) {
        int32_t u; memcpy(&u, p, 4);
        const __m512i w = _mm512_srlv_epi32(_mm512_set1_epi32(u),
                              _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30));
        return _mm512_permutexvar_ps(w, _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3));
    }
    const __m512i lohi = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                                  _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)p)));
    const __m512i w = _mm512_srlv_epi32(lohi, _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28));
    return _mm512_permutexvar_ps(w, _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LK_SIMD_NAME "AVX2+FMA"
#define LK_VF 8
#define LK_VREGS 16
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
/* 2 and 4 bits: shift per lane, mask, convert.  A vpermps table lookup, which masks and converts in one
 * instruction as the AVX-512 path does, was slower on Zen 3: 1.15 against 0.77 ns per 16 codes decoded
 * and FMA'd in a micro-benchmark. */
static inline lk_vf lk_vf_codes(const uint8_t *p, int bits) {
    if (bits == 8) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    uint32_t u = 0;
    memcpy(&u, p, bits == 2 ? 2 : 4);
    const __m256i sh = bits == 2 ? _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14) : _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)u), sh),
                                               _mm256_set1_epi32((1 << bits) - 1)));
}
/* 2 LK_VF codes from p as two vectors.  2 bits: the one 32-bit word holding both halves is broadcast
 * once, where two lk_vf_codes calls would each move a 16-bit half in through a general register; 4 and 8
 * bits are whole words per half already, so they are two lk_vf_codes calls. */
#define LK_HAVE_CODES2
static inline void lk_vf_codes2(const uint8_t *p, int bits, lk_vf *lo, lk_vf *hi) {
    if (bits != 2) {
        *lo = lk_vf_codes(p, bits);
        *hi = lk_vf_codes(p + LK_VF * bits / 8, bits);
        return;
    }
    int32_t u;
    memcpy(&u, p, 4);
    const __m256i w = _mm256_set1_epi32(u), m = _mm256_set1_epi32(3);
    *lo = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(w, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)), m));
    *hi = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(w, _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30)), m));
}

/* 2-bit codes of 2 LK_VF tokens from one 32-bit word with lane k of both vectors scaled by 4^k: each code
 * is masked in place (word & (3 << 2k)) and converted, with no per-lane shift; the high half is the word
 * shifted right by 16 once: 6 instructions for 16 codes instead of 8.  A sum of such vectors times
 * anything (FMAs) is exactly 4^k times the sum over the plain codes (a power of two commutes with
 * rounding, short of overflow past 2e34), so a kernel multiplies its accumulators by
 * lk_vf_codes2_unscale() (4^-k) once at the end, or by lk_vf_codes2_scale() (4^k) on loading
 * accumulators it adds to: the results are the same bits. */
#define LK_HAVE_CODES2_SCALED
static inline void lk_vf_codes2_scaled(const uint8_t *p, lk_vf *lo, lk_vf *hi) {
    int32_t u;
    memcpy(&u, p, 4);
    const __m256i w = _mm256_set1_epi32(u);
    const __m256i m = _mm256_setr_epi32(3, 3 << 2, 3 << 4, 3 << 6, 3 << 8, 3 << 10, 3 << 12, 3 << 14);
    *lo = _mm256_cvtepi32_ps(_mm256_and_si256(w, m));
    *hi = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w, 16), m));
}
static inline lk_vf lk_vf_codes2_scale(void) { return _mm256_setr_ps(1, 4, 16, 64, 256, 1024, 4096, 16384); }
static inline lk_vf lk_vf_codes2_unscale(void) {
    return _mm256_setr_ps(1, 0.25f, 0.0625f, 0.015625f, 0.00390625f, 0.0009765625f, 0.000244140625f, 0.00006103515625f);
}

#else
#define LK_SIMD_NAME "generic"
#define LK_VF 8
#define LK_VREGS 16
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
/* NAME(m, a, b): lanes of m that are all ones take a, the others b (C has no ?: on vectors; comparisons
 * give masks); V the vector type, M the integer vector of its lane width.  Also used for lk_vd below. */
#define LK__DEFINE_VSEL(NAME, V, M)                                                               \
static inline V NAME(M m, V a, V b) {                                                             \
    M ai, bi;                                                                                     \
    memcpy(&ai, &a, sizeof a);                                                                    \
    memcpy(&bi, &b, sizeof b);                                                                    \
    M r = (ai & m) | (bi & ~m);                                                                   \
    V out;                                                                                        \
    memcpy(&out, &r, sizeof out);                                                                 \
    return out;                                                                                   \
}
LK__DEFINE_VSEL(lk__vsel, lk_vf, lk__vi)
static inline lk_vf lk_vf_max(lk_vf a, lk_vf b) { return lk__vsel(a > b, a, b); }
static inline lk_vf lk_vf_min(lk_vf a, lk_vf b) { return lk__vsel(a < b, a, b); }
static inline float lk_vf_sum(lk_vf v) { float s = 0; for (int i = 0; i < LK_VF; i++) s += v[i]; return s; }
static inline float lk_vf_hmax(lk_vf v) { float m = v[0]; for (int i = 1; i < LK_VF; i++) m = v[i] > m ? v[i] : m; return m; }
static inline lk_vf lk_vf_round(lk_vf v) { for (int i = 0; i < LK_VF; i++) v[i] = nearbyintf(v[i]); return v; }
static inline lk_vf lk_vf_pow2i(lk_vf n) {
    lk_vf r; for (int i = 0; i < LK_VF; i++) r[i] = ldexpf(1.0f, (int)n[i]); return r;
}
static inline lk_vf lk_vf_select_lt(lk_vf a, lk_vf b, lk_vf c, lk_vf v) { return lk__vsel(a < b, c, v); }
static inline lk_vf lk_vf_keep_nan(lk_vf x, lk_vf y) { return lk__vsel(x != x, x, y); }
static inline lk_vf lk_vf_codes(const uint8_t *p, int bits) {
    lk_vf v; const int per = 8 / bits, mask = (1 << bits) - 1;
    for (int i = 0; i < LK_VF; i++) v[i] = (float)((p[i / per] >> (bits * (i % per))) & mask);
    return v;
}
#endif

#ifndef LK_HAVE_CODES2
/* 2 LK_VF codes from p as two vectors (lk_vf_codes twice; AVX2 has its own) */
static inline void lk_vf_codes2(const uint8_t *p, int bits, lk_vf *lo, lk_vf *hi) {
    *lo = lk_vf_codes(p, bits);
    *hi = lk_vf_codes(p + LK_VF * bits / 8, bits);
}
#endif

#ifndef LK_HAVE_CODES2_SCALED
/* the plain codes (lk_vf_codes2 at 2 bits), and scale factors of 1 */
static inline void lk_vf_codes2_scaled(const uint8_t *p, lk_vf *lo, lk_vf *hi) { lk_vf_codes2(p, 2, lo, hi); }
static inline lk_vf lk_vf_codes2_scale(void) { return lk_vf_set1(1.0f); }
static inline lk_vf lk_vf_codes2_unscale(void) { return lk_vf_set1(1.0f); }
#endif

#if !defined(__AVX512F__)
/* out[0..3] = horizontal sums of a, b, c, d */
static inline void lk_vf_sum4(lk_vf a, lk_vf b, lk_vf c, lk_vf d, float *out) {
    out[0] = lk_vf_sum(a); out[1] = lk_vf_sum(b); out[2] = lk_vf_sum(c); out[3] = lk_vf_sum(d);
}
#endif

/* The shared core of lk_vf_exp for x in range: x = n ln2 + r (Cody-Waite, |r| <= ln2/2), returns
 * the degree-6 polynomial p ~ e^r and n, so that e^x = p * 2^n. */
static inline lk_vf lk__exp_reduced(lk_vf xc, lk_vf *n_out) {
    const lk_vf n = lk_vf_round(lk_vf_mul(xc, lk_vf_set1(1.44269504088896341f)));
    lk_vf r = lk_vf_fma(n, lk_vf_set1(-0.693359375f), xc);
    r = lk_vf_fma(n, lk_vf_set1(2.12194440e-4f), r);
    lk_vf p = lk_vf_set1(1.9875691500e-4f);
    p = lk_vf_fma(p, r, lk_vf_set1(1.3981999507e-3f));
    p = lk_vf_fma(p, r, lk_vf_set1(8.3334519073e-3f));
    p = lk_vf_fma(p, r, lk_vf_set1(4.1665795894e-2f));
    p = lk_vf_fma(p, r, lk_vf_set1(1.6666665459e-1f));
    p = lk_vf_fma(p, r, lk_vf_set1(5.0000001201e-1f));
    *n_out = n;
    return lk_vf_fma(p, lk_vf_mul(r, r), lk_vf_add(r, lk_vf_set1(1.0f)));
}

/* e^x, |relative error| < 2e-7 on [-87.3, 88.7]; e^x = 0 below -87.3 (so exp(-inf) = 0) and
 * +inf above 88.7; NaN in, NaN out.  Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then a
 * degree-6 polynomial for e^r. */
#if defined(__AVX512F__)
static inline lk_vf lk_vf_exp(lk_vf x) {
    /* AVX-512: the same reduction and polynomial; 2^n by scalef (exact, overflows to inf by itself),
     * NaN carried through by putting x second in min (which returns its second operand when either
     * is NaN).  Underflowing lanes (masked scores are -inf) are computed at x = 0 and zeroed at the
     * end: clamping them to the bottom of the range would make scalef produce subnormals, and each
     * subnormal costs a microcode assist (~20x slower). */
    const lk_vf hi = lk_vf_set1(88.7228391f), lo = lk_vf_set1(-87.3365448f);
    const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    const lk_vf xc = _mm512_min_ps(hi, _mm512_mask_blend_ps(under, x, lk_vf_zero()));
    lk_vf n;
    const lk_vf p = lk__exp_reduced(xc, &n);
    return _mm512_mask_blend_ps(under, _mm512_scalef_ps(p, n), lk_vf_zero()); /* underflow, -inf -> 0 */
}
#else
static inline lk_vf lk_vf_exp(lk_vf x) {
    const lk_vf hi = lk_vf_set1(88.7228391f), lo = lk_vf_set1(-87.3365448f);
    lk_vf xc = lk_vf_min(lk_vf_max(x, lo), hi);
    lk_vf n;
    const lk_vf p = lk__exp_reduced(xc, &n);
    /* n can reach 128 at the top of the range: split 2^n = 2^(n-1) * 2 to stay in range */
    lk_vf y = lk_vf_mul(lk_vf_mul(p, lk_vf_pow2i(lk_vf_sub(n, lk_vf_set1(1.0f)))), lk_vf_set1(2.0f));
    y = lk_vf_select_lt(x, lo, lk_vf_zero(), y);                      /* underflow (and -inf) -> 0 */
    y = lk_vf_select_lt(hi, x, lk_vf_set1(INFINITY), y);              /* overflow (and +inf) -> inf */
    return lk_vf_keep_nan(x, y); /* min/max may have dropped a NaN input: restore it */
}
#endif

/* e^x for softmax arguments: x <= 88 (in practice s - max <= 0), -inf (-> 0) or NaN (-> NaN); the
 * result equals lk_vf_exp's on that range (bar 2^-126 <= e^x < 2^-125, normal here, 0 there).  Without
 * AVX-512 it drops what that range cannot need: the overflow clamp and select, the 2^(n-1) * 2 split,
 * and the NaN restore (max(lo, x) returns x when x is NaN, so NaN runs through the polynomial): 7 of
 * lk_vf_exp's 27 instructions. */
#if defined(__AVX512F__)
static inline lk_vf lk_vf_exp_softmax(lk_vf x) { return lk_vf_exp(x); }
#elif defined(__AVX2__) && defined(__FMA__)
static inline lk_vf lk_vf_exp_softmax(lk_vf x) {
    const lk_vf lo = lk_vf_set1(-87.3365448f);
    lk_vf n;
    const lk_vf p = lk__exp_reduced(_mm256_max_ps(lo, x), &n);
    const lk_vf y = lk_vf_mul(p, lk_vf_pow2i(n));
    return _mm256_and_ps(y, _mm256_cmp_ps(x, lo, _CMP_NLT_UQ)); /* below the range (and -inf) -> 0 */
}
#else
static inline lk_vf lk_vf_exp_softmax(lk_vf x) { return lk_vf_exp(x); }
#endif

/* Software prefetch of [p, p + bytes) into L2 (prefetcht1: a hint; portable GCC builtin, no ISA branch;
 * L2 rather than L1 so that prefetching several streams ahead does not evict the working set).
 * Kernels that walk several streams at once (e.g. the quantized KV cache: codes, scales, zeros of
 * keys and values) prefetch a few blocks ahead, since the hardware streamers stop at page edges. */
static inline void lk_prefetch(const void *p, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch((const char *)p + off, 0, 2);
}

/* A software prefetch spread over a kernel's work: up to 4 byte ranges (the streams of a block ahead) are
 * queued with lk_pf_add, and each lk_pf_step issues the next few cache lines.  On a Zen 3 guest,
 * tpa.decode with a burst of prefetches per block (768 lines) ran 4-10% slower than with none, and with
 * the same lines spread over the block's value fold 8-11% faster (one thread, a 24 MiB cache): a burst
 * presumably overflows the core's miss buffers, which drop prefetches rather than wait. */
typedef struct {
    const char *p[4];
    int64_t left[4];   /* bytes still to prefetch in each range */
    int n, cur;
} lk_prefetcher;

static inline void lk_pf_reset(lk_prefetcher *pf) { pf->n = 0; pf->cur = 0; }
static inline void lk_pf_add(lk_prefetcher *pf, const void *p, int64_t bytes) {
    if (pf->n < 4 && bytes > 0) { pf->p[pf->n] = (const char *)p; pf->left[pf->n] = bytes; pf->n++; }
}
static inline int64_t lk_pf_lines(const lk_prefetcher *pf) {
    int64_t lines = 0;
    for (int i = pf->cur; i < pf->n; i++) lines += (pf->left[i] + 63) / 64;
    return lines;
}
static inline void lk_pf_step(lk_prefetcher *pf, int64_t lines) {
    while (lines > 0 && pf->cur < pf->n) {
        const int i = pf->cur;
        __builtin_prefetch(pf->p[i], 0, 2);
        pf->p[i] += 64;
        pf->left[i] -= 64;
        lines--;
        if (pf->left[i] <= 0) pf->cur++;
    }
}

/* Whether a kernel that streams `bytes` of data per call should prefetch the blocks ahead in software.
 * Measured on tpa.decode (spread prefetch, lk_prefetcher):
 *   - AMD Zen 3 guest: +8-11% on one thread and +4-5% on two at 24 MiB (the data comes from DRAM), but
 *     -5-15% at 1.5-6 MiB, where the data sits in the caches and the prefetches are pure overhead;
 *   - AMD Zen 5 guest (a burst per block, stop 10): +15% at 24 MiB;
 *   - Intel Emerald Rapids guest: -13-17% (each prefetch instruction costs several cycles there, and the
 *     streamers keep up without it).
 * So: not on Intel, and elsewhere only for streams of LK_PF_MIN_BYTES or more. */
#define LK_PF_MIN_BYTES (8LL << 20)
static inline int lk_prefetch_pays(int64_t bytes) {
    if (bytes < LK_PF_MIN_BYTES) return 0;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    return !__builtin_cpu_is("intel");
#else
    return 1;
#endif
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

/* (a | b) = x0 x1 x2 ... x(2 LK_VF - 1): *even = x0 x2 x4 ..., *odd = x1 x3 x5 ... (splits the pairs of
 * a rank-2 factor stored head-major, e.g. TPA's ak (..., H, 2), into rank-major head lanes). */
#if defined(__AVX512F__)
static inline void lk_vf_deinterleave2(lk_vf a, lk_vf b, lk_vf *even, lk_vf *odd) {
    const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    *even = _mm512_permutex2var_ps(a, ie, b);
    *odd = _mm512_permutex2var_ps(a, io, b);
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline void lk_vf_deinterleave2(lk_vf a, lk_vf b, lk_vf *even, lk_vf *odd) {
    /* within 128-bit halves: a0 a2 b0 b2 | a4 a6 b4 b6, then 64-bit chunks reordered 0 2 1 3 */
    const __m256 e = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    const __m256 o = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
    *even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0)));
    *odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), _MM_SHUFFLE(3, 1, 2, 0)));
}
#else
static inline void lk_vf_deinterleave2(lk_vf a, lk_vf b, lk_vf *even, lk_vf *odd) {
    float x[2 * LK_VF], e[LK_VF], o[LK_VF];
    memcpy(x, &a, sizeof a);
    memcpy(x + LK_VF, &b, sizeof b);
    for (int i = 0; i < LK_VF; i++) { e[i] = x[2 * i]; o[i] = x[2 * i + 1]; }
    memcpy(even, e, sizeof e);
    memcpy(odd, o, sizeof o);
}
#endif

/* dst[c * ds + r] = src[r * ss + c] for r < rows, c < cols: the transposing pack of key tiles (attention,
 * attention_mass).  With AVX-512, 16 x 16 blocks go through registers (64 shuffles per block instead of
 * 256 scalar loads and stores); edges, and other ISAs, copy element by element.  A pure copy, so the
 * SIMD and generic paths give identical results. */
#if defined(__AVX512F__)
static inline void lk__transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {            /* pairs of rows interleaved per 32-bit element */
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {            /* then per 64-bit pair: 4 x 4 blocks in each 128-bit lane */
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int i = 0; i < 2; i++)              /* then the 128-bit lanes, twice */
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
            t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    }
}
#endif

static inline void lk_transpose(const float *src, int64_t ss, int64_t rows, int64_t cols, float *dst, int64_t ds) {
    int64_t r0 = 0;
#if defined(__AVX512F__)
    for (; r0 + 16 <= rows; r0 += 16) {
        int64_t c0 = 0;
        for (; c0 + 16 <= cols; c0 += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + (r0 + i) * ss + c0);
            lk__transpose16(r);
            for (int i = 0; i < 16; i++) _mm512_storeu_ps(dst + (c0 + i) * ds + r0, r[i]);
        }
        for (; c0 < cols; c0++)
            for (int64_t r = r0; r < r0 + 16; r++) dst[c0 * ds + r] = src[r * ss + c0];
    }
#endif
    for (int64_t r = r0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) dst[c * ds + r] = src[r * ss + c];
}

/* ---------------------------------------------------------------------------------------------- */
/* lk_vd: a vector of LK_VD doubles (AVX-512 8, AVX2 4, the GCC-vector fallback 4), for the float64
 * SIMD kernels (float64 is what NumPy makes by default).  The same small set of helpers as lk_vf, with
 * the same semantics; kernels reach both through simd_real.h. */
#if defined(__AVX512F__)
#define LK_VD 8
typedef __m512d lk_vd;
static inline lk_vd lk_vd_zero(void) { return _mm512_setzero_pd(); }
static inline lk_vd lk_vd_set1(double x) { return _mm512_set1_pd(x); }
static inline lk_vd lk_vd_load(const double *p) { return _mm512_loadu_pd(p); }
static inline void lk_vd_store(double *p, lk_vd v) { _mm512_storeu_pd(p, v); }
static inline lk_vd lk_vd_load_n(const double *p, int n) { return _mm512_maskz_loadu_pd((__mmask8)((1u << n) - 1u), p); }
static inline void lk_vd_store_n(double *p, lk_vd v, int n) { _mm512_mask_storeu_pd(p, (__mmask8)((1u << n) - 1u), v); }
static inline lk_vd lk_vd_add(lk_vd a, lk_vd b) { return _mm512_add_pd(a, b); }
static inline lk_vd lk_vd_sub(lk_vd a, lk_vd b) { return _mm512_sub_pd(a, b); }
static inline lk_vd lk_vd_mul(lk_vd a, lk_vd b) { return _mm512_mul_pd(a, b); }
static inline lk_vd lk_vd_fma(lk_vd a, lk_vd b, lk_vd c) { return _mm512_fmadd_pd(a, b, c); }
static inline lk_vd lk_vd_max(lk_vd a, lk_vd b) { return _mm512_max_pd(a, b); }
static inline double lk_vd_sum(lk_vd v) { return _mm512_reduce_add_pd(v); }
static inline double lk_vd_hmax(lk_vd v) { return _mm512_reduce_max_pd(v); }
static inline lk_vd lk_vd_select_lt(lk_vd a, lk_vd b, lk_vd c, lk_vd v) {
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(a, b, _CMP_LT_OQ), v, c);
}
#elif defined(__AVX2__) && defined(__FMA__)
#define LK_VD 4
typedef __m256d lk_vd;
static inline __m256i lk__mask4(int n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}
static inline lk_vd lk_vd_zero(void) { return _mm256_setzero_pd(); }
static inline lk_vd lk_vd_set1(double x) { return _mm256_set1_pd(x); }
static inline lk_vd lk_vd_load(const double *p) { return _mm256_loadu_pd(p); }
static inline void lk_vd_store(double *p, lk_vd v) { _mm256_storeu_pd(p, v); }
static inline lk_vd lk_vd_load_n(const double *p, int n) { return _mm256_maskload_pd(p, lk__mask4(n)); }
static inline void lk_vd_store_n(double *p, lk_vd v, int n) { _mm256_maskstore_pd(p, lk__mask4(n), v); }
static inline lk_vd lk_vd_add(lk_vd a, lk_vd b) { return _mm256_add_pd(a, b); }
static inline lk_vd lk_vd_sub(lk_vd a, lk_vd b) { return _mm256_sub_pd(a, b); }
static inline lk_vd lk_vd_mul(lk_vd a, lk_vd b) { return _mm256_mul_pd(a, b); }
static inline lk_vd lk_vd_fma(lk_vd a, lk_vd b, lk_vd c) { return _mm256_fmadd_pd(a, b, c); }
static inline lk_vd lk_vd_max(lk_vd a, lk_vd b) { return _mm256_max_pd(a, b); }
static inline double lk_vd_sum(lk_vd v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
static inline double lk_vd_hmax(lk_vd v) {
    __m128d s = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_max_sd(s, _mm_unpackhi_pd(s, s)));
}
static inline lk_vd lk_vd_select_lt(lk_vd a, lk_vd b, lk_vd c, lk_vd v) {
    return _mm256_blendv_pd(v, c, _mm256_cmp_pd(a, b, _CMP_LT_OQ));
}
/* out[0..3] = horizontal sums of a, b, c, d */
#define LK_HAVE_VD_SUM4
static inline void lk_vd_sum4(lk_vd a, lk_vd b, lk_vd c, lk_vd d, double *out) {
    const __m256d ab = _mm256_hadd_pd(a, b), cd = _mm256_hadd_pd(c, d); /* a01 b01 a23 b23 | c.. d.. */
    _mm256_storeu_pd(out, _mm256_add_pd(_mm256_permute2f128_pd(ab, cd, 0x20), _mm256_permute2f128_pd(ab, cd, 0x31)));
}
#else
#define LK_VD 4
typedef double lk_vd __attribute__((vector_size(32)));
typedef int64_t lk__vl __attribute__((vector_size(32)));
static inline lk_vd lk_vd_zero(void) { return (lk_vd){0}; }
static inline lk_vd lk_vd_set1(double x) { return (lk_vd){x, x, x, x}; }
static inline lk_vd lk_vd_load(const double *p) { lk_vd v; memcpy(&v, p, sizeof v); return v; }
static inline void lk_vd_store(double *p, lk_vd v) { memcpy(p, &v, sizeof v); }
static inline lk_vd lk_vd_load_n(const double *p, int n) { lk_vd v = {0}; for (int i = 0; i < n; i++) v[i] = p[i]; return v; }
static inline void lk_vd_store_n(double *p, lk_vd v, int n) { for (int i = 0; i < n; i++) p[i] = v[i]; }
static inline lk_vd lk_vd_add(lk_vd a, lk_vd b) { return a + b; }
static inline lk_vd lk_vd_sub(lk_vd a, lk_vd b) { return a - b; }
static inline lk_vd lk_vd_mul(lk_vd a, lk_vd b) { return a * b; }
static inline lk_vd lk_vd_fma(lk_vd a, lk_vd b, lk_vd c) { return a * b + c; }
LK__DEFINE_VSEL(lk__vseld, lk_vd, lk__vl)
/* as maxpd: the second operand when either is NaN */
static inline lk_vd lk_vd_max(lk_vd a, lk_vd b) { return lk__vseld(a > b, a, b); }
static inline double lk_vd_sum(lk_vd v) { double s = 0; for (int i = 0; i < LK_VD; i++) s += v[i]; return s; }
static inline double lk_vd_hmax(lk_vd v) { double m = v[0]; for (int i = 1; i < LK_VD; i++) m = v[i] > m ? v[i] : m; return m; }
static inline lk_vd lk_vd_select_lt(lk_vd a, lk_vd b, lk_vd c, lk_vd v) { return lk__vseld(a < b, c, v); }
#endif

#ifndef LK_HAVE_VD_SUM4
static inline void lk_vd_sum4(lk_vd a, lk_vd b, lk_vd c, lk_vd d, double *out) {
    out[0] = lk_vd_sum(a); out[1] = lk_vd_sum(b); out[2] = lk_vd_sum(c); out[3] = lk_vd_sum(d);
}
#endif

/* e^x in double precision for softmax arguments: x <= 709 (in practice s - max <= 0), -inf (-> 0) or NaN
 * (-> NaN); x below -708.39 (where e^x leaves the normal range) gives 0.  Cody-Waite reduction
 * x = n ln2 + r (ln2 split in two, the high part exact for |n| < 2^11), |r| <= ln2/2, then the Taylor
 * polynomial of e^r to degree 13 (truncation < 5e-18 relative), then 2^n by exponent arithmetic:
 * within ~2 ulp of exp() over the range (tests compare with NumPy at 1e-12). */
#define LK__EXPD_LO (-708.3964185322641)
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
static inline lk_vd lk__expd_poly(lk_vd xc, lk_vd *n_out) {
    const lk_vd n = lk_vd_mul(xc, lk_vd_set1(1.4426950408889634));
#if defined(__AVX512F__)
    const lk_vd nr = _mm512_roundscale_pd(n, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    const lk_vd nr = _mm256_round_pd(n, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
    lk_vd r = lk_vd_fma(nr, lk_vd_set1(-6.93147180369123816490e-01), xc);
    r = lk_vd_fma(nr, lk_vd_set1(-1.90821492927058770002e-10), r);
    static const double c[14] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                                 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0,
                                 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0};
    lk_vd p = lk_vd_set1(c[0]);
    for (int i = 1; i < 14; i++) p = lk_vd_fma(p, r, lk_vd_set1(c[i]));
    *n_out = nr;
    return p;
}
#endif
#if defined(__AVX512F__)
static inline lk_vd lk_vd_exp_softmax(lk_vd x) {
    const __mmask8 under = _mm512_cmp_pd_mask(x, lk_vd_set1(LK__EXPD_LO), _CMP_LT_OQ);
    lk_vd n;
    const lk_vd p = lk__expd_poly(_mm512_mask_blend_pd(under, x, lk_vd_zero()), &n);
    return _mm512_mask_blend_pd(under, _mm512_scalef_pd(p, n), lk_vd_zero());
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline lk_vd lk_vd_exp_softmax(lk_vd x) {
    const lk_vd lo = lk_vd_set1(LK__EXPD_LO);
    lk_vd n;
    const lk_vd p = lk__expd_poly(_mm256_max_pd(lo, x), &n); /* max(lo, NaN) is NaN: it runs through */
    const __m256i e = _mm256_slli_epi64(_mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n)),
                                                         _mm256_set1_epi64x(1023)), 52);
    const lk_vd y = lk_vd_mul(p, _mm256_castsi256_pd(e));
    return _mm256_and_pd(y, _mm256_cmp_pd(x, lo, _CMP_NLT_UQ)); /* below the range (and -inf) -> 0 */
}
#else
static inline lk_vd lk_vd_exp_softmax(lk_vd x) {
    for (int i = 0; i < LK_VD; i++) x[i] = x[i] < LK__EXPD_LO ? 0.0 : exp(x[i]);
    return x;
}
#endif

/* lk_vf_deinterleave2 for doubles: (a | b) = x0 x1 ... x(2 LK_VD - 1) -> *even = x0 x2 ..., *odd = x1 x3 ... */
#if defined(__AVX512F__)
static inline void lk_vd_deinterleave2(lk_vd a, lk_vd b, lk_vd *even, lk_vd *odd) {
    *even = _mm512_permutex2var_pd(a, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), b);
    *odd = _mm512_permutex2var_pd(a, _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15), b);
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline void lk_vd_deinterleave2(lk_vd a, lk_vd b, lk_vd *even, lk_vd *odd) {
    /* unpack within 128-bit halves: a0 b0 a2 b2 / a1 b1 a3 b3, then 64-bit chunks reordered 0 2 1 3 */
    *even = _mm256_permute4x64_pd(_mm256_unpacklo_pd(a, b), _MM_SHUFFLE(3, 1, 2, 0));
    *odd = _mm256_permute4x64_pd(_mm256_unpackhi_pd(a, b), _MM_SHUFFLE(3, 1, 2, 0));
}
#else
static inline void lk_vd_deinterleave2(lk_vd a, lk_vd b, lk_vd *even, lk_vd *odd) {
    for (int i = 0; i < LK_VD / 2; i++) {
        (*even)[i] = a[2 * i]; (*odd)[i] = a[2 * i + 1];
        (*even)[LK_VD / 2 + i] = b[2 * i]; (*odd)[LK_VD / 2 + i] = b[2 * i + 1];
    }
}
#endif

/* dst[c * ds + r] = src[r * ss + c] (lk_transpose for doubles; a plain copy loop) */
static inline void lk_transpose_f64(const double *src, int64_t ss, int64_t rows, int64_t cols, double *dst, int64_t ds) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) dst[c * ds + r] = src[r * ss + c];
}

/* Runtime switch between the SIMD and the generic path (tests diff the two). */
int lk_simd_enabled(void);
void lk_set_simd_enabled(int on);

#endif
