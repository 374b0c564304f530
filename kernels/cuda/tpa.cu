/* Tensor Product Attention on the GPU (SPEC 2): decode in the FlashTPA order (2.4) and materialize (2.1).
 * f32, f16, bf16 in; float32 for every product, score, softmax statistic and accumulator.
 *
 * Decode, s[h,j] = scale/(Rq Rk) sum_{r,s} aq[h,r] ak[j,h,s] <bq[r], bk[j,s]>,
 *         out[h] = sum_j softmax_j(s[h,j]) (1/Rv) sum_t av[j,h,t] bv[j,t].
 * tpa_decode_tc_kernel (f16 / bf16, opt-in with LK_TPA_PATH_TENSOR_CORES until it has run on a GPU;
 * described at the kernel): the same order with the bk . bq products and the value products on tensor
 * cores.
 * tpa_decode_kernel (f32, and shapes the former does not take): one block of 256 threads per (batch row
 * b, head group, cache split).  The split's
 * tokens are visited in tiles of TN <= 32; per tile:
 *   1. stage: the tile's ak, bk, av, bv rows (token-major, each token's block contiguous in memory)
 *      are read once, coalesced (16-byte loads when sizes, strides and alignment allow), converted to
 *      float32 into shared memory; tokens past the row's length read as 0 (never loaded);
 *   2. G[j,r,s] = <bq[r], bk[j,s]>: the head-shared products, float32 (bq in shared memory);
 *   3. scores S[h,j] = sum_s ak[j,h,s] sum_r aq'[h,r] G[j,r,s], with aq' = aq * scale log2(e)/(Rq Rk),
 *      so scores are in the log2 domain; tokens j >= kv_lens[b] are -inf (masked tail);
 *   4. one warp per head: online softmax (running max m, sum l, rescale alpha), and the softmax
 *      weights folded into av: W[j,t,h] = p[h,j] av[j,h,t] / Rv;
 *   5. acc[h, e] = alpha[h] acc[h, e] + sum_{j,t} W[j,t,h] bv[j,t,e]: each thread owns 4 consecutive
 *      features of up to 8 heads (float4 reads of bv from shared memory).
 * K and V are never formed and each cached factor is read once per split (once per head group; a
 * single group unless H * E is large).  With one split the block writes out and lse itself; with more,
 * float32 partials [m, l, acc[E]] per (b, h, split) go to scratch and tpa_combine_kernel merges them
 * with softmax.cuh's combine_block (max-stabilized, log2 domain, fixed order: reproducible).
 *
 * Where this does better than the reference Triton kernels of tensorgi/T6
 * (decode/flashtpa_decode_triton*.py): the padded tail of the last block is masked (keys >= kv_lens[b]
 * never contribute; device kv_lens are clamped to [0, M]); the split combine is stabilized by the
 * maximum partial statistic, not the minimum LSE (which overflows exp when partial maxima differ by more
 * than ~88); partials and LSE are float32, not bf16; and the bk . bq products stay float32 (the reference
 * rounds them to bf16 before the head mixing).
 *
 * materialize_kernel: one thread per output element (grid-stride), out = scale sum_r a[h,r] b[r,d].
 *
 * Every index is 64-bit where it can exceed 2^31; every tail is bounds-checked; no float atomics. */
#include <math.h>

#include "common.cuh"
#include "lmkern/tpa.h"
#include "mma.cuh"
#include "softmax.cuh"

namespace {

using namespace lk;

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int MAX_TN = 32;             // tokens per tile (one per lane in the softmax step)
constexpr int MAX_HPT = 8;             // heads per thread in the accumulator
constexpr size_t SMEM_DEFAULT = 48 * 1024;
constexpr size_t SMEM_MAX = 96 * 1024; // opt-in limit that every sm_80+ GPU allows

__host__ __device__ __forceinline__ int odd_pad(int x) { return x | 1; }  // odd row strides: no bank conflicts

/* Shape of one decode launch, computed on the host and passed by value. */
struct DecodeCfg {
    int TN;                    // tokens per tile
    int TE, TH;                // threads across features (4 each) and across heads; TE * TH = THREADS
    int HPT;                   // heads per thread (template parameter of the kernel)
    int GP;                    // lanes sharing one G task (a power of two <= 8 dividing 32)
    int groups, hg;            // head groups and heads per group (the last one may hold fewer)
    int Dp, Rq4, BKJ, GS, AKJ, AVJ, TNP, E4;  // shared-memory strides (floats)
    size_t smem;               // bytes
    int vec;                   // VEC_* flags: 16-byte loads allowed
};

constexpr int VEC_AK = 1, VEC_BK = 2, VEC_AV = 4, VEC_BV = 8;

/* Shared-memory layout (floats), bv first so that its float4 rows are 16-byte aligned. */
struct SmemLayout {
    int bv, bq, bk, G, aq, ak, av, S, W, m, l, alpha, total;
};

__host__ __device__ inline SmemLayout smem_layout(const DecodeCfg &c, int Rq, int Rv) {
    SmemLayout L;
    int o = 0;
    L.bv = o;    o += c.TN * Rv * c.E4;
    L.bq = o;    o += c.Rq4 * c.Dp;
    L.bk = o;    o += c.TN * c.BKJ;
    L.G = o;     o += c.TN * c.GS;
    L.aq = o;    o += c.hg * Rq;
    L.ak = o;    o += c.TN * c.AKJ;
    L.av = o;    o += c.TN * c.AVJ;
    L.S = o;     o += c.hg * c.TNP;
    L.W = o;     o += c.TN * Rv * c.hg;
    L.m = o;     o += c.hg;
    L.l = o;     o += c.hg;
    L.alpha = o; o += c.hg;
    L.total = o;
    return L;
}

/* Element u of 16 raw bytes read as T. */
__device__ __forceinline__ uint32_t word_of(const uint4 &r, int w) {
    return w == 0 ? r.x : w == 1 ? r.y : w == 2 ? r.z : r.w;
}
template <typename T> __device__ __forceinline__ float raw_f(const uint4 &r, int u);
template <> __device__ __forceinline__ float raw_f<float>(const uint4 &r, int u) { return __uint_as_float(word_of(r, u)); }
template <> __device__ __forceinline__ float raw_f<__half>(const uint4 &r, int u) {
    const uint32_t w = word_of(r, u >> 1);
    return __half2float(__ushort_as_half((unsigned short)((u & 1) ? (w >> 16) : (w & 0xffffu))));
}
template <> __device__ __forceinline__ float raw_f<__nv_bfloat16>(const uint4 &r, int u) {
    const uint32_t w = word_of(r, u >> 1);
    return __bfloat162float(__ushort_as_bfloat16((unsigned short)((u & 1) ? (w >> 16) : (w & 0xffffu))));
}

/* Copies tokens j0 .. j0 + TN - 1 of one factor into shared memory as float32.  Token j's `len`
 * contiguous elements start at src + (j0 + j) * tok_stride; element c goes to
 * dst[j * dst_j + (c / inner) * dst_inner + c % inner].  Tokens j >= nvalid are written as 0 and never
 * read from global memory.  vec: 16-byte loads (the host checked len, inner, strides and alignment). */
template <typename T>
__device__ __forceinline__ void stage(float *dst, const T *src, int64_t tok_stride, int64_t j0, int nvalid, int TN,
                                      int len, int inner, int dst_j, int dst_inner, bool vec) {
    if (len <= 0) return;
    const int nthreads = blockDim.x;
    if (vec) {
        constexpr int PER = 16 / sizeof(T);
        const int cpr = len / PER, chunks = TN * cpr;
        for (int q = threadIdx.x; q < chunks; q += nthreads) {
            const int j = q / cpr, c = (q - j * cpr) * PER;
            uint4 raw = make_uint4(0u, 0u, 0u, 0u);
            if (j < nvalid) raw = *reinterpret_cast<const uint4 *>(src + (j0 + j) * tok_stride + c);
            float *d = dst + j * dst_j + (c / inner) * dst_inner + c % inner;  // PER elements stay in one inner row
#pragma unroll
            for (int u = 0; u < PER; u++) d[u] = raw_f<T>(raw, u);
        }
    } else {
        const int total = TN * len;
        for (int q = threadIdx.x; q < total; q += nthreads) {
            const int j = q / len, c = q - j * len;
            const float v = j < nvalid ? to_f<T>(src[(j0 + j) * tok_stride + c]) : 0.f;
            dst[j * dst_j + (c / inner) * dst_inner + c % inner] = v;
        }
    }
}

/* [start, end) of this split's tokens of row b; kv_lens is clamped to [0, M] (memory safety for
 * device-resident lengths). */
__device__ __forceinline__ void split_range(const lk_tpa_attention_params &p, int64_t b, int64_t split, int64_t split_len,
                                            int64_t *start, int64_t *end) {
    int64_t len = p.kv_lens ? p.kv_lens[b] : p.M;
    len = len < 0 ? 0 : (len > p.M ? p.M : len);
    *start = split * split_len;
    *end = min(*start + split_len, len);
}

/* aq_s[h Rq + r] = aq[b, h0 + h, r] * score_scale for the block's hc heads (all threads). */
template <typename T>
__device__ __forceinline__ void stage_aq(float *aq_s, const lk_tpa_attention_params &p, const lk_tpa_decode_strides &st,
                                         int64_t b, int h0, int hc, float score_scale) {
    const int Rq = (int)p.Rq;
    const T *aq = (const T *)p.aq + b * st.aq[0];
    for (int q = threadIdx.x; q < hc * Rq; q += blockDim.x) {
        const int h = q / Rq, r = q - h * Rq;
        aq_s[q] = to_f<T>(aq[(int64_t)(h0 + h) * st.aq[1] + r]) * score_scale;
    }
}

/* One warp's online-softmax step for head h over a tile's scores, TPL tokens per lane: s0 of token lane,
 * s1 of token lane + 32 (TPL = 2).  Lane 0 updates m_s, l_s, alpha_s[h]; returns the probabilities of
 * the two tokens (0 for -inf scores and for the absent second one; all -inf so far gives alpha = 0). */
template <int TPL>
__device__ __forceinline__ float2 online_softmax_step(float *m_s, float *l_s, float *alpha_s, int h, int lane, float s0,
                                                      float s1) {
    static_assert(TPL == 1 || TPL == 2, "one or two tokens per lane");
    const float m_old = m_s[h];
    const float m_new = fmaxf(m_old, warp_max(TPL == 2 ? fmaxf(s0, s1) : s0));
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float p0 = exp2f(s0 - m_use);
    const float p1 = TPL == 2 ? exp2f(s1 - m_use) : 0.f;
    const float alpha = exp2f(m_old - m_use);
    const float sum = warp_sum(TPL == 2 ? p0 + p1 : p0);
    __syncwarp();  // every lane has read m_s[h] before lane 0 overwrites it
    if (lane == 0) {
        m_s[h] = m_new;
        l_s[h] = fmaf(l_s[h], alpha, sum);
        alpha_s[h] = alpha;
    }
    return make_float2(p0, p1);
}

#ifndef LK_TPA_MIN_BLOCKS
// resident blocks per SM asked of the register allocator (at most 85 registers a thread).  H100, bf16,
// H=32 ranks 16/1/1 M=32768 B=4, GPU time by torch.profiler in one process: 3 gives 184 us against 290 us
// for the compiler's own choice (128 registers, 2 blocks); the extra warps hide the shared-memory
// latency that stalled the kernel.  Configurations with 8 heads per thread may spill more (not timed).
#define LK_TPA_MIN_BLOCKS 3
#endif

template <typename T, int HPT>
__global__ void __launch_bounds__(THREADS, LK_TPA_MIN_BLOCKS)
tpa_decode_kernel(const lk_tpa_attention_params p, const lk_tpa_decode_strides st, const DecodeCfg cfg,
                  int num_splits, int64_t split_len, float *scratch, float score_scale) {
    extern __shared__ float4 smem4[];
    float *sm = reinterpret_cast<float *>(smem4);
    const int Rq = (int)p.Rq, Rk = (int)p.Rk, Rv = (int)p.Rv, D = (int)p.D, E = (int)p.E;
    const int TN = cfg.TN, hg = cfg.hg;
    const SmemLayout L = smem_layout(cfg, Rq, Rv);
    float *bv_s = sm + L.bv, *bq_s = sm + L.bq, *bk_s = sm + L.bk, *G_s = sm + L.G, *aq_s = sm + L.aq;
    float *ak_s = sm + L.ak, *av_s = sm + L.av, *S_s = sm + L.S, *W_s = sm + L.W;
    float *m_s = sm + L.m, *l_s = sm + L.l, *alpha_s = sm + L.alpha;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t blk = blockIdx.x;
    const int64_t split = blk % num_splits;
    const int64_t grp = (blk / num_splits) % cfg.groups;
    const int64_t b = blk / ((int64_t)num_splits * cfg.groups);
    const int h0 = (int)grp * hg;
    const int hc = (int)min((int64_t)hg, p.H - h0);  // heads of this group (>= 1: groups = cdiv(H, hg))

    int64_t start, end;
    split_range(p, b, split, split_len, &start, &end);

    // per-block setup: bq rows (zero rows up to Rq4), aq of the group's heads (pre-scaled), zero bv
    // padding columns, softmax state
    const T *bq = (const T *)p.bq + b * st.bq[0];
    for (int q = tid; q < cfg.Rq4 * D; q += THREADS) {
        const int r = q / D, d = q - r * D;
        bq_s[r * cfg.Dp + d] = r < Rq ? to_f<T>(bq[r * st.bq[1] + d]) : 0.f;
    }
    stage_aq<T>(aq_s, p, st, b, h0, hc, score_scale);
    for (int q = tid; q < TN * Rv * (cfg.E4 - E); q += THREADS) {
        const int row = q / (cfg.E4 - E), e = E + q % (cfg.E4 - E);
        bv_s[row * cfg.E4 + e] = 0.f;
    }
    for (int h = tid; h < hg; h += THREADS) {
        m_s[h] = -INFINITY;
        l_s[h] = 0.f;
        alpha_s[h] = 1.f;
    }

    // accumulator: features e0 .. e0 + 3 of heads th + k TH
    const int te = tid % cfg.TE, th = tid / cfg.TE, e0 = te * 4;
    float acc[HPT][4];
    int wh[HPT];  // head index for reads, clamped to the group's written heads (results of heads >= hc are dropped)
#pragma unroll
    for (int k = 0; k < HPT; k++) {
        wh[k] = min(th + k * cfg.TH, hc - 1);
#pragma unroll
        for (int u = 0; u < 4; u++) acc[k][u] = 0.f;
    }

    const T *akp = (const T *)p.ak + b * st.ak[0] + (int64_t)h0 * Rk;
    const T *bkp = (const T *)p.bk + b * st.bk[0];
    const T *avp = (const T *)p.av + b * st.av[0] + (int64_t)h0 * Rv;
    const T *bvp = (const T *)p.bv + b * st.bv[0];
    const float inv_rv = 1.f / (float)Rv;

    for (int64_t j0 = start; j0 < end; j0 += TN) {
        const int nvalid = (int)min((int64_t)TN, end - j0);
        __syncthreads();  // the previous tile (and the setup) is done with shared memory
        // 1. stage the tile
        stage<T>(ak_s, akp, st.ak[1], j0, nvalid, TN, hc * Rk, hc * Rk, cfg.AKJ, 0, cfg.vec & VEC_AK);
        stage<T>(bk_s, bkp, st.bk[1], j0, nvalid, TN, Rk * D, Rk * D, cfg.BKJ, 0, cfg.vec & VEC_BK);
        stage<T>(av_s, avp, st.av[1], j0, nvalid, TN, hc * Rv, hc * Rv, cfg.AVJ, 0, cfg.vec & VEC_AV);
        stage<T>(bv_s, bvp, st.bv[1], j0, nvalid, TN, Rv * E, E > 0 ? E : 1, Rv * cfg.E4, cfg.E4, cfg.vec & VEC_BV);
        __syncthreads();
        // 2. G[j, r, s] = <bq[r], bk[j, s]>, four ranks r per task; each task's D features are split over
        //    GP adjacent lanes (interleaved) and summed with shuffles, so small tiles keep every thread busy
        {
            const int GP = cfg.GP, rchunks = cfg.Rq4 / 4, tasks = TN * Rk * rchunks;
            for (int q0i = 0; q0i < tasks * GP; q0i += THREADS) {   // uniform trip count: shuffles below
                const int q = q0i + tid, task = q / GP, part = q - task * GP;
                const bool live = task < tasks;
                const int j = task % TN, rest = task / TN, s = rest % Rk, r0 = (rest / Rk) * 4;
                float g0 = 0.f, g1 = 0.f, g2 = 0.f, g3 = 0.f;
                if (live) {
                    const float *krow = bk_s + j * cfg.BKJ + s * D;
                    const float *q0 = bq_s + r0 * cfg.Dp;
                    for (int d = part; d < D; d += GP) {
                        const float x = krow[d];
                        g0 = fmaf(q0[d], x, g0);
                        g1 = fmaf(q0[cfg.Dp + d], x, g1);
                        g2 = fmaf(q0[2 * cfg.Dp + d], x, g2);
                        g3 = fmaf(q0[3 * cfg.Dp + d], x, g3);
                    }
                }
                for (int o = GP / 2; o > 0; o >>= 1) {   // GP lanes of a task are adjacent and aligned
                    g0 += __shfl_xor_sync(0xffffffffu, g0, o);
                    g1 += __shfl_xor_sync(0xffffffffu, g1, o);
                    g2 += __shfl_xor_sync(0xffffffffu, g2, o);
                    g3 += __shfl_xor_sync(0xffffffffu, g3, o);
                }
                if (live && part == 0) {
                    float *g = G_s + j * cfg.GS + s;
                    if (r0 < Rq) g[r0 * Rk] = g0;
                    if (r0 + 1 < Rq) g[(r0 + 1) * Rk] = g1;
                    if (r0 + 2 < Rq) g[(r0 + 2) * Rk] = g2;
                    if (r0 + 3 < Rq) g[(r0 + 3) * Rk] = g3;
                }
            }
        }
        __syncthreads();
        // 3. S[h, j] = sum_s ak[j, h, s] sum_r aq'[h, r] G[j, r, s]  (log2 domain; masked tail -inf)
        for (int q = tid; q < hc * TN; q += THREADS) {
            const int j = q % TN, h = q / TN;
            float sc = -INFINITY;
            if (j < nvalid) {
                sc = 0.f;
                const float *g = G_s + j * cfg.GS;
                const float *a = aq_s + h * Rq;
                const float *k = ak_s + j * cfg.AKJ + h * Rk;
                for (int s = 0; s < Rk; s++) {
                    float mix = 0.f;
                    for (int r = 0; r < Rq; r++) mix = fmaf(a[r], g[r * Rk + s], mix);
                    sc = fmaf(k[s], mix, sc);
                }
            }
            S_s[h * cfg.TNP + j] = sc;
        }
        __syncthreads();
        // 4. online softmax, one warp per head (lane = token), and W[j, t, h] = p[h, j] av[j, h, t] / Rv
        for (int h = warp; h < hc; h += WARPS) {  // warp-uniform
            const float sc = lane < TN ? S_s[h * cfg.TNP + lane] : -INFINITY;
            const float pr = online_softmax_step<1>(m_s, l_s, alpha_s, h, lane, sc, 0.f).x;
            if (lane < TN) {
                const float pw = pr * inv_rv;
                for (int t = 0; t < Rv; t++) W_s[(lane * Rv + t) * hg + h] = pw * av_s[lane * cfg.AVJ + h * Rv + t];
            }
        }
        __syncthreads();
        // 5. acc[h, e] = alpha[h] acc[h, e] + sum_{j, t} W[j, t, h] bv[j, t, e]
        float al[HPT];
#pragma unroll
        for (int k = 0; k < HPT; k++) al[k] = alpha_s[wh[k]];
#pragma unroll
        for (int k = 0; k < HPT; k++)
#pragma unroll
            for (int u = 0; u < 4; u++) acc[k][u] *= al[k];
        const int rows = nvalid * Rv;
        for (int row = 0; row < rows; row++) {
            const float4 v = *reinterpret_cast<const float4 *>(bv_s + row * cfg.E4 + e0);
            const float *w = W_s + row * hg;
#pragma unroll
            for (int k = 0; k < HPT; k++) {
                const float wk = w[wh[k]];
                acc[k][0] = fmaf(wk, v.x, acc[k][0]);
                acc[k][1] = fmaf(wk, v.y, acc[k][1]);
                acc[k][2] = fmaf(wk, v.z, acc[k][2]);
                acc[k][3] = fmaf(wk, v.w, acc[k][3]);
            }
        }
    }
    __syncthreads();  // m_s / l_s of the last tile (and of the setup, for an empty split) are visible

    // write: the output directly (one split) or this split's partial
#pragma unroll
    for (int k = 0; k < HPT; k++) {
        const int h = th + k * cfg.TH;
        if (h >= hc) continue;
        const int64_t hh = h0 + h;
        const float m = m_s[h], l = l_s[h];
        if (num_splits == 1) {
            const float inv = l == 0.f ? 0.f : 1.f / l;
            T *o = (T *)p.out + b * st.out[0] + hh * st.out[1];
#pragma unroll
            for (int u = 0; u < 4; u++)
                if (e0 + u < E) o[e0 + u] = from_f<T>(acc[k][u] * inv);
            if (te == 0 && p.lse) ((float *)p.lse)[b * p.H + hh] = l == 0.f ? -INFINITY : (m + log2f(l)) * LN2_F;
        } else {
            float *part = scratch + ((b * p.H + hh) * num_splits + split) * (int64_t)(E + 2);
            if (te == 0) {
                part[0] = m;
                part[1] = l;
            }
#pragma unroll
            for (int u = 0; u < 4; u++)
                if (e0 + u < E) part[2 + e0 + u] = acc[k][u];
        }
    }
}


/* ---- tensor-core decode (float16 / bfloat16) ------------------------------------------------------
 * tpa_decode_tc_kernel: one block of 4 warps per (batch row, cache split), every head in the block.
 * Per tile of TN (64, 32 or 16) tokens:
 *   1. stage: bk rows (token, rank) and bv transposed ([feature][token, rank]) in the input dtype, ak
 *      and av as float32; tokens past the row's length are zeros, never loaded;
 *   2. G[(j, s), r] = <bk[j, s], bq[r]> on tensor cores (mma.sync m16n8k16, f32 accumulate): the
 *      products of two f16 / bf16 numbers are exact and the sums stay in (tensor-core) f32, whose
 *      alignment truncation differs slightly from IEEE float32 adds; T6 rounds G to bf16, we do not;
 *   3. scores S[h, j] = sum_s ak[j, h, s] sum_r aq'[h, r] G[(j, s), r] in float32 (CUDA cores);
 *   4. online softmax, one warp per head, and W[h, (j, t)] = p[h, j] av[j, h, t] rounded to the input
 *      dtype (the one rounding this kernel adds, like FlashAttention's P; 1/Rv is applied to the
 *      accumulators at the end, so small weights do not fall into f16 subnormals);
 *   5. acc[h, e] = alpha[h] acc[h, e] + sum_(j, t) W[h, (j, t)] bv[(j, t), e] on tensor cores; the
 *      accumulators (16 heads x 8 features per mma tile, up to TC_MAX_TILES tiles per warp) stay in
 *      registers across the split.
 * Output and partials as tpa_decode_kernel (the same combine).  Shapes whose accumulators or tiles do
 * not fit use the CUDA-core kernel. */
constexpr int TC_THREADS = 128;
constexpr int TC_WARPS = TC_THREADS / 32;
constexpr int TC_MAX_TILES = 16;   // accumulator tiles per warp (64 registers)

struct TcCfg {
    int TN;                 // tokens per tile
    int DP, E8, H16, Rq8;   // D padded to 16, E to 8, H to 16, Rq to 8
    int KS, WS, GS;         // row strides: bk_s / bq_s (DP + 8), W_s / bvt_s (TN Rv + 8), G_s (Rq8 + 4 floats)
    int AKJ, AVJ, TNP;      // float32 strides of ak_s, av_s, S_s (odd)
    int tiles;              // accumulator tiles: H16 / 16 * E8 / 8
    int MT;                 // tiles per warp (template parameter: 4, 8 or 16)
    size_t smem;
    int vec;                // VEC_* flags
};

struct TcLayout {
    size_t bq, bk, bvt, W, G, aq, ak, av, S, m, l, alpha, total;   // byte offsets, 16-byte aligned
};

__host__ __device__ inline size_t align16(size_t x) { return (x + 15) / 16 * 16; }

__host__ __device__ inline TcLayout tc_layout(const TcCfg &c, int H, int Rq, int Rk) {
    TcLayout L;
    size_t o = 0;
    L.bq = o;    o = align16(o + (size_t)c.Rq8 * c.KS * 2);
    L.bk = o;    o = align16(o + (size_t)c.TN * Rk * c.KS * 2);
    L.bvt = o;   o = align16(o + (size_t)c.E8 * c.WS * 2);
    L.W = o;     o = align16(o + (size_t)c.H16 * c.WS * 2);
    L.G = o;     o = align16(o + (size_t)c.TN * Rk * c.GS * 4);
    L.aq = o;    o = align16(o + (size_t)H * Rq * 4);
    L.ak = o;    o = align16(o + (size_t)c.TN * c.AKJ * 4);
    L.av = o;    o = align16(o + (size_t)c.TN * c.AVJ * 4);
    L.S = o;     o = align16(o + (size_t)H * c.TNP * 4);
    L.m = o;     o = align16(o + (size_t)H * 4);
    L.l = o;     o = align16(o + (size_t)H * 4);
    L.alpha = o; o = align16(o + (size_t)H * 4);
    L.total = o;
    return L;
}

template <typename T, int MT>
__global__ void __launch_bounds__(TC_THREADS)
tpa_decode_tc_kernel(const lk_tpa_attention_params p, const lk_tpa_decode_strides st, const TcCfg cfg,
                     int num_splits, int64_t split_len, float *scratch, float score_scale) {
    extern __shared__ __align__(16) unsigned char tc_smem[];
    const int H = (int)p.H, Rq = (int)p.Rq, Rk = (int)p.Rk, Rv = (int)p.Rv, D = (int)p.D, E = (int)p.E;
    const TcLayout L = tc_layout(cfg, H, Rq, Rk);
    T *bq_s = reinterpret_cast<T *>(tc_smem + L.bq), *bk_s = reinterpret_cast<T *>(tc_smem + L.bk);
    T *bvt_s = reinterpret_cast<T *>(tc_smem + L.bvt), *W_s = reinterpret_cast<T *>(tc_smem + L.W);
    float *G_s = reinterpret_cast<float *>(tc_smem + L.G), *aq_s = reinterpret_cast<float *>(tc_smem + L.aq);
    float *ak_s = reinterpret_cast<float *>(tc_smem + L.ak), *av_s = reinterpret_cast<float *>(tc_smem + L.av);
    float *S_s = reinterpret_cast<float *>(tc_smem + L.S), *m_s = reinterpret_cast<float *>(tc_smem + L.m);
    float *l_s = reinterpret_cast<float *>(tc_smem + L.l), *alpha_s = reinterpret_cast<float *>(tc_smem + L.alpha);
    const int TN = cfg.TN, KS = cfg.KS, WS = cfg.WS, GS = cfg.GS, DP = cfg.DP;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
    const T zero = from_f<T>(0.f);

    const int64_t split = blockIdx.x % num_splits, b = blockIdx.x / num_splits;
    int64_t start, end;
    split_range(p, b, split, split_len, &start, &end);

    // setup: bq (zero-padded to Rq8 x DP), aq pre-scaled, the padding rows / columns that staging never
    // writes (W rows >= H, bvt rows >= E, bk columns >= D), softmax state
    const T *bq = (const T *)p.bq + b * st.bq[0];
    for (int q = tid; q < cfg.Rq8 * DP; q += TC_THREADS) {
        const int r = q / DP, d = q - r * DP;
        bq_s[r * KS + d] = (r < Rq && d < D) ? bq[r * st.bq[1] + d] : zero;
    }
    stage_aq<T>(aq_s, p, st, b, 0, H, score_scale);
    for (int q = tid; q < (cfg.H16 - H) * WS; q += TC_THREADS) W_s[H * WS + q] = zero;
    for (int q = tid; q < (cfg.E8 - E) * WS; q += TC_THREADS) bvt_s[E * WS + q] = zero;
    if (DP > D)
        for (int q = tid; q < TN * Rk * (DP - D); q += TC_THREADS) {
            const int row = q / (DP - D), d = D + q % (DP - D);
            bk_s[row * KS + d] = zero;
        }
    for (int h = tid; h < H; h += TC_THREADS) {
        m_s[h] = -INFINITY;
        l_s[h] = 0.f;
        alpha_s[h] = 1.f;
    }
    float acc[MT][4];
#pragma unroll
    for (int k = 0; k < MT; k++) acc[k][0] = acc[k][1] = acc[k][2] = acc[k][3] = 0.f;

    const T *akp = (const T *)p.ak + b * st.ak[0];
    const T *bkp = (const T *)p.bk + b * st.bk[0];
    const T *avp = (const T *)p.av + b * st.av[0];
    const T *bvp = (const T *)p.bv + b * st.bv[0];
    const float inv_rv = 1.f / (float)Rv;
    const int etiles = cfg.E8 / 8, mtiles_g = TN * Rk / 16, ntiles_g = cfg.Rq8 / 8, ksteps_g = DP / 16;
    const int ksteps_v = TN * Rv / 16, RvE = Rv * E, RkD = Rk * D;

    for (int64_t j0 = start; j0 < end; j0 += TN) {
        const int nvalid = (int)min((int64_t)TN, end - j0);
        __syncthreads();  // the previous tile (and the setup) is done with shared memory
        // 1. stage
        stage<T>(ak_s, akp, st.ak[1], j0, nvalid, TN, H * Rk, H * Rk, cfg.AKJ, 0, cfg.vec & VEC_AK);
        stage<T>(av_s, avp, st.av[1], j0, nvalid, TN, H * Rv, H * Rv, cfg.AVJ, 0, cfg.vec & VEC_AV);
        if (cfg.vec & VEC_BK) {   // 8 elements of one (token, rank) row per 16-byte load (D % 8 == 0)
            const int cpr = RkD / 8;
            for (int q = tid; q < TN * cpr; q += TC_THREADS) {
                const int j = q / cpr, c = (q - j * cpr) * 8, s = c / D, d = c - s * D;
                uint4 raw = make_uint4(0u, 0u, 0u, 0u);
                if (j < nvalid) raw = *reinterpret_cast<const uint4 *>(bkp + (j0 + j) * st.bk[1] + c);
                *reinterpret_cast<uint4 *>(bk_s + (j * Rk + s) * KS + d) = raw;
            }
        } else {
            for (int q = tid; q < TN * RkD; q += TC_THREADS) {
                const int j = q / RkD, c = q - j * RkD, s = c / D, d = c - s * D;
                bk_s[(j * Rk + s) * KS + d] = j < nvalid ? bkp[(j0 + j) * st.bk[1] + c] : zero;
            }
        }
        if (cfg.vec & VEC_BV) {   // bv transposed: bvt_s[e][j Rv + t] (E % 8 == 0)
            const int cpr = RvE / 8;
            for (int q = tid; q < TN * cpr; q += TC_THREADS) {
                const int j = q / cpr, c = (q - j * cpr) * 8, t = c / E, e = c - t * E;
                uint4 raw = make_uint4(0u, 0u, 0u, 0u);
                if (j < nvalid) raw = *reinterpret_cast<const uint4 *>(bvp + (j0 + j) * st.bv[1] + c);
#pragma unroll
                for (int u = 0; u < 8; u++) bvt_s[(e + u) * WS + j * Rv + t] = from_f<T>(raw_f<T>(raw, u));  // exact
            }
        } else {
            for (int q = tid; q < TN * RvE; q += TC_THREADS) {
                const int j = q / RvE, c = q - j * RvE, t = c / E, e = c - t * E;
                bvt_s[e * WS + j * Rv + t] = j < nvalid ? bvp[(j0 + j) * st.bv[1] + c] : zero;
            }
        }
        __syncthreads();
        // 2. G on tensor cores: rows (j, s) of bk_s times the bq rows
        for (int mt = warp; mt < mtiles_g; mt += TC_WARPS) {
            for (int nt = 0; nt < ntiles_g; nt++) {
                float c[4] = {0.f, 0.f, 0.f, 0.f};
                for (int ks = 0; ks < ksteps_g; ks++) {
                    uint32_t a[4];
                    load_a(a, bk_s + mt * 16 * KS + ks * 16, KS, gid, tig);
                    const T *bb = bq_s + (nt * 8 + gid) * KS + ks * 16 + 2 * tig;
                    mma_op<T>::run(c, a, ld32(bb), ld32(bb + 8));
                }
                float *g = G_s + (mt * 16 + gid) * GS + nt * 8 + 2 * tig;
                g[0] = c[0];
                g[1] = c[1];
                g[8 * GS] = c[2];
                g[8 * GS + 1] = c[3];
            }
        }
        __syncthreads();
        // 3. S[h, j] = sum_s ak[j, h, s] sum_r aq'[h, r] G[(j, s), r]  (log2 domain; masked tail -inf)
        for (int q = tid; q < H * TN; q += TC_THREADS) {
            const int h = q / TN, j = q - h * TN;
            float sc = -INFINITY;
            if (j < nvalid) {
                sc = 0.f;
                const float *a = aq_s + h * Rq, *k = ak_s + j * cfg.AKJ + h * Rk;
                for (int s = 0; s < Rk; s++) {
                    const float *g = G_s + (j * Rk + s) * GS;
                    float mix = 0.f;
                    for (int r = 0; r < Rq; r++) mix = fmaf(a[r], g[r], mix);
                    sc = fmaf(k[s], mix, sc);
                }
            }
            S_s[h * cfg.TNP + j] = sc;
        }
        __syncthreads();
        // 4. online softmax, one warp per head (tokens lane and lane + 32), and the W rows
        for (int h = warp; h < H; h += TC_WARPS) {  // warp-uniform
            const float s0 = lane < TN ? S_s[h * cfg.TNP + lane] : -INFINITY;
            const float s1 = lane + 32 < TN ? S_s[h * cfg.TNP + lane + 32] : -INFINITY;
            const float2 pp = online_softmax_step<2>(m_s, l_s, alpha_s, h, lane, s0, s1);
            const float p0 = pp.x, p1 = pp.y;
#pragma unroll
            for (int u = 0; u < 2; u++) {
                const int j = lane + 32 * u;
                if (j < TN) {   // 1/Rv is applied to the accumulators at the end: W keeps f16's range
                    const float pw = u ? p1 : p0;
                    for (int t = 0; t < Rv; t++)
                        W_s[h * WS + j * Rv + t] = from_f<T>(pw * av_s[j * cfg.AVJ + h * Rv + t]);
                }
            }
        }
        __syncthreads();
        // 5. acc = alpha acc + W bv on tensor cores; tile k of this warp is t = warp + 4 k
#pragma unroll
        for (int k = 0; k < MT; k++) {
            const int t = warp + k * TC_WARPS;
            if (t < cfg.tiles) {  // warp-uniform
                const int mh = t / etiles, ne = t - mh * etiles;
                const int h0 = mh * 16 + gid, h1 = h0 + 8;
                const float a0 = h0 < H ? alpha_s[h0] : 1.f, a1 = h1 < H ? alpha_s[h1] : 1.f;
                acc[k][0] *= a0;
                acc[k][1] *= a0;
                acc[k][2] *= a1;
                acc[k][3] *= a1;
                for (int ks = 0; ks < ksteps_v; ks++) {
                    uint32_t a[4];
                    load_a(a, W_s + mh * 16 * WS + ks * 16, WS, gid, tig);
                    const T *bb = bvt_s + (ne * 8 + gid) * WS + ks * 16 + 2 * tig;
                    mma_op<T>::run(acc[k], a, ld32(bb), ld32(bb + 8));
                }
            }
        }
    }
    __syncthreads();  // m_s / l_s of the last tile (and of the setup, for an empty split) are visible

    // write: the output (one split) or this split's partial; the fragment's rows are heads, columns features
#pragma unroll
    for (int k = 0; k < MT; k++) {
        const int t = warp + k * TC_WARPS;
        if (t >= cfg.tiles) continue;
        const int mh = t / etiles, ne = t - mh * etiles;
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const int h = mh * 16 + gid + (c >= 2 ? 8 : 0), e = ne * 8 + 2 * tig + (c & 1);
            if (h >= H || e >= E) continue;
            if (num_splits == 1) {
                const float l = l_s[h], inv = l == 0.f ? 0.f : 1.f / l;
                ((T *)p.out)[b * st.out[0] + (int64_t)h * st.out[1] + e] = from_f<T>(acc[k][c] * inv_rv * inv);
            } else {   // the combine is linear in acc: 1/Rv applied here is exact
                scratch[((b * H + h) * num_splits + split) * (int64_t)(E + 2) + 2 + e] = acc[k][c] * inv_rv;
            }
        }
    }
    for (int h = tid; h < H; h += TC_THREADS) {
        const float m = m_s[h], l = l_s[h];
        if (num_splits == 1) {
            if (p.lse) ((float *)p.lse)[b * H + h] = l == 0.f ? -INFINITY : (m + log2f(l)) * LN2_F;
        } else {
            float *part = scratch + ((b * H + h) * num_splits + split) * (int64_t)(E + 2);
            part[0] = m;
            part[1] = l;
        }
    }
}

/* One block per (b, h): merges the split partials with combine_block. */
template <typename T>
__global__ void __launch_bounds__(COMBINE_THREADS)
tpa_combine_kernel(const lk_tpa_attention_params p, const lk_tpa_decode_strides st, int num_splits, const float *scratch) {
    const int64_t row = blockIdx.x;
    const int64_t b = row / p.H, h = row % p.H;
    T *o = (T *)p.out + b * st.out[0] + h * st.out[1];
    combine_block<T, COMBINE_THREADS>(scratch + row * num_splits * (p.E + 2), num_splits, p.E, o,
                                      p.lse ? (float *)p.lse + row : nullptr);
}

/* out[n, h, d] = scale sum_r a[n, h, r] b[n, r, d]: one thread per output element. */
template <typename T>
__global__ void __launch_bounds__(THREADS)
materialize_kernel(const lk_tpa_materialize_params p, float scale) {
    const int64_t total = p.rows * p.H * p.D;
    const T *a = (const T *)p.a;
    const T *bm = (const T *)p.b;
    T *out = (T *)p.out;
    for (int64_t idx = (int64_t)blockIdx.x * THREADS + threadIdx.x; idx < total; idx += (int64_t)gridDim.x * THREADS) {
        const int64_t d = idx % p.D, nh = idx / p.D, n = nh / p.H;
        const T *ar = a + nh * p.R;
        const T *bc = bm + n * p.R * p.D + d;
        float acc = 0.f;
        for (int64_t r = 0; r < p.R; r++) acc = fmaf(to_f<T>(ar[r]), to_f<T>(bc[r * p.D]), acc);
        out[idx] = from_f<T>(acc * scale);
    }
}

/* ---- host side ----------------------------------------------------------------------------------- */

size_t itemsize(lk_dtype dt) { return dt == LK_F32 ? 4 : 2; }

/* The launch shape of a decode call; false when it does not fit the kernel. */
bool decode_config(const lk_tpa_attention_params *p, DecodeCfg *c) {
    if (p->D > LK_CUDA_ATTN_MAX_HEAD_DIM || p->E > LK_CUDA_ATTN_MAX_HEAD_DIM || p->D < 0 || p->E < 0) return false;
    if (p->Rq < 1 || p->Rk < 1 || p->Rv < 1 || p->H < 1) return false;
    if (p->Rq > 4096 || p->Rk > 4096 || p->Rv > 4096 || p->H > (1 << 20)) return false;
    const int D = (int)p->D, E = (int)p->E, Rq = (int)p->Rq, Rk = (int)p->Rk, Rv = (int)p->Rv, H = (int)p->H;
    int te = 1;
    while (te * 4 < E) te *= 2;  // E <= 256: te <= 64
    c->TE = te;
    c->TH = THREADS / te;
    c->E4 = 4 * te;
    const int need = (H + c->TH - 1) / c->TH;  // heads per thread for one group
    if (need <= MAX_HPT) {
        c->groups = 1;
        c->hg = H;
    } else {
        c->groups = (H + MAX_HPT * c->TH - 1) / (MAX_HPT * c->TH);
        c->hg = (H + c->groups - 1) / c->groups;
        c->groups = (H + c->hg - 1) / c->hg;
    }
    const int hpt = (c->hg + c->TH - 1) / c->TH;
    c->HPT = hpt <= 1 ? 1 : hpt <= 2 ? 2 : hpt <= 4 ? 4 : 8;
    c->Dp = odd_pad(D);
    c->Rq4 = (Rq + 3) / 4 * 4;
    c->BKJ = odd_pad(Rk * D);
    c->GS = odd_pad(Rq * Rk);
    c->AKJ = odd_pad(c->hg * Rk);
    c->AVJ = odd_pad(c->hg * Rv);
    for (int tn = MAX_TN; tn >= 1; tn /= 2) {
        c->TN = tn;
        c->TNP = odd_pad(tn);
        const size_t bytes = (size_t)smem_layout(*c, Rq, Rv).total * sizeof(float);
        c->smem = bytes;
        if (bytes <= SMEM_DEFAULT) break;
    }
    const int64_t tasks = (int64_t)c->TN * Rk * (c->Rq4 / 4);
    c->GP = 1;
    while (c->GP < 8 && tasks * c->GP * 2 <= THREADS && c->GP * 2 <= D) c->GP *= 2;
    return c->smem <= SMEM_MAX;  // TN = 1 may need more than the default shared memory
}

/* 16-byte loads of a factor: token rows of `len` elements at `base` + b*sb + j*sj + off for every b, j
 * (and inner rows of `inner` elements not straddling a chunk). */
bool vec_ok(const void *base, int64_t sb, int64_t sj, int64_t off_step, int64_t len, int64_t inner, size_t item) {
    const int64_t per = 16 / (int64_t)item;
    return ((uintptr_t)base % 16 == 0) && sb % per == 0 && sj % per == 0 && off_step % per == 0 && len % per == 0 &&
           inner % per == 0;
}

/* Launches a decode kernel over blocks_per_split x num_splits blocks (opting in to more shared memory
 * when the config needs it), then, with splits, the combine.  Shared by both decode kernels. */
template <typename T, typename Cfg>
lk_status launch_split(void (*kernel)(lk_tpa_attention_params, lk_tpa_decode_strides, Cfg, int, int64_t, float *, float),
                       const lk_tpa_attention_params *p, const lk_tpa_decode_strides *s, const Cfg &c,
                       int64_t blocks_per_split, int threads, int num_splits, float *scratch, cudaStream_t st) {
    const int64_t blocks = blocks_per_split * num_splits;
    if (blocks > 0x7fffffff || (num_splits > 1 && p->B * p->H > 0x7fffffff)) return LK_ERR_VALUE;
    // split_len: a multiple of the tile, covering M
    int64_t split_len = (p->M + num_splits - 1) / num_splits;
    split_len = (split_len + c.TN - 1) / c.TN * c.TN;
    if (split_len < c.TN) split_len = c.TN;
    if (c.smem > SMEM_DEFAULT) {
        cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)c.smem);
        if (err != cudaSuccess) return lk::record_error(err);
    }
    const float score_scale = (float)(p->scale * 1.4426950408889634 / ((double)p->Rq * (double)p->Rk));
    kernel<<<(unsigned)blocks, threads, c.smem, st>>>(*p, *s, c, num_splits, split_len, scratch, score_scale);
    lk_status status = lk::check_launch();
    if (status != LK_OK || num_splits == 1) return status;
    tpa_combine_kernel<T><<<(unsigned)(p->B * p->H), COMBINE_THREADS, 0, st>>>(*p, *s, num_splits, scratch);
    return lk::check_launch();
}

template <typename T, int HPT>
lk_status launch_decode(const lk_tpa_attention_params *p, const lk_tpa_decode_strides *s, const DecodeCfg &c,
                        int num_splits, float *scratch, cudaStream_t st) {
    return launch_split<T, DecodeCfg>(tpa_decode_kernel<T, HPT>, p, s, c, p->B * c.groups, THREADS, num_splits, scratch, st);
}

template <typename T>
lk_status launch_decode_h(const lk_tpa_attention_params *p, const lk_tpa_decode_strides *s, const DecodeCfg &c,
                          int num_splits, float *scratch, cudaStream_t st) {
    switch (c.HPT) {
    case 1: return launch_decode<T, 1>(p, s, c, num_splits, scratch, st);
    case 2: return launch_decode<T, 2>(p, s, c, num_splits, scratch, st);
    case 4: return launch_decode<T, 4>(p, s, c, num_splits, scratch, st);
    default: return launch_decode<T, 8>(p, s, c, num_splits, scratch, st);
    }
}


/* The launch shape of the tensor-core decode; false when the shape does not fit it (the CUDA-core
 * kernel takes it). */
bool tc_config(const lk_tpa_attention_params *p, TcCfg *c) {
    if (p->dtype != LK_F16 && p->dtype != LK_BF16) return false;
    if (p->D < 1 || p->E < 1 || p->D > LK_CUDA_ATTN_MAX_HEAD_DIM || p->E > LK_CUDA_ATTN_MAX_HEAD_DIM) return false;
    if (p->H < 1 || p->H > 4096 || p->Rq < 1 || p->Rq > 256 || p->Rk < 1 || p->Rk > 16 || p->Rv < 1 || p->Rv > 16)
        return false;
    const int H = (int)p->H, Rq = (int)p->Rq, Rk = (int)p->Rk, Rv = (int)p->Rv;
    c->DP = ((int)p->D + 15) / 16 * 16;
    c->E8 = ((int)p->E + 7) / 8 * 8;
    c->H16 = (H + 15) / 16 * 16;
    c->Rq8 = (Rq + 7) / 8 * 8;
    c->tiles = c->H16 / 16 * (c->E8 / 8);
    const int per_warp = (c->tiles + TC_WARPS - 1) / TC_WARPS;
    if (per_warp > TC_MAX_TILES) return false;
    c->MT = per_warp <= 4 ? 4 : per_warp <= 8 ? 8 : 16;
    c->KS = c->DP + 8;
    c->GS = c->Rq8 + 4;
    c->AKJ = odd_pad(H * Rk);
    c->AVJ = odd_pad(H * Rv);
    for (int tn = 64; tn >= 16; tn /= 2) {
        c->TN = tn;
        c->TNP = odd_pad(tn);
        c->WS = tn * Rv + 8;
        c->smem = tc_layout(*c, H, Rq, Rk).total;
        if (c->smem <= SMEM_MAX) return true;
    }
    return false;
}

template <typename T, int MT>
lk_status launch_tc(const lk_tpa_attention_params *p, const lk_tpa_decode_strides *s, const TcCfg &c, int num_splits,
                    float *scratch, cudaStream_t st) {
    return launch_split<T, TcCfg>(tpa_decode_tc_kernel<T, MT>, p, s, c, p->B, TC_THREADS, num_splits, scratch, st);
}

template <typename T>
lk_status launch_tc_mt(const lk_tpa_attention_params *p, const lk_tpa_decode_strides *s, const TcCfg &c, int num_splits,
                       float *scratch, cudaStream_t st) {
    switch (c.MT) {
    case 4: return launch_tc<T, 4>(p, s, c, num_splits, scratch, st);
    case 8: return launch_tc<T, 8>(p, s, c, num_splits, scratch, st);
    default: return launch_tc<T, 16>(p, s, c, num_splits, scratch, st);
    }
}

/* Whether a call takes the tensor-core kernel: only when p->path is LK_TPA_PATH_TENSOR_CORES (and the
 * shape fits).  It compiles but has not run on a GPU yet (stop 11 lost its device before the run), so
 * LK_TPA_PATH_AUTO stays on the float32 CUDA-core kernel, which the H100 tests passed; the first GPU
 * session that passes test_gpu_decode_tensor_cores_and_cuda_cores_agree should make it the default for
 * f16 / bf16. */
bool use_tc(const lk_tpa_attention_params *p, TcCfg *c) {
    return p->path == LK_TPA_PATH_TENSOR_CORES && tc_config(p, c);
}

}  // namespace

extern "C" int lk_tpa_decode_cuda_supported(const lk_tpa_attention_params *p) {
    TcCfg t;
    if (p->path == LK_TPA_PATH_TENSOR_CORES) return tc_config(p, &t) ? 1 : 0;
    DecodeCfg c;
    return decode_config(p, &c) ? 1 : 0;
}

extern "C" int lk_tpa_decode_cuda_splits(const lk_tpa_attention_params *p, int num_sms) {
    TcCfg t;
    if (use_tc(p, &t)) {   // about 4 blocks per SM, at least 4 tiles per split
        if (p->B <= 0 || p->M <= 4 * t.TN) return 1;
        int64_t splits = (4 * (int64_t)(num_sms > 0 ? num_sms : 1) + p->B - 1) / p->B;
        const int64_t most = (p->M + 4 * t.TN - 1) / (4 * t.TN);
        if (splits > most) splits = most;
        if (splits > 512) splits = 512;
        return splits < 1 ? 1 : (int)splits;
    }
    DecodeCfg c;
    if (!decode_config(p, &c) || p->B <= 0 || p->M <= 256) return 1;
    // about two blocks per SM (the kernel's residency; more with LK_TPA_MIN_BLOCKS), at least 512 tokens
    // per split: fewer partials for the combine to merge
    const int64_t per_b = p->B * c.groups;
    const int64_t resident = LK_TPA_MIN_BLOCKS > 2 ? LK_TPA_MIN_BLOCKS : 2;
    int64_t splits = per_b > 0 ? (resident * (int64_t)(num_sms > 0 ? num_sms : 1) + per_b - 1) / per_b : 1;
    const int64_t most = (p->M + 511) / 512;
    if (splits > most) splits = most;
    if (splits > 512) splits = 512;
    return splits < 1 ? 1 : (int)splits;
}

extern "C" int64_t lk_tpa_decode_cuda_scratch_floats(const lk_tpa_attention_params *p, int num_splits) {
    if (num_splits <= 1) return 0;
    return p->B * p->H * (int64_t)num_splits * (p->E + 2);
}

extern "C" lk_status lk_tpa_decode_cuda(const lk_tpa_attention_params *p, const lk_tpa_decode_strides *s,
                                        int num_splits, float *scratch, lk_stream stream) {
    if (p->dtype != LK_F32 && p->dtype != LK_F16 && p->dtype != LK_BF16) return LK_ERR_DTYPE;
    if (p->B == 0 || p->H == 0) return LK_OK;
    if (p->M < 0 || p->B < 0) return LK_ERR_VALUE;
    if (num_splits < 1 || (num_splits > 1 && !scratch)) return LK_ERR_VALUE;
    const size_t item = itemsize(p->dtype);
    cudaStream_t st = (cudaStream_t)stream;
    TcCfg t;
    if (use_tc(p, &t)) {
        t.vec = 0;
        const int64_t hk = p->H * p->Rk, hv = p->H * p->Rv;
        if (vec_ok(p->ak, s->ak[0], s->ak[1], 0, hk, hk, item)) t.vec |= VEC_AK;
        if (vec_ok(p->av, s->av[0], s->av[1], 0, hv, hv, item)) t.vec |= VEC_AV;
        if (vec_ok(p->bk, s->bk[0], s->bk[1], 0, p->Rk * p->D, p->D, item)) t.vec |= VEC_BK;
        if (vec_ok(p->bv, s->bv[0], s->bv[1], 0, p->Rv * p->E, p->E, item)) t.vec |= VEC_BV;
        if (p->dtype == LK_F16) return launch_tc_mt<__half>(p, s, t, num_splits, scratch, st);
        return launch_tc_mt<__nv_bfloat16>(p, s, t, num_splits, scratch, st);
    }
    if (p->path == LK_TPA_PATH_TENSOR_CORES) return LK_ERR_VALUE;
    DecodeCfg c;
    if (!decode_config(p, &c)) return LK_ERR_VALUE;
    c.vec = 0;
    const int64_t hk = c.groups > 1 ? (int64_t)c.hg * p->Rk : 0, hv = c.groups > 1 ? (int64_t)c.hg * p->Rv : 0;
    const int64_t lak = (int64_t)c.hg * p->Rk, lav = (int64_t)c.hg * p->Rv;
    // ak / av: the last group's row is shorter (hc < hg): require both lengths to be whole chunks
    const int64_t lak_last = (p->H - (int64_t)(c.groups - 1) * c.hg) * p->Rk;
    const int64_t lav_last = (p->H - (int64_t)(c.groups - 1) * c.hg) * p->Rv;
    if (vec_ok(p->ak, s->ak[0], s->ak[1], hk, lak, lak_last, item)) c.vec |= VEC_AK;
    if (vec_ok(p->bk, s->bk[0], s->bk[1], 0, p->Rk * p->D, p->Rk * p->D, item)) c.vec |= VEC_BK;
    if (vec_ok(p->av, s->av[0], s->av[1], hv, lav, lav_last, item)) c.vec |= VEC_AV;
    if (p->E > 0 && vec_ok(p->bv, s->bv[0], s->bv[1], 0, p->Rv * p->E, p->E, item)) c.vec |= VEC_BV;
    switch (p->dtype) {
    case LK_F32: return launch_decode_h<float>(p, s, c, num_splits, scratch, st);
    case LK_F16: return launch_decode_h<__half>(p, s, c, num_splits, scratch, st);
    default: return launch_decode_h<__nv_bfloat16>(p, s, c, num_splits, scratch, st);
    }
}

extern "C" lk_status lk_tpa_materialize_cuda(const lk_tpa_materialize_params *p, lk_stream stream) {
    if (p->dtype != LK_F32 && p->dtype != LK_F16 && p->dtype != LK_BF16) return LK_ERR_DTYPE;
    if (p->rows < 0 || p->H < 0 || p->R < 0 || p->D < 0) return LK_ERR_VALUE;
    const int64_t total = p->rows * p->H * p->D;
    if (total == 0) return LK_OK;
    const int64_t blocks = grid_stride_blocks((total + THREADS - 1) / THREADS);
    cudaStream_t st = (cudaStream_t)stream;
    const float scale = (float)p->scale;
    switch (p->dtype) {
    case LK_F32: materialize_kernel<float><<<(unsigned)blocks, THREADS, 0, st>>>(*p, scale); break;
    case LK_F16: materialize_kernel<__half><<<(unsigned)blocks, THREADS, 0, st>>>(*p, scale); break;
    default: materialize_kernel<__nv_bfloat16><<<(unsigned)blocks, THREADS, 0, st>>>(*p, scale); break;
    }
    return lk::check_launch();
}
