/* CUDA launchers of the core ops (attention, RoPE) and the stream type every CUDA launcher takes.
 *
 * Conventions for every CUDA launcher (families add theirs to their own header, after
 * `#include "lmkern/cuda.h"`):
 *   lk_status lk_<op>_cuda(const lk_<op>_params *p, <scratch pointers, if any>, lk_stream stream);
 * - pointers in the params struct are DEVICE pointers on the current device (the binding selects it);
 * - the launcher only enqueues work on `stream` (no host synchronization, no cudaMalloc): scratch
 *   space is allocated by the caller (the Python layer, from the caller's own framework) and passed in;
 * - it returns LK_ERR_CUDA when a launch fails (the binding reports cudaGetLastError's string),
 *   LK_ERR_VALUE for a size the kernel does not support, LK_ERR_DTYPE for a dtype it does not support.
 * This header needs no CUDA include: lk_stream is the same type as cudaStream_t. */
#ifndef LMKERN_CUDA_H
#define LMKERN_CUDA_H

#include "lmkern/attention.h"
#include "lmkern/common.h"

#ifdef __cplusplus
extern "C" {
#endif

struct CUstream_st;
typedef struct CUstream_st *lk_stream; /* == cudaStream_t */

/* The CUDA error string of the last launch failure recorded on this host thread (LK_ERR_CUDA). */
const char *lk_cuda_last_error(void);

/* Largest head dimension (D and E) the CUDA attention kernels support. */
#define LK_CUDA_ATTN_MAX_HEAD_DIM 256

/* Attention (SPEC 1.1 + ParScale prefix) on the GPU.  dtype: LK_F32, LK_F16 or LK_BF16 for q, k, v,
 * out, prefix_k/v (all one dtype); lse, when not NULL, is float32 (B, N, Hq) contiguous; q_pos, kv_pos,
 * kv_lens are int64 device arrays (kv_lens values are clamped to [0, M] on the device).  The feature
 * axis of q, k, v, out is contiguous; strides are in elements.
 * num_splits > 1 splits every query row's keys into that many chunks (split-KV, for decode) whose
 * float32 partials go to `scratch`, which must hold lk_attention_cuda_scratch_floats(p, num_splits)
 * floats (NULL when num_splits == 1). */
lk_status lk_attention_cuda(const lk_attention_params *p, int num_splits, float *scratch, lk_stream stream);
/* The split count the launcher would like for p on a GPU with `num_sms` multiprocessors (>= 1). */
int lk_attention_cuda_splits(const lk_attention_params *p, int num_sms);
/* Floats of scratch that lk_attention_cuda needs for num_splits (0 when num_splits == 1). */
int64_t lk_attention_cuda_scratch_floats(const lk_attention_params *p, int num_splits);

/* RoPE in place (lk_rope_params, dtype LK_F32, LK_F16 or LK_BF16; x and positions on the device).
 * x is addressed with x_stride (elements, for the B, T, G axes; the feature axis is contiguous). */
lk_status lk_rope_cuda(const lk_rope_params *p, const int64_t x_stride[3], lk_stream stream);

#ifdef __cplusplus
}
#endif
#endif
