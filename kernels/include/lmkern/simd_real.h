/* One kernel source, two element types: the names a type-generic SIMD kernel uses, mapped to simd.h's
 * float (lk_vf) or double (lk_vd) helpers.  A kernel written against these names is compiled twice, once
 * per type, by two small .c files (e.g. attention_simd_f32.c and attention_simd_f64.c), the second
 * defining LK_REAL_F64 before including it; static names then never collide, and only the entry points
 * carry the type in their name (LK_REAL_NAME).  No intrinsics here: those stay in simd.h. */
#ifndef LMKERN_SIMD_REAL_H
#define LMKERN_SIMD_REAL_H

#include <float.h>
#include <math.h>

#include "lmkern/simd.h"
#include "lmkern/softmax.h"

#ifdef LK_REAL_F64
typedef double lk_real;
typedef lk_vd lk_v;
#define LK_VL LK_VD
#define LK_REAL_NAME(name) name##_f64
#define lk_v_zero lk_vd_zero
#define lk_v_set1 lk_vd_set1
#define lk_v_load lk_vd_load
#define lk_v_store lk_vd_store
#define lk_v_load_n lk_vd_load_n
#define lk_v_store_n lk_vd_store_n
#define lk_v_add lk_vd_add
#define lk_v_sub lk_vd_sub
#define lk_v_mul lk_vd_mul
#define lk_v_fma lk_vd_fma
#define lk_v_max lk_vd_max
#define lk_v_sum lk_vd_sum
#define lk_v_sum4 lk_vd_sum4
#define lk_v_hmax lk_vd_hmax
#define lk_v_select_lt lk_vd_select_lt
#define lk_v_exp_softmax lk_vd_exp_softmax
#define lk_v_deinterleave2 lk_vd_deinterleave2
#define LK_REAL_MAX DBL_MAX
#define lk_real_exp exp
#define lk_real_transpose lk_transpose_f64
#define lk_real_softmax_combine lk_softmax_combine_f64
#else
typedef float lk_real;
typedef lk_vf lk_v;
#define LK_VL LK_VF
#define LK_REAL_NAME(name) name##_f32
#define lk_v_zero lk_vf_zero
#define lk_v_set1 lk_vf_set1
#define lk_v_load lk_vf_load
#define lk_v_store lk_vf_store
#define lk_v_load_n lk_vf_load_n
#define lk_v_store_n lk_vf_store_n
#define lk_v_add lk_vf_add
#define lk_v_sub lk_vf_sub
#define lk_v_mul lk_vf_mul
#define lk_v_fma lk_vf_fma
#define lk_v_max lk_vf_max
#define lk_v_sum lk_vf_sum
#define lk_v_sum4 lk_vf_sum4
#define lk_v_hmax lk_vf_hmax
#define lk_v_select_lt lk_vf_select_lt
#define lk_v_exp_softmax lk_vf_exp_softmax
#define lk_v_deinterleave2 lk_vf_deinterleave2
#define LK_REAL_MAX FLT_MAX
#define lk_real_exp expf
#define lk_real_transpose lk_transpose
#define lk_real_softmax_combine lk_softmax_combine_f32
#endif

#endif
