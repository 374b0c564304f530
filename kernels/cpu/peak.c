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

/* Sums n floats of buf split over the threads; returns the sum (so nothing is optimized away). */
double lk_read_sum(const float *buf, int64_t n) {
    double total = 0;
#pragma omp parallel num_threads(lk_get_num_threads()) reduction(+ : total)
    {
        int64_t lo, hi;
        lk_chunk(n / LK_VF, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
        lk_vf s0 = lk_vf_zero(), s1 = lk_vf_zero(), s2 = lk_vf_zero(), s3 = lk_vf_zero();
        int64_t i = lo;
        for (; i + 4 <= hi; i += 4) {
            s0 = lk_vf_add(s0, lk_vf_load(buf + (i + 0) * LK_VF));
            s1 = lk_vf_add(s1, lk_vf_load(buf + (i + 1) * LK_VF));
            s2 = lk_vf_add(s2, lk_vf_load(buf + (i + 2) * LK_VF));
            s3 = lk_vf_add(s3, lk_vf_load(buf + (i + 3) * LK_VF));
        }
        for (; i < hi; i++) s0 = lk_vf_add(s0, lk_vf_load(buf + i * LK_VF));
        total += lk_vf_sum(lk_vf_add(lk_vf_add(s0, s1), lk_vf_add(s2, s3)));
    }
    return total;
}
