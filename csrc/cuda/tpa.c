/* lmkern._cuda bindings of lmkern.tpa: tpa_decode_plan, tpa_decode, tpa_materialize (see bindings.h).
 * The Python layer (lmkern._cuda_tpa) has checked shapes, dtypes and devices; these check sizes and
 * pointers, then launch with the GIL released. */
#include <string.h>

#include "bindings.h"
#include "lmkern/tpa.h"

static const char *FN_DECODE = "cuda.tpa_decode";

/* Keywords of tpa_decode / tpa_decode_plan: sizes, pointers and (batch, second-axis, unused) strides. */
static int fill_decode(PyObject *args, PyObject *kwargs, lk_tpa_attention_params *p, lk_tpa_decode_strides *s,
                       int *device, void **stream, int *num_splits, void **scratch, int *num_sms) {
    static char *kwlist[] = {"device", "stream", "dtype", "B", "M", "H", "Rq", "Rk", "Rv", "D", "E",
                             "aq", "aq_stride", "bq", "bq_stride", "ak", "ak_stride", "bk", "bk_stride",
                             "av", "av_stride", "bv", "bv_stride", "out", "out_stride", "lse", "kv_lens",
                             "scale", "num_splits", "scratch", "num_sms", "path", NULL};
    const char *dtype = "float32";
    long long B = 0, M = 0, H = 0, Rq = 0, Rk = 0, Rv = 0, D = 0, E = 0;
    void *aq = NULL, *bq = NULL, *ak = NULL, *bk = NULL, *av = NULL, *bv = NULL, *out = NULL, *lse = NULL, *lens = NULL;
    int64_t st[7][3];
    double scale = 1.0;
    int path = 0;
    memset(st, 0, sizeof st);
    memset(p, 0, sizeof *p);
    memset(s, 0, sizeof *s);
    *num_splits = 1;
    *scratch = NULL;
    *stream = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iO&sLLLLLLLLO&O&O&O&O&O&O&O&O&O&O&O&O&O&O&O&diO&ii", kwlist, device,
                                     lk_cu_ptr_arg, stream, &dtype, &B, &M, &H, &Rq, &Rk, &Rv, &D, &E,
                                     lk_cu_ptr_arg, &aq, lk_cu_strides3, st[0], lk_cu_ptr_arg, &bq, lk_cu_strides3, st[1],
                                     lk_cu_ptr_arg, &ak, lk_cu_strides3, st[2], lk_cu_ptr_arg, &bk, lk_cu_strides3, st[3],
                                     lk_cu_ptr_arg, &av, lk_cu_strides3, st[4], lk_cu_ptr_arg, &bv, lk_cu_strides3, st[5],
                                     lk_cu_ptr_arg, &out, lk_cu_strides3, st[6], lk_cu_ptr_arg, &lse, lk_cu_ptr_arg, &lens,
                                     &scale, num_splits, lk_cu_ptr_arg, scratch, num_sms, &path))
        return -1;
    if (path < LK_TPA_PATH_AUTO || path > LK_TPA_PATH_TENSOR_CORES) {
        PyErr_Format(PyExc_ValueError, "%s: path must be 0 (auto), 1 (factor: float32 CUDA cores), 2 (same as 1) "
                     "or 3 (tensor cores); got %d", FN_DECODE, path);
        return -1;
    }
    if (lk_cu_parse_dtype(FN_DECODE, dtype, &p->dtype) < 0) return -1;
    if (B < 0 || M < 0 || H < 0 || D < 0 || E < 0) {
        PyErr_Format(PyExc_ValueError, "%s: negative size", FN_DECODE);
        return -1;
    }
    if (Rq < 1 || Rk < 1 || Rv < 1) {
        PyErr_Format(PyExc_ValueError, "%s: ranks must be >= 1", FN_DECODE);
        return -1;
    }
    if (D > LK_CUDA_ATTN_MAX_HEAD_DIM || E > LK_CUDA_ATTN_MAX_HEAD_DIM) {
        PyErr_Format(PyExc_ValueError, "%s: head dimensions D = %lld and E = %lld must be <= %d on the GPU", FN_DECODE, D,
                     E, LK_CUDA_ATTN_MAX_HEAD_DIM);
        return -1;
    }
    for (int a = 0; a < 7; a++)
        if (st[a][0] < 0 || st[a][1] < 0) {
            PyErr_Format(PyExc_ValueError, "%s: negative stride", FN_DECODE);
            return -1;
        }
    /* a pointer may be NULL only when its array has no elements */
    if (B * H > 0 && (!aq || (D > 0 && !bq) || (E > 0 && !out) || (M > 0 && (!ak || !av || (D > 0 && !bk) || (E > 0 && !bv))))) {
        PyErr_Format(PyExc_ValueError, "%s: null device pointer", FN_DECODE);
        return -1;
    }
    if (*num_splits < 1 || *num_splits > 4096) {
        PyErr_Format(PyExc_ValueError, "%s: num_splits must be in [1, 4096]", FN_DECODE);
        return -1;
    }
    p->B = B; p->N = 1; p->M = M; p->H = H; p->Rq = Rq; p->Rk = Rk; p->Rv = Rv; p->D = D; p->E = E;
    p->aq = aq; p->bq = bq; p->ak = ak; p->bk = bk; p->av = av; p->bv = bv; p->out = out; p->lse = lse;
    p->kv_lens = (const int64_t *)lens;
    p->scale = scale;
    p->path = (lk_tpa_path)path;
    int64_t *dst[7] = {s->aq, s->bq, s->ak, s->bk, s->av, s->bv, s->out};
    for (int a = 0; a < 7; a++) {
        dst[a][0] = st[a][0];
        dst[a][1] = st[a][1];
    }
    if (!lk_tpa_decode_cuda_supported(p)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: H = %lld, Rq = %lld, Rk = %lld, Rv = %lld, D = %lld, E = %lld do not fit the CUDA kernel's "
                     "shared memory%s", FN_DECODE, H, Rq, Rk, Rv, D, E,
                     path == LK_TPA_PATH_TENSOR_CORES ? " (the tensor-core kernel takes float16 / "
                                                        "bfloat16 and at most 64 tiles of 16 heads x 8 features)" : "");
        return -1;
    }
    return 0;
}

/* tpa_decode_plan(**tpa_decode keywords, num_sms=0) -> (num_splits, scratch_floats) */
static PyObject *py_tpa_decode_plan(PyObject *self, PyObject *args, PyObject *kwargs) {
    lk_tpa_attention_params p;
    lk_tpa_decode_strides s;
    int device = 0, splits, sms = 0;
    void *stream, *scratch;
    if (fill_decode(args, kwargs, &p, &s, &device, &stream, &splits, &scratch, &sms) < 0) return NULL;
    sms = lk_cu_num_sms(device, sms);
    splits = lk_tpa_decode_cuda_splits(&p, sms);
    return Py_BuildValue("(iL)", splits, (long long)lk_tpa_decode_cuda_scratch_floats(&p, splits));
}

static PyObject *py_tpa_decode(PyObject *self, PyObject *args, PyObject *kwargs) {
    lk_tpa_attention_params p;
    lk_tpa_decode_strides s;
    int device = 0, splits, sms = 0;
    void *stream, *scratch;
    if (fill_decode(args, kwargs, &p, &s, &device, &stream, &splits, &scratch, &sms) < 0) return NULL;
    if (splits > 1 && !scratch) {
        PyErr_Format(PyExc_ValueError, "%s: num_splits > 1 needs scratch", FN_DECODE);
        return NULL;
    }
    LK_CU_LAUNCH(FN_DECODE, device, lk_tpa_decode_cuda(&p, &s, splits, (float *)scratch, (lk_stream)stream));
    Py_RETURN_NONE;
}

/* tpa_materialize(device=, stream=, dtype=, rows=, H=, R=, D=, a=, b=, out=, scale=): C-contiguous arrays. */
static PyObject *py_tpa_materialize(PyObject *self, PyObject *args, PyObject *kwargs) {
    static const char *fn = "cuda.tpa_materialize";
    static char *kwlist[] = {"device", "stream", "dtype", "rows", "H", "R", "D", "a", "b", "out", "scale", NULL};
    int device = 0;
    void *stream = NULL, *a = NULL, *b = NULL, *out = NULL;
    const char *dtype = "float32";
    long long rows = 0, H = 0, R = 0, D = 0;
    double scale = 1.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iO&sLLLLO&O&O&d", kwlist, &device, lk_cu_ptr_arg, &stream, &dtype,
                                     &rows, &H, &R, &D, lk_cu_ptr_arg, &a, lk_cu_ptr_arg, &b, lk_cu_ptr_arg, &out, &scale))
        return NULL;
    lk_tpa_materialize_params p;
    memset(&p, 0, sizeof p);
    if (lk_cu_parse_dtype(fn, dtype, &p.dtype) < 0) return NULL;
    if (rows < 0 || H < 0 || R < 0 || D < 0) {
        PyErr_Format(PyExc_ValueError, "%s: negative size", fn);
        return NULL;
    }
    if (rows * H * D > 0 && (!out || (R > 0 && (!a || !b)))) {
        PyErr_Format(PyExc_ValueError, "%s: null device pointer", fn);
        return NULL;
    }
    p.rows = rows; p.H = H; p.R = R; p.D = D; p.a = a; p.b = b; p.out = out; p.scale = scale;
    LK_CU_LAUNCH(fn, device, lk_tpa_materialize_cuda(&p, (lk_stream)stream));
    Py_RETURN_NONE;
}

PyMethodDef lk_cuda_tpa_methods[] = {
    {"tpa_decode_plan", (PyCFunction)(void (*)(void))py_tpa_decode_plan, METH_VARARGS | METH_KEYWORDS,
     "tpa_decode_plan(**tpa_decode keywords, num_sms=0) -> (num_splits, scratch_floats)"},
    {"tpa_decode", (PyCFunction)(void (*)(void))py_tpa_decode, METH_VARARGS | METH_KEYWORDS,
     "tpa_decode(device=, stream=, dtype=, B=, M=, H=, Rq=, Rk=, Rv=, D=, E=, aq=, aq_stride=, ...): enqueue decode."},
    {"tpa_materialize", (PyCFunction)(void (*)(void))py_tpa_materialize, METH_VARARGS | METH_KEYWORDS,
     "tpa_materialize(device=, stream=, dtype=, rows=, H=, R=, D=, a=, b=, out=, scale=): enqueue scale * a @ b."},
    {NULL, NULL, 0, NULL},
};
