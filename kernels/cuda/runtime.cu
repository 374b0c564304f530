/* Error recording shared by every CUDA launcher: the binding turns LK_ERR_CUDA into a RuntimeError
 * carrying the CUDA error string of the failure recorded here (per host thread). */
#include "common.cuh"

static thread_local cudaError_t lk_last_error = cudaSuccess;

namespace lk {
lk_status record_error(cudaError_t err) {
    lk_last_error = err;
    return LK_ERR_CUDA;
}
}  // namespace lk

extern "C" const char *lk_cuda_last_error(void) {
    return lk_last_error == cudaSuccess ? "unknown CUDA error" : cudaGetErrorString(lk_last_error);
}
