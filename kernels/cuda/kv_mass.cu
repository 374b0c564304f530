/* Attention mass (SPEC 4.3) on the GPU: how much attention each key receives, without an N x M matrix.
 *
 *   normalize:  mass_h[j] = sum_i 2^(s_ij - lse2_i)   over admissible (i, j), s in the log2 domain
 *   otherwise:  mass_h[j] = sum_i scale <q_i, k_j>    (raw scaled logits, ScaleKV)
 * then reduced over the query heads of each KV head (mean, sum, max; max propagates NaN) or kept per
 * head (none).  Key j is admissible for query i iff j < kv_lens[b] and, when causal,
 * kv_pos[b,j] <= q_pos[b,i]; keys no query may see get 0.
 *
 * The rows of one (b, KV head g) are r = hh * N + i (hh: query head within the group), so all query
 * heads of a GQA group share every key tile.  Three kernels, 128 threads each:
 * - mass_stats_kernel (normalize only): block (b, g, 32-row tile, key split).  The row tile's q (all D
 *   features) stays in shared memory; key tiles of 32 keys stream through in chunks of 64 features
 *   (transposed, padded: conflict-free).  Each thread scores 4 rows x 2 keys (8 FMAs per 6 shared
 *   loads); the online (m, l) of each row lives in the 16 lanes that share the row (xor shuffles).
 *   Each split writes its float32 partial [m, l] (log2 domain, the layout of softmax.cuh).
 * - mass_combine_kernel: one block per row merges the splits with lk::combine_block (E = 0) into the
 *   natural-log lse of the row.
 * - mass_keys_kernel: block (b, g, 32-key tile).  The key tile (all D features) stays in shared
 *   memory; the rows of the group stream through in chunks of 32 (q in chunks of 64 features), dot
 *   products are recomputed with the very same FMA chain as pass 1 (bitwise equal), p = 2^(s - lse2) goes
 *   to a 32 x 32 shared tile, and 32 threads (one per key) add the tile's rows in row order into the
 *   running head total, finishing a head (reduce or write) when the row index leaves it.  Every
 *   output element is owned by one thread and summed in a fixed order: deterministic, no atomics.
 * Causal with default kv_pos (= j) skips the work of key tiles a row tile cannot see (pass 1) and of
 * row chunks that see nothing of the key tile (pass 2).
 * Shared memory <= 47 KB for D <= 256 (no opt-in needed).  Every load is bounds-checked (rows past
 * the group, keys past kv_lens, features past D read as 0); kv_lens is clamped to [0, M]; 64-bit
 * indexing for every global address. */
#include <math.h>

#include "common.cuh"
#include "softmax.cuh"
#include "lmkern/kv.h"

namespace {

using namespace lk;

constexpr int THREADS = 128;      // 4 warps: tx = t % 16 (keys tx, tx + 16), ty = t / 16 (rows ty + 8u)
constexpr int TR = 32;            // rows per tile
constexpr int TJ = 32;            // keys per tile
constexpr int KS = TJ + 1;        // stride of the transposed key tile kt[d * KS + jj]
constexpr int DC = 64;            // features per streamed chunk
constexpr int QCS = DC + 1;       // row stride of a streamed q chunk
constexpr int PS = TJ + 1;        // row stride of the probability tile
constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ int64_t row_len(const lk_kv_mass_cuda_params &p, int64_t b) {
    const int64_t len = p.kv_lens ? p.kv_lens[b] : p.M;
    return len < 0 ? 0 : (len > p.M ? p.M : len);  // memory safety for device-resident kv_lens
}

__device__ __forceinline__ int64_t q_position(const lk_kv_mass_cuda_params &p, int64_t b, int64_t i, int64_t len) {
    return p.q_pos ? p.q_pos[b * p.q_pos_bstride + i] : len - p.N + i;
}

__device__ __forceinline__ int64_t kv_position(const lk_kv_mass_cuda_params &p, int64_t b, int64_t j) {
    return p.kv_pos ? p.kv_pos[b * p.kv_pos_bstride + j] : j;
}

/* Row stride of the resident q tile: D + 1, or D + 2 when that is a multiple of 32 (two rows read by
 * one warp must fall in different banks). */
__host__ __device__ __forceinline__ int q_row_stride(int64_t D) {
    return (int)((D + 1) % 32 == 0 ? D + 2 : D + 1);
}

/* acc[u][c] += sum_{d < nd} q[ty + 8u][d] * k[d][tx + 16c]: qrow points at row ty of a q tile with row
 * stride qs; kcol at column tx of a transposed key tile (stride KS).  The same FMA order in both
 * passes, so the recomputed dot products are bitwise those of pass 1. */
__device__ __forceinline__ void tile_fma(const float *qrow, int qs, const float *kcol, int nd, float acc[4][2]) {
#pragma unroll 4
    for (int d = 0; d < nd; d++) {
        const float k0 = kcol[d * KS], k1 = kcol[d * KS + 16];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const float qv = qrow[u * 8 * qs + d];
            acc[u][0] = fmaf(qv, k0, acc[u][0]);
            acc[u][1] = fmaf(qv, k1, acc[u][1]);
        }
    }
}

/* ---- pass 1: per-row softmax statistics ------------------------------------------------------- */

/* grid (B * Hkv * row_tiles, num_splits); dynamic shared memory: qpos[TR], kpos[TJ] (int64), q tile
 * TR x q_row_stride(D), key chunk DC x KS (float). */
template <typename T>
__global__ void __launch_bounds__(THREADS) mass_stats_kernel(const lk_kv_mass_cuda_params p, int num_splits,
                                                             int64_t split_len, float scale_log2, float *part) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    int64_t *qpos_s = (int64_t *)smem_raw;
    int64_t *kpos_s = qpos_s + TR;
    float *qs = (float *)(kpos_s + TJ);
    const int QS = q_row_stride(p.D);
    float *kt = qs + TR * QS;
    __shared__ int64_t qmax_s;

    const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
    const int64_t group = p.Hq / p.Hkv, R = group * p.N;
    const int64_t row_tiles = (R + TR - 1) / TR;
    const int64_t rt = blockIdx.x % row_tiles, bg = blockIdx.x / row_tiles;
    const int64_t g = bg % p.Hkv, b = bg / p.Hkv;
    const int split = blockIdx.y;
    const int64_t r0 = rt * TR;
    const int64_t len = row_len(p, b);
    const int64_t D = p.D;
    const T *qg = (const T *)p.q;
    const T *kg = (const T *)p.k;

    // the row tile's q (all features) and positions
    for (int e = t; e < TR * (int)D; e += THREADS) {
        const int rr = e / (int)D, d = e % (int)D;
        const int64_t r = r0 + rr;
        float v = 0.f;
        if (r < R) {
            const int64_t hh = r / p.N, i = r % p.N;
            v = to_f<T>(qg[b * p.q_stride[0] + i * p.q_stride[1] + (g * group + hh) * p.q_stride[2] + d]);
        }
        qs[rr * QS + d] = v;
    }
    if (t < TR) {
        const int64_t r = r0 + t;
        qpos_s[t] = r < R ? q_position(p, b, r % p.N, len) : INT64_MIN;
    }
    __syncthreads();
    if (t == 0) {
        int64_t mx = INT64_MIN;
        for (int rr = 0; rr < TR; rr++) mx = qpos_s[rr] > mx ? qpos_s[rr] : mx;
        qmax_s = mx;
    }
    __syncthreads();

    // this split's keys; causal with default kv_pos: keys j > qmax are never admissible
    const int64_t k0 = (int64_t)split * split_len;
    int64_t k1 = k0 + split_len < len ? k0 + split_len : len;
    if (p.causal && !p.kv_pos) {
        const int64_t qmax = qmax_s;
        const int64_t vis = qmax < 0 ? 0 : (qmax < len ? qmax + 1 : len);  // keys j <= qmax
        if (vis < k1) k1 = vis;
    }

    float m[4], l[4];
#pragma unroll
    for (int u = 0; u < 4; u++) { m[u] = -INFINITY; l[u] = 0.f; }

    for (int64_t j0 = k0; j0 < k1; j0 += TJ) {
        float acc[4][2] = {};
        // one pass even when D == 0: it writes kpos_s (read by the mask below) and zero scores
        for (int64_t dc0 = 0; dc0 == 0 || dc0 < D; dc0 += DC) {
            const int nd = (int)(D - dc0 < DC ? D - dc0 : DC);
            __syncthreads();  // the previous chunk is consumed
            for (int e = t; e < TJ * DC; e += THREADS) {
                const int jj = e / DC, d = e % DC;
                const int64_t j = j0 + jj;
                float v = 0.f;
                if (j < k1 && d < nd) v = to_f<T>(kg[b * p.k_stride[0] + j * p.k_stride[1] + g * p.k_stride[2] + dc0 + d]);
                kt[d * KS + jj] = v;
            }
            if (dc0 == 0 && t < TJ) kpos_s[t] = p.causal && j0 + t < k1 ? kv_position(p, b, j0 + t) : 0;
            __syncthreads();
            tile_fma(qs + ty * QS + dc0, QS, kt + tx, nd, acc);
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int rr = ty + 8 * u;
            const int64_t qp = qpos_s[rr];
            float s[2];
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int jj = tx + 16 * c;
                const bool ok = r0 + rr < R && j0 + jj < k1 && (!p.causal || kpos_s[jj] <= qp);
                s[c] = ok ? acc[u][c] * scale_log2 : -INFINITY;
            }
            const float m_new = fmaxf(m[u], warp_max<16>(fmaxf(s[0], s[1])));
            const float e0 = s[0] == -INFINITY ? 0.f : exp2f(s[0] - m_new);
            const float e1 = s[1] == -INFINITY ? 0.f : exp2f(s[1] - m_new);
            const float sum = warp_sum<16>(e0 + e1);
            l[u] = (m[u] == -INFINITY ? 0.f : l[u] * exp2f(m[u] - m_new)) + sum;
            m[u] = m_new;
        }
    }
    if (tx == 0) {
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int64_t r = r0 + ty + 8 * u;
            if (r < R) {
                float *dst = part + (((b * p.Hkv + g) * R + r) * num_splits + split) * 2;
                dst[0] = m[u];
                dst[1] = l[u];
            }
        }
    }
}

/* One block per row: lse (natural log) of the row from its split partials (combine_block with E = 0).
 * A NaN score (NaN in q or k) makes its split's l NaN and the merge then gives the row a NaN lse, so
 * every mass the row contributes to is NaN, as IEEE arithmetic says. */
__global__ void __launch_bounds__(THREADS) mass_combine_kernel(int num_splits, const float *part, float *lse) {
    const int64_t row = blockIdx.x;
    combine_block<float, THREADS>(part + row * num_splits * 2, num_splits, 0, (float *)nullptr, lse + row);
}

/* ---- pass 2: per-key mass --------------------------------------------------------------------- */

/* grid B * Hkv * key_tiles; dynamic shared memory: qpos[TR], kpos[TJ] (int64), lse2[TR], key tile
 * D x KS, q chunk TR x QCS, probability tile TR x PS (float). */
template <typename T>
__global__ void __launch_bounds__(THREADS) mass_keys_kernel(const lk_kv_mass_cuda_params p, float scale_log2,
                                                            const float *lse) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    int64_t *qpos_s = (int64_t *)smem_raw;
    int64_t *kpos_s = qpos_s + TR;
    float *lse2_s = (float *)(kpos_s + TJ);
    float *kt = lse2_s + TR;
    float *qs = kt + p.D * KS;
    float *ps = qs + TR * QCS;
    __shared__ int active_s;

    const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
    const int64_t group = p.Hq / p.Hkv, R = group * p.N;
    const int64_t key_tiles = (p.M + TJ - 1) / TJ;
    const int64_t jt = blockIdx.x % key_tiles, bg = blockIdx.x / key_tiles;
    const int64_t g = bg % p.Hkv, b = bg / p.Hkv;
    const int64_t j0 = jt * TJ;
    const int64_t len = row_len(p, b);
    const int64_t D = p.D;
    const int64_t Hout = p.reduce == LK_REDUCE_NONE ? p.Hq : p.Hkv;
    float *out = p.out;

    if (j0 >= len) {  // no key of the tile is admissible: zeros (block-uniform exit, before any barrier)
        const int64_t j = j0 + t;
        if (t < TJ && j < p.M) {
            if (p.reduce == LK_REDUCE_NONE)
                for (int64_t hh = 0; hh < group; hh++) out[(b * p.M + j) * Hout + g * group + hh] = 0.f;
            else
                out[(b * p.M + j) * Hout + g] = 0.f;
        }
        return;
    }
    const int64_t kend = len - j0 < TJ ? len : j0 + TJ;  // keys [j0, kend) are real

    const T *qg = (const T *)p.q;
    const T *kg = (const T *)p.k;
    for (int e = t; e < TJ * (int)D; e += THREADS) {
        const int jj = e / (int)D, d = e % (int)D;
        const int64_t j = j0 + jj;
        kt[d * KS + jj] = j < kend ? to_f<T>(kg[b * p.k_stride[0] + j * p.k_stride[1] + g * p.k_stride[2] + d]) : 0.f;
    }
    if (t < TJ) kpos_s[t] = p.causal && j0 + t < kend ? kv_position(p, b, j0 + t) : 0;

    // the running state of key jj = t (threads t < TJ): head total of head cur_hh, reduction so far
    int64_t cur_hh = 0, cur_i = 0;
    float head = 0.f;
    float red = p.reduce == LK_REDUCE_MAX ? -INFINITY : 0.f;
    const int64_t jmine = j0 + t;
    const float scale = (float)p.scale;

    for (int64_t r0 = 0; r0 < R; r0 += TR) {
        __syncthreads();  // the previous probability tile is consumed (and kt / kpos are written)
        if (t < TR) {
            const int64_t r = r0 + t;
            int64_t qp = INT64_MIN;
            float l2 = -INFINITY;
            if (r < R) {
                qp = q_position(p, b, r % p.N, len);
                if (p.normalize) l2 = lse[(b * p.Hkv + g) * R + r] * LOG2E;
            }
            qpos_s[t] = qp;
            lse2_s[t] = l2;
        }
        __syncthreads();
        if (t == 0) {
            // causal with default kv_pos: a chunk whose queries all sit before j0 sees nothing of the tile
            int act = 1;
            if (p.causal && !p.kv_pos) {
                int64_t mx = INT64_MIN;
                for (int rr = 0; rr < TR; rr++) mx = qpos_s[rr] > mx ? qpos_s[rr] : mx;
                act = mx >= j0;
            }
            active_s = act;
        }
        __syncthreads();
        const int act = active_s;
        float acc[4][2] = {};
        if (act) {
            for (int64_t dc0 = 0; dc0 < D; dc0 += DC) {
                const int nd = (int)(D - dc0 < DC ? D - dc0 : DC);
                if (dc0 > 0) __syncthreads();  // the previous q chunk is consumed
                for (int e = t; e < TR * DC; e += THREADS) {
                    const int rr = e / DC, d = e % DC;
                    const int64_t r = r0 + rr;
                    float v = 0.f;
                    if (r < R && d < nd) {
                        const int64_t hh = r / p.N, i = r % p.N;
                        v = to_f<T>(qg[b * p.q_stride[0] + i * p.q_stride[1] + (g * group + hh) * p.q_stride[2] + dc0 + d]);
                    }
                    qs[rr * QCS + d] = v;
                }
                __syncthreads();
                tile_fma(qs + ty * QCS, QCS, kt + dc0 * KS + tx, nd, acc);
            }
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int rr = ty + 8 * u;
            const int64_t qp = qpos_s[rr];
            const float l2 = lse2_s[rr];
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int jj = tx + 16 * c;
                const bool ok = act && r0 + rr < R && j0 + jj < kend && (!p.causal || kpos_s[jj] <= qp);
                float v = 0.f;
                if (ok) {
                    if (p.normalize) v = l2 == -INFINITY ? 0.f : exp2f(acc[u][c] * scale_log2 - l2);
                    else v = acc[u][c] * scale;
                }
                ps[rr * PS + jj] = v;
            }
        }
        __syncthreads();
        if (t < TJ) {
            const int nr = (int)(R - r0 < TR ? R - r0 : TR);
            for (int rr = 0; rr < nr; rr++) {
                if (cur_i == p.N) {  // head cur_hh is complete
                    if (p.reduce == LK_REDUCE_NONE) {
                        if (jmine < p.M) out[(b * p.M + jmine) * Hout + g * group + cur_hh] = head;
                    } else if (p.reduce == LK_REDUCE_MAX) {
                        red = head > red || head != head ? head : red;
                    } else {
                        red += head;
                    }
                    head = 0.f;
                    cur_hh++;
                    cur_i = 0;
                }
                head += ps[rr * PS + t];
                cur_i++;
            }
        }
    }
    if (t < TJ && jmine < p.M) {  // the last head (R >= 1: the launcher handles N == 0)
        if (p.reduce == LK_REDUCE_NONE) {
            out[(b * p.M + jmine) * Hout + g * group + cur_hh] = head;
        } else {
            if (p.reduce == LK_REDUCE_MAX) red = head > red || head != head ? head : red;
            else red += head;
            out[(b * p.M + jmine) * Hout + g] = p.reduce == LK_REDUCE_MEAN ? __fdiv_rn(red, (float)group) : red;
        }
    }
}

/* ---- launchers -------------------------------------------------------------------------------- */

size_t stats_smem(int64_t D) {
    return (TR + TJ) * sizeof(int64_t) + (size_t)(TR * q_row_stride(D) + DC * KS) * sizeof(float);
}

size_t keys_smem(int64_t D) {
    return (TR + TJ) * sizeof(int64_t) + (size_t)(TR + D * KS + TR * QCS + TR * PS) * sizeof(float);
}

int64_t split_len_of(const lk_kv_mass_cuda_params *p, int num_splits) {
    const int64_t tiles = (p->M + TJ - 1) / TJ;
    return (tiles + num_splits - 1) / num_splits * TJ;
}

template <typename T>
lk_status launch(const lk_kv_mass_cuda_params *p, int num_splits, float *scratch, cudaStream_t st) {
    const int64_t group = p->Hq / p->Hkv, R = group * p->N;
    const float scale_log2 = (float)(p->scale * 1.4426950408889634);
    const float *lse = nullptr;
    if (p->normalize) {
        const int64_t rows = p->B * p->Hkv * R;
        float *part = scratch, *lse_w = scratch + rows * num_splits * 2;
        const int64_t blocks = p->B * p->Hkv * ((R + TR - 1) / TR);
        if (blocks > 0x7fffffff || num_splits > 65535) return LK_ERR_VALUE;
        mass_stats_kernel<T><<<dim3((unsigned)blocks, (unsigned)num_splits), THREADS, stats_smem(p->D), st>>>(
            *p, num_splits, split_len_of(p, num_splits), scale_log2, part);
        lk_status s = check_launch();
        if (s != LK_OK) return s;
        if (rows > 0x7fffffff) return LK_ERR_VALUE;
        mass_combine_kernel<<<(unsigned)rows, THREADS, 0, st>>>(num_splits, part, lse_w);
        s = check_launch();
        if (s != LK_OK) return s;
        lse = lse_w;
    }
    const int64_t kblocks = p->B * p->Hkv * ((p->M + TJ - 1) / TJ);
    if (kblocks > 0x7fffffff) return LK_ERR_VALUE;
    mass_keys_kernel<T><<<(unsigned)kblocks, THREADS, keys_smem(p->D), st>>>(*p, scale_log2, lse);
    return check_launch();
}

}  // namespace

extern "C" int lk_kv_mass_cuda_splits(const lk_kv_mass_cuda_params *p, int num_sms) {
    if (!p->normalize || p->Hkv <= 0 || p->Hq <= 0 || p->N <= 0) return 1;
    const int64_t R = p->Hq / p->Hkv * p->N;
    const int64_t blocks = p->B * p->Hkv * ((R + TR - 1) / TR);
    return split_count(blocks, num_sms, p->M, 256, 64);   // at least 256 keys per split
}

extern "C" int64_t lk_kv_mass_cuda_scratch_floats(const lk_kv_mass_cuda_params *p, int num_splits) {
    if (!p->normalize || p->Hkv <= 0) return 0;
    const int64_t rows = p->B * p->Hq / p->Hkv * p->N * p->Hkv;
    return rows * (2 * (int64_t)num_splits + 1);
}

extern "C" lk_status lk_kv_mass_cuda(const lk_kv_mass_cuda_params *p, int num_splits, float *scratch, lk_stream stream) {
    if (p->D > LK_CUDA_ATTN_MAX_HEAD_DIM || p->D < 0) return LK_ERR_VALUE;
    if (p->reduce < LK_REDUCE_MEAN || p->reduce > LK_REDUCE_NONE) return LK_ERR_VALUE;
    if (p->Hkv < 0 || p->Hq < 0 || (p->Hkv == 0 ? p->Hq != 0 : p->Hq % p->Hkv)) return LK_ERR_VALUE;
    cudaStream_t st = (cudaStream_t)stream;
    const int64_t Hout = p->reduce == LK_REDUCE_NONE ? p->Hq : p->Hkv;
    const int64_t n_out = p->B * p->M * Hout;
    if (n_out == 0) return LK_OK;
    if (p->N == 0 || p->Hq == 0) {  // no query: every key gets 0
        cudaError_t err = cudaMemsetAsync(p->out, 0, (size_t)n_out * sizeof(float), st);
        return err == cudaSuccess ? LK_OK : record_error(err);
    }
    if (num_splits < 1 || (p->normalize && !scratch)) return LK_ERR_VALUE;
    switch (p->dtype) {
    case LK_F32: return launch<float>(p, num_splits, scratch, st);
    case LK_F16: return launch<__half>(p, num_splits, scratch, st);
    case LK_BF16: return launch<__nv_bfloat16>(p, num_splits, scratch, st);
    default: return LK_ERR_DTYPE;
    }
}
