/* lmkern._cuda bindings of lmkern.kv scoring and eviction (attention_mass, pool1d, keep_topk, compact);
 * quantization and the quantized cache are in kv.c.  See bindings.h.
 *
 * The Python layer (lmkern._cuda_kv_select) has checked shapes, dtypes, devices and host index values;
 * here: size sanity, null pointers, then the launch without the GIL. */
#include <string.h>

#include "bindings.h"
#include "lmkern/kv.h"

/* ---- attention_mass --------------------------------------------------------------------------- */

static const char *FN_MASS = "cuda.kv_attention_mass";

static int fill_mass(PyObject *args, PyObject *kwargs, lk_kv_mass_cuda_params *p, int *device, void **stream,
                     int *num_splits, void **scratch, int *num_sms) {
    static char *kwlist[] = {"device", "stream", "dtype", "B", "N", "M", "Hq", "Hkv", "D", "q", "q_stride", "k",
                             "k_stride", "out", "q_pos", "q_pos_bstride", "kv_pos", "kv_pos_bstride", "kv_lens",
                             "causal", "normalize", "reduce", "scale", "num_splits", "scratch", "num_sms", NULL};
    const char *dtype = "float32";
    long long B = 0, N = 0, M = 0, Hq = 0, Hkv = 0, D = 0, qpb = 0, kvpb = 0;
    void *q = NULL, *k = NULL, *out = NULL, *qpos = NULL, *kvpos = NULL, *lens = NULL;
    int causal = 0, normalize = 1, reduce = LK_REDUCE_MEAN;
    double scale = 1.0;
    *num_splits = 1;
    *scratch = NULL;
    *stream = NULL;
    memset(p, 0, sizeof *p);
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iO&sLLLLLLO&O&O&O&O&O&LO&LO&ppidiO&i", kwlist, device, lk_cu_ptr_arg,
                                     stream, &dtype, &B, &N, &M, &Hq, &Hkv, &D, lk_cu_ptr_arg, &q, lk_cu_strides3,
                                     p->q_stride, lk_cu_ptr_arg, &k, lk_cu_strides3, p->k_stride, lk_cu_ptr_arg, &out,
                                     lk_cu_ptr_arg, &qpos, &qpb, lk_cu_ptr_arg, &kvpos, &kvpb, lk_cu_ptr_arg, &lens,
                                     &causal, &normalize, &reduce, &scale, num_splits, lk_cu_ptr_arg, scratch, num_sms))
        return -1;
    if (lk_cu_parse_dtype(FN_MASS, dtype, &p->dtype) < 0) return -1;
    if (B < 0 || N < 0 || M < 0 || Hq < 0 || Hkv < 0 || D < 0 || qpb < 0 || kvpb < 0) {
        PyErr_Format(PyExc_ValueError, "%s: negative size", FN_MASS);
        return -1;
    }
    if (Hkv == 0 ? Hq != 0 : Hq % Hkv != 0) {
        PyErr_Format(PyExc_ValueError, "%s: Hq = %lld must be a multiple of Hkv = %lld", FN_MASS, Hq, Hkv);
        return -1;
    }
    if (D > LK_CUDA_ATTN_MAX_HEAD_DIM) {
        PyErr_Format(PyExc_ValueError, "%s: head dimension D = %lld must be <= %d on the GPU", FN_MASS, D,
                     LK_CUDA_ATTN_MAX_HEAD_DIM);
        return -1;
    }
    if (reduce < LK_REDUCE_MEAN || reduce > LK_REDUCE_NONE) {
        PyErr_Format(PyExc_ValueError, "%s: reduce must be in [0, 3]", FN_MASS);
        return -1;
    }
    const long long Hout = reduce == LK_REDUCE_NONE ? Hq : Hkv;
    if (B * M * Hout > 0 && (!out || (N * Hq * D > 0 && (!q || (M * D > 0 && !k))))) {
        PyErr_Format(PyExc_ValueError, "%s: null device pointer", FN_MASS);
        return -1;
    }
    if (*num_splits < 1 || *num_splits > 64) {
        PyErr_Format(PyExc_ValueError, "%s: num_splits must be in [1, 64]", FN_MASS);
        return -1;
    }
    p->B = B; p->N = N; p->M = M; p->Hq = Hq; p->Hkv = Hkv; p->D = D;
    p->q = q; p->k = k; p->out = (float *)out;
    p->q_pos = qpos; p->q_pos_bstride = qpb; p->kv_pos = kvpos; p->kv_pos_bstride = kvpb; p->kv_lens = lens;
    p->causal = causal; p->normalize = normalize; p->reduce = reduce; p->scale = scale;
    return 0;
}

/* kv_attention_mass_plan(**the keywords of kv_attention_mass, num_sms=0) -> (num_splits, scratch_floats) */
static PyObject *py_mass_plan(PyObject *self, PyObject *args, PyObject *kwargs) {
    lk_kv_mass_cuda_params p;
    int device = 0, splits, sms = 0;
    void *stream, *scratch;
    if (fill_mass(args, kwargs, &p, &device, &stream, &splits, &scratch, &sms) < 0) return NULL;
    sms = lk_cu_num_sms(device, sms);
    splits = lk_kv_mass_cuda_splits(&p, sms);
    return Py_BuildValue("(iL)", splits, (long long)lk_kv_mass_cuda_scratch_floats(&p, splits));
}

static PyObject *py_mass(PyObject *self, PyObject *args, PyObject *kwargs) {
    lk_kv_mass_cuda_params p;
    int device = 0, splits, sms = 0;
    void *stream, *scratch;
    if (fill_mass(args, kwargs, &p, &device, &stream, &splits, &scratch, &sms) < 0) return NULL;
    if (p.normalize && p.B * p.M * p.N * p.Hq > 0 && !scratch) {
        PyErr_Format(PyExc_ValueError, "%s: normalize needs scratch", FN_MASS);
        return NULL;
    }
    LK_CU_LAUNCH(FN_MASS, device, lk_kv_mass_cuda(&p, splits, (float *)scratch, (lk_stream)stream));
    Py_RETURN_NONE;
}

/* ---- pool1d ----------------------------------------------------------------------------------- */

static PyObject *py_pool1d(PyObject *self, PyObject *args, PyObject *kwargs) {
    static const char *fn = "cuda.kv_pool1d";
    static char *kwlist[] = {"device", "stream", "dtype", "B", "M", "H", "kernel_size", "max_mode", "scores",
                             "s_stride", "out", NULL};
    int device = 0, max_mode = 0;
    void *stream = NULL, *scores = NULL, *out = NULL;
    const char *dtype = "float32";
    long long B = 0, M = 0, H = 0, ks = 1;
    lk_kv_pool_cuda_params p;
    memset(&p, 0, sizeof p);
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iO&sLLLLpO&O&O&", kwlist, &device, lk_cu_ptr_arg, &stream, &dtype,
                                     &B, &M, &H, &ks, &max_mode, lk_cu_ptr_arg, &scores, lk_cu_strides3, p.s_stride,
                                     lk_cu_ptr_arg, &out))
        return NULL;
    if (lk_cu_parse_dtype(fn, dtype, &p.dtype) < 0) return NULL;
    if (B < 0 || M < 0 || H < 0 || ks < 1 || ks % 2 == 0) {
        PyErr_Format(PyExc_ValueError, "%s: bad sizes (kernel_size must be a positive odd integer)", fn);
        return NULL;
    }
    if (B * M * H > 0 && (!scores || !out)) {
        PyErr_Format(PyExc_ValueError, "%s: null device pointer", fn);
        return NULL;
    }
    p.B = B; p.M = M; p.H = H; p.kernel_size = ks; p.max_mode = max_mode; p.scores = scores; p.out = out;
    LK_CU_LAUNCH(fn, device, lk_kv_pool1d_cuda(&p, (lk_stream)stream));
    Py_RETURN_NONE;
}

/* ---- keep_topk -------------------------------------------------------------------------------- */

static PyObject *py_keep_topk(PyObject *self, PyObject *args, PyObject *kwargs) {
    static const char *fn = "cuda.kv_keep_topk";
    static char *kwlist[] = {"device", "stream", "dtype", "B", "M", "H", "K", "sink", "recent", "scores", "s_stride",
                             "idx", NULL};
    int device = 0;
    void *stream = NULL, *scores = NULL, *idx = NULL;
    const char *dtype = "float32";
    long long B = 0, M = 0, H = 0, K = 0, sink = 0, recent = 0;
    lk_kv_topk_cuda_params p;
    memset(&p, 0, sizeof p);
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iO&sLLLLLLO&O&O&", kwlist, &device, lk_cu_ptr_arg, &stream, &dtype,
                                     &B, &M, &H, &K, &sink, &recent, lk_cu_ptr_arg, &scores, lk_cu_strides3, p.s_stride,
                                     lk_cu_ptr_arg, &idx))
        return NULL;
    if (lk_cu_parse_dtype(fn, dtype, &p.dtype) < 0) return NULL;
    if (B < 0 || M < 0 || H < 0 || K < 0 || K > M || sink < 0 || recent < 0 || (K < M && sink + recent > K)) {
        PyErr_Format(PyExc_ValueError, "%s: bad sizes (0 <= K <= M, sink + recent <= K)", fn);
        return NULL;
    }
    if (B * K * H > 0 && (!scores || !idx)) {
        PyErr_Format(PyExc_ValueError, "%s: null device pointer", fn);
        return NULL;
    }
    p.B = B; p.M = M; p.H = H; p.K = K; p.sink = sink; p.recent = recent; p.scores = scores; p.idx = (int64_t *)idx;
    LK_CU_LAUNCH(fn, device, lk_kv_keep_topk_cuda(&p, (lk_stream)stream));
    Py_RETURN_NONE;
}

/* ---- compact ---------------------------------------------------------------------------------- */

static PyObject *py_compact(PyObject *self, PyObject *args, PyObject *kwargs) {
    static const char *fn = "cuda.kv_compact";
    static char *kwlist[] = {"device", "stream", "B", "M", "K", "H", "row_bytes", "x", "x_stride_bytes", "idx", "out",
                             NULL};
    int device = 0;
    void *stream = NULL, *x = NULL, *idx = NULL, *out = NULL;
    long long B = 0, M = 0, K = 0, H = 0, rb = 0;
    lk_kv_compact_cuda_params p;
    memset(&p, 0, sizeof p);
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iO&LLLLLO&O&O&O&", kwlist, &device, lk_cu_ptr_arg, &stream, &B, &M,
                                     &K, &H, &rb, lk_cu_ptr_arg, &x, lk_cu_strides3, p.x_stride_bytes, lk_cu_ptr_arg,
                                     &idx, lk_cu_ptr_arg, &out))
        return NULL;
    if (B < 0 || M < 0 || K < 0 || H < 0 || rb < 0) {
        PyErr_Format(PyExc_ValueError, "%s: negative size", fn);
        return NULL;
    }
    if (B * K * H * rb > 0 && M == 0) {
        PyErr_Format(PyExc_ValueError, "%s: idx must be in [0, M = 0)", fn);
        return NULL;
    }
    if (B * K * H * rb > 0 && (!x || !idx || !out)) {
        PyErr_Format(PyExc_ValueError, "%s: null device pointer", fn);
        return NULL;
    }
    p.B = B; p.M = M; p.K = K; p.H = H; p.row_bytes = rb; p.x = x; p.idx = (const int64_t *)idx; p.out = out;
    LK_CU_LAUNCH(fn, device, lk_kv_compact_cuda(&p, (lk_stream)stream));
    Py_RETURN_NONE;
}

PyMethodDef lk_cuda_kv_select_methods[] = {
    {"kv_attention_mass_plan", (PyCFunction)(void (*)(void))py_mass_plan, METH_VARARGS | METH_KEYWORDS,
     "kv_attention_mass_plan(**kv_attention_mass keywords, num_sms=0) -> (num_splits, scratch_floats)"},
    {"kv_attention_mass", (PyCFunction)(void (*)(void))py_mass, METH_VARARGS | METH_KEYWORDS,
     "kv_attention_mass(device=, stream=, dtype=, B=, N=, M=, Hq=, Hkv=, D=, q=, q_stride=, k=, k_stride=, out=, "
     "q_pos=, q_pos_bstride=, kv_pos=, kv_pos_bstride=, kv_lens=, causal=, normalize=, reduce=, scale=, "
     "num_splits=, scratch=): enqueue attention_mass (out float32 (B, M, Hout) contiguous)."},
    {"kv_pool1d", (PyCFunction)(void (*)(void))py_pool1d, METH_VARARGS | METH_KEYWORDS,
     "kv_pool1d(device=, stream=, dtype=, B=, M=, H=, kernel_size=, max_mode=, scores=, s_stride=, out=)"},
    {"kv_keep_topk", (PyCFunction)(void (*)(void))py_keep_topk, METH_VARARGS | METH_KEYWORDS,
     "kv_keep_topk(device=, stream=, dtype=, B=, M=, H=, K=, sink=, recent=, scores=, s_stride=, idx=)"},
    {"kv_compact", (PyCFunction)(void (*)(void))py_compact, METH_VARARGS | METH_KEYWORDS,
     "kv_compact(device=, stream=, B=, M=, K=, H=, row_bytes=, x=, x_stride_bytes=, idx=, out=): byte-row gather"},
    {NULL, NULL, 0, NULL},
};
