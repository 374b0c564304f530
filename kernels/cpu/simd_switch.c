/* Runtime switch that forces every kernel onto its generic (scalar) path. */
#include "lmkern/simd.h"

static int lk_simd_on = 1;

int lk_simd_enabled(void) { return __atomic_load_n(&lk_simd_on, __ATOMIC_RELAXED); }
void lk_set_simd_enabled(int on) { __atomic_store_n(&lk_simd_on, on ? 1 : 0, __ATOMIC_RELAXED); }
