/* Mixture-of-Recursions expert-choice selection (SPEC 3.3) on the GPU: per row, the k best of n
 * scores, returned in ascending position order, by selection, never by a sort.
 *
 * One block of TOPK_THREADS threads per batch row (the CPU kernel, kernels/cpu/mor_topk.c, per row):
 * 1. Each score becomes an unsigned key whose integer order is the order we want (NaN -> 0, below
 *    everything; -0.0 -> +0.0; x >= 0 -> bits | sign bit; x < 0 -> ~bits).  Keys are recomputed
 *    from the scores at every pass (no scratch), with integer operations only (--use_fast_math
 *    cannot touch them).
 * 2. Radix select, most significant byte first, 4 passes: a 256-bin shared histogram of the current
 *    byte of the keys that match the bytes fixed so far (warp-aggregated integer atomics:
 *    deterministic counts); warp 0 finds the byte value d holding the w-th largest (a suffix scan
 *    over the bins); keys with a larger byte are certainly chosen (w -= their count), d is fixed.
 *    After the last byte the threshold key `thr` is known exactly, and `want` = w keys equal to it
 *    are taken; exactly k - want keys are > thr.
 * 3. One pass in position order in tiles of TOPK_THREADS x TOPK_ITEMS consecutive positions: a
 *    block-wide exclusive scan of the per-thread counts (#keys > thr, #keys == thr), packed in one
 *    uint32 (16 bits each: a tile holds 2048 < 2^16 positions), gives every winner its output slot
 *    = #(> thr before it) + min(#(== thr before it), want): ties go to the lower position and the
 *    output is ascending with no sort (a stable compaction).
 * k == n takes every position (no passes).  Indexing of positions is 32-bit (the launcher refuses
 * n >= 2^31), of rows 64-bit.  Every write is bounds-checked against k. */
#include "common.cuh"
#include "lmkern/mor.h"

namespace {

using namespace lk;

constexpr int TOPK_THREADS = 512;
constexpr int TOPK_WARPS = TOPK_THREADS / 32;
constexpr int TOPK_ITEMS = 4;
constexpr uint32_t TOPK_TILE = TOPK_THREADS * TOPK_ITEMS;  // < 2^16
static_assert(TOPK_TILE < 65536, "per-tile counts are packed in 16 bits");

constexpr unsigned FULL = 0xffffffffu;

/* Order-preserving key of a float (NaN lowest, -0.0 == +0.0), by integer operations only. */
__device__ __forceinline__ uint32_t score_key(float x) {
    uint32_t u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;  // NaN
    if ((u << 1) == 0u) u = 0u;                       // -0.0 -> +0.0
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* Exclusive prefix sum of v over the block (thread order); *total = the block's sum.
 * Uniform control flow required (contains __syncthreads); scan_s is reusable on return. */
__device__ __forceinline__ uint32_t block_exclusive_scan(uint32_t v, uint32_t *scan_s, uint32_t *total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint32_t incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const uint32_t t = __shfl_up_sync(FULL, incl, o);
        if (lane >= o) incl += t;
    }
    if (lane == 31) scan_s[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        uint32_t x = lane < TOPK_WARPS ? scan_s[lane] : 0u;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const uint32_t t = __shfl_up_sync(FULL, x, o);
            if (lane >= o) x += t;
        }
        if (lane < TOPK_WARPS) scan_s[lane] = x;  // inclusive prefix of the warp totals
    }
    __syncthreads();
    const uint32_t before = warp ? scan_s[warp - 1] : 0u;
    *total = scan_s[TOPK_WARPS - 1];
    __syncthreads();  // scan_s may be rewritten by the next call
    return before + incl - v;
}

template <typename T>
__global__ void __launch_bounds__(TOPK_THREADS) topk_kernel(const lk_mor_topk_params p, int64_t scores_stride) {
    __shared__ uint32_t hist[256];
    __shared__ uint32_t scan_s[TOPK_WARPS];
    __shared__ uint32_t digit_s, above_s;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t b = blockIdx.x;
    const T *s = (const T *)p.scores + b * scores_stride;
    const uint32_t n = (uint32_t)p.n, k = (uint32_t)p.k;

    uint32_t thr = 0u, want = n;  // k == n: every key (all are >= 0) is taken
    if (k < n) {
        uint32_t prefix = 0u, pmask = 0u, w = k;  // w >= 1: the launcher skips k == 0
        for (int shift = 24; shift >= 0; shift -= 8) {
            if (tid < 256) hist[tid] = 0u;
            __syncthreads();
            // every thread runs the same number of iterations: full warps for __match_any_sync
            for (uint32_t base = 0; base < n; base += TOPK_THREADS) {
                const uint32_t i = base + (uint32_t)tid;
                uint32_t d = 256u;  // no bin
                if (i < n) {
                    const uint32_t key = score_key(to_f<T>(s[i]));
                    if ((key & pmask) == prefix) d = (key >> shift) & 0xffu;
                }
                const unsigned peers = __match_any_sync(FULL, d);
                if (d < 256u && lane == __ffs(peers) - 1) atomicAdd(&hist[d], (uint32_t)__popc(peers));
            }
            __syncthreads();
            if (warp == 0) {
                // lane l owns the bins 255 - 8l, ..., 248 - 8l (from the top): the w-th largest lies in the
                // first lane whose inclusive running count reaches w (it exists: the matching keys number >= w)
                uint32_t c[8], sum = 0u;
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    c[u] = hist[255 - 8 * lane - u];
                    sum += c[u];
                }
                uint32_t incl = sum;
#pragma unroll
                for (int o = 1; o < 32; o <<= 1) {
                    const uint32_t t = __shfl_up_sync(FULL, incl, o);
                    if (lane >= o) incl += t;
                }
                const unsigned owner = __ballot_sync(FULL, incl >= w);
                if (owner == 0u && lane == 0) {  // cannot happen for a fixed input; keeps the state defined
                    digit_s = 0u;
                    above_s = 0u;
                }
                if (owner != 0u && lane == __ffs(owner) - 1) {
                    uint32_t above = incl - sum;
                    int u = 0;
#pragma unroll
                    for (int v = 0; v < 7; v++) {  // first bin (from the top) where the count reaches w
                        if (u == v && above + c[v] < w) {
                            above += c[v];
                            u = v + 1;
                        }
                    }
                    digit_s = (uint32_t)(255 - 8 * lane - u);
                    above_s = above;
                }
            }
            __syncthreads();
            prefix |= digit_s << shift;
            pmask |= 0xffu << shift;
            w -= above_s;
            __syncthreads();  // digit_s / above_s / hist are rewritten by the next pass
        }
        thr = prefix;
        want = w;
    }

    // stable compaction in position order
    const int64_t *cand = p.candidates ? p.candidates + b * p.n : nullptr;
    int64_t *idx = p.idx + b * p.k;
    T *gate = (T *)p.gate + b * p.k;
    uint32_t gt_done = 0u, eq_done = 0u;  // counts over the previous tiles (the same in every thread)
    for (uint32_t tile = 0; tile < n; tile += TOPK_TILE) {
        if (gt_done + min(eq_done, want) >= k) break;  // uniform: every slot is written
        const uint32_t i0 = tile + (uint32_t)tid * TOPK_ITEMS;
        uint32_t keys[TOPK_ITEMS];
        uint32_t n_gt = 0u, n_eq = 0u;
#pragma unroll
        for (int u = 0; u < TOPK_ITEMS; u++) {
            const uint32_t i = i0 + u;
            keys[u] = i < n ? score_key(to_f<T>(s[i])) : 0u;
            n_gt += (i < n) & (keys[u] > thr);
            n_eq += (i < n) & (keys[u] == thr);
        }
        uint32_t total;
        const uint32_t before = block_exclusive_scan(n_gt | (n_eq << 16), scan_s, &total);
        uint32_t gt_before = gt_done + (before & 0xffffu), eq_before = eq_done + (before >> 16);
#pragma unroll
        for (int u = 0; u < TOPK_ITEMS; u++) {
            const uint32_t i = i0 + u;
            if (i >= n) break;
            uint32_t slot = k;  // not chosen
            if (keys[u] > thr) {
                slot = gt_before + min(eq_before, want);
                gt_before++;
            } else if (keys[u] == thr) {
                if (eq_before < want) slot = gt_before + eq_before;
                eq_before++;
            }
            if (slot < k) {
                idx[slot] = cand ? cand[i] : (int64_t)i;
                gate[slot] = s[i];
            }
        }
        gt_done += total & 0xffffu;
        eq_done += total >> 16;
    }
}

template <typename T>
lk_status launch(const lk_mor_topk_params *p, int64_t scores_stride, cudaStream_t stream) {
    topk_kernel<T><<<(unsigned)p->B, TOPK_THREADS, 0, stream>>>(*p, scores_stride);
    return check_launch();
}

}  // namespace

extern "C" lk_status lk_mor_topk_cuda(const lk_mor_topk_params *p, int64_t scores_stride, lk_stream stream) {
    if (p->k < 0 || p->k > p->n || p->B < 0 || p->n >= ((int64_t)1 << 31) || p->B >= ((int64_t)1 << 31))
        return LK_ERR_VALUE;
    if (p->B == 0 || p->k == 0) return LK_OK;
    cudaStream_t s = (cudaStream_t)stream;
    switch (p->dtype) {
    case LK_F32: return launch<float>(p, scores_stride, s);
    case LK_F16: return launch<__half>(p, scores_stride, s);
    case LK_BF16: return launch<__nv_bfloat16>(p, scores_stride, s);
    default: return LK_ERR_DTYPE;
    }
}
