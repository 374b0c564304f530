/* Attention (SPEC 1.1) with an optional ParScale shared prefix (SPEC 5.2): the generic path.
 *
 * One task per (b, h, i): an online softmax over the admissible keys,
 *   m = max_j s_j,  l = sum_j e^(s_j - m),  acc = sum_j e^(s_j - m) v_j,  out = acc / l.
 * No N x M matrix is ever formed.  Tasks are split statically over threads, so a fixed thread
 * count gives bitwise identical results. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "lmkern/attention.h"

static inline int64_t lk_q_position(const lk_attention_params *p, int64_t b, int64_t i, int64_t len) {
    return p->q_pos ? p->q_pos[b * p->q_pos_bstride + i] : len - p->N + i;
}

static inline int64_t lk_kv_position(const lk_attention_params *p, int64_t b, int64_t j) {
    return p->kv_pos ? p->kv_pos[b * p->kv_pos_bstride + j] : j;
}

#define LK_DEFINE_ATTENTION_GENERIC(NAME, T)                                                      \
static void NAME(const lk_attention_params *p) {                                                  \
    const int64_t B = p->B, N = p->N, Hq = p->Hq, D = p->D, E = p->E, L = p->prefix_len;         \
    const int64_t group = p->Hq / p->Hkv;                                                         \
    const int64_t tasks = B * Hq * N;                                                             \
    const T scale = (T)p->scale;                                                                  \
    _Pragma("omp parallel num_threads(lk_get_num_threads())")                                     \
    {                                                                                             \
        T *acc = (T *)malloc(sizeof(T) * (size_t)(E > 0 ? E : 1));                                \
        int64_t lo, hi;                                                                           \
        lk_chunk(tasks, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);                   \
        for (int64_t t = lo; t < hi && acc; t++) {                                                \
            const int64_t b = t / (Hq * N), h = (t / N) % Hq, i = t % N, g = h / group;           \
            const T *qv = (const T *)p->q + b * p->q_stride[0] + i * p->q_stride[1] + h * p->q_stride[2]; \
            T *o = (T *)p->out + b * p->out_stride[0] + i * p->out_stride[1] + h * p->out_stride[2]; \
            const int64_t len = p->kv_lens ? p->kv_lens[b] : p->M;                                \
            const int64_t qp = lk_q_position(p, b, i, len);                                       \
            T m = -INFINITY, l = 0;                                                               \
            for (int64_t e = 0; e < E; e++) acc[e] = 0;                                           \
            /* keys: the L prefix keys of this row's stream, then the row's own keys */           \
            for (int64_t j = -L; j < len; j++) {                                                  \
                const T *kv, *vv;                                                                 \
                if (j < 0) {                                                                      \
                    const int64_t row = ((b / p->prefix_rows) * L + (j + L)) * p->Hkv + g;        \
                    kv = (const T *)p->prefix_k + row * D;                                        \
                    vv = (const T *)p->prefix_v + row * E;                                        \
                } else {                                                                          \
                    if (p->causal && lk_kv_position(p, b, j) > qp) continue;                     \
                    kv = (const T *)p->k + b * p->k_stride[0] + j * p->k_stride[1] + g * p->k_stride[2]; \
                    vv = (const T *)p->v + b * p->v_stride[0] + j * p->v_stride[1] + g * p->v_stride[2]; \
                }                                                                                 \
                T s = 0;                                                                          \
                for (int64_t d = 0; d < D; d++) s += qv[d] * kv[d];                               \
                s *= scale;                                                                       \
                if (s > m) {                                                                      \
                    /* rescale what was accumulated under the old max */                          \
                    const T c = m == -INFINITY ? 0 : (T)exp((double)(m - s));                     \
                    l *= c;                                                                       \
                    for (int64_t e = 0; e < E; e++) acc[e] *= c;                                  \
                    m = s;                                                                        \
                }                                                                                 \
                const T w = (T)exp((double)(s - m));                                              \
                l += w;                                                                           \
                for (int64_t e = 0; e < E; e++) acc[e] += w * vv[e];                              \
            }                                                                                     \
            const T inv = l > 0 ? (T)1 / l : 0;                                                   \
            for (int64_t e = 0; e < E; e++) o[e] = acc[e] * inv;                                  \
            if (p->lse) ((T *)p->lse)[t / (Hq * N) * N * Hq + i * Hq + h] =                       \
                l > 0 ? m + (T)log((double)l) : -INFINITY;                                        \
        }                                                                                         \
        free(acc);                                                                                \
    }                                                                                             \
}

LK_DEFINE_ATTENTION_GENERIC(attention_generic_f32, float)
LK_DEFINE_ATTENTION_GENERIC(attention_generic_f64, double)

lk_status lk_attention_cpu(const lk_attention_params *p) {
    if (p->B == 0 || p->N == 0 || p->Hq == 0) return LK_OK;
    if (p->dtype == LK_F32) attention_generic_f32(p);
    else if (p->dtype == LK_F64) attention_generic_f64(p);
    else return LK_ERR_DTYPE;
    return LK_OK;
}
