/* Tensor-core helpers shared by the CUDA kernels: mma.sync m16n8k16 (f16 / bf16 in, f32 accumulate).
 *
 * Fragment layout (PTX ISA, m16n8k16, .row.col), with gid = lane / 4 and tig = lane % 4:
 *   A (16 x 16, row-major in shared memory, row stride S): a[0] = A[gid][2 tig .. +1],
 *     a[1] = A[gid + 8][2 tig ..], a[2] = A[gid][2 tig + 8 ..], a[3] = A[gid + 8][2 tig + 8 ..];
 *   B (16 x 8, stored as [n][k], k contiguous): b0 = B[n = gid][k = 2 tig ..], b1 = B[gid][2 tig + 8 ..];
 *   C (16 x 8, f32): c[0], c[1] = C[gid][2 tig, 2 tig + 1], c[2], c[3] = C[gid + 8][2 tig, 2 tig + 1]. */
#ifndef LMKERN_CUDA_MMA_CUH
#define LMKERN_CUDA_MMA_CUH

#include "common.cuh"

namespace lk {

template <typename T> struct mma_op;

template <> struct mma_op<__half> {
    static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 h2 = __floats2half2_rn(lo, hi);  // lo in the low 16 bits
        return *reinterpret_cast<uint32_t *>(&h2);
    }
};

template <> struct mma_op<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 h2 = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&h2);
    }
};

__device__ __forceinline__ uint32_t ld32(const void *p) { return *reinterpret_cast<const uint32_t *>(p); }

/* The A fragment of the 16 x 16 tile at `tile` (row-major, row stride `stride` elements). */
template <typename T>
__device__ __forceinline__ void load_a(uint32_t a[4], const T *tile, int stride, int gid, int tig) {
    const T *x = tile + gid * stride + 2 * tig;
    a[0] = ld32(x);
    a[1] = ld32(x + 8 * stride);
    a[2] = ld32(x + 8);
    a[3] = ld32(x + 8 * stride + 8);
}

}  // namespace lk

#endif
