/* tpa_simd.h for float32: lk_tpa_simd_f32 */
#include "tpa_simd.h"
