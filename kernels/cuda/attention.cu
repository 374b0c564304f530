/* Attention (SPEC 1.1) with the ParScale shared prefix (SPEC 5.2) on the GPU: f32, f16, bf16 in,
 * float32 accumulation and softmax statistics throughout.
 *
 * Keys are visited in a "virtual" order jj = 0 .. L + len_b - 1: the L prefix keys of row b's stream
 * (always admissible), then the row's own keys j = jj - L (admissible iff j < kv_lens[b] and, when
 * causal, kv_pos[b,j] <= q_pos[b,i]).  Scores are kept in the log2 domain (s * scale * log2 e) so
 * every exponential is one exp2f; lse is converted back to natural log on the way out.
 *
 * Two kernels:
 * - attn_mma_kernel (f16/bf16, N >= 16): FlashAttention-2 style.  A block of 4 warps owns 64 query
 *   rows of one (b, h); each warp owns 16 rows.  K/V tiles of 64 keys are staged in shared memory
 *   (V transposed), S = Q K^T and O += P V run on tensor cores (mma.sync m16n8k16, f32 accumulate),
 *   P never leaves registers (the S accumulator layout is the A-operand layout of the next mma).
 *   D and E are zero-padded to multiples of 16 in shared memory, so any D, E <= 256 works.
 * - attn_tile_kernel (f32, N >= 16): CUDA cores, float32 throughout.  A block of 4 warps owns 32
 *   query rows of one (b, h) (8 per warp) and stages K/V tiles of 32 keys in shared memory: each
 *   lane scores one key against the warp's 8 rows, then lanes split the features for P V.
 * - attn_warp_kernel (f32 and f16/bf16 decode, N < 16): one warp per (query row, split).  Keys in chunks
 *   of 32, one key per lane for the score, then lanes across features for P V.  With num_splits > 1
 *   each warp covers one contiguous chunk of the keys and writes a float32 partial (m, l, acc[E]) to
 *   scratch; attn_combine_kernel (a block per row) merges them with the max-stabilized merge of
 *   lmkern/softmax.h.
 *
 * Causal with default kv_pos (= j) lets a block stop at the largest query position it holds.
 * Every load is bounds-checked: rows past N, keys past L + len, features past D / E read as 0 and
 * are never written.  Indexing is 64-bit. */
#include <math.h>

#include "common.cuh"
#include "mma.cuh"
#include "softmax.cuh"

namespace {

using namespace lk;

constexpr float LN2 = LN2_F;

__device__ __forceinline__ int64_t row_len(const lk_attention_params &p, int64_t b) {
    int64_t len = p.kv_lens ? p.kv_lens[b] : p.M;
    return len < 0 ? 0 : (len > p.M ? p.M : len);  // memory safety for device-resident kv_lens
}

__device__ __forceinline__ int64_t q_position(const lk_attention_params &p, int64_t b, int64_t i, int64_t len) {
    return p.q_pos ? p.q_pos[b * p.q_pos_bstride + i] : len - p.N + i;
}

__device__ __forceinline__ int64_t kv_position(const lk_attention_params &p, int64_t b, int64_t j) {
    return p.kv_pos ? p.kv_pos[b * p.kv_pos_bstride + j] : j;
}

/* End (exclusive) of the virtual keys a query at position qmax can see: with causal and default
 * kv_pos, keys j > qmax are never admissible. */
__device__ __forceinline__ int64_t key_end(const lk_attention_params &p, int64_t len, int64_t qmax) {
    int64_t real = len;
    if (p.causal && !p.kv_pos) {
        // keys j <= qmax, written without forming qmax + 1 (positions are arbitrary int64)
        real = qmax < 0 ? 0 : (qmax < len ? qmax + 1 : len);
    }
    return p.prefix_len + real;
}

/* Rows of key / value jj (virtual index) of batch row b, kv head g. */
template <typename T>
__device__ __forceinline__ const T *key_row(const lk_attention_params &p, int64_t b, int64_t g, int64_t jj) {
    const int64_t L = p.prefix_len;
    if (jj < L) return (const T *)p.prefix_k + (((b / p.prefix_rows) * L + jj) * p.Hkv + g) * p.D;
    return (const T *)p.k + b * p.k_stride[0] + (jj - L) * p.k_stride[1] + g * p.k_stride[2];
}

template <typename T>
__device__ __forceinline__ const T *value_row(const lk_attention_params &p, int64_t b, int64_t g, int64_t jj) {
    const int64_t L = p.prefix_len;
    if (jj < L) return (const T *)p.prefix_v + (((b / p.prefix_rows) * L + jj) * p.Hkv + g) * p.E;
    return (const T *)p.v + b * p.v_stride[0] + (jj - L) * p.v_stride[1] + g * p.v_stride[2];
}

/* Flags of which rows may be read with 16-byte loads (set by the launcher). */
constexpr int VEC_QK = 1;  // q, k, prefix_k rows: D % 8 == 0, strides % 8 == 0, bases 16-byte aligned
constexpr int VEC_V = 2;   // v, prefix_v rows: the same with E

/* Element u of the 16 bytes `r` read as T (constant u after unrolling: no local-memory round trip). */
__device__ __forceinline__ uint32_t word_of(const uint4 &r, int w) {
    return w == 0 ? r.x : w == 1 ? r.y : w == 2 ? r.z : r.w;
}
__device__ __forceinline__ unsigned short half_word(const uint4 &r, int u) {
    const uint32_t w = word_of(r, u >> 1);
    return (unsigned short)((u & 1) ? (w >> 16) : (w & 0xffffu));  // element 2k in the low half
}
template <typename T> __device__ __forceinline__ T raw_elem(const uint4 &r, int u);
template <> __device__ __forceinline__ float raw_elem<float>(const uint4 &r, int u) { return __uint_as_float(word_of(r, u)); }
template <> __device__ __forceinline__ __half raw_elem<__half>(const uint4 &r, int u) { return __ushort_as_half(half_word(r, u)); }
template <> __device__ __forceinline__ __nv_bfloat16 raw_elem<__nv_bfloat16>(const uint4 &r, int u) {
    return __ushort_as_bfloat16(half_word(r, u));
}

/* <qs, k_row> over D features; qs is float (already scaled; 16-byte aligned), k_row of T.  vec: 16-byte
 * loads of k and of q (one shared-memory load per four features, not one per FMA), unrolled with two
 * partial sums so several loads are in flight and the FMA chain is halved. */
template <typename T>
__device__ __forceinline__ float dot_row(const float *qs, const T *kr, int64_t D, bool vec) {
    float dot = 0.f;
    if (vec) {
        constexpr int PER = 16 / sizeof(T);  // elements per 16-byte load (4 or 8)
        float dot2 = 0.f;
        const int n = (int)D;
#pragma unroll 4
        for (int d = 0; d < n; d += PER) {
            const uint4 raw = *reinterpret_cast<const uint4 *>(kr + d);
#pragma unroll
            for (int u = 0; u < PER; u += 4) {
                const float4 q4 = *reinterpret_cast<const float4 *>(qs + d + u);
                dot = fmaf(q4.x, to_f<T>(raw_elem<T>(raw, u)), dot);
                dot2 = fmaf(q4.y, to_f<T>(raw_elem<T>(raw, u + 1)), dot2);
                dot = fmaf(q4.z, to_f<T>(raw_elem<T>(raw, u + 2)), dot);
                dot2 = fmaf(q4.w, to_f<T>(raw_elem<T>(raw, u + 3)), dot2);
            }
        }
        dot += dot2;
    } else {
#pragma unroll 8
        for (int64_t d = 0; d < D; d++) dot = fmaf(qs[d], to_f<T>(kr[d]), dot);
    }
    return dot;
}

/* EPL consecutive elements of T read with the widest aligned loads (at most 16 bytes each). */
template <typename T, int EPL> struct alignas(EPL * sizeof(T) < 16 ? EPL * sizeof(T) : 16) FeatChunk {
    T v[EPL];
};

/* Value feature r of a lane: blocked (lane * EPL + r: one vector load per key, needs VEC_V) or strided
 * (lane + 32 r: any E, any alignment). */
template <int EPL> __device__ __forceinline__ int64_t feat_of(int lane, int r, bool blocked) {
    return blocked ? (int64_t)lane * EPL + r : (int64_t)lane + 32 * r;
}

/* ------------------------------------------------------------------------------------------------ */
/* CUDA-core kernel: one warp per (query row, split).                                               */

constexpr int WARP_KERNEL_WARPS = 4;

/* EPL: value features per lane (E <= 32 * EPL). */
template <typename T, int EPL>
__global__ void __launch_bounds__(32 * WARP_KERNEL_WARPS)
attn_warp_kernel(const lk_attention_params p, int num_splits, int64_t split_len, float *scratch, float scale_log2,
                 int vec) {
    __shared__ __align__(16) float q_s[WARP_KERNEL_WARPS][LK_CUDA_ATTN_MAX_HEAD_DIM];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t rows = p.B * p.N * p.Hq;
    const int64_t task = (int64_t)blockIdx.x * WARP_KERNEL_WARPS + warp;
    if (task >= rows * num_splits) return;  // whole warp leaves together
    // consecutive warps: consecutive query heads of one split, so GQA heads sharing a KV head read the
    // same keys together (L1/L2 reuse)
    const int64_t row = task % rows, split = task / rows;
    // row = (b * N + i) * Hq + h: the index of out / lse in (B, N, Hq) order
    const int64_t h = row % p.Hq, i = (row / p.Hq) % p.N, b = row / (p.Hq * p.N);
    const int64_t g = h / (p.Hq / p.Hkv);
    const int64_t D = p.D, E = p.E;

    const T *qv = (const T *)p.q + b * p.q_stride[0] + i * p.q_stride[1] + h * p.q_stride[2];
    for (int64_t d = lane; d < D; d += 32) q_s[warp][d] = to_f<T>(qv[d]) * scale_log2;
    __syncwarp();

    const int64_t len = row_len(p, b);
    const int64_t qp = q_position(p, b, i, len);
    const int64_t end = key_end(p, len, qp);
    const int64_t lo = split * split_len;
    const int64_t hi = lo + split_len < end ? lo + split_len : end;

    float m = -INFINITY, l = 0.f, acc[EPL];
#pragma unroll
    for (int r = 0; r < EPL; r++) acc[r] = 0.f;
    // blocked feature layout: E a multiple of EPL and 16-byte aligned rows (VEC_V guarantees E % 8 == 0)
    const bool vblk = (vec & VEC_V) != 0;

    for (int64_t base = lo; base < hi; base += 32) {
        // s_j = scale log2e <q, k_j>, one key per lane
        const int64_t jj = base + lane;
        float s = -INFINITY;
        if (jj < hi) {
            bool ok = true;
            if (jj >= p.prefix_len && p.causal) ok = kv_position(p, b, jj - p.prefix_len) <= qp;
            if (ok) s = dot_row<T>(q_s[warp], key_row<T>(p, b, g, jj), D, (vec & VEC_QK) != 0);
        }
        const float cmax = warp_max(s);   // fmaxf: NaN scores do not set the max ...
        const float m_new = fmaxf(m, cmax);
        const float ref = m_new == -INFINITY ? 0.f : m_new;   // nothing admissible yet: masked keys give 0
        const float corr = m == -INFINITY ? 0.f : exp2f(m - ref);
        const float pj = s == -INFINITY ? 0.f : exp2f(s - ref);   // ... but reach l and acc (NaN out, lse)
        l = l * corr + warp_sum(pj);
        m = m_new;
#pragma unroll
        for (int r = 0; r < EPL; r++) acc[r] *= corr;
        // acc += p_j v_j, lanes across features; four keys' rows are loaded before their FMAs
        const int cnt = (int)(hi - base < 32 ? hi - base : 32);
        for (int k0 = 0; k0 < cnt; k0 += 4) {
            float pk[4], x[4][EPL];
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const int kk = k0 + u < cnt ? k0 + u : cnt - 1;   // uniform
                pk[u] = __shfl_sync(0xffffffffu, pj, kk);
                if (k0 + u >= cnt) pk[u] = 0.f;
#pragma unroll
                for (int r = 0; r < EPL; r++) x[u][r] = 0.f;
                if (pk[u] == 0.f) continue;  // masked key or past the chunk (uniform): never read
                const T *vr = value_row<T>(p, b, g, base + k0 + u);
                if (vblk) {
                    if ((int64_t)lane * EPL < E) {
                        const FeatChunk<T, EPL> c = *reinterpret_cast<const FeatChunk<T, EPL> *>(vr + lane * EPL);
#pragma unroll
                        for (int r = 0; r < EPL; r++) x[u][r] = to_f<T>(c.v[r]);
                    }
                } else {
#pragma unroll
                    for (int r = 0; r < EPL; r++) {
                        const int64_t e = lane + 32 * r;
                        if (e < E) x[u][r] = to_f<T>(vr[e]);
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < 4; u++)
#pragma unroll
                for (int r = 0; r < EPL; r++) acc[r] = fmaf(pk[u], x[u][r], acc[r]);
        }
    }

    if (num_splits == 1) {
        const float inv = l == 0.f ? 0.f : 1.f / l;   // NaN l (a NaN score) stays NaN
        T *o = (T *)p.out + b * p.out_stride[0] + i * p.out_stride[1] + h * p.out_stride[2];
#pragma unroll
        for (int r = 0; r < EPL; r++) {
            const int64_t e = feat_of<EPL>(lane, r, vblk);
            if (e < E) o[e] = from_f<T>(acc[r] * inv);
        }
        if (p.lse && lane == 0) ((float *)p.lse)[row] = l == 0.f ? -INFINITY : (m + log2f(l)) * LN2;
    } else {
        // partial state (m in the log2 domain, l, acc[E]) of this split
        float *part = scratch + (row * num_splits + split) * (E + 2);
        if (lane == 0) {
            part[0] = m;
            part[1] = l;
        }
#pragma unroll
        for (int r = 0; r < EPL; r++) {
            const int64_t e = feat_of<EPL>(lane, r, vblk);
            if (e < E) part[2 + e] = acc[r];
        }
    }
}

/* Merge of the split partials of one row per block (softmax.cuh's combine_block). */
template <typename T>
__global__ void __launch_bounds__(COMBINE_THREADS)
attn_combine_kernel(const lk_attention_params p, int num_splits, const float *scratch) {
    const int64_t row = blockIdx.x;
    const int64_t h = row % p.Hq, i = (row / p.Hq) % p.N, b = row / (p.Hq * p.N);
    T *o = (T *)p.out + b * p.out_stride[0] + i * p.out_stride[1] + h * p.out_stride[2];
    combine_block<T, COMBINE_THREADS>(scratch + row * num_splits * (p.E + 2), num_splits, p.E, o,
                                      p.lse ? (float *)p.lse + row : nullptr);
}

/* ------------------------------------------------------------------------------------------------ */
/* CUDA-core tiled kernel (float32 prefill): 4 warps x 8 query rows of one (b, h) share K/V tiles of  */
/* 32 keys in shared memory.  Scores: lane = key, 8 rows per lane; P V: lanes across features.        */

constexpr int TILE_WARPS = 4;
constexpr int TILE_ROWS = 8;                        // query rows per warp
constexpr int TILE_BM = TILE_WARPS * TILE_ROWS;     // query rows per block
constexpr int TILE_BN = 32;                         // keys per tile (one per lane)

/* Row stride of the K tile: odd, so lanes reading k_s[lane * stride + d] hit 32 different banks. */
__host__ __device__ __forceinline__ int64_t tile_k_stride(int64_t D) { return D % 2 ? D : D + 1; }

static size_t tile_smem_bytes(int64_t D, int64_t E) {
    return sizeof(int64_t) * (TILE_BN + TILE_BM) +
           sizeof(float) * (size_t)(TILE_BM * D + TILE_BN * tile_k_stride(D) + TILE_BN * E);
}

template <typename T, int EPL>
__global__ void __launch_bounds__(32 * TILE_WARPS)
attn_tile_kernel(const lk_attention_params p, float scale_log2) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int64_t D = p.D, E = p.E, KS = tile_k_stride(D), L = p.prefix_len;
    int64_t *kvp_s = reinterpret_cast<int64_t *>(smem);   // [TILE_BN]
    int64_t *qpos_s = kvp_s + TILE_BN;                     // [TILE_BM]
    float *q_s = reinterpret_cast<float *>(qpos_s + TILE_BM);  // [TILE_BM][D], scaled by scale log2 e
    float *k_s = q_s + TILE_BM * D;                        // [TILE_BN][KS]
    float *v_s = k_s + TILE_BN * KS;                       // [TILE_BN][E]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t nmb = (p.N + TILE_BM - 1) / TILE_BM;
    // causal: the last row blocks of a head see the most keys, so they are scheduled first
    const int64_t mb = nmb - 1 - blockIdx.x % nmb, h = (blockIdx.x / nmb) % p.Hq, b = blockIdx.x / (nmb * p.Hq);
    const int64_t g = h / (p.Hq / p.Hkv), i0 = mb * TILE_BM;
    const int valid_q = (int)(p.N - i0 < TILE_BM ? p.N - i0 : TILE_BM);
    const int64_t len = row_len(p, b);

    for (int64_t idx = tid; idx < TILE_BM * D; idx += blockDim.x) {
        const int r = (int)(idx / D);
        const int64_t d = idx % D;
        q_s[idx] = r < valid_q ? to_f<T>(((const T *)p.q + b * p.q_stride[0] + (i0 + r) * p.q_stride[1] +
                                          h * p.q_stride[2])[d]) * scale_log2
                               : 0.f;
    }
    for (int r = tid; r < TILE_BM; r += blockDim.x) qpos_s[r] = r < valid_q ? q_position(p, b, i0 + r, len) : 0;
    __syncthreads();
    int64_t qmax = INT64_MIN;
    for (int r = 0; r < valid_q; r++) qmax = qpos_s[r] > qmax ? qpos_s[r] : qmax;
    const int64_t end = key_end(p, len, qmax);

    const int wr = warp * TILE_ROWS;
    const bool warp_active = wr < valid_q;  // uniform across the warp
    float m[TILE_ROWS], l[TILE_ROWS], acc[TILE_ROWS][EPL];
#pragma unroll
    for (int r = 0; r < TILE_ROWS; r++) {
        m[r] = -INFINITY;
        l[r] = 0.f;
#pragma unroll
        for (int u = 0; u < EPL; u++) acc[r][u] = 0.f;
    }

    for (int64_t kt = 0; kt < end; kt += TILE_BN) {
        const int valid_k = (int)(end - kt < TILE_BN ? end - kt : TILE_BN);
        __syncthreads();  // everyone is done with the previous tile
        for (int64_t idx = tid; idx < TILE_BN * D; idx += blockDim.x) {
            const int r = (int)(idx / D);
            const int64_t d = idx % D;
            k_s[r * KS + d] = r < valid_k ? to_f<T>(key_row<T>(p, b, g, kt + r)[d]) : 0.f;
        }
        for (int64_t idx = tid; idx < TILE_BN * E; idx += blockDim.x) {
            const int r = (int)(idx / E);
            const int64_t e = idx % E;
            v_s[idx] = r < valid_k ? to_f<T>(value_row<T>(p, b, g, kt + r)[e]) : 0.f;
        }
        for (int r = tid; r < TILE_BN; r += blockDim.x)
            kvp_s[r] = (r < valid_k && kt + r >= L) ? kv_position(p, b, kt + r - L) : 0;
        __syncthreads();
        if (!warp_active) continue;

        // s[r] = <q_r, k_lane> (log2 domain) for this warp's 8 rows
        float s[TILE_ROWS];
#pragma unroll
        for (int r = 0; r < TILE_ROWS; r++) s[r] = 0.f;
        for (int64_t d = 0; d < D; d++) {
            const float kd = k_s[lane * KS + d];
#pragma unroll
            for (int r = 0; r < TILE_ROWS; r++) s[r] = fmaf(q_s[(wr + r) * D + d], kd, s[r]);
        }
        const bool key_ok = lane < valid_k;
        const bool positional = p.causal && kt + lane >= L;
#pragma unroll
        for (int r = 0; r < TILE_ROWS; r++) {
            const bool ok = key_ok && (!positional || kvp_s[lane] <= qpos_s[wr + r]);
            s[r] = ok ? s[r] : -INFINITY;
            const float m_new = fmaxf(m[r], warp_max(s[r]));
            const float base = m_new == -INFINITY ? 0.f : m_new;  // keeps -inf - base at -inf, not NaN
            const float corr = exp2f(m[r] - base);
            s[r] = exp2f(s[r] - base);  // p_r for this lane's key (0 when masked)
            l[r] = l[r] * corr + warp_sum(s[r]);
            m[r] = m_new;
#pragma unroll
            for (int u = 0; u < EPL; u++) acc[r][u] *= corr;
        }
        // acc[r] += p[r][kk] v[kk], lanes across features
        for (int kk = 0; kk < valid_k; kk++) {
            float pk[TILE_ROWS];
#pragma unroll
            for (int r = 0; r < TILE_ROWS; r++) pk[r] = __shfl_sync(0xffffffffu, s[r], kk);
#pragma unroll
            for (int u = 0; u < EPL; u++) {
                const int64_t e = lane + 32 * u;
                if (e < E) {
                    const float ve = v_s[kk * E + e];
#pragma unroll
                    for (int r = 0; r < TILE_ROWS; r++) acc[r][u] = fmaf(pk[r], ve, acc[r][u]);
                }
            }
        }
    }

    if (!warp_active) return;
#pragma unroll
    for (int r = 0; r < TILE_ROWS; r++) {
        const int64_t i = i0 + wr + r;
        if (i >= p.N) continue;
        const float inv = l[r] == 0.f ? 0.f : 1.f / l[r];
        T *o = (T *)p.out + b * p.out_stride[0] + i * p.out_stride[1] + h * p.out_stride[2];
#pragma unroll
        for (int u = 0; u < EPL; u++) {
            const int64_t e = lane + 32 * u;
            if (e < E) o[e] = from_f<T>(acc[r][u] * inv);
        }
        if (p.lse && lane == 0)
            ((float *)p.lse)[(b * p.N + i) * p.Hq + h] = l[r] == 0.f ? -INFINITY : (m[r] + log2f(l[r])) * LN2;
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Tensor-core kernel (f16 / bf16).                                                                 */

constexpr int MMA_BM = 64;            // query rows per block (4 warps x 16)
constexpr int MMA_BN = 64;            // keys per shared-memory tile
constexpr int MMA_WARPS = 4;
constexpr int MMA_NT = MMA_BN / 8;    // n8 subtiles of S per warp
constexpr int MMA_VTS = MMA_BN + 8;   // row stride (elements) of the transposed V tile


/* Bytes of dynamic shared memory of attn_mma_kernel for padded D (DP) and E (EP). */
static size_t mma_smem_bytes(int64_t DP, int64_t EP) {
    const int64_t QS = DP + 8;
    return sizeof(int64_t) * (MMA_BN + MMA_BM) + 2 * (size_t)(MMA_BM * QS + MMA_BN * QS + EP * MMA_VTS);
}

/* Copies `rows` rows of `cols_pad` elements into shared memory (row stride dst_stride), zero past
 * `valid_rows` or past `cols`.  src_row(r) gives row r's global pointer.  vec: 16-byte loads are
 * safe (cols % 8 == 0 and every row 16-byte aligned). */
template <typename T, typename RowFn>
__device__ __forceinline__ void stage_rows(T *dst, int dst_stride, int rows, int valid_rows, int64_t cols,
                                           int64_t cols_pad, bool vec, RowFn src_row) {
    const int tid = threadIdx.x, nthreads = blockDim.x;
    if (vec) {
        const int chunks = (int)(cols_pad / 8);
        for (int idx = tid; idx < rows * chunks; idx += nthreads) {
            const int r = idx / chunks, c = (idx % chunks) * 8;
            uint4 val = make_uint4(0, 0, 0, 0);
            if (r < valid_rows && c < cols) val = *reinterpret_cast<const uint4 *>(src_row(r) + c);
            *reinterpret_cast<uint4 *>(dst + r * dst_stride + c) = val;
        }
    } else {
        for (int idx = tid; idx < rows * cols_pad; idx += nthreads) {
            const int r = idx / (int)cols_pad, c = idx % (int)cols_pad;
            T val = from_f<T>(0.f);
            if (r < valid_rows && c < cols) val = src_row(r)[c];
            dst[r * dst_stride + c] = val;
        }
    }
}

/* ET: n8 tiles of the value features this instantiation can hold (E padded to 16 <= 8 * ET). */
template <typename T, int ET>
__global__ void __launch_bounds__(32 * MMA_WARPS)
attn_mma_kernel(const lk_attention_params p, float scale_log2, int vec) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int64_t DP = (p.D + 15) / 16 * 16, EP = (p.E + 15) / 16 * 16;
    const int QS = (int)DP + 8;
    int64_t *kvp_s = reinterpret_cast<int64_t *>(smem);          // [MMA_BN] key positions of the tile
    int64_t *qpos_s = kvp_s + MMA_BN;                             // [MMA_BM] query positions
    T *q_s = reinterpret_cast<T *>(qpos_s + MMA_BM);              // [MMA_BM][QS]
    T *k_s = q_s + MMA_BM * QS;                                   // [MMA_BN][QS]
    T *vt_s = k_s + MMA_BN * QS;                                  // [EP][MMA_VTS]  (V transposed)

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gid = lane >> 2, tig = lane & 3;  // mma fragment coordinates: row group, thread in group
    const int64_t nmb = (p.N + MMA_BM - 1) / MMA_BM;
    // causal: the last row blocks of a head see the most keys, so they are scheduled first
    const int64_t mb = nmb - 1 - blockIdx.x % nmb, h = (blockIdx.x / nmb) % p.Hq, b = blockIdx.x / (nmb * p.Hq);
    const int64_t g = h / (p.Hq / p.Hkv), L = p.prefix_len;
    const int64_t i0 = mb * MMA_BM;
    const int valid_q = (int)(p.N - i0 < MMA_BM ? p.N - i0 : MMA_BM);
    const int64_t len = row_len(p, b);

    // stage Q and the query positions
    stage_rows<T>(q_s, QS, MMA_BM, valid_q, p.D, DP, (vec & VEC_QK) != 0,
                  [&](int r) { return (const T *)p.q + b * p.q_stride[0] + (i0 + r) * p.q_stride[1] + h * p.q_stride[2]; });
    for (int r = tid; r < MMA_BM; r += blockDim.x) qpos_s[r] = r < valid_q ? q_position(p, b, i0 + r, len) : 0;
    __syncthreads();
    int64_t qmax = INT64_MIN;
    for (int r = 0; r < valid_q; r++) qmax = qpos_s[r] > qmax ? qpos_s[r] : qmax;
    const int64_t end = key_end(p, len, qmax);

    const int wr = warp * 16;                     // this warp's first row in the block
    const bool warp_active = i0 + wr < p.N;       // uniform across the warp
    const int et_active = (int)(EP / 8);
    const int64_t qp0 = qpos_s[wr + gid], qp1 = qpos_s[wr + gid + 8];

    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    float acc[ET][4];
#pragma unroll
    for (int et = 0; et < ET; et++) acc[et][0] = acc[et][1] = acc[et][2] = acc[et][3] = 0.f;

    for (int64_t kt = 0; kt < end; kt += MMA_BN) {
        const int valid_k = (int)(end - kt < MMA_BN ? end - kt : MMA_BN);
        __syncthreads();  // everyone is done with the previous tile
        stage_rows<T>(k_s, QS, MMA_BN, valid_k, p.D, DP, (vec & VEC_QK) != 0, [&](int r) { return key_row<T>(p, b, g, kt + r); });
        // V transposed: vt_s[e][r] = v[key r][e], zero past the valid keys or E
        if (vec & VEC_V) {
            const int chunks = (int)(EP / 8);
            for (int idx = tid; idx < MMA_BN * chunks; idx += blockDim.x) {
                const int r = idx / chunks, e0 = (idx % chunks) * 8;
                uint4 raw = make_uint4(0, 0, 0, 0);
                if (r < valid_k && e0 < p.E) raw = *reinterpret_cast<const uint4 *>(value_row<T>(p, b, g, kt + r) + e0);
#pragma unroll
                for (int u = 0; u < 8; u++) vt_s[(e0 + u) * MMA_VTS + r] = raw_elem<T>(raw, u);
            }
        } else {
            for (int idx = tid; idx < MMA_BN * (int)EP; idx += blockDim.x) {
                const int r = idx / (int)EP, e = idx % (int)EP;
                T val = from_f<T>(0.f);
                if (r < valid_k && e < p.E) val = value_row<T>(p, b, g, kt + r)[e];
                vt_s[e * MMA_VTS + r] = val;
            }
        }
        for (int r = tid; r < MMA_BN; r += blockDim.x) {
            const int64_t jj = kt + r;
            kvp_s[r] = (r < valid_k && jj >= L) ? kv_position(p, b, jj - L) : 0;
        }
        __syncthreads();
        if (!warp_active) continue;

        // S = Q K^T for this warp's 16 rows and the tile's 64 keys (f32 accumulate)
        float s[MMA_NT][4];
#pragma unroll
        for (int nt = 0; nt < MMA_NT; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
        for (int ks = 0; ks < (int)(DP / 16); ks++) {
            uint32_t a[4];
            load_a(a, q_s + wr * QS + ks * 16, QS, gid, tig);
#pragma unroll
            for (int nt = 0; nt < MMA_NT; nt++) {
                const T *kb = k_s + (nt * 8 + gid) * QS + ks * 16 + 2 * tig;
                mma_op<T>::run(s[nt], a, ld32(kb), ld32(kb + 8));
            }
        }

        // mask, scale into the log2 domain, row maxima (rows gid and gid + 8)
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < MMA_NT; nt++) {
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const int kl = nt * 8 + 2 * tig + (c & 1);
                const int64_t jj = kt + kl;
                bool ok = kl < valid_k;
                if (ok && p.causal && jj >= L) ok = kvp_s[kl] <= (c < 2 ? qp0 : qp1);
                s[nt][c] = ok ? s[nt][c] * scale_log2 : -INFINITY;
            }
            mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
            mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
        }
        // the 4 threads of a quad hold one row's 64 scores
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        // base -inf (nothing admissible yet) is replaced by 0 so that -inf - base stays -inf, not NaN
        const float base0 = mn0 == -INFINITY ? 0.f : mn0, base1 = mn1 == -INFINITY ? 0.f : mn1;
        const float corr0 = exp2f(m0 - base0), corr1 = exp2f(m1 - base1);
        float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
        for (int nt = 0; nt < MMA_NT; nt++) {
            s[nt][0] = exp2f(s[nt][0] - base0);
            s[nt][1] = exp2f(s[nt][1] - base0);
            s[nt][2] = exp2f(s[nt][2] - base1);
            s[nt][3] = exp2f(s[nt][3] - base1);
            rs0 += s[nt][0] + s[nt][1];
            rs1 += s[nt][2] + s[nt][3];
        }
        l0 = l0 * corr0 + rs0;  // per-thread partial row sums; reduced over the quad at the end
        l1 = l1 * corr1 + rs1;
        m0 = mn0;
        m1 = mn1;
#pragma unroll
        for (int et = 0; et < ET; et++) {
            acc[et][0] *= corr0;
            acc[et][1] *= corr0;
            acc[et][2] *= corr1;
            acc[et][3] *= corr1;
        }

        // O += P V: the S accumulators of key subtiles 2kk, 2kk+1 are the A fragment of k-step kk
#pragma unroll
        for (int kk = 0; kk < MMA_BN / 16; kk++) {
            uint32_t a[4] = {mma_op<T>::pack(s[2 * kk][0], s[2 * kk][1]), mma_op<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                             mma_op<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             mma_op<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int et = 0; et < ET; et++) {
                if (et < et_active) {
                    const T *vb = vt_s + (et * 8 + gid) * MMA_VTS + kk * 16 + 2 * tig;
                    mma_op<T>::run(acc[et], a, ld32(vb), ld32(vb + 8));
                }
            }
        }
    }

    if (!warp_active) return;
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 == 0.f ? 0.f : 1.f / l0, inv1 = l1 == 0.f ? 0.f : 1.f / l1;
    const int64_t ia = i0 + wr + gid, ib = ia + 8;
    T *oa = (T *)p.out + b * p.out_stride[0] + ia * p.out_stride[1] + h * p.out_stride[2];
    T *ob = (T *)p.out + b * p.out_stride[0] + ib * p.out_stride[1] + h * p.out_stride[2];
#pragma unroll
    for (int et = 0; et < ET; et++) {
        if (et >= et_active) continue;
        const int64_t e = et * 8 + 2 * tig;
        if (ia < p.N) {
            if (e < p.E) oa[e] = from_f<T>(acc[et][0] * inv0);
            if (e + 1 < p.E) oa[e + 1] = from_f<T>(acc[et][1] * inv0);
        }
        if (ib < p.N) {
            if (e < p.E) ob[e] = from_f<T>(acc[et][2] * inv1);
            if (e + 1 < p.E) ob[e + 1] = from_f<T>(acc[et][3] * inv1);
        }
    }
    if (p.lse && tig == 0) {
        float *lse = (float *)p.lse;
        if (ia < p.N) lse[(b * p.N + ia) * p.Hq + h] = l0 == 0.f ? -INFINITY : (m0 + log2f(l0)) * LN2;
        if (ib < p.N) lse[(b * p.N + ib) * p.Hq + h] = l1 == 0.f ? -INFINITY : (m1 + log2f(l1)) * LN2;
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Launchers.                                                                                       */

bool use_mma(const lk_attention_params *p) { return (p->dtype == LK_F16 || p->dtype == LK_BF16) && p->N >= 16; }

/* float32 prefill: the shared-memory tiled CUDA-core kernel (decode stays on the split-KV warp kernel). */
bool use_tile(const lk_attention_params *p) { return p->dtype == LK_F32 && p->N >= 16; }

bool aligned16(const void *ptr) { return ((uintptr_t)ptr & 15) == 0; }

/* VEC_QK: 16-byte loads of q, k, prefix_k rows are safe (D % 8 == 0, strides % 8 == 0, bases
 * aligned); VEC_V: the same for v, prefix_v rows with E.  (8 elements of 2 bytes = 16 bytes; for
 * float32 the same conditions give 32-byte alignment, more than needed.) */
int vector_flags(const lk_attention_params *p) {
    int flags = 0;
    bool qk = p->D % 8 == 0 && aligned16(p->q) && aligned16(p->k) && (!p->prefix_len || aligned16(p->prefix_k));
    bool v = p->E % 8 == 0 && aligned16(p->v) && (!p->prefix_len || aligned16(p->prefix_v));
    for (int a = 0; a < 3; a++) {
        if (p->q_stride[a] % 8 || p->k_stride[a] % 8) qk = false;
        if (p->v_stride[a] % 8) v = false;
    }
    if (qk) flags |= VEC_QK;
    if (v) flags |= VEC_V;
    return flags;
}

int64_t split_len_of(const lk_attention_params *p, int num_splits) {
    const int64_t total = p->prefix_len + p->M;
    const int64_t per = (total + num_splits - 1) / num_splits;
    return (per + 31) / 32 * 32;
}

template <typename T, int EPL>
lk_status launch_warp(const lk_attention_params *p, int num_splits, float *scratch, float scale_log2, cudaStream_t st) {
    const int64_t rows = p->B * p->N * p->Hq;
    const int64_t blocks = (rows * num_splits + WARP_KERNEL_WARPS - 1) / WARP_KERNEL_WARPS;
    if (blocks > 0x7fffffff || (num_splits > 1 && rows > 0x7fffffff)) return LK_ERR_VALUE;
    attn_warp_kernel<T, EPL><<<(unsigned)blocks, 32 * WARP_KERNEL_WARPS, 0, st>>>(
        *p, num_splits, split_len_of(p, num_splits), scratch, scale_log2, vector_flags(p));
    lk_status s = lk::check_launch();
    if (s != LK_OK || num_splits == 1) return s;
    attn_combine_kernel<T><<<(unsigned)rows, COMBINE_THREADS, 0, st>>>(*p, num_splits, scratch);
    return lk::check_launch();
}

template <typename T>
lk_status launch_warp_e(const lk_attention_params *p, int num_splits, float *scratch, float scale_log2, cudaStream_t st) {
    if (p->E <= 32) return launch_warp<T, 1>(p, num_splits, scratch, scale_log2, st);
    if (p->E <= 64) return launch_warp<T, 2>(p, num_splits, scratch, scale_log2, st);
    if (p->E <= 128) return launch_warp<T, 4>(p, num_splits, scratch, scale_log2, st);
    return launch_warp<T, 8>(p, num_splits, scratch, scale_log2, st);
}

template <typename T, int EPL>
lk_status launch_tile(const lk_attention_params *p, float scale_log2, cudaStream_t st) {
    const size_t smem = tile_smem_bytes(p->D, p->E);
    const int64_t blocks = (p->N + TILE_BM - 1) / TILE_BM * p->Hq * p->B;
    if (blocks > 0x7fffffff) return LK_ERR_VALUE;
    if (smem > 48 * 1024) {
        cudaError_t err = cudaFuncSetAttribute(attn_tile_kernel<T, EPL>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (err != cudaSuccess) return lk::record_error(err);
    }
    attn_tile_kernel<T, EPL><<<(unsigned)blocks, 32 * TILE_WARPS, smem, st>>>(*p, scale_log2);
    return lk::check_launch();
}

template <typename T>
lk_status launch_tile_e(const lk_attention_params *p, float scale_log2, cudaStream_t st) {
    if (p->E <= 32) return launch_tile<T, 1>(p, scale_log2, st);
    if (p->E <= 64) return launch_tile<T, 2>(p, scale_log2, st);
    if (p->E <= 128) return launch_tile<T, 4>(p, scale_log2, st);
    return launch_tile<T, 8>(p, scale_log2, st);
}

template <typename T, int ET>
lk_status launch_mma(const lk_attention_params *p, float scale_log2, cudaStream_t st) {
    const int64_t DP = (p->D + 15) / 16 * 16, EP = (p->E + 15) / 16 * 16;
    const size_t smem = mma_smem_bytes(DP, EP);
    const int64_t nmb = (p->N + MMA_BM - 1) / MMA_BM;
    const int64_t blocks = nmb * p->Hq * p->B;
    if (blocks > 0x7fffffff) return LK_ERR_VALUE;
    if (smem > 48 * 1024) {
        cudaError_t err = cudaFuncSetAttribute(attn_mma_kernel<T, ET>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (err != cudaSuccess) return lk::record_error(err);
    }
    attn_mma_kernel<T, ET><<<(unsigned)blocks, 32 * MMA_WARPS, smem, st>>>(*p, scale_log2, vector_flags(p));
    return lk::check_launch();
}

template <typename T>
lk_status launch_mma_e(const lk_attention_params *p, float scale_log2, cudaStream_t st) {
    const int64_t EP = (p->E + 15) / 16 * 16;
    if (EP <= 64) return launch_mma<T, 8>(p, scale_log2, st);
    if (EP <= 128) return launch_mma<T, 16>(p, scale_log2, st);
    return launch_mma<T, 32>(p, scale_log2, st);
}

}  // namespace

extern "C" int lk_attention_cuda_splits(const lk_attention_params *p, int num_sms) {
    if (use_mma(p) || use_tile(p)) return 1;
    const int64_t rows = p->B * p->N * p->Hq, total = p->prefix_len + p->M;
    if (rows <= 0 || total <= 512) return 1;
    const int64_t target = (int64_t)(num_sms > 0 ? num_sms : 1) * 32;  // warps to keep every SM busy
    int64_t splits = (target + rows - 1) / rows;
    const int64_t most = (total + 255) / 256;  // at least 256 keys per split
    if (splits > most) splits = most;
    if (splits > 128) splits = 128;
    return splits < 1 ? 1 : (int)splits;
}

extern "C" int64_t lk_attention_cuda_scratch_floats(const lk_attention_params *p, int num_splits) {
    if (num_splits <= 1) return 0;
    return p->B * p->N * p->Hq * (int64_t)num_splits * (p->E + 2);
}

extern "C" lk_status lk_attention_cuda(const lk_attention_params *p, int num_splits, float *scratch, lk_stream stream) {
    if (p->D > LK_CUDA_ATTN_MAX_HEAD_DIM || p->E > LK_CUDA_ATTN_MAX_HEAD_DIM) return LK_ERR_VALUE;
    if (p->B == 0 || p->N == 0 || p->Hq == 0) return LK_OK;
    if (p->Hkv <= 0 || p->Hq % p->Hkv) return LK_ERR_VALUE;
    if (p->prefix_len && p->prefix_rows < 1) return LK_ERR_VALUE;
    if (num_splits < 1 || (num_splits > 1 && !scratch)) return LK_ERR_VALUE;
    cudaStream_t st = (cudaStream_t)stream;
    const float scale_log2 = (float)(p->scale * 1.4426950408889634);
    if (use_mma(p)) {
        if (num_splits != 1) return LK_ERR_VALUE;
        if (p->dtype == LK_F16) return launch_mma_e<__half>(p, scale_log2, st);
        return launch_mma_e<__nv_bfloat16>(p, scale_log2, st);
    }
    if (use_tile(p)) {
        if (num_splits != 1) return LK_ERR_VALUE;
        return launch_tile_e<float>(p, scale_log2, st);
    }
    switch (p->dtype) {
    case LK_F32: return launch_warp_e<float>(p, num_splits, scratch, scale_log2, st);
    case LK_F16: return launch_warp_e<__half>(p, num_splits, scratch, scale_log2, st);
    case LK_BF16: return launch_warp_e<__nv_bfloat16>(p, num_splits, scratch, scale_log2, st);
    default: return LK_ERR_DTYPE;
    }
}
