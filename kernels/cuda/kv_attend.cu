/* Attention over the GPU KIVI cache (SPEC 4.2) straight from the packed codes: f32, f16, bf16 queries,
 * float32 cache data (scales, zeros, residual), float32 accumulation and softmax statistics.
 *
 * Row b holding len tokens: keys j < qk are quantized per channel (group grp = j / G of G tokens shares
 * k_scale[grp][d], k_zero[grp][d]), keys qk <= j < len are float32 in the key ring (slot j % k_res_cap);
 * values j < qv are quantized per token (feature group e / G shares v_scale[j][e / G], v_zero[j][e / G]),
 * values qv <= j < len are float32 in the value ring.  Key j is admissible iff !causal or
 * kv_pos[b, j] <= q_pos[b, i].  Scores are kept in the log2 domain (s * scale * log2 e).
 *
 * kv_attend_kernel<T, RT>: a block of 4 warps owns one (b, KV head g, tile of RT query rows, split of the
 * keys).  Query rows r = i * group + hh enumerate the N queries times the group = Hq / Hkv query heads
 * that read KV head g, so every loaded code byte serves all of them (GQA sharing).  Keys are visited in
 * tiles of 128, one per thread:
 *   1. scores: thread t dequantizes its key feature by feature in registers (code * scale + zero, one
 *      FMA; the packed byte is read once) and FMAs it into the RT rows' dot products (q rows in shared
 *      memory, read as broadcasts); masked keys get -inf;
 *   2. online softmax: one warp per row takes the tile max, rescales (m, l) and turns the scores into
 *      probabilities in shared memory;
 *   3. P V: thread t owns value features t and t + 128; per key it dequantizes its feature once
 *      (code * scale + zero in registers) and FMAs it into the accumulators of all RT rows.
 * No dequantized copy of the cache exists anywhere, not even a tile of it in shared memory.
 * With num_splits > 1 each block covers one contiguous chunk of the keys and writes float32 partials
 * [m, l, acc[E]] per query row to scratch; kv_combine_kernel merges them with softmax.cuh's combine_block
 * (fixed order: deterministic, no atomics).  Every index is 64-bit; rows/qk/qv are clamped on the device
 * so inconsistent bookkeeping can never address outside the cache. */
#include <math.h>

#include "common.cuh"
#include "lmkern/kv.h"
#include "softmax.cuh"

namespace {

using namespace lk;

constexpr int ATT_WARPS = 4;
constexpr int ATT_THREADS = 32 * ATT_WARPS;
constexpr int KT = ATT_THREADS;                                               // keys per tile
constexpr int EPT = (LK_CUDA_ATTN_MAX_HEAD_DIM + ATT_THREADS - 1) / ATT_THREADS;  // value features per thread
constexpr int MAX_RT = 16;                                                    // query rows per block

struct RowState {
    int64_t len, qk, qv;
};

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

/* len in [0, S], qk and qv in [0, len]; without a ring (capacity 0) everything is read as quantized. */
__device__ __forceinline__ RowState row_state(const lk_kv_attend_cuda_params &p, int64_t b) {
    const int64_t *r = p.rows + b * 3;
    RowState s;
    s.len = clamp64(r[0], 0, p.S);
    s.qk = clamp64(r[1], 0, s.len);
    s.qv = clamp64(r[2], 0, s.len);
    if (p.k_res_cap == 0) s.qk = s.len;
    if (p.v_res_cap == 0) s.qv = s.len;
    return s;
}

size_t attend_smem_bytes(int64_t D, int RT) { return sizeof(float) * (size_t)(RT * D + RT * KT + 3 * RT); }

template <typename T, int RT>
__global__ void __launch_bounds__(ATT_THREADS)
kv_attend_kernel(const lk_kv_attend_cuda_params p, int num_splits, int64_t split_len, float *scratch, float scale_log2) {
    extern __shared__ __align__(16) float smem[];
    __shared__ int64_t qpos_s[RT];
    const int64_t D = p.D, E = p.E, G = p.G, S = p.S;
    float *q_s = smem;                 // [RT][D], scaled by scale * log2 e
    float *s_s = q_s + RT * D;         // [RT][KT]: scores, then probabilities
    float *m_s = s_s + RT * KT;        // [RT] running max (log2 domain)
    float *l_s = m_s + RT;             // [RT] running sum
    float *c_s = l_s + RT;             // [RT] correction of the current tile

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t group = p.Hq / p.Hkv, rows = p.N * group;
    const int64_t ntiles = (rows + RT - 1) / RT;
    int64_t blk = blockIdx.x;
    const int64_t split = blk % num_splits;
    blk /= num_splits;
    const int64_t tile = blk % ntiles;
    blk /= ntiles;
    const int64_t g = blk % p.Hkv, b = blk / p.Hkv;
    const int64_t r0 = tile * RT;
    const int nr = (int)(rows - r0 < RT ? rows - r0 : RT);  // valid rows of this tile (>= 1)

    for (int64_t idx = tid; idx < RT * D; idx += ATT_THREADS) {
        const int r = (int)(idx / D);
        const int64_t d = idx % D;
        float v = 0.f;
        if (r < nr) {
            const int64_t R = r0 + r, i = R / group, h = g * group + R % group;
            v = to_f<T>(((const T *)p.q)[b * p.q_stride[0] + i * p.q_stride[1] + h * p.q_stride[2] + d]) * scale_log2;
        }
        q_s[idx] = v;
    }
    for (int r = tid; r < RT; r += ATT_THREADS) {
        qpos_s[r] = r < nr ? p.q_pos[b * p.N + (r0 + r) / group] : 0;
        m_s[r] = -INFINITY;
        l_s[r] = 0.f;
        c_s[r] = 1.f;
    }
    __syncthreads();

    const RowState rs = row_state(p, b);
    const int64_t lo = split * split_len;
    int64_t hi = split == num_splits - 1 ? rs.len : lo + split_len;
    if (hi > rs.len) hi = rs.len;

    const int bits = p.bits, per = 8 / bits, mask = (1 << bits) - 1;
    const int64_t bh = b * p.Hkv + g, KG = p.k_groups, cps = G / per, EG = E / G;
    const int64_t kcap = p.k_res_cap, vcap = p.v_res_cap;

    float acc[RT][EPT];
#pragma unroll
    for (int r = 0; r < RT; r++)
#pragma unroll
        for (int u = 0; u < EPT; u++) acc[r][u] = 0.f;
    // this thread's value features e = tid + 128 u: packed byte, bit shift and scale group, computed once
    // (the divisions by the runtime sizes inside the key loop cost ~20 k instructions per key on the H100)
    int vbyte[EPT], vshift[EPT], vgrp[EPT];
    bool vok[EPT];
#pragma unroll
    for (int u = 0; u < EPT; u++) {
        const int e = tid + u * ATT_THREADS;
        vok[u] = e < E;
        vbyte[u] = vok[u] ? e / per : 0;
        vshift[u] = vok[u] ? bits * (e % per) : 0;
        vgrp[u] = vok[u] ? (int)(e / G) : 0;
    }

    for (int64_t base = lo; base < hi; base += KT) {  // uniform across the block
        // 1. scores of key j = base + tid for the RT rows
        const int64_t j = base + tid;
        float s[RT];
#pragma unroll
        for (int r = 0; r < RT; r++) s[r] = 0.f;
        if (j < hi) {
            if (j < rs.qk) {
                const int64_t grp = j / G, tt = j % G;
                const int64_t gbase = (bh * KG + grp) * D;
                const uint8_t *kc = p.k_codes + gbase * cps + tt / per;  // + d * cps: channel d
                const float *ks = p.k_scale + gbase, *kz = p.k_zero + gbase;
                const int shift = bits * (int)(tt % per);
                for (int64_t d = 0; d < D; d++) {
                    const float x = fmaf((float)((kc[d * cps] >> shift) & mask), ks[d], kz[d]);
#pragma unroll
                    for (int r = 0; r < RT; r++) s[r] = fmaf(q_s[r * D + d], x, s[r]);
                }
            } else {
                const float *kr = p.k_res + (bh * kcap + j % kcap) * D;
                for (int64_t d = 0; d < D; d++) {
                    const float x = kr[d];
#pragma unroll
                    for (int r = 0; r < RT; r++) s[r] = fmaf(q_s[r * D + d], x, s[r]);
                }
            }
            if (p.causal) {
                const int64_t kp = p.kv_pos[b * S + j];
#pragma unroll
                for (int r = 0; r < RT; r++)
                    if (kp > qpos_s[r]) s[r] = -INFINITY;
            }
        } else {
#pragma unroll
            for (int r = 0; r < RT; r++) s[r] = -INFINITY;
        }
#pragma unroll
        for (int r = 0; r < RT; r++) s_s[r * KT + tid] = s[r];
        __syncthreads();

        // 2. online softmax, one warp per row
        for (int r = warp; r < nr; r += ATT_WARPS) {
            float mx = -INFINITY;
            for (int t = lane; t < KT; t += 32) mx = fmaxf(mx, s_s[r * KT + t]);
            mx = warp_max(mx);
            const float m_old = m_s[r], m_new = fmaxf(m_old, mx);
            // base -inf (nothing admissible yet) is replaced by 0 so that -inf - base stays -inf, not NaN
            const float base_m = m_new == -INFINITY ? 0.f : m_new;
            float sum = 0.f;
            for (int t = lane; t < KT; t += 32) {
                const float pj = exp2f(s_s[r * KT + t] - base_m);
                s_s[r * KT + t] = pj;
                sum += pj;
            }
            sum = warp_sum(sum);
            const float corr = exp2f(m_old - base_m);  // m_old = -inf gives 0
            const float l_old = l_s[r];
            __syncwarp();
            if (lane == 0) {
                l_s[r] = l_old * corr + sum;
                m_s[r] = m_new;
                c_s[r] = corr;
            }
        }
        __syncthreads();

        // 3. acc = acc * corr + sum_t p_t v_t, thread tid owns features tid + 128 u
#pragma unroll
        for (int r = 0; r < RT; r++) {
            const float c = c_s[r];
#pragma unroll
            for (int u = 0; u < EPT; u++) acc[r][u] *= c;
        }
        const int cnt = (int)(hi - base < KT ? hi - base : KT);
        for (int t = 0; t < cnt; t++) {
            const int64_t jj = base + t;
            float x[EPT];
            if (jj < rs.qv) {
                const int64_t tok = bh * S + jj;
                const uint8_t *vc = p.v_codes + tok * (E / per);
                const float *vs = p.v_scale + tok * EG, *vz = p.v_zero + tok * EG;
#pragma unroll
                for (int u = 0; u < EPT; u++)
                    x[u] = vok[u] ? fmaf((float)((vc[vbyte[u]] >> vshift[u]) & mask), vs[vgrp[u]], vz[vgrp[u]]) : 0.f;
            } else {
                const float *vr = p.v_res + (bh * vcap + jj % vcap) * E;
#pragma unroll
                for (int u = 0; u < EPT; u++) x[u] = vok[u] ? vr[tid + u * ATT_THREADS] : 0.f;
            }
#pragma unroll
            for (int r = 0; r < RT; r++) {
                const float pr = s_s[r * KT + t];
#pragma unroll
                for (int u = 0; u < EPT; u++) acc[r][u] = fmaf(pr, x[u], acc[r][u]);
            }
        }
        __syncthreads();  // everyone is done with s_s and c_s before the next tile
    }

#pragma unroll
    for (int r = 0; r < RT; r++) {
        if (r >= nr) continue;  // uniform; acc[r] keeps compile-time indices (registers)
        const int64_t R = r0 + r, i = R / group, h = g * group + R % group;
        const int64_t orow = (b * p.N + i) * p.Hq + h;
        const float m = m_s[r], l = l_s[r];
        if (num_splits == 1) {
            const float inv = l == 0.f ? 0.f : 1.f / l;
            T *o = (T *)p.out + b * p.out_stride[0] + i * p.out_stride[1] + h * p.out_stride[2];
#pragma unroll
            for (int u = 0; u < EPT; u++) {
                const int64_t e = tid + (int64_t)u * ATT_THREADS;
                if (e < E) o[e] = from_f<T>(acc[r][u] * inv);
            }
            if (p.lse && tid == 0) p.lse[orow] = l == 0.f ? -INFINITY : (m + log2f(l)) * LN2_F;
        } else {
            float *part = scratch + (orow * num_splits + split) * (E + 2);
            if (tid == 0) {
                part[0] = m;
                part[1] = l;
            }
#pragma unroll
            for (int u = 0; u < EPT; u++) {
                const int64_t e = tid + (int64_t)u * ATT_THREADS;
                if (e < E) part[2 + e] = acc[r][u];
            }
        }
    }
}

/* Merge of the split partials, one block per output row (B, N, Hq order). */
template <typename T>
__global__ void __launch_bounds__(COMBINE_THREADS) kv_combine_kernel(const lk_kv_attend_cuda_params p, int num_splits,
                                                                     const float *scratch) {
    const int64_t row = blockIdx.x;   // one block per query row
    const int64_t h = row % p.Hq, i = (row / p.Hq) % p.N, b = row / (p.Hq * p.N);
    T *o = (T *)p.out + b * p.out_stride[0] + i * p.out_stride[1] + h * p.out_stride[2];
    combine_block<T, COMBINE_THREADS>(scratch + row * num_splits * (p.E + 2), num_splits, p.E, o,
                                      p.lse ? p.lse + row : nullptr);
}

/* Query rows per block: the smallest power of two holding N * group, at most MAX_RT. */
int rows_per_block(const lk_kv_attend_cuda_params *p) {
    const int64_t rows = p->N * (p->Hkv > 0 ? p->Hq / p->Hkv : 1);
    int rt = 1;
    while (rt < rows && rt < MAX_RT) rt *= 2;
    return rt;
}

int64_t blocks_per_split(const lk_kv_attend_cuda_params *p) {
    const int64_t rows = p->N * (p->Hq / p->Hkv), rt = rows_per_block(p);
    return p->B * p->Hkv * ((rows + rt - 1) / rt);
}

int64_t split_len_of(const lk_kv_attend_cuda_params *p, int num_splits) {
    const int64_t per = (p->max_len + num_splits - 1) / num_splits;
    return (per + KT - 1) / KT * KT;
}

template <typename T, int RT>
lk_status launch_rt(const lk_kv_attend_cuda_params *p, int num_splits, float *scratch, float scale_log2, cudaStream_t st) {
    const int64_t blocks = blocks_per_split(p) * num_splits;
    if (blocks > 0x7fffffff) return LK_ERR_VALUE;
    const size_t smem = attend_smem_bytes(p->D, RT);  // <= 16 * (256 + 128 + 3) * 4 bytes < 48 KiB
    kv_attend_kernel<T, RT><<<(unsigned)blocks, ATT_THREADS, smem, st>>>(*p, num_splits, split_len_of(p, num_splits),
                                                                        scratch, scale_log2);
    lk_status s = check_launch();
    if (s != LK_OK || num_splits == 1) return s;
    const int64_t rows = p->B * p->N * p->Hq;
    if (rows > 0x7fffffff) return LK_ERR_VALUE;
    kv_combine_kernel<T><<<(unsigned)rows, COMBINE_THREADS, 0, st>>>(*p, num_splits, scratch);
    return check_launch();
}

template <typename T>
lk_status launch(const lk_kv_attend_cuda_params *p, int num_splits, float *scratch, float scale_log2, cudaStream_t st) {
    switch (rows_per_block(p)) {
    case 1: return launch_rt<T, 1>(p, num_splits, scratch, scale_log2, st);
    case 2: return launch_rt<T, 2>(p, num_splits, scratch, scale_log2, st);
    case 4: return launch_rt<T, 4>(p, num_splits, scratch, scale_log2, st);
    case 8: return launch_rt<T, 8>(p, num_splits, scratch, scale_log2, st);
    default: return launch_rt<T, 16>(p, num_splits, scratch, scale_log2, st);
    }
}

}  // namespace

extern "C" int lk_kv_attend_cuda_splits(const lk_kv_attend_cuda_params *p, int num_sms) {
    if (p->B <= 0 || p->N <= 0 || p->Hq <= 0 || p->Hkv <= 0 || p->Hq % p->Hkv) return 1;
    const int64_t blocks = blocks_per_split(p);
    if (p->max_len <= 2 * KT) return 1;
    const int64_t target = (int64_t)(num_sms > 0 ? num_sms : 1) * 4;  // blocks to keep every SM busy
    int64_t splits = (target + blocks - 1) / blocks;
    const int64_t most = (p->max_len + 2 * KT - 1) / (2 * KT);  // at least 256 keys per split
    if (splits > most) splits = most;
    if (splits > 128) splits = 128;
    return splits < 1 ? 1 : (int)splits;
}

extern "C" int64_t lk_kv_attend_cuda_scratch_floats(const lk_kv_attend_cuda_params *p, int num_splits) {
    if (num_splits <= 1) return 0;
    return p->B * p->N * p->Hq * (int64_t)num_splits * (p->E + 2);
}

extern "C" lk_status lk_kv_attend_cuda(const lk_kv_attend_cuda_params *p, int num_splits, float *scratch, lk_stream stream) {
    if (p->D > LK_CUDA_ATTN_MAX_HEAD_DIM || p->E > LK_CUDA_ATTN_MAX_HEAD_DIM) return LK_ERR_VALUE;
    if (p->bits != 2 && p->bits != 4 && p->bits != 8) return LK_ERR_VALUE;
    if (p->G < 1 || p->G % (8 / p->bits) || p->E % p->G) return LK_ERR_VALUE;
    if (p->B < 0 || p->N < 0 || p->Hq < 0 || p->D < 0 || p->E < 0 || p->S < 0 || p->max_len < 0) return LK_ERR_VALUE;
    if (p->k_groups * p->G < p->S || p->k_res_cap < 0 || p->v_res_cap < 0) return LK_ERR_VALUE;
    if (p->B == 0 || p->N == 0 || p->Hq == 0) return LK_OK;
    if (p->Hkv <= 0 || p->Hq % p->Hkv) return LK_ERR_VALUE;
    if (num_splits < 1 || (num_splits > 1 && !scratch)) return LK_ERR_VALUE;
    cudaStream_t st = (cudaStream_t)stream;
    const float scale_log2 = (float)(p->scale * 1.4426950408889634);
    switch (p->dtype) {
    case LK_F32: return launch<float>(p, num_splits, scratch, scale_log2, st);
    case LK_F16: return launch<__half>(p, num_splits, scratch, scale_log2, st);
    case LK_BF16: return launch<__nv_bfloat16>(p, num_splits, scratch, scale_log2, st);
    default: return LK_ERR_DTYPE;
    }
}
