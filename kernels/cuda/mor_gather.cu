/* Mixture-of-Recursions gather (SPEC 3.5) on the GPU: out[b, j] = h[b, idx[b, j]].
 *
 * One warp per output row (b, j), rows in a grid-stride loop; lanes copy the Dm features with 16-byte
 * loads/stores when the row size, the strides and both base pointers allow it, else element by
 * element (a bit copy either way: gather does no arithmetic).  idx == NULL copies rows in place
 * (out[b, t] = h[b, t], k == T): the first half of scatter_residual.  Token indices come from device
 * memory and are not trusted: one outside [0, T) writes a zero row and reads nothing (the Python layer
 * range-checks host indices and raises ValueError before the launch).  Indexing is 64-bit. */
#include "common.cuh"
#include "lmkern/mor.h"

namespace {

using namespace lk;

constexpr int GATHER_WARPS = 8;

template <typename E>  /* E: the element type moved (uint4 for 16-byte vectors, or T's bits) */
__global__ void __launch_bounds__(32 * GATHER_WARPS)
gather_kernel(const E *__restrict__ h, const int64_t *__restrict__ idx, E *__restrict__ out, int64_t B, int64_t T,
              int64_t k, int64_t row_elems, int64_t hs0, int64_t hs1, int64_t os0, int64_t os1) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t rows = B * k;
    for (int64_t r = (int64_t)blockIdx.x * GATHER_WARPS + warp; r < rows; r += (int64_t)gridDim.x * GATHER_WARPS) {
        const int64_t b = r / k, j = r - b * k;
        const int64_t t = idx ? idx[r] : j;
        E *dst = out + b * os0 + j * os1;
        if (t < 0 || t >= T) {
            const E zero = E();
            for (int64_t d = lane; d < row_elems; d += 32) dst[d] = zero;
            continue;
        }
        const E *src = h + b * hs0 + t * hs1;
        for (int64_t d = lane; d < row_elems; d += 32) dst[d] = src[d];
    }
}

template <typename E>
lk_status launch(const lk_mor_gather_params *p, int64_t row_elems, int64_t div, const int64_t hs[2],
                 const int64_t os[2], cudaStream_t stream) {
    const int64_t rows = p->B * p->k;
    const int64_t blocks = grid_stride_blocks(lk_cdiv(rows, GATHER_WARPS));
    gather_kernel<E><<<(unsigned)blocks, 32 * GATHER_WARPS, 0, stream>>>(
        (const E *)p->h, p->idx, (E *)p->out, p->B, p->T, p->k, row_elems, hs[0] / div, hs[1] / div, os[0] / div,
        os[1] / div);
    return check_launch();
}

}  // namespace

extern "C" lk_status lk_mor_gather_cuda(const lk_mor_gather_params *p, const int64_t h_stride[2],
                                        const int64_t out_stride[2], lk_stream stream) {
    if (p->B < 0 || p->T < 0 || p->k < 0 || p->Dm < 0) return LK_ERR_VALUE;
    if (p->dtype != LK_F32 && p->dtype != LK_F16 && p->dtype != LK_BF16) return LK_ERR_DTYPE;
    if (p->B == 0 || p->k == 0 || p->Dm == 0) return LK_OK;
    cudaStream_t s = (cudaStream_t)stream;
    const int64_t item = p->dtype == LK_F32 ? 4 : 2;
    const int64_t vec = 16 / item;  // elements per 16 bytes
    const bool aligned = p->Dm % vec == 0 && h_stride[0] % vec == 0 && h_stride[1] % vec == 0 &&
                         out_stride[0] % vec == 0 && out_stride[1] % vec == 0 && (uintptr_t)p->h % 16 == 0 &&
                         (uintptr_t)p->out % 16 == 0;
    if (aligned) return launch<uint4>(p, p->Dm / vec, vec, h_stride, out_stride, s);
    if (item == 4) return launch<uint32_t>(p, p->Dm, 1, h_stride, out_stride, s);
    return launch<uint16_t>(p, p->Dm, 1, h_stride, out_stride, s);
}
