/* lmkern._cuda bindings of lmkern.kv quantization and the GPU KIVI cache (kernels/cuda/kv_quant.cu,
 * kv_attend.cu).  Keyword arguments only; the Python layer (lmkern._cuda_kv) has checked shapes, dtypes
 * and devices; here sizes are re-checked (ValueError) and the launch runs without the GIL. */
#include "bindings.h"

#include "lmkern/kv.h"

static int bad_bits_or_group(const char *fn, int bits, long long G) {
    if (bits != 2 && bits != 4 && bits != 8) {
        PyErr_Format(PyExc_ValueError, "%s: bits must be one of 2, 4, 8; got %d", fn, bits);
        return 1;
    }
    if (G < 1 || G % (8 / bits)) {
        PyErr_Format(PyExc_ValueError, "%s: group_size must be a positive multiple of %d; got %lld", fn, 8 / bits, G);
        return 1;
    }
    return 0;
}

/* ---- quantize / dequantize ------------------------------------------------------------------------ */

static PyObject *quant_common(PyObject *args, PyObject *kwargs, int dequant) {
    const char *fn = dequant ? "cuda.kv_dequantize" : "cuda.kv_quantize";
    static char *kwlist[] = {"device", "stream", "dtype", "B", "T", "H", "D", "G", "bits", "channel", "x", "codes",
                             "scale", "zero", NULL};
    int device = 0, bits = 0, channel = 0;
    void *stream = NULL, *x = NULL, *codes = NULL, *scale = NULL, *zero = NULL;
    const char *dtype = "float32";
    long long B = 0, T = 0, H = 0, D = 0, G = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iO&sLLLLLipO&O&O&O&", kwlist, &device, lk_cu_ptr_arg, &stream,
                                     &dtype, &B, &T, &H, &D, &G, &bits, &channel, lk_cu_ptr_arg, &x, lk_cu_ptr_arg,
                                     &codes, lk_cu_ptr_arg, &scale, lk_cu_ptr_arg, &zero))
        return NULL;
    lk_kv_quant_params p;
    memset(&p, 0, sizeof p);
    if (lk_cu_parse_dtype(fn, dtype, &p.dtype) < 0) return NULL;
    if (B < 0 || T < 0 || H < 0 || D < 0) {
        PyErr_Format(PyExc_ValueError, "%s: negative size", fn);
        return NULL;
    }
    if (bad_bits_or_group(fn, bits, G)) return NULL;
    if ((channel ? T : D) % G) {
        PyErr_Format(PyExc_ValueError, "%s: the grouped axis (%lld) is not a multiple of group_size = %lld", fn,
                     channel ? T : D, G);
        return NULL;
    }
    if (B * T * H * D > 0 && (!x || !codes || !scale || !zero)) {
        PyErr_Format(PyExc_ValueError, "%s: null device pointer", fn);
        return NULL;
    }
    p.B = B; p.T = T; p.H = H; p.D = D; p.G = G; p.bits = bits; p.channel = channel;
    p.x = x; p.codes = (uint8_t *)codes; p.scale = (float *)scale; p.zero = (float *)zero;
    if (dequant) LK_CU_LAUNCH(fn, device, lk_kv_dequantize_cuda(&p, (lk_stream)stream));
    else LK_CU_LAUNCH(fn, device, lk_kv_quantize_cuda(&p, (lk_stream)stream));
    Py_RETURN_NONE;
}

static PyObject *py_kv_quantize(PyObject *self, PyObject *args, PyObject *kwargs) { return quant_common(args, kwargs, 0); }
static PyObject *py_kv_dequantize(PyObject *self, PyObject *args, PyObject *kwargs) { return quant_common(args, kwargs, 1); }

/* ---- the cache ------------------------------------------------------------------------------------ */

/* Shared checks of the cache geometry (ValueError). */
static int bad_cache(const char *fn, long long H, long long D, long long E, long long G, long long S, long long KG,
                     long long kcap, long long vcap, int bits) {
    if (H < 0 || D < 0 || E < 0 || S < 0 || KG < 0 || kcap < 0 || vcap < 0) {
        PyErr_Format(PyExc_ValueError, "%s: negative size", fn);
        return 1;
    }
    if (bad_bits_or_group(fn, bits, G)) return 1;
    if (E % G) {
        PyErr_Format(PyExc_ValueError, "%s: E = %lld is not a multiple of group_size = %lld", fn, E, G);
        return 1;
    }
    if (KG * G < S || (S > 0 && kcap < 1)) {
        PyErr_Format(PyExc_ValueError, "%s: inconsistent cache geometry", fn);
        return 1;
    }
    if (D > LK_CUDA_ATTN_MAX_HEAD_DIM || E > LK_CUDA_ATTN_MAX_HEAD_DIM) {
        PyErr_Format(PyExc_ValueError, "%s: head dimensions D = %lld and E = %lld must be <= %d on the GPU", fn, D, E,
                     LK_CUDA_ATTN_MAX_HEAD_DIM);
        return 1;
    }
    return 0;
}

static PyObject *py_kv_cache_append(PyObject *self, PyObject *args, PyObject *kwargs) {
    const char *fn = "cuda.kv_cache_append";
    static char *kwlist[] = {"device", "stream", "dtype", "B", "T", "H", "D", "E", "G", "S", "k_groups", "k_res_cap",
                             "v_res_cap", "bits", "k", "k_stride", "v", "v_stride", "rows", "max_kgroups",
                             "max_vtokens", "max_new", "k_codes", "k_scale", "k_zero", "k_res", "v_codes", "v_scale",
                             "v_zero", "v_res", NULL};
    int device = 0, bits = 0;
    void *stream = NULL, *k = NULL, *v = NULL, *rows = NULL, *kc = NULL, *ks = NULL, *kz = NULL, *kr = NULL,
         *vc = NULL, *vs = NULL, *vz = NULL, *vr = NULL;
    const char *dtype = "float32";
    long long B = 0, T = 0, H = 0, D = 0, E = 0, G = 0, S = 0, KG = 0, kcap = 0, vcap = 0, mkg = 0, mvt = 0, mnew = 0;
    lk_kv_cache_append_params p;
    memset(&p, 0, sizeof p);
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iO&sLLLLLLLLLLiO&O&O&O&O&LLLO&O&O&O&O&O&O&O&", kwlist, &device,
                                     lk_cu_ptr_arg, &stream, &dtype, &B, &T, &H, &D, &E, &G, &S, &KG, &kcap, &vcap,
                                     &bits, lk_cu_ptr_arg, &k, lk_cu_strides3, p.k_stride, lk_cu_ptr_arg, &v,
                                     lk_cu_strides3, p.v_stride, lk_cu_ptr_arg, &rows, &mkg, &mvt, &mnew, lk_cu_ptr_arg,
                                     &kc, lk_cu_ptr_arg, &ks, lk_cu_ptr_arg, &kz, lk_cu_ptr_arg, &kr, lk_cu_ptr_arg, &vc,
                                     lk_cu_ptr_arg, &vs, lk_cu_ptr_arg, &vz, lk_cu_ptr_arg, &vr))
        return NULL;
    if (lk_cu_parse_dtype(fn, dtype, &p.dtype) < 0) return NULL;
    if (B < 0 || T < 0 || mkg < 0 || mvt < 0 || mnew < 0) {
        PyErr_Format(PyExc_ValueError, "%s: negative size", fn);
        return NULL;
    }
    if (bad_cache(fn, H, D, E, G, S, KG, kcap, vcap, bits)) return NULL;
    if (B * H * S > 0 && (!rows || (T * D > 0 && !k) || (T * E > 0 && !v) || (D > 0 && (!kc || !ks || !kz || !kr)) ||
                          (E > 0 && (!vc || !vs || !vz)) || (E > 0 && vcap > 0 && !vr))) {
        PyErr_Format(PyExc_ValueError, "%s: null device pointer", fn);
        return NULL;
    }
    p.B = B; p.T = T; p.H = H; p.D = D; p.E = E; p.G = G; p.S = S; p.k_groups = KG; p.k_res_cap = kcap;
    p.v_res_cap = vcap; p.bits = bits; p.k = k; p.v = v; p.rows = (const int64_t *)rows;
    p.max_kgroups = mkg; p.max_vtokens = mvt; p.max_new = mnew;
    p.k_codes = (uint8_t *)kc; p.k_scale = (float *)ks; p.k_zero = (float *)kz; p.k_res = (float *)kr;
    p.v_codes = (uint8_t *)vc; p.v_scale = (float *)vs; p.v_zero = (float *)vz; p.v_res = (float *)vr;
    LK_CU_LAUNCH(fn, device, lk_kv_cache_append_cuda(&p, (lk_stream)stream));
    Py_RETURN_NONE;
}

static int fill_attend(const char *fn, PyObject *args, PyObject *kwargs, lk_kv_attend_cuda_params *p, int *device,
                       void **stream, int *num_splits, void **scratch, int *num_sms) {
    static char *kwlist[] = {"device", "stream", "dtype", "B", "N", "Hq", "Hkv", "D", "E", "G", "S", "k_groups",
                             "k_res_cap", "v_res_cap", "bits", "causal", "scale", "q", "q_stride", "out",
                             "out_stride", "lse", "k_codes", "k_scale", "k_zero", "k_res", "v_codes", "v_scale",
                             "v_zero", "v_res", "rows", "q_pos", "kv_pos", "max_len", "num_splits", "scratch",
                             "num_sms", NULL};
    const char *dtype = "float32";
    long long B = 0, N = 0, Hq = 0, Hkv = 0, D = 0, E = 0, G = 0, S = 0, KG = 0, kcap = 0, vcap = 0, maxlen = 0;
    int bits = 0, causal = 0;
    double scale = 1.0;
    void *q = NULL, *out = NULL, *lse = NULL, *kc = NULL, *ks = NULL, *kz = NULL, *kr = NULL, *vc = NULL, *vs = NULL,
         *vz = NULL, *vr = NULL, *rows = NULL, *qpos = NULL, *kvpos = NULL;
    memset(p, 0, sizeof *p);
    *num_splits = 1;
    *scratch = NULL;
    *stream = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iO&sLLLLLLLLLLLipdO&O&O&O&O&O&O&O&O&O&O&O&O&O&O&O&LiO&i", kwlist,
                                     device, lk_cu_ptr_arg, stream, &dtype, &B, &N, &Hq, &Hkv, &D, &E, &G, &S, &KG,
                                     &kcap, &vcap, &bits, &causal, &scale, lk_cu_ptr_arg, &q, lk_cu_strides3,
                                     p->q_stride, lk_cu_ptr_arg, &out, lk_cu_strides3, p->out_stride, lk_cu_ptr_arg,
                                     &lse, lk_cu_ptr_arg, &kc, lk_cu_ptr_arg, &ks, lk_cu_ptr_arg, &kz, lk_cu_ptr_arg,
                                     &kr, lk_cu_ptr_arg, &vc, lk_cu_ptr_arg, &vs, lk_cu_ptr_arg, &vz, lk_cu_ptr_arg,
                                     &vr, lk_cu_ptr_arg, &rows, lk_cu_ptr_arg, &qpos, lk_cu_ptr_arg, &kvpos, &maxlen,
                                     num_splits, lk_cu_ptr_arg, scratch, num_sms))
        return -1;
    if (lk_cu_parse_dtype(fn, dtype, &p->dtype) < 0) return -1;
    if (B < 0 || N < 0 || Hq < 0 || Hkv < 0 || maxlen < 0 || maxlen > S) {
        PyErr_Format(PyExc_ValueError, "%s: negative size or max_len outside [0, S]", fn);
        return -1;
    }
    if (bad_cache(fn, Hkv, D, E, G, S, KG, kcap, vcap, bits)) return -1;
    if (Hkv == 0 ? Hq != 0 : Hq % Hkv != 0) {
        PyErr_Format(PyExc_ValueError, "%s: Hq = %lld must be a multiple of Hkv = %lld", fn, Hq, Hkv);
        return -1;
    }
    if (*num_splits < 1 || *num_splits > 1024) {
        PyErr_Format(PyExc_ValueError, "%s: num_splits must be in [1, 1024]", fn);
        return -1;
    }
    if (B * N * Hq > 0 && (!rows || !qpos || (D > 0 && !q) || (E > 0 && !out) ||
                           (S > 0 && (!kvpos || (D > 0 && (!kc || !ks || !kz || !kr)) ||
                                      (E > 0 && (!vc || !vs || !vz)) || (E > 0 && vcap > 0 && !vr))))) {
        PyErr_Format(PyExc_ValueError, "%s: null device pointer", fn);
        return -1;
    }
    p->B = B; p->N = N; p->Hq = Hq; p->Hkv = Hkv; p->D = D; p->E = E; p->G = G; p->S = S; p->k_groups = KG;
    p->k_res_cap = kcap; p->v_res_cap = vcap; p->bits = bits; p->causal = causal; p->scale = scale;
    p->q = q; p->out = out; p->lse = (float *)lse;
    p->k_codes = (const uint8_t *)kc; p->k_scale = (const float *)ks; p->k_zero = (const float *)kz;
    p->k_res = (const float *)kr; p->v_codes = (const uint8_t *)vc; p->v_scale = (const float *)vs;
    p->v_zero = (const float *)vz; p->v_res = (const float *)vr;
    p->rows = (const int64_t *)rows; p->q_pos = (const int64_t *)qpos; p->kv_pos = (const int64_t *)kvpos;
    p->max_len = maxlen;
    return 0;
}

/* kv_attend_plan(**same keywords as kv_attend, num_sms=...) -> (num_splits, scratch_floats) */
static PyObject *py_kv_attend_plan(PyObject *self, PyObject *args, PyObject *kwargs) {
    lk_kv_attend_cuda_params p;
    int device = 0, splits, sms = 0;
    void *stream, *scratch;
    if (fill_attend("cuda.kv_attend_plan", args, kwargs, &p, &device, &stream, &splits, &scratch, &sms) < 0) return NULL;
    sms = lk_cu_num_sms(device, sms);
    splits = lk_kv_attend_cuda_splits(&p, sms);
    return Py_BuildValue("(iL)", splits, (long long)lk_kv_attend_cuda_scratch_floats(&p, splits));
}

static PyObject *py_kv_attend(PyObject *self, PyObject *args, PyObject *kwargs) {
    const char *fn = "cuda.kv_attend";
    lk_kv_attend_cuda_params p;
    int device = 0, splits, sms = 0;
    void *stream, *scratch;
    if (fill_attend(fn, args, kwargs, &p, &device, &stream, &splits, &scratch, &sms) < 0) return NULL;
    if (splits > 1 && !scratch) {
        PyErr_Format(PyExc_ValueError, "%s: num_splits > 1 needs scratch", fn);
        return NULL;
    }
    LK_CU_LAUNCH(fn, device, lk_kv_attend_cuda(&p, splits, (float *)scratch, (lk_stream)stream));
    Py_RETURN_NONE;
}

PyMethodDef lk_cuda_kv_methods[] = {
    {"kv_quantize", (PyCFunction)(void (*)(void))py_kv_quantize, METH_VARARGS | METH_KEYWORDS,
     "kv_quantize(device=, stream=, dtype=, B=, T=, H=, D=, G=, bits=, channel=, x=, codes=, scale=, zero=)"},
    {"kv_dequantize", (PyCFunction)(void (*)(void))py_kv_dequantize, METH_VARARGS | METH_KEYWORDS,
     "kv_dequantize(same keywords as kv_quantize; x is written)"},
    {"kv_cache_append", (PyCFunction)(void (*)(void))py_kv_cache_append, METH_VARARGS | METH_KEYWORDS,
     "kv_cache_append(device=, stream=, dtype=, B=, T=, H=, D=, E=, G=, S=, ...): the GPU KIVI cache append"},
    {"kv_attend_plan", (PyCFunction)(void (*)(void))py_kv_attend_plan, METH_VARARGS | METH_KEYWORDS,
     "kv_attend_plan(**kv_attend keywords, num_sms=) -> (num_splits, scratch_floats)"},
    {"kv_attend", (PyCFunction)(void (*)(void))py_kv_attend, METH_VARARGS | METH_KEYWORDS,
     "kv_attend(device=, stream=, dtype=, B=, N=, Hq=, Hkv=, ...): attention over the GPU KIVI cache"},
    {NULL, NULL, 0, NULL},
};
