/* attention_simd.h for float64: lk_attention_simd_f64 */
#define LK_REAL_F64 1
#include "attention_simd.h"
