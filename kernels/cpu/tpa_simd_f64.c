/* tpa_simd.h for float64: lk_tpa_simd_f64 */
#define LK_REAL_F64 1
#include "tpa_simd.h"
