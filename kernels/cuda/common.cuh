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

__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
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
