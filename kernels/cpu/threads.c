/* The one thread-count setting shared by every kernel. */
#include <stdlib.h>
#include <omp.h>
#include "lmkern/common.h"

static int lk_threads = 0; /* 0: not yet initialised */

static int lk_default_threads(void) {
    const char *env = getenv("LMKERN_NUM_THREADS");
    if (env && *env) {
        int n = atoi(env);
        if (n > 0) return n;
    }
    return omp_get_num_procs();
}

int lk_get_num_threads(void) {
    int n = __atomic_load_n(&lk_threads, __ATOMIC_RELAXED);
    if (n <= 0) {
        n = lk_default_threads();
        __atomic_store_n(&lk_threads, n, __ATOMIC_RELAXED);
    }
    return n;
}

void lk_set_num_threads(int n) {
    __atomic_store_n(&lk_threads, n > 0 ? n : lk_default_threads(), __ATOMIC_RELAXED);
}

int lk_team_cap(int64_t tasks) {
    const int n = lk_get_num_threads();
    return tasks < 1 ? 1 : tasks < n ? (int)tasks : n;
}

int lk_team_for(int64_t work) {
    const int n = lk_get_num_threads();
    const int64_t by = work / LK_PAR_WORK;
    return by < 1 ? 1 : by < n ? (int)by : n;
}
