/* Token selection on the GPU (SPEC 4.4, 4.5): pool1d, keep_topk, compact.
 *
 * - pool1d: one thread per output (b, j, h) (h fastest: neighbouring threads read neighbouring
 *   scores), the clipped window [max(0, j - r), min(M, j + r + 1)) summed in float32 and divided by
 *   kernel_size ("avg": the padding counts as zeros) or its maximum ("max": the padding is ignored;
 *   NaN propagates).  Output rounded once to the input dtype.
 * - keep_topk: one block per (b, h).  Scores become order-preserving uint32 keys (larger score, larger
 *   key; -0 and +0 one key; every NaN key 0, below -inf).  A 4-pass radix select (8 bits a pass, block
 *   histogram in shared memory with integer atomics: exact counts, so deterministic) over the
 *   candidates [sink, M - recent) finds the key T of the want-th best candidate and how many of the
 *   candidates with key T to take (want = K - sink - recent).  A stable compaction in position order
 *   (two block scans per tile) then writes the protected positions, every candidate with key > T,
 *   and the first candidates with key == T (the lowest positions: ties go to the lower position),
 *   ascending.  Same selection as the CPU path (kernels/cpu/kv_select.c), bit for bit.
 * - compact: one thread per (output row, vector), the widest of 16/8/4/2/1-byte copies that the row
 *   size, the base pointers and the strides allow.  Device-resident idx values are clamped to
 *   [0, M - 1], so a wrong index never reads outside x.
 * 64-bit indexing throughout; every tail is bounds-checked. */
#include <math.h>

#include "common.cuh"
#include "lmkern/kv.h"

namespace {

using namespace lk;

constexpr int EW_THREADS = 256;      // elementwise kernels (pool1d, compact)
constexpr int64_t EW_MAX_BLOCKS = 65536;
constexpr int TOPK_THREADS = 512;    // 16 warps

unsigned ew_blocks(int64_t total) {
    const int64_t blocks = (total + EW_THREADS - 1) / EW_THREADS;
    return (unsigned)(blocks < EW_MAX_BLOCKS ? blocks : EW_MAX_BLOCKS);
}

/* ---- pool1d ----------------------------------------------------------------------------------- */

template <typename T>
__global__ void __launch_bounds__(EW_THREADS) pool_kernel(const lk_kv_pool_cuda_params p) {
    const int64_t total = p.B * p.M * p.H, r = p.kernel_size / 2;
    const T *sg = (const T *)p.scores;
    T *out = (T *)p.out;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t h = e % p.H, bj = e / p.H, j = bj % p.M, b = bj / p.M;
        const int64_t lo = j > r ? j - r : 0;
        const int64_t hi = p.M - 1 - j > r ? j + r + 1 : p.M;  // written without forming j + r (r may be huge)
        const T *col = sg + b * p.s_stride[0] + h * p.s_stride[2];
        float acc;
        if (p.max_mode) {
            acc = -INFINITY;
            for (int64_t t = lo; t < hi; t++) {
                const float v = to_f<T>(col[t * p.s_stride[1]]);
                acc = v > acc || v != v ? v : acc;  // NaN sticks (NaN > x and x > NaN are false)
            }
        } else {
            acc = 0.f;
            for (int64_t t = lo; t < hi; t++) acc += to_f<T>(col[t * p.s_stride[1]]);
            acc = __fdiv_rn(acc, (float)p.kernel_size);
        }
        out[e] = from_f<T>(acc);
    }
}

/* ---- keep_topk -------------------------------------------------------------------------------- */

/* Order-preserving key of a score: larger score, larger key; -0 == +0; NaN -> 0 (lowest, below -inf,
 * whose key is 0x007fffff). */
__device__ __forceinline__ uint32_t rank_key_bits(uint32_t u) {
    const uint32_t mag = u & 0x7fffffffu;
    if (mag > 0x7f800000u) return 0u;
    if (mag == 0u) return 0x80000000u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <typename T> __device__ __forceinline__ uint32_t rank_key(const T *s) {
    return rank_key_bits(__float_as_uint(to_f<T>(*s)));
}
template <> __device__ __forceinline__ uint32_t rank_key<float>(const float *s) {
    return rank_key_bits(*(const uint32_t *)s);  // the raw bits: no arithmetic, no flush of subnormals
}

/* Exclusive prefix sum of v over the block (all threads call it, blockDim.x a multiple of 32 and
 * <= 1024); *total gets the block's sum.  warp_tot: 32 ints of shared memory. */
__device__ __forceinline__ int block_exclusive_scan(int v, int *warp_tot, int *total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    int inc = v;
    for (int o = 1; o < 32; o <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += n;
    }
    if (lane == 31) warp_tot[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        int w = lane < nwarps ? warp_tot[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            const int n = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += n;
        }
        if (lane < nwarps) warp_tot[lane] = w;  // inclusive warp totals
    }
    __syncthreads();
    const int prefix = (warp > 0 ? warp_tot[warp - 1] : 0) + inc - v;
    *total = warp_tot[nwarps - 1];
    __syncthreads();  // warp_tot is reused by the next scan
    return prefix;
}

template <typename T>
__global__ void __launch_bounds__(TOPK_THREADS) topk_kernel(const lk_kv_topk_cuda_params p) {
    __shared__ unsigned hist[256];
    __shared__ int warp_tot[32];
    __shared__ uint32_t prefix_s;
    __shared__ int64_t remaining_s;

    const int t = threadIdx.x;
    const int64_t b = blockIdx.x / p.H, h = blockIdx.x % p.H;
    const int64_t M = p.M, K = p.K, H = p.H, s1 = p.s_stride[1];
    const T *col = (const T *)p.scores + b * p.s_stride[0] + h * p.s_stride[2];
    int64_t *out = p.idx + b * K * H + h;

    if (K >= M) {  // every position is kept
        for (int64_t j = t; j < M; j += blockDim.x) out[j * H] = j;
        return;
    }
    // here sink + recent <= K < M: the protected ranges [0, sink) and [M - recent, M) are disjoint
    const int64_t c0 = p.sink, c1 = M - p.recent;
    const int64_t want = K - p.sink - p.recent;  // candidates to take; < c1 - c0

    uint32_t thresh = 0xffffffffu;  // above every key (the largest, +inf, is 0xff800000): takes none
    int64_t need_eq = 0;
    if (want > 0) {
        if (t == 0) {
            prefix_s = 0u;
            remaining_s = want;
        }
        for (int pass = 0; pass < 4; pass++) {
            const int shift = 24 - 8 * pass;
            const uint32_t mask = pass == 0 ? 0u : 0xffffffffu << (32 - 8 * pass);
            for (int i = t; i < 256; i += blockDim.x) hist[i] = 0u;
            __syncthreads();  // hist cleared; prefix_s / remaining_s of the previous pass visible
            const uint32_t pre = prefix_s;
            for (int64_t j = c0 + t; j < c1; j += blockDim.x) {
                const uint32_t key = rank_key<T>(col + j * s1);
                if ((key & mask) == pre) atomicAdd(&hist[(key >> shift) & 255u], 1u);
            }
            __syncthreads();
            if (t == 0) {
                // the digit holding the remaining-th largest key among those matching the prefix
                const int64_t rem = remaining_s;
                int64_t above = 0;
                int d = 255;
                while (d > 0 && above + (int64_t)hist[d] < rem) above += hist[d--];
                prefix_s = pre | ((uint32_t)d << shift);
                remaining_s = rem - above;
            }
            __syncthreads();  // thread 0 is done with hist before the next pass clears it
        }
        thresh = prefix_s;
        need_eq = remaining_s;
    }

    // stable compaction in position order
    int64_t eq_base = 0, base = 0;
    for (int64_t j0 = 0; j0 < M; j0 += blockDim.x) {
        const int64_t j = j0 + t;
        const bool valid = j < M;
        const bool prot = valid && (j < p.sink || j >= c1);
        const bool cand = valid && !prot;
        const uint32_t key = cand ? rank_key<T>(col + j * s1) : 0u;
        const bool eq = cand && key == thresh;
        int tot;
        const int64_t eq_rank = eq_base + block_exclusive_scan(eq ? 1 : 0, warp_tot, &tot);
        eq_base += tot;
        const bool sel = prot || (cand && key > thresh) || (eq && eq_rank < need_eq);
        const int64_t slot = base + block_exclusive_scan(sel ? 1 : 0, warp_tot, &tot);
        base += tot;
        if (sel && slot < K) out[slot * H] = j;
        if (base >= K) break;  // block-uniform
    }
}

/* ---- compact ---------------------------------------------------------------------------------- */

template <typename V>
__global__ void __launch_bounds__(EW_THREADS) compact_kernel(const lk_kv_compact_cuda_params p) {
    const int64_t vpr = p.row_bytes / (int64_t)sizeof(V);
    const int64_t total = p.B * p.K * p.H * vpr;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t v = e % vpr, row = e / vpr;
        const int64_t h = row % p.H, b = row / p.H / p.K;
        int64_t j = p.idx[row];
        j = j < 0 ? 0 : (j >= p.M ? p.M - 1 : j);  // memory safety for device-resident idx
        const V *src = (const V *)((const char *)p.x + b * p.x_stride_bytes[0] + j * p.x_stride_bytes[1] +
                                   h * p.x_stride_bytes[2]);
        V *dst = (V *)((char *)p.out + row * p.row_bytes);
        dst[v] = src[v];
    }
}

template <typename V>
lk_status launch_compact(const lk_kv_compact_cuda_params *p, cudaStream_t st) {
    const int64_t total = p->B * p->K * p->H * (p->row_bytes / (int64_t)sizeof(V));
    compact_kernel<V><<<ew_blocks(total), EW_THREADS, 0, st>>>(*p);
    return check_launch();
}

bool divides(int64_t w, int64_t v) { return v % w == 0; }

}  // namespace

extern "C" lk_status lk_kv_pool1d_cuda(const lk_kv_pool_cuda_params *p, lk_stream stream) {
    if (p->B < 0 || p->M < 0 || p->H < 0 || p->kernel_size < 1 || p->kernel_size % 2 == 0) return LK_ERR_VALUE;
    const int64_t total = p->B * p->M * p->H;
    if (total == 0) return LK_OK;
    cudaStream_t st = (cudaStream_t)stream;
    switch (p->dtype) {
    case LK_F32: pool_kernel<float><<<ew_blocks(total), EW_THREADS, 0, st>>>(*p); break;
    case LK_F16: pool_kernel<__half><<<ew_blocks(total), EW_THREADS, 0, st>>>(*p); break;
    case LK_BF16: pool_kernel<__nv_bfloat16><<<ew_blocks(total), EW_THREADS, 0, st>>>(*p); break;
    default: return LK_ERR_DTYPE;
    }
    return check_launch();
}

extern "C" lk_status lk_kv_keep_topk_cuda(const lk_kv_topk_cuda_params *p, lk_stream stream) {
    if (p->B < 0 || p->M < 0 || p->H < 0 || p->K < 0 || p->K > p->M || p->sink < 0 || p->recent < 0) return LK_ERR_VALUE;
    if (p->K < p->M && p->sink + p->recent > p->K) return LK_ERR_VALUE;
    const int64_t blocks = p->B * p->H;
    if (blocks == 0 || p->K == 0) return LK_OK;
    if (blocks > 0x7fffffff) return LK_ERR_VALUE;
    cudaStream_t st = (cudaStream_t)stream;
    switch (p->dtype) {
    case LK_F32: topk_kernel<float><<<(unsigned)blocks, TOPK_THREADS, 0, st>>>(*p); break;
    case LK_F16: topk_kernel<__half><<<(unsigned)blocks, TOPK_THREADS, 0, st>>>(*p); break;
    case LK_BF16: topk_kernel<__nv_bfloat16><<<(unsigned)blocks, TOPK_THREADS, 0, st>>>(*p); break;
    default: return LK_ERR_DTYPE;
    }
    return check_launch();
}

extern "C" lk_status lk_kv_compact_cuda(const lk_kv_compact_cuda_params *p, lk_stream stream) {
    if (p->B < 0 || p->M < 0 || p->K < 0 || p->H < 0 || p->row_bytes < 0) return LK_ERR_VALUE;
    if (p->B * p->K * p->H == 0 || p->row_bytes == 0) return LK_OK;
    if (p->M == 0) return LK_ERR_VALUE;  // no row to gather from
    cudaStream_t st = (cudaStream_t)stream;
    const int64_t addr = (int64_t)((uintptr_t)p->x | (uintptr_t)p->out);
    for (int64_t w = 16; w > 1; w >>= 1) {
        if (divides(w, p->row_bytes) && divides(w, addr) && divides(w, p->x_stride_bytes[0]) &&
            divides(w, p->x_stride_bytes[1]) && divides(w, p->x_stride_bytes[2])) {
            switch (w) {
            case 16: return launch_compact<uint4>(p, st);
            case 8: return launch_compact<uint2>(p, st);
            case 4: return launch_compact<uint32_t>(p, st);
            default: return launch_compact<uint16_t>(p, st);
            }
        }
    }
    return launch_compact<uint8_t>(p, st);
}
