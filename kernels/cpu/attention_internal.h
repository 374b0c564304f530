/* What attention.c (the generic path and the dispatch) shares with the SIMD kernel attention_simd.h,
 * which is compiled once per element type (attention_simd_f32.c, attention_simd_f64.c). */
#ifndef LMKERN_ATTENTION_INTERNAL_H
#define LMKERN_ATTENTION_INTERNAL_H

#include <stdint.h>

#include "lmkern/attention.h"
#include "lmkern/common.h"

static inline int64_t lk_q_position(const lk_attention_params *p, int64_t b, int64_t i, int64_t len) {
    return p->q_pos ? p->q_pos[b * p->q_pos_bstride + i] : len - p->N + i;
}

static inline int64_t lk_kv_position(const lk_attention_params *p, int64_t b, int64_t j) {
    return p->kv_pos ? p->kv_pos[b * p->kv_pos_bstride + j] : j;
}

static inline int64_t lk_row_len(const lk_attention_params *p, int64_t b) {
    return p->kv_lens ? p->kv_lens[b] : p->M;
}

/* Threads for a region: one for a call too small to repay waking (or, on a busy machine,
 * waiting for) a second thread, at most `tasks`.  Results never depend on it: the split path's
 * chunk count depends on B and lk_get_num_threads() only, whatever the team size. */
static int lk_team(const lk_attention_params *p, int64_t tasks) {
    const double flops = 2.0 * (double)p->B * (double)p->N * (double)p->Hq * (double)(p->M + p->prefix_len) *
                         (double)(p->D + p->E);
    return flops < 4e6 ? 1 : lk_team_cap(tasks);
}

/* The SIMD paths (tiles for prefill, split keys for decode), float32 and float64. */
lk_status lk_attention_simd_f32(const lk_attention_params *p);
lk_status lk_attention_simd_f64(const lk_attention_params *p);

#endif
