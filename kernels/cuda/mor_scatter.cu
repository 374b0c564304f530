/* Mixture-of-Recursions gated residual scatter (SPEC 3.5) on the GPU:
 *   out = h;  for j = 0, 1, ..., k-1 in order:  out[b, idx[b, j]] += gate[b, j] * y[b, j]
 *
 * Deterministic without atomics: block (b, feature chunk) owns features [f0, f0 + chunk) of every
 * row of batch row b, and each thread owns PER consecutive features of them; the thread walks
 * j = 0 .. k-1 in order and updates its features of row idx[b, j].  A repeated index is therefore
 * accumulated by one thread, in ascending j, exactly as the CPU kernel does: every step is
 * out = round_T(fma(gate, y, out)) with float32 arithmetic (bitwise the CPU result for float32; this
 * file is built without flush-to-zero).  For float16/bfloat16, a token named m times is therefore
 * rounded m times, where the twin (float32, one rounding) is not: routing from expert_choice never
 * repeats a token, and repeated indices in half precision carry that documented extra rounding.
 * Different features of a row belong to different threads, so nothing races.
 * The copy out = h (when h is given) is lk_mor_gather_cuda with identity rows, enqueued first.
 * Token indices from device memory are not trusted: one outside [0, T) is skipped.  Indexing 64-bit. */
#include "common.cuh"
#include "lmkern/mor.h"

namespace {

using namespace lk;

template <typename T, int PER>
struct alignas(sizeof(T) * PER) Pack {
    T v[PER];
};

/* PER features per thread (PER * sizeof(T) == 16 when the vector path applies, else PER == 1). */
template <typename T, int PER>
__global__ void scatter_kernel(const int64_t *idx, const T *y, const T *gate,
                               T *out, int64_t B, int64_t T_len, int64_t k, int64_t Dm, int64_t chunks,
                               int64_t ys0, int64_t ys1, int64_t os0, int64_t os1) {
    for (int64_t blk = blockIdx.x; blk < B * chunks; blk += gridDim.x) {   // grid-stride over (b, chunk)
        const int64_t b = blk / chunks, chunk = blk - b * chunks;
        const int64_t f = (chunk * blockDim.x + threadIdx.x) * PER;
        if (f >= Dm) continue;  // no barrier below: a thread past the row leaves alone
        const int64_t *ib = idx + b * k;
        const T *gb = gate ? gate + b * k : nullptr;
        const T *yb = y + b * ys0 + f;
        T *ob = out + b * os0 + f;
        for (int64_t j = 0; j < k; j++) {
            const int64_t t = ib[j];
            if (t < 0 || t >= T_len) continue;
            const float g = gb ? to_f<T>(gb[j]) : 1.0f;
            Pack<T, PER> *op = reinterpret_cast<Pack<T, PER> *>(ob + t * os1);
            const Pack<T, PER> yv = *reinterpret_cast<const Pack<T, PER> *>(yb + j * ys1);
            Pack<T, PER> ov = *op;
#pragma unroll
            for (int u = 0; u < PER; u++) ov.v[u] = from_f<T>(fmaf(g, to_f<T>(yv.v[u]), to_f<T>(ov.v[u])));
            *op = ov;
        }
    }
}

template <typename T, int PER>
lk_status launch(const lk_mor_scatter_params *p, const int64_t ys[2], const int64_t os[2], cudaStream_t stream) {
    const int64_t packs = p->Dm / PER;  // Dm % PER == 0 (checked by the caller)
    const int threads = (int)lk_min_i64(128, lk_cdiv(packs, 32) * 32);
    const int64_t chunks = lk_cdiv(packs, threads);
    const int64_t blocks = grid_stride_blocks(p->B * chunks);
    scatter_kernel<T, PER><<<(unsigned)blocks, threads, 0, stream>>>(
        p->idx, (const T *)p->y, (const T *)p->gate, (T *)p->out, p->B, p->T, p->k, p->Dm, chunks, ys[0], ys[1],
        os[0], os[1]);
    return check_launch();
}

template <typename T>
lk_status dispatch(const lk_mor_scatter_params *p, const int64_t ys[2], const int64_t os[2], cudaStream_t stream) {
    constexpr int VEC = 16 / sizeof(T);
    const bool vec = p->Dm % VEC == 0 && ys[0] % VEC == 0 && ys[1] % VEC == 0 && os[0] % VEC == 0 &&
                     os[1] % VEC == 0 && (uintptr_t)p->y % 16 == 0 && (uintptr_t)p->out % 16 == 0;
    return vec ? launch<T, VEC>(p, ys, os, stream) : launch<T, 1>(p, ys, os, stream);
}

}  // namespace

extern "C" lk_status lk_mor_scatter_cuda(const lk_mor_scatter_params *p, const int64_t h_stride[2],
                                         const int64_t y_stride[2], const int64_t out_stride[2], lk_stream stream) {
    if (p->B < 0 || p->T < 0 || p->k < 0 || p->Dm < 0) return LK_ERR_VALUE;
    if (p->dtype != LK_F32 && p->dtype != LK_F16 && p->dtype != LK_BF16) return LK_ERR_DTYPE;
    if (p->h) {  // out = h (every row, identity gather)
        lk_mor_gather_params g;
        g.dtype = p->dtype;
        g.B = p->B;
        g.T = p->T;
        g.k = p->T;
        g.Dm = p->Dm;
        g.h = p->h;
        g.idx = nullptr;
        g.out = p->out;
        const lk_status st = lk_mor_gather_cuda(&g, h_stride, out_stride, stream);
        if (st != LK_OK) return st;
    }
    if (p->B == 0 || p->k == 0 || p->Dm == 0 || p->T == 0) return LK_OK;
    cudaStream_t s = (cudaStream_t)stream;
    switch (p->dtype) {
    case LK_F32: return dispatch<float>(p, y_stride, out_stride, s);
    case LK_F16: return dispatch<__half>(p, y_stride, out_stride, s);
    default: return dispatch<__nv_bfloat16>(p, y_stride, out_stride, s);
    }
}
