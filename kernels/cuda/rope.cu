/* Rotary position embedding (SPEC 1.2) on the GPU, in place, f32 / f16 / bf16.
 *
 * One thread per (b, t, g, pair i), grid-stride.  theta = pos * base^(-2i/r) and its sine and cosine
 * are computed in double precision (so positions up to 2^20 and beyond keep float32 accuracy; the
 * cost is a few FP64 operations per pair, cheap next to the memory traffic on data-centre GPUs);
 * the rotation itself is done in float32 and rounded once to the storage dtype.
 * "half" pairs (i, i + r/2), "interleaved" pairs (2i, 2i + 1); features >= r are never touched. */
#include <math.h>

#include "common.cuh"

namespace {

template <typename T>
__global__ void rope_kernel(const lk_rope_params p, int64_t s0, int64_t s1, int64_t s2, double log2_base) {
    const int64_t half = p.rotary_dim / 2;
    const int64_t total = p.B * p.T * p.G * half;
    const double sign = p.inverse ? -1.0 : 1.0;
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = idx % half, g = (idx / half) % p.G, t = (idx / (half * p.G)) % p.T;
        const int64_t b = idx / (half * p.G * p.T);
        const double pos = (double)p.positions[b * p.pos_bstride + t];
        // f_i = base^(-2i/r), theta = pos f_i (double)
        const double theta = pos * exp2(-(2.0 * (double)i / (double)p.rotary_dim) * log2_base);
        double sn, cs;
        sincos(theta, &sn, &cs);
        const float c = (float)cs, s = (float)(sign * sn);
        T *x = (T *)p.x + b * s0 + t * s1 + g * s2;
        const int64_t ia = p.interleaved ? 2 * i : i, ib = p.interleaved ? 2 * i + 1 : i + half;
        const float a = lk::to_f<T>(x[ia]), bb = lk::to_f<T>(x[ib]);
        // (a, b) -> (a cos - b sin, a sin + b cos)
        x[ia] = lk::from_f<T>(a * c - bb * s);
        x[ib] = lk::from_f<T>(a * s + bb * c);
    }
}

template <typename T>
lk_status launch(const lk_rope_params *p, const int64_t st[3], cudaStream_t stream) {
    const int64_t total = p->B * p->T * p->G * (p->rotary_dim / 2);
    if (total == 0) return LK_OK;
    const int threads = 256;
    int64_t blocks = (total + threads - 1) / threads;
    if (blocks > 65536) blocks = 65536;  // grid-stride loop covers the rest
    rope_kernel<T><<<(unsigned)blocks, threads, 0, stream>>>(*p, st[0], st[1], st[2], log2(p->base));
    return lk::check_launch();
}

}  // namespace

extern "C" lk_status lk_rope_cuda(const lk_rope_params *p, const int64_t x_stride[3], lk_stream stream) {
    if (p->rotary_dim < 0 || p->rotary_dim > p->D || p->rotary_dim % 2) return LK_ERR_VALUE;
    if (!(p->base > 0)) return LK_ERR_VALUE;
    cudaStream_t st = (cudaStream_t)stream;
    switch (p->dtype) {
    case LK_F32: return launch<float>(p, x_stride, st);
    case LK_F16: return launch<__half>(p, x_stride, st);
    case LK_BF16: return launch<__nv_bfloat16>(p, x_stride, st);
    default: return LK_ERR_DTYPE;
    }
}
