/* Micro-benchmarks for the roofline share (SPEC 7): float32 FMA throughput on all threads and
 * read bandwidth over a buffer far larger than the caches. */
#include <stdlib.h>
#include <omp.h>

#include "lmkern/common.h"
#include "lmkern/simd.h"

/* Runs `iters` rounds of 12 independent FMA chains per thread; returns the FLOPs done. */
double lk_peak_fma(int64_t iters) {
    double flops = 0;
#pragma omp parallel num_threads(lk_get_num_threads()) reduction(+ : flops)
    {
        lk_vf acc[12];
        const lk_vf a = lk_vf_set1(0.999999f), b = lk_vf_set1(1e-7f);
        for (int i = 0; i < 12; i++) acc[i] = lk_vf_set1((float)i);
        for (int64_t it = 0; it < iters; it++)
            for (int i = 0; i < 12; i++) acc[i] = lk_vf_fma(acc[i], a, b);
        float sink = 0;
        for (int i = 0; i < 12; i++) sink += lk_vf_sum(acc[i]);
        /* keep the result alive without affecting the count */
        flops += 2.0 * LK_VF * 12.0 * (double)iters + (sink == 12345.678f ? 1 : 0);
    }
    return flops;
}

/* Sums n floats of buf split over the threads; returns the sum (so nothing is optimized away).
 * Eight independent accumulators (four left the add latency chain close to the load rate on a core
 * with two load ports); plain loads, no prefetch hints: what a streaming kernel sees. */
double lk_read_sum(const float *buf, int64_t n) {
    double total = 0;
#pragma omp parallel num_threads(lk_get_num_threads()) reduction(+ : total)
    {
        int64_t lo, hi;
        lk_chunk(n / LK_VF, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
        lk_vf s[8];
        for (int u = 0; u < 8; u++) s[u] = lk_vf_zero();
        int64_t i = lo;
        for (; i + 8 <= hi; i += 8)
            for (int u = 0; u < 8; u++) s[u] = lk_vf_add(s[u], lk_vf_load(buf + (i + u) * LK_VF));
        for (; i < hi; i++) s[0] = lk_vf_add(s[0], lk_vf_load(buf + i * LK_VF));
        for (int u = 1; u < 8; u++) s[0] = lk_vf_add(s[0], s[u]);
        total += lk_vf_sum(s[0]);
    }
    return total;
}
