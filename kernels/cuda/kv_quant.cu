/* KIVI asymmetric quantization on the GPU (SPEC 4.1) and the appends of the GPU KIVI cache (SPEC 4.2).
 *
 * The formula is the CPU kernel's (kernels/cpu/kv_quant.c), operation for operation, in double
 * precision: per group lo = min, hi = max (a NaN anywhere makes both NaN),
 *   scale = float32((hi - lo) / (2^bits - 1)),  zero = float32(lo),
 *   code  = clip(rint((x - zero) / scale), 0, 2^bits - 1)   (0 when scale == 0 or NaN, or the quotient is NaN),
 *   x_hat = float64(code) * scale + zero, rounded once to the output dtype.
 * Every step is a correctly rounded IEEE double operation (the build's --use_fast_math only touches
 * single precision; the float <-> double conversions are written as PTX cvt without .ftz so subnormals
 * survive), so for the same float32 input the codes, scales and zeros equal the CPU's bit for bit, and
 * float32 x_hat does too (code * scale is exact in double).  float16/bfloat16 input is widened exactly
 * first, so it gives the CPU's result for the widened float32 values.
 * A constant group stores scale = 0 and codes 0 and reconstructs lo exactly: never NaN for finite input
 * (KIVI's CUDA kernels divide by max - min and return NaN there).
 *
 * Kernels (one thread per task, grid-stride loops, 64-bit indices):
 * - quant_token_kernel: one thread per (b, t, h, feature group); the group's G features are read twice
 *   (min/max, then codes) and packed LSB-first, per = 8 / bits codes per byte.
 * - quant_channel_kernel: one thread per (b, token group, h, d), d fastest so a warp reads consecutive
 *   features of each token (coalesced) and writes consecutive code bytes.
 * - dequant_kernel: one thread per element, coalesced over the feature axis.
 * - cache_quant_keys / cache_quant_values / cache_copy_residual: the cache append (see kv.h): the key
 *   groups and value tokens that cross the residual boundary are quantized from the full-precision ring
 *   (or straight from the appended input), then the new full-precision tokens are written to the ring. */
#include <math.h>

#include "common.cuh"
#include "lmkern/kv.h"

namespace {

using namespace lk;

constexpr int THREADS = 256;
constexpr int64_t MAX_BLOCKS = 1 << 16;  // grid-stride beyond

/* IEEE float <-> double conversions that keep subnormals whatever -ftz says. */
__device__ __forceinline__ double f2d(float x) {
    double r;
    asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ float d2f(double x) {
    float r;
    asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(x));
    return r;
}

/* exact widening of an input element */
template <typename T> __device__ __forceinline__ double to_d(T x);
template <> __device__ __forceinline__ double to_d<float>(float x) { return f2d(x); }
template <> __device__ __forceinline__ double to_d<__half>(__half x) { return f2d(__half2float(x)); }
template <> __device__ __forceinline__ double to_d<__nv_bfloat16>(__nv_bfloat16 x) { return f2d(__bfloat162float(x)); }

/* one rounding from double to the output dtype */
template <typename T> __device__ __forceinline__ T from_d(double x);
template <> __device__ __forceinline__ float from_d<float>(double x) { return d2f(x); }
template <> __device__ __forceinline__ __half from_d<__half>(double x) { return __double2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_d<__nv_bfloat16>(double x) { return __double2bfloat16(x); }

/* The code of x in a group (zero, scale) with `levels` = 2^bits - 1 (lk_code of the CPU kernel). */
__device__ __forceinline__ unsigned code_of(double x, double zero, double scale, double levels) {
    if (!(scale > 0)) return 0;
    const double v = __ddiv_rn(__dsub_rn(x, zero), scale);
    if (!(v > 0)) return 0;  // also NaN
    return (unsigned)(v < levels ? rint(v) : levels);
}

/* lo / hi of the G values at(0 .. G-1) -> the group's float32 scale and zero. */
template <typename F>
__device__ __forceinline__ void group_stats(F at, int64_t G, double levels, float *scale, float *zero) {
    double lo = INFINITY, hi = -INFINITY;
    bool nan = false;
    for (int64_t i = 0; i < G; i++) {
        const double v = at(i);
        if (isnan(v)) nan = true;
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    if (nan) lo = hi = NAN;
    *scale = d2f(__ddiv_rn(__dsub_rn(hi, lo), levels));
    *zero = d2f(lo);
}

/* The byte holding the codes of at(i0 .. i0 + per - 1), LSB-first. */
template <typename F>
__device__ __forceinline__ uint8_t pack_byte(F at, int64_t i0, int per, int bits, float zero, float scale,
                                             double levels) {
    const double z = f2d(zero), s = f2d(scale);
    unsigned byte = 0;
    for (int k = 0; k < per; k++) byte |= code_of(at(i0 + k), z, s, levels) << (bits * k);
    return (uint8_t)byte;
}

unsigned grid_for(int64_t tasks) {
    const int64_t blocks = (tasks + THREADS - 1) / THREADS;
    return (unsigned)(blocks < MAX_BLOCKS ? blocks : MAX_BLOCKS);
}

__device__ __forceinline__ int64_t first_task() { return (int64_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t task_stride() { return (int64_t)gridDim.x * blockDim.x; }

/* ------------------------------------------------------------------------------------------------ */
/* quantize / dequantize                                                                            */

template <typename T>
__global__ void __launch_bounds__(THREADS) quant_token_kernel(const lk_kv_quant_params p) {
    const int64_t D = p.D, G = p.G, ng = D / G;
    const int bits = p.bits, per = 8 / bits;
    const double levels = (double)((1 << bits) - 1);
    const int64_t tasks = p.B * p.T * p.H * ng;
    for (int64_t t = first_task(); t < tasks; t += task_stride()) {
        const int64_t row = t / ng, g = t % ng;
        const T *x = (const T *)p.x + row * D + g * G;
        auto at = [&](int64_t i) { return to_d<T>(x[i]); };
        float s, z;
        group_stats(at, G, levels, &s, &z);
        p.scale[t] = s;  // t = row * (D / G) + g
        p.zero[t] = z;
        uint8_t *c = p.codes + row * (D / per) + g * (G / per);
        for (int64_t i = 0; i < G; i += per) c[i / per] = pack_byte(at, i, per, bits, z, s, levels);
    }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) quant_channel_kernel(const lk_kv_quant_params p) {
    const int64_t T_ = p.T, H = p.H, D = p.D, G = p.G, ntg = T_ / G;
    const int bits = p.bits, per = 8 / bits;
    const double levels = (double)((1 << bits) - 1);
    const int64_t tasks = p.B * ntg * H * D;
    for (int64_t t = first_task(); t < tasks; t += task_stride()) {
        const int64_t d = t % D, h = (t / D) % H, tg = (t / (D * H)) % ntg, b = t / (D * H * ntg);
        const T *x = (const T *)p.x + ((b * T_ + tg * G) * H + h) * D + d;
        auto at = [&](int64_t i) { return to_d<T>(x[i * H * D]); };
        float s, z;
        group_stats(at, G, levels, &s, &z);
        p.scale[t] = s;  // t = ((b * (T / G) + tg) * H + h) * D + d
        p.zero[t] = z;
        for (int64_t i = 0; i < G; i += per)
            p.codes[((b * (T_ / per) + (tg * G + i) / per) * H + h) * D + d] = pack_byte(at, i, per, bits, z, s, levels);
    }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) dequant_kernel(const lk_kv_quant_params p) {
    const int64_t T_ = p.T, H = p.H, D = p.D, G = p.G;
    const int bits = p.bits, per = 8 / bits, mask = (1 << bits) - 1;
    const int64_t n = p.B * T_ * H * D;
    T *x = (T *)p.x;
    for (int64_t e = first_task(); e < n; e += task_stride()) {
        const int64_t d = e % D;
        int code;
        float s, z;
        if (!p.channel) {
            const int64_t r = e / D;
            code = (p.codes[r * (D / per) + d / per] >> (bits * (int)(d % per))) & mask;
            s = p.scale[r * (D / G) + d / G];
            z = p.zero[r * (D / G) + d / G];
        } else {
            const int64_t h = (e / D) % H, t = (e / (D * H)) % T_, b = e / (D * H * T_);
            code = (p.codes[((b * (T_ / per) + t / per) * H + h) * D + d] >> (bits * (int)(t % per))) & mask;
            const int64_t si = ((b * (T_ / G) + t / G) * H + h) * D + d;
            s = p.scale[si];
            z = p.zero[si];
        }
        // code * scale is exact in double, so this is the CPU's value whether or not it is fused
        x[e] = from_d<T>(__dadd_rn(__dmul_rn((double)code, f2d(s)), f2d(z)));
    }
}

lk_status check_quant_params(const lk_kv_quant_params *p) {
    if (p->bits != 2 && p->bits != 4 && p->bits != 8) return LK_ERR_VALUE;
    if (p->G < 1 || p->G % (8 / p->bits)) return LK_ERR_VALUE;
    if (p->B < 0 || p->T < 0 || p->H < 0 || p->D < 0) return LK_ERR_VALUE;
    if ((p->channel ? p->T : p->D) % p->G) return LK_ERR_VALUE;
    return LK_OK;
}

template <typename T>
lk_status launch_quantize(const lk_kv_quant_params *p, cudaStream_t st) {
    if (p->channel) {
        quant_channel_kernel<T><<<grid_for(p->B * (p->T / p->G) * p->H * p->D), THREADS, 0, st>>>(*p);
    } else {
        quant_token_kernel<T><<<grid_for(p->B * p->T * p->H * (p->D / p->G)), THREADS, 0, st>>>(*p);
    }
    return check_launch();
}

template <typename T>
lk_status launch_dequantize(const lk_kv_quant_params *p, cudaStream_t st) {
    dequant_kernel<T><<<grid_for(p->B * p->T * p->H * p->D), THREADS, 0, st>>>(*p);
    return check_launch();
}

/* ------------------------------------------------------------------------------------------------ */
/* cache append                                                                                     */

/* Row b's append, clamped so that inconsistent values can never address outside the cache:
 * 0 <= start <= S, 0 <= n <= min(T, S - start), 0 <= qk0 <= qk1 <= start + n, 0 <= qv0 <= qv1 <= start + n. */
struct AppendRow {
    int64_t start, n, qk0, qk1, qv0, qv1;
};

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

__device__ __forceinline__ AppendRow append_row(const lk_kv_cache_append_params &p, int64_t b) {
    const int64_t *r = p.rows + b * 6;
    AppendRow a;
    a.start = clamp64(r[0], 0, p.S);
    a.n = clamp64(r[1], 0, p.T < p.S - a.start ? p.T : p.S - a.start);
    const int64_t L1 = a.start + a.n;
    a.qk1 = clamp64(r[3], 0, L1);
    a.qk0 = clamp64(r[2], 0, a.qk1);
    a.qv1 = clamp64(r[5], 0, L1);
    a.qv0 = clamp64(r[4], 0, a.qv1);
    return a;
}

/* One thread per (b, h, crossing key group, channel d), d fastest. */
template <typename T>
__global__ void __launch_bounds__(THREADS) cache_quant_keys(const lk_kv_cache_append_params p) {
    const int64_t H = p.H, D = p.D, G = p.G, MKG = p.max_kgroups, kcap = p.k_res_cap;
    const int bits = p.bits, per = 8 / bits;
    const double levels = (double)((1 << bits) - 1);
    const int64_t tasks = p.B * H * MKG * D;
    for (int64_t t = first_task(); t < tasks; t += task_stride()) {
        const int64_t d = t % D, gl = (t / D) % MKG, h = (t / (D * MKG)) % H, b = t / (D * MKG * H);
        const AppendRow a = append_row(p, b);
        const int64_t grp = a.qk0 / G + gl;
        if ((grp + 1) * G > a.qk1) continue;  // this row has fewer crossing groups
        const int64_t bh = b * H + h;
        const T *kin = (const T *)p.k + b * p.k_stride[0] + h * p.k_stride[2] + d;
        // token grp*G + i: in the ring while it is an old token, else in the appended input
        auto at = [&](int64_t i) -> double {
            const int64_t j = grp * G + i;
            if (j < a.start) return kcap > 0 ? f2d(p.k_res[(bh * kcap + j % kcap) * D + d]) : 0.0;
            return to_d<T>(kin[(j - a.start) * p.k_stride[1]]);
        };
        float s, z;
        group_stats(at, G, levels, &s, &z);
        const int64_t gi = (bh * p.k_groups + grp) * D + d;
        p.k_scale[gi] = s;
        p.k_zero[gi] = z;
        uint8_t *c = p.k_codes + gi * (G / per);
        for (int64_t i = 0; i < G; i += per) c[i / per] = pack_byte(at, i, per, bits, z, s, levels);
    }
}

/* One thread per (b, h, crossing value token, feature group), the group fastest. */
template <typename T>
__global__ void __launch_bounds__(THREADS) cache_quant_values(const lk_kv_cache_append_params p) {
    const int64_t H = p.H, E = p.E, G = p.G, EG = E / G, MV = p.max_vtokens, vcap = p.v_res_cap;
    const int bits = p.bits, per = 8 / bits;
    const double levels = (double)((1 << bits) - 1);
    const int64_t tasks = p.B * H * MV * EG;
    for (int64_t t = first_task(); t < tasks; t += task_stride()) {
        const int64_t ge = t % EG, tl = (t / EG) % MV, h = (t / (EG * MV)) % H, b = t / (EG * MV * H);
        const AppendRow a = append_row(p, b);
        const int64_t j = a.qv0 + tl;
        if (j >= a.qv1) continue;
        const int64_t bh = b * H + h;
        const float *ring = vcap > 0 ? p.v_res + (bh * vcap + j % vcap) * E + ge * G : nullptr;
        const bool old = j < a.start;
        const T *vin = old ? nullptr
                           : (const T *)p.v + b * p.v_stride[0] + (j - a.start) * p.v_stride[1] + h * p.v_stride[2] + ge * G;
        auto at = [&](int64_t i) -> double {
            if (old) return ring ? f2d(ring[i]) : 0.0;
            return to_d<T>(vin[i]);
        };
        float s, z;
        group_stats(at, G, levels, &s, &z);
        const int64_t tok = bh * p.S + j;
        p.v_scale[tok * EG + ge] = s;
        p.v_zero[tok * EG + ge] = z;
        uint8_t *c = p.v_codes + tok * (E / per) + ge * (G / per);
        for (int64_t i = 0; i < G; i += per) c[i / per] = pack_byte(at, i, per, bits, z, s, levels);
    }
}

/* One thread per (b, new token, h, feature of k then v): new tokens that stay in full precision go to
 * their ring slot, widened to float32.  Runs after the quantization kernels (they read the old ring). */
template <typename T>
__global__ void __launch_bounds__(THREADS) cache_copy_residual(const lk_kv_cache_append_params p) {
    const int64_t H = p.H, D = p.D, E = p.E, F = D + E, MN = p.max_new;
    const int64_t kcap = p.k_res_cap, vcap = p.v_res_cap;
    const int64_t tasks = p.B * MN * H * F;
    for (int64_t t = first_task(); t < tasks; t += task_stride()) {
        const int64_t f = t % F, h = (t / F) % H, tl = (t / (F * H)) % MN, b = t / (F * H * MN);
        const AppendRow a = append_row(p, b);
        if (tl >= a.n) continue;
        const int64_t j = a.start + tl, bh = b * H + h;
        if (f < D) {
            if (j >= a.qk1 && kcap > 0)
                p.k_res[(bh * kcap + j % kcap) * D + f] =
                    to_f<T>(((const T *)p.k)[b * p.k_stride[0] + tl * p.k_stride[1] + h * p.k_stride[2] + f]);
        } else {
            const int64_t e = f - D;
            if (j >= a.qv1 && vcap > 0)
                p.v_res[(bh * vcap + j % vcap) * E + e] =
                    to_f<T>(((const T *)p.v)[b * p.v_stride[0] + tl * p.v_stride[1] + h * p.v_stride[2] + e]);
        }
    }
}

template <typename T>
lk_status launch_append(const lk_kv_cache_append_params *p, cudaStream_t st) {
    const int64_t kt = p->B * p->H * p->max_kgroups * p->D;
    const int64_t vt = p->B * p->H * p->max_vtokens * (p->E / p->G);
    const int64_t ct = p->B * p->max_new * p->H * (p->D + p->E);
    if (kt > 0) {
        cache_quant_keys<T><<<grid_for(kt), THREADS, 0, st>>>(*p);
        lk_status s = check_launch();
        if (s != LK_OK) return s;
    }
    if (vt > 0) {
        cache_quant_values<T><<<grid_for(vt), THREADS, 0, st>>>(*p);
        lk_status s = check_launch();
        if (s != LK_OK) return s;
    }
    if (ct > 0) {
        cache_copy_residual<T><<<grid_for(ct), THREADS, 0, st>>>(*p);
        return check_launch();
    }
    return LK_OK;
}

}  // namespace

extern "C" lk_status lk_kv_quantize_cuda(const lk_kv_quant_params *p, lk_stream stream) {
    lk_status s = check_quant_params(p);
    if (s != LK_OK) return s;
    if (p->B == 0 || p->T == 0 || p->H == 0 || p->D == 0) return LK_OK;
    cudaStream_t st = (cudaStream_t)stream;
    switch (p->dtype) {
    case LK_F32: return launch_quantize<float>(p, st);
    case LK_F16: return launch_quantize<__half>(p, st);
    case LK_BF16: return launch_quantize<__nv_bfloat16>(p, st);
    default: return LK_ERR_DTYPE;
    }
}

extern "C" lk_status lk_kv_dequantize_cuda(const lk_kv_quant_params *p, lk_stream stream) {
    lk_status s = check_quant_params(p);
    if (s != LK_OK) return s;
    if (p->B == 0 || p->T == 0 || p->H == 0 || p->D == 0) return LK_OK;
    cudaStream_t st = (cudaStream_t)stream;
    switch (p->dtype) {
    case LK_F32: return launch_dequantize<float>(p, st);
    case LK_F16: return launch_dequantize<__half>(p, st);
    case LK_BF16: return launch_dequantize<__nv_bfloat16>(p, st);
    default: return LK_ERR_DTYPE;
    }
}

extern "C" lk_status lk_kv_cache_append_cuda(const lk_kv_cache_append_params *p, lk_stream stream) {
    if (p->bits != 2 && p->bits != 4 && p->bits != 8) return LK_ERR_VALUE;
    if (p->G < 1 || p->G % (8 / p->bits) || p->E % p->G) return LK_ERR_VALUE;
    if (p->B < 0 || p->T < 0 || p->H < 0 || p->D < 0 || p->E < 0 || p->S < 0) return LK_ERR_VALUE;
    if (p->max_kgroups < 0 || p->max_vtokens < 0 || p->max_new < 0 || p->k_res_cap < 0 || p->v_res_cap < 0)
        return LK_ERR_VALUE;
    if (p->k_groups * p->G < p->S) return LK_ERR_VALUE;  // every key group of the capacity has a slot
    if (p->B == 0 || p->H == 0 || p->S == 0) return LK_OK;
    cudaStream_t st = (cudaStream_t)stream;
    switch (p->dtype) {
    case LK_F32: return launch_append<float>(p, st);
    case LK_F16: return launch_append<__half>(p, st);
    case LK_BF16: return launch_append<__nv_bfloat16>(p, st);
    default: return LK_ERR_DTYPE;
    }
}
