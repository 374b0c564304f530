/* Mixture-of-Recursions gather of the active tokens (SPEC 3.5):  out[b, j] = h[b, idx[b, j]].
 *
 * A row copy per (b, j), split statically over threads.  Indices are checked before anything is
 * copied: one outside [0, T) returns LK_ERR_VALUE (the binding reports it as a ValueError). */
#include <string.h>
#include <omp.h>

#include "lmkern/mor.h"

lk_status lk_mor_gather_cpu(const lk_mor_gather_params *p) {
    const int64_t B = p->B, T = p->T, k = p->k, Dm = p->Dm;
    for (int64_t i = 0; i < B * k; i++)
        if (p->idx[i] < 0 || p->idx[i] >= T) return LK_ERR_VALUE;
    if (B * k == 0 || Dm == 0) return LK_OK;
    if (p->dtype != LK_F32 && p->dtype != LK_F64) return LK_ERR_DTYPE;
    const size_t es = p->dtype == LK_F64 ? 8 : 4, row = es * (size_t)Dm;
    const char *h = (const char *)p->h;
    char *out = (char *)p->out;
    #pragma omp parallel num_threads(lk_team_for(B * k * (int64_t)row * 2))
    {
        int64_t lo, hi;
        lk_chunk(B * k, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
        for (int64_t r = lo; r < hi; r++) {
            const int64_t b = r / k;
            memcpy(out + (size_t)r * row, h + (size_t)(b * T + p->idx[r]) * row, row);
        }
    }
    return LK_OK;
}
