/* attention_simd.h for float32: lk_attention_simd_f32 */
#include "attention_simd.h"
