/* lmkern._cuda bindings of lmkern.mor (SPEC 3): thin validate-and-launch wrappers of the launchers in
 * kernels/cuda/mor_*.cu.  The Python layer (lmkern._cuda_mor) has checked shapes, dtypes, devices and
 * host index ranges; here only sizes and pointers are checked (ValueError), then the launch runs with
 * the GIL released on the caller's stream.  Keyword arguments as in bindings.h; strides are 2-tuples
 * (batch, token) in elements. */
#include <string.h>

#include "bindings.h"
#include "lmkern/mor.h"

/* O& converter: a 2-sequence of ints into int64_t[2]. */
static int strides2(PyObject *o, void *addr) {
    int64_t *s = (int64_t *)addr;
    PyObject *t = PySequence_Tuple(o);
    if (!t) return 0;
    if (PyTuple_GET_SIZE(t) != 2) {
        Py_DECREF(t);
        PyErr_SetString(PyExc_ValueError, "strides must have 2 entries (batch, token)");
        return 0;
    }
    for (int i = 0; i < 2; i++) {
        s[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(t, i));
        if (s[i] == -1 && PyErr_Occurred()) {
            Py_DECREF(t);
            return 0;
        }
    }
    Py_DECREF(t);
    return 1;
}

static int bad(const char *fn, const char *what) {
    PyErr_Format(PyExc_ValueError, "%s: %s", fn, what);
    return -1;
}

/* ---- expert_choice ------------------------------------------------------------------------------ */

static PyObject *py_mor_topk(PyObject *self, PyObject *args, PyObject *kwargs) {
    static const char *fn = "cuda.mor_topk";
    static char *kwlist[] = {"device", "stream", "dtype", "B", "n", "k", "scores", "scores_stride", "candidates",
                             "idx", "gate", NULL};
    int device = 0;
    void *stream = NULL, *scores = NULL, *cand = NULL, *idx = NULL, *gate = NULL;
    const char *dtype = "float32";
    long long B = 0, n = 0, k = 0, ss = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iO&sLLLO&LO&O&O&", kwlist, &device, lk_cu_ptr_arg, &stream,
                                     &dtype, &B, &n, &k, lk_cu_ptr_arg, &scores, &ss, lk_cu_ptr_arg, &cand,
                                     lk_cu_ptr_arg, &idx, lk_cu_ptr_arg, &gate))
        return NULL;
    lk_mor_topk_params p;
    memset(&p, 0, sizeof p);
    if (lk_cu_parse_dtype(fn, dtype, &p.dtype) < 0) return NULL;
    if (B < 0 || n < 0 || k < 0 || k > n) return bad(fn, "bad sizes (need 0 <= k <= n)"), NULL;
    if (n >= (1LL << 31) || B >= (1LL << 31)) return bad(fn, "n and B must be below 2^31 on the GPU"), NULL;
    if (B * k > 0 && (!scores || !idx || !gate)) return bad(fn, "null device pointer"), NULL;
    p.B = B; p.n = n; p.k = k; p.scores = scores; p.candidates = (const int64_t *)cand;
    p.idx = (int64_t *)idx; p.gate = gate;
    LK_CU_LAUNCH(fn, device, lk_mor_topk_cuda(&p, ss, (lk_stream)stream));
    Py_RETURN_NONE;
}

/* ---- router_scores ------------------------------------------------------------------------------ */

static PyObject *py_mor_router(PyObject *self, PyObject *args, PyObject *kwargs) {
    static const char *fn = "cuda.mor_router";
    static char *kwlist[] = {"device", "stream", "dtype", "B", "T", "Dm", "C", "h", "h_stride", "w", "w_stride",
                             "z", "activation", "alpha", "temperature", NULL};
    int device = 0, act = 0;
    void *stream = NULL, *h = NULL, *w = NULL, *z = NULL;
    const char *dtype = "float32";
    long long B = 0, T = 0, Dm = 0, C = 0;
    int64_t hs[2] = {0, 0}, ws[2] = {0, 0};
    double alpha = 1.0, temperature = 1.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iO&sLLLLO&O&O&O&O&idd", kwlist, &device, lk_cu_ptr_arg, &stream,
                                     &dtype, &B, &T, &Dm, &C, lk_cu_ptr_arg, &h, strides2, hs, lk_cu_ptr_arg, &w,
                                     strides2, ws, lk_cu_ptr_arg, &z, &act, &alpha, &temperature))
        return NULL;
    lk_mor_router_params p;
    memset(&p, 0, sizeof p);
    if (lk_cu_parse_dtype(fn, dtype, &p.dtype) < 0) return NULL;
    if (B < 0 || T < 0 || Dm < 0 || C < 0) return bad(fn, "bad sizes"), NULL;
    if (C > LK_MOR_CUDA_MAX_C) {
        PyErr_Format(PyExc_ValueError, "mor.router_scores: w has C = %lld outputs; the CUDA kernel supports at most %d",
                     C, LK_MOR_CUDA_MAX_C);
        return NULL;
    }
    if (act < LK_MOR_ACT_NONE || act > LK_MOR_ACT_SOFTMAX) return bad(fn, "bad activation"), NULL;
    if (!(temperature > 0)) return bad(fn, "temperature must be positive"), NULL;
    if (B * T * C > 0 && (!z || (Dm > 0 && (!h || !w)))) return bad(fn, "null device pointer"), NULL;
    p.rows = B * T; p.C = C; p.Dm = Dm; p.h = h; p.wt = w; p.z = z; p.activation = act; p.alpha = alpha;
    p.temperature = temperature;
    LK_CU_LAUNCH(fn, device, lk_mor_router_cuda(&p, T, hs, ws, (lk_stream)stream));
    Py_RETURN_NONE;
}

/* ---- token_choice ------------------------------------------------------------------------------- */

static PyObject *py_mor_token_choice(PyObject *self, PyObject *args, PyObject *kwargs) {
    static const char *fn = "cuda.mor_token_choice";
    static char *kwlist[] = {"device", "stream", "dtype", "B", "T", "C", "probs", "probs_stride", "bias", "depth",
                             "gate", NULL};
    int device = 0;
    void *stream = NULL, *probs = NULL, *bias = NULL, *depth = NULL, *gate = NULL;
    const char *dtype = "float32";
    long long B = 0, T = 0, C = 0;
    int64_t ps[2] = {0, 0};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iO&sLLLO&O&O&O&O&", kwlist, &device, lk_cu_ptr_arg, &stream,
                                     &dtype, &B, &T, &C, lk_cu_ptr_arg, &probs, strides2, ps, lk_cu_ptr_arg, &bias,
                                     lk_cu_ptr_arg, &depth, lk_cu_ptr_arg, &gate))
        return NULL;
    lk_mor_token_choice_params p;
    memset(&p, 0, sizeof p);
    if (lk_cu_parse_dtype(fn, dtype, &p.dtype) < 0) return NULL;
    if (B < 0 || T < 0 || C < 0 || (B * T > 0 && C == 0)) return bad(fn, "bad sizes (need C >= 1)"), NULL;
    if (B * T > 0 && (!probs || !depth || !gate)) return bad(fn, "null device pointer"), NULL;
    p.rows = B * T; p.C = C; p.probs = probs; p.bias = bias; p.depth = (int64_t *)depth; p.gate = gate;
    LK_CU_LAUNCH(fn, device, lk_mor_token_choice_cuda(&p, T, ps, (lk_stream)stream));
    Py_RETURN_NONE;
}

/* ---- gather / scatter_residual ------------------------------------------------------------------ */

static PyObject *py_mor_gather(PyObject *self, PyObject *args, PyObject *kwargs) {
    static const char *fn = "cuda.mor_gather";
    static char *kwlist[] = {"device", "stream", "dtype", "B", "T", "k", "Dm", "h", "h_stride", "idx", "out",
                             "out_stride", NULL};
    int device = 0;
    void *stream = NULL, *h = NULL, *idx = NULL, *out = NULL;
    const char *dtype = "float32";
    long long B = 0, T = 0, k = 0, Dm = 0;
    int64_t hs[2] = {0, 0}, os[2] = {0, 0};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iO&sLLLLO&O&O&O&O&", kwlist, &device, lk_cu_ptr_arg, &stream,
                                     &dtype, &B, &T, &k, &Dm, lk_cu_ptr_arg, &h, strides2, hs, lk_cu_ptr_arg, &idx,
                                     lk_cu_ptr_arg, &out, strides2, os))
        return NULL;
    lk_mor_gather_params p;
    memset(&p, 0, sizeof p);
    if (lk_cu_parse_dtype(fn, dtype, &p.dtype) < 0) return NULL;
    if (B < 0 || T < 0 || k < 0 || Dm < 0) return bad(fn, "bad sizes"), NULL;
    if (B * k * Dm > 0 && (!idx || !out || (T > 0 && !h))) return bad(fn, "null device pointer"), NULL;
    p.B = B; p.T = T; p.k = k; p.Dm = Dm; p.h = h; p.idx = (const int64_t *)idx; p.out = out;
    LK_CU_LAUNCH(fn, device, lk_mor_gather_cuda(&p, hs, os, (lk_stream)stream));
    Py_RETURN_NONE;
}

static PyObject *py_mor_scatter(PyObject *self, PyObject *args, PyObject *kwargs) {
    static const char *fn = "cuda.mor_scatter";
    static char *kwlist[] = {"device", "stream", "dtype", "B", "T", "k", "Dm", "h", "h_stride", "idx", "y",
                             "y_stride", "gate", "out", "out_stride", NULL};
    int device = 0;
    void *stream = NULL, *h = NULL, *idx = NULL, *y = NULL, *gate = NULL, *out = NULL;
    const char *dtype = "float32";
    long long B = 0, T = 0, k = 0, Dm = 0;
    int64_t hs[2] = {0, 0}, ys[2] = {0, 0}, os[2] = {0, 0};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iO&sLLLLO&O&O&O&O&O&O&O&", kwlist, &device, lk_cu_ptr_arg,
                                     &stream, &dtype, &B, &T, &k, &Dm, lk_cu_ptr_arg, &h, strides2, hs,
                                     lk_cu_ptr_arg, &idx, lk_cu_ptr_arg, &y, strides2, ys, lk_cu_ptr_arg, &gate,
                                     lk_cu_ptr_arg, &out, strides2, os))
        return NULL;
    lk_mor_scatter_params p;
    memset(&p, 0, sizeof p);
    if (lk_cu_parse_dtype(fn, dtype, &p.dtype) < 0) return NULL;
    if (B < 0 || T < 0 || k < 0 || Dm < 0) return bad(fn, "bad sizes"), NULL;
    if (B * T * Dm > 0 && !out) return bad(fn, "null device pointer"), NULL;
    if (B * k * Dm > 0 && (!idx || !y)) return bad(fn, "null device pointer"), NULL;
    if (h && h == out) return bad(fn, "h and out must differ (pass h=None for in place)"), NULL;
    p.B = B; p.T = T; p.k = k; p.Dm = Dm; p.h = h; p.idx = (const int64_t *)idx; p.y = y; p.gate = gate; p.out = out;
    LK_CU_LAUNCH(fn, device, lk_mor_scatter_cuda(&p, hs, ys, os, (lk_stream)stream));
    Py_RETURN_NONE;
}

#define LK_KW(name, f, doc) {name, (PyCFunction)(void (*)(void))f, METH_VARARGS | METH_KEYWORDS, doc}

PyMethodDef lk_cuda_mor_methods[] = {
    LK_KW("mor_topk", py_mor_topk, "mor_topk(**kw): expert-choice top-k per row (lk_mor_topk_cuda)."),
    LK_KW("mor_router", py_mor_router, "mor_router(**kw): router scores (lk_mor_router_cuda)."),
    LK_KW("mor_token_choice", py_mor_token_choice, "mor_token_choice(**kw): token-choice argmax (lk_mor_token_choice_cuda)."),
    LK_KW("mor_gather", py_mor_gather, "mor_gather(**kw): active-token gather (lk_mor_gather_cuda)."),
    LK_KW("mor_scatter", py_mor_scatter, "mor_scatter(**kw): gated residual scatter (lk_mor_scatter_cuda)."),
    {NULL, NULL, 0, NULL},
};
