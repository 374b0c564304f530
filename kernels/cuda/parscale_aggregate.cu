/* ParScale output aggregation (SPEC 5.3) on the GPU: the two kernels around the framework's GEMMs.
 *
 *   bias_silu  xs[o, r] = silu(x[o, r] + b1[o]) in float32, on the first GEMM's (Hh, R) output
 *   mix        w = (1 - s) softmax_P(z[:, r] + b2) + s / P;  y[b, t] = sum_p w[p] h[p·B + b, t]
 *
 * The gather of the P streams into the GEMM input and the GEMMs themselves are the caller's framework
 * (reshape and matmul, i.e. cuBLAS): see python/lmkern/_cuda_parscale.py.
 *
 * bias_silu: one thread per element, a 2-D block (columns r along x for coalescing, rows o along y)
 *   sized to R so a decode shape (R of 1..8) does not leave most lanes idle; no integer division.
 * mix: one block of 128 threads per (token row r, chunk of 128·V features); rows beyond the grid's
 *   y extent are walked grid-stride.  Warp 0 computes the row's P weights into shared memory
 *   (max-stabilized softmax in float32: finite for any finite logits), then every thread reads its
 *   V features (16-byte loads when sizes, strides and alignment allow) of the P stream rows and
 *   accumulates sum_p w[p] h in float32, in stream order p = 0 .. P-1 (deterministic, no atomics).
 * Indexing is 64-bit; every feature tail is bounds-checked. */
#include <math.h>

#include "common.cuh"
#include "lmkern/parscale.h"

namespace {

using namespace lk;

/* ---------------------------------------------------------------- bias + SiLU */

constexpr int SILU_THREADS = 256;

/* out[o, r] = silu(x[o, r] + bias[o]) = a / (1 + e^-a);  large negative a gives -0, a -> +inf gives a,
 * a = -inf exactly gives NaN (-inf / inf), as the twin.
 * out may be x (float32): each element is read and then written by the same thread. */
template <typename T>
__global__ void __launch_bounds__(SILU_THREADS) bias_silu_kernel(const T *x, const T *bias, float *out, int64_t Hh,
                                                                 int64_t R) {
    const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= R) return;  // no barrier in this kernel
    for (int64_t o = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; o < Hh; o += (int64_t)gridDim.y * blockDim.y) {
        const float a = to_f<T>(x[o * R + r]) + (bias ? to_f<T>(bias[o]) : 0.f);
        out[o * R + r] = a / (1.f + expf(-a));
    }
}

template <typename T>
lk_status launch_bias_silu(const lk_parscale_bias_silu_params *p, float *out, cudaStream_t stream) {
    // block: tx columns (a power of two in [32, 256], at least R when R is small) times ty rows
    int tx = 32;
    while (tx < SILU_THREADS && tx < p->R) tx *= 2;
    const int ty = SILU_THREADS / tx;
    const int64_t gx = (p->R + tx - 1) / tx;
    int64_t gy = (p->Hh + ty - 1) / ty;
    if (gx > 0x7fffffff) return LK_ERR_VALUE;
    if (gy > 65535) gy = 65535;  // grid-stride over the rest
    bias_silu_kernel<T><<<dim3((unsigned)gx, (unsigned)gy), dim3(tx, ty), 0, stream>>>(
        (const T *)p->x, (const T *)p->bias, out, p->Hh, p->R);
    return check_launch();
}

/* ---------------------------------------------------------------- softmax over P + smoothing + weighted sum */

constexpr int MIX_THREADS = 128;

/* V consecutive elements of T, loaded / stored as one access (16 bytes when V = 16 / sizeof(T)). */
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
    T v[V];
};

template <typename T, int V>
__global__ void __launch_bounds__(MIX_THREADS) mix_kernel(const lk_parscale_mix_params p,
                                                          const lk_parscale_mix_cuda_layout l) {
    extern __shared__ float w_sh[];  // the P weights of the current row
    const int64_t P = p.P, R = p.R, Hd = p.Hd;
    const float keep = (float)(1.0 - p.smoothing), share = (float)(p.smoothing / (double)P);
    const float *z = (const float *)p.z;
    const T *b2 = (const T *)p.b2;
    const T *h = (const T *)p.h;
    T *y = (T *)p.y;
    const int64_t j = ((int64_t)blockIdx.x * MIX_THREADS + threadIdx.x) * V;  // this thread's first feature
    const int64_t pstride = l.B * l.h_stride[0];                              // stream p to stream p + 1
    for (int64_t r = blockIdx.y; r < R; r += gridDim.y) {  // uniform across the block
        const int64_t b = r / l.T, t = r - b * l.T;
        if (threadIdx.x < 32) {
            // w = (1 - s) softmax_p(z[p, r] + b2[p]) + s / P; each lane owns p = lane, lane + 32, ...
            // (NaN logits are skipped by fmaxf but make the sum, hence every weight, NaN, as on the CPU)
            float m = -INFINITY;
            for (int64_t q = threadIdx.x; q < P; q += 32) {
                const float v = z[q * R + r] + (b2 ? to_f<T>(b2[q]) : 0.f);
                w_sh[q] = v;
                m = fmaxf(m, v);
            }
            m = warp_max(m);
            float sum = 0.f;
            for (int64_t q = threadIdx.x; q < P; q += 32) {
                const float e = expf(w_sh[q] - m);
                w_sh[q] = e;
                sum += e;
            }
            sum = warp_sum(sum);
            for (int64_t q = threadIdx.x; q < P; q += 32) {
                const float w = w_sh[q] / sum * keep + share;
                w_sh[q] = w;
                if (p.weights && blockIdx.x == 0) p.weights[r * P + q] = w;
            }
        }
        __syncthreads();
        if (j < Hd) {  // V divides Hd on the vector path: the whole pack is in range
            // y[b, t, j] = sum_p w[p] h[p·B + b, t, j]
            const T *hr = h + b * l.h_stride[0] + t * l.h_stride[1] + j;
            float acc[V];
#pragma unroll
            for (int u = 0; u < V; u++) acc[u] = 0.f;
#pragma unroll 4
            for (int64_t q = 0; q < P; q++) {
                const Pack<T, V> v = *reinterpret_cast<const Pack<T, V> *>(hr + q * pstride);
                const float wq = w_sh[q];
#pragma unroll
                for (int u = 0; u < V; u++) acc[u] = fmaf(wq, to_f<T>(v.v[u]), acc[u]);
            }
            Pack<T, V> o;
#pragma unroll
            for (int u = 0; u < V; u++) o.v[u] = from_f<T>(acc[u]);
            *reinterpret_cast<Pack<T, V> *>(y + b * l.y_stride[0] + t * l.y_stride[1] + j) = o;
        }
        __syncthreads();  // w_sh is rewritten for the next row
    }
}

template <typename T, int V>
lk_status launch_mix_v(const lk_parscale_mix_params *p, const lk_parscale_mix_cuda_layout *l, cudaStream_t stream) {
    const int64_t per_block = (int64_t)MIX_THREADS * V;
    int64_t gx = (p->Hd + per_block - 1) / per_block;
    if (gx < 1) gx = 1;  // Hd = 0: one block per row still writes the weights
    if (gx > 0x7fffffff) return LK_ERR_VALUE;
    const int64_t gy = p->R < 65535 ? p->R : 65535;  // grid-stride over the rest
    const size_t smem = sizeof(float) * (size_t)p->P;
    mix_kernel<T, V><<<dim3((unsigned)gx, (unsigned)gy), MIX_THREADS, smem, stream>>>(*p, *l);
    return check_launch();
}

template <typename T>
lk_status launch_mix(const lk_parscale_mix_params *p, const lk_parscale_mix_cuda_layout *l, cudaStream_t stream) {
    constexpr int V = 16 / (int)sizeof(T);
    // 16-byte accesses need Hd, every row stride and both base pointers to be multiples of 16 bytes
    const bool vec = p->Hd % V == 0 && l->h_stride[0] % V == 0 && l->h_stride[1] % V == 0 &&
                     l->y_stride[0] % V == 0 && l->y_stride[1] % V == 0 && (uintptr_t)p->h % 16 == 0 &&
                     (uintptr_t)p->y % 16 == 0;
    return vec ? launch_mix_v<T, V>(p, l, stream) : launch_mix_v<T, 1>(p, l, stream);
}

}  // namespace

extern "C" lk_status lk_parscale_bias_silu_cuda(const lk_parscale_bias_silu_params *p, float *out, lk_stream stream) {
    if (p->R < 0 || p->Hh < 0) return LK_ERR_VALUE;
    if (p->R == 0 || p->Hh == 0) return LK_OK;
    if (!p->x || !out) return LK_ERR_VALUE;
    cudaStream_t st = (cudaStream_t)stream;
    switch (p->dtype) {
    case LK_F32: return launch_bias_silu<float>(p, out, st);
    case LK_F16: return launch_bias_silu<__half>(p, out, st);
    case LK_BF16: return launch_bias_silu<__nv_bfloat16>(p, out, st);
    default: return LK_ERR_DTYPE;
    }
}

extern "C" lk_status lk_parscale_mix_cuda(const lk_parscale_mix_params *p, const lk_parscale_mix_cuda_layout *l,
                                          lk_stream stream) {
    if (p->P < 1 || p->P > LK_PARSCALE_CUDA_MAX_P || p->R < 0 || p->Hd < 0 || l->B < 0 || l->T < 0 ||
        l->B * l->T != p->R || !(p->smoothing >= 0.0 && p->smoothing <= 1.0))
        return LK_ERR_VALUE;
    if (p->R == 0) return LK_OK;
    if (!p->z || (p->Hd > 0 && (!p->h || !p->y))) return LK_ERR_VALUE;
    cudaStream_t st = (cudaStream_t)stream;
    switch (p->dtype) {
    case LK_F32: return launch_mix<float>(p, l, st);
    case LK_F16: return launch_mix<__half>(p, l, st);
    case LK_BF16: return launch_mix<__nv_bfloat16>(p, l, st);
    default: return LK_ERR_DTYPE;
    }
}
