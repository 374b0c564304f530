/* lmkern common definitions shared by every kernel family (CPU and CUDA).
 * Kernels know nothing about Python: they take a params struct of pointers, sizes and flags
 * and return an lk_status.  Arrays handed to CPU kernels are C-contiguous unless a params
 * struct says otherwise (the bindings copy strided inputs). */
#ifndef LMKERN_COMMON_H
#define LMKERN_COMMON_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    LK_F32 = 0,
    LK_F64 = 1,
    LK_F16 = 2,  /* CUDA only */
    LK_BF16 = 3, /* CUDA only */
} lk_dtype;

typedef enum {
    LK_OK = 0,
    LK_ERR_NOMEM = 1,   /* -> MemoryError */
    LK_ERR_VALUE = 2,   /* -> ValueError (a kernel-level precondition, e.g. index out of range) */
    LK_ERR_DTYPE = 3,   /* -> TypeError */
    LK_ERR_CUDA = 4,    /* -> RuntimeError with the CUDA error string */
} lk_status;

/* Thread count used by every OpenMP region (set_num_threads / LMKERN_NUM_THREADS). */
int lk_get_num_threads(void);
void lk_set_num_threads(int n);

/* Threads for a kernel of `tasks` independent tasks: no more than there are tasks (an idle worker would
 * only be woken and waited for at the barriers), at least 1, at most lk_get_num_threads(). */
int lk_team_cap(int64_t tasks);

/* Threads for a kernel of about `work` bytes of memory traffic (inputs read and outputs written;
 * arithmetic-heavy kernels convert their FMAs at their own speed, e.g. attention_mass counts 2 FMAs
 * of its register-blocked tile as a byte, the router 1 FMA as 4 bytes): one thread per LK_PAR_WORK,
 * at least 1, at most lk_get_num_threads().  lmkern's OpenMP workers sleep between kernels (OMP_WAIT_POLICY=PASSIVE, see
 * python/lmkern/__init__.py), and waking one costs more than a small kernel takes: on a 2-vCPU VM a
 * rope over one decode token ran in 12 us on one thread and 120 us on two.  Results stay bitwise
 * reproducible: the team size depends only on the shape and the thread setting. */
#define LK_PAR_WORK ((int64_t)1 << 20)
int lk_team_for(int64_t work);

/* Largest and smallest int64 helpers. */
static inline int64_t lk_min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t lk_max_i64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t lk_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* [lo, hi) of chunk `i` out of `n` equal chunks of `total` items: the static split every
 * kernel uses so that results are bitwise reproducible for a fixed thread count. */
static inline void lk_chunk(int64_t total, int64_t n, int64_t i, int64_t *lo, int64_t *hi) {
    int64_t base = total / n, rem = total % n;
    *lo = i * base + (i < rem ? i : rem);
    *hi = *lo + base + (i < rem ? 1 : 0);
}

#ifdef __cplusplus
}
#endif
#endif
