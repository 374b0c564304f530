/* Device helpers shared by the CUDA kernels: dtype conversion, warp reductions, error recording. */
#ifndef LMKERN_CUDA_COMMON_CUH
#define LMKERN_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "lmkern/cuda.h"

namespace lk {

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

/* Max / sum over groups of W consecutive lanes (W = 32: the warp; 16: each half warp); all 32 lanes call. */
template <int W = 32> __device__ __forceinline__ float warp_max(float x) {
    for (int o = W / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

template <int W = 32, typename F> __device__ __forceinline__ F warp_sum(F x) {   // float or double
    for (int o = W / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

/* Blocks of a launch whose kernel grid-strides over `blocks` units of work: at most 2^20. */
static inline int64_t grid_stride_blocks(int64_t blocks) { return blocks < (1 << 20) ? blocks : (int64_t)1 << 20; }

/* Split count of a split-KV launch: enough splits that blocks_per_split * splits fills every SM about
 * 8 times, at most ceil(len / min_per_split) (each split keeps real work) and at most cap. */
static inline int split_count(int64_t blocks_per_split, int num_sms, int64_t len, int64_t min_per_split, int64_t cap) {
    if (blocks_per_split <= 0) return 1;
    const int64_t target = (int64_t)(num_sms > 0 ? num_sms : 1) * 8;
    int64_t splits = (target + blocks_per_split - 1) / blocks_per_split;
    const int64_t most = (len + min_per_split - 1) / min_per_split;
    if (splits > most) splits = most;
    if (splits > cap) splits = cap;
    return splits < 1 ? 1 : (int)splits;
}

/* Records a failed launch (read back by the binding through lk_cuda_last_error); LK_ERR_CUDA. */
lk_status record_error(cudaError_t err);

/* LK_OK, or LK_ERR_CUDA after recording the pending launch error. */
static inline lk_status check_launch() {
    cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? LK_OK : record_error(err);
}

}  // namespace lk

#endif
