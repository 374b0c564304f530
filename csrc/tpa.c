/* lmkern._core bindings for lmkern.tpa: validate, fill the params struct, release the GIL, call.
 * The Python layer (lmkern.tpa) has checked shapes with the SPEC's messages already; the checks here
 * guard memory safety against direct calls. */
#include "arrays.h"
#include "lmkern/tpa.h"

/* _core.tpa_materialize(a, b, out, scale): a (rows, H, R), b (rows, R, D), out (rows, H, D). */
static PyObject *py_tpa_materialize(PyObject *self, PyObject *args) {
    static const char *fn = "tpa.materialize";
    PyObject *a_o, *b_o, *out_o;
    double scale;
    if (!PyArg_ParseTuple(args, "OOOd", &a_o, &b_o, &out_o, &scale)) return NULL;
    PyObject *result = NULL;
    PyArrayObject *a = NULL, *b = NULL, *out = NULL;
    const int typenum = lk_float_typenum(a_o);
    if (!(a = lk_float_in(a_o, typenum, fn, "a")) || !(b = lk_float_in(b_o, typenum, fn, "b"))) goto fail;
    if (PyArray_NDIM(a) != 3) {
        PyErr_Format(PyExc_ValueError, "%s: a must be 3-D (rows, H, R)", fn);
        goto fail;
    }
    const npy_intp rows = PyArray_DIM(a, 0), H = PyArray_DIM(a, 1), R = PyArray_DIM(a, 2);
    npy_intp bd[3] = {rows, R, -1};
    if (lk_check_dims(fn, "b", b, "(rows, R, D)", 3, bd) < 0) goto fail;
    const npy_intp D = PyArray_DIM(b, 2);
    npy_intp od[3] = {rows, H, D};
    if (!(out = lk_out(out_o, typenum, fn, "out", 3, od))) goto fail;
    lk_tpa_materialize_params p = {0};
    p.dtype = typenum == NPY_FLOAT64 ? LK_F64 : LK_F32;
    p.rows = rows; p.H = H; p.R = R; p.D = D;
    p.a = PyArray_DATA(a); p.b = PyArray_DATA(b); p.out = PyArray_DATA(out);
    p.scale = scale;
    lk_status st;
    Py_BEGIN_ALLOW_THREADS
    st = lk_tpa_materialize_cpu(&p);
    Py_END_ALLOW_THREADS
    if (lk_raise_status(st, fn) < 0) goto fail;
    result = Py_NewRef(Py_None);
fail:
    Py_XDECREF(a); Py_XDECREF(b); Py_XDECREF(out);
    return result;
}

/* _core.tpa_attention(aq, bq, ak, bk, av, bv, out, lse, q_pos, kv_pos, kv_lens, causal, scale, path, splits, decode)
 * Prefill: aq (B,N,H,Rq), bq (B,N,Rq,D), out (B,N,H,E), lse (B,N,H) or None.
 * decode=True: aq (B,H,Rq), bq (B,Rq,D), out (B,H,E), lse (B,H) or None; q_pos, kv_pos, causal unused.
 * Cached factors: ak (B,M,H,Rk), bk (B,M,Rk,D), av (B,M,H,Rv), bv (B,M,Rv,E). */
static PyObject *py_tpa_attention(PyObject *self, PyObject *args) {
    PyObject *o[8], *qpos_o, *kvpos_o, *lens_o;
    int causal, path, decode;
    double scale;
    Py_ssize_t splits;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOpdinp", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7],
                          &qpos_o, &kvpos_o, &lens_o, &causal, &scale, &path, &splits, &decode))
        return NULL;
    const char *fn = decode ? "tpa.decode" : "tpa.attention";
    static const char *names[6] = {"aq", "bq", "ak", "bk", "av", "bv"};
    PyObject *result = NULL;
    PyArrayObject *x[6] = {NULL}, *out = NULL, *lse = NULL, *qpos = NULL, *kvpos = NULL, *lens = NULL;
    const int typenum = lk_float_typenum(o[0]);
    for (int k = 0; k < 6; k++)
        if (!(x[k] = lk_float_in(o[k], typenum, fn, names[k]))) goto fail;
    const int qd = decode ? 3 : 4; /* rank of aq / bq */
    if (PyArray_NDIM(x[0]) != qd || PyArray_NDIM(x[1]) != qd || PyArray_NDIM(x[2]) != 4 || PyArray_NDIM(x[3]) != 4 ||
        PyArray_NDIM(x[4]) != 4 || PyArray_NDIM(x[5]) != 4) {
        PyErr_Format(PyExc_ValueError, "%s: factors have the wrong number of dimensions", fn);
        goto fail;
    }
    const npy_intp B = PyArray_DIM(x[0], 0), N = decode ? 1 : PyArray_DIM(x[0], 1);
    const npy_intp H = PyArray_DIM(x[0], qd - 2), Rq = PyArray_DIM(x[0], qd - 1);
    const npy_intp M = PyArray_DIM(x[2], 1), Rk = PyArray_DIM(x[2], 3), D = PyArray_DIM(x[1], qd - 1);
    const npy_intp Rv = PyArray_DIM(x[4], 3), E = PyArray_DIM(x[5], 3);
    npy_intp bq3[3] = {B, Rq, D}, bq4[4] = {B, N, Rq, D};
    npy_intp akd[4] = {B, M, H, Rk}, bkd[4] = {B, M, Rk, D}, avd[4] = {B, M, H, Rv}, bvd[4] = {B, M, Rv, E};
    if (lk_check_dims(fn, "bq", x[1], decode ? "(B, Rq, D)" : "(B, N, Rq, D)", qd, decode ? bq3 : bq4) < 0 ||
        lk_check_dims(fn, "ak", x[2], "(B, M, H, Rk)", 4, akd) < 0 ||
        lk_check_dims(fn, "bk", x[3], "(B, M, Rk, D)", 4, bkd) < 0 ||
        lk_check_dims(fn, "av", x[4], "(B, M, H, Rv)", 4, avd) < 0 ||
        lk_check_dims(fn, "bv", x[5], "(B, M, Rv, E)", 4, bvd) < 0)
        goto fail;
    if (Rq < 1 || Rk < 1 || Rv < 1) {
        PyErr_Format(PyExc_ValueError, "%s: ranks must be >= 1", fn);
        goto fail;
    }
    npy_intp od3[3] = {B, H, E}, od4[4] = {B, N, H, E}, ld2[2] = {B, H}, ld3[3] = {B, N, H};
    if (!(out = lk_out(o[6], typenum, fn, "out", qd, decode ? od3 : od4))) goto fail;
    if (o[7] != Py_None && !(lse = lk_out(o[7], typenum, fn, "lse", qd - 1, decode ? ld2 : ld3))) goto fail;

    lk_tpa_attention_params p = {0};
    p.dtype = typenum == NPY_FLOAT64 ? LK_F64 : LK_F32;
    p.B = B; p.N = N; p.M = M; p.H = H; p.Rq = Rq; p.Rk = Rk; p.Rv = Rv; p.D = D; p.E = E;
    p.aq = PyArray_DATA(x[0]); p.bq = PyArray_DATA(x[1]); p.ak = PyArray_DATA(x[2]);
    p.bk = PyArray_DATA(x[3]); p.av = PyArray_DATA(x[4]); p.bv = PyArray_DATA(x[5]);
    p.out = PyArray_DATA(out);
    p.lse = lse ? PyArray_DATA(lse) : NULL;
    p.causal = causal;
    p.scale = scale;
    p.path = (path == 1 || path == 2) ? (lk_tpa_path)path : LK_TPA_PATH_AUTO;
    p.splits = splits > 0 ? splits : 0;

    if (!decode) {
        if ((qpos = lk_index_in(qpos_o, fn, "q_pos"))) {
            const int nd = PyArray_NDIM(qpos) == 1 ? 1 : 2;
            npy_intp d1[1] = {N}, d2[2] = {B, N};
            if (lk_check_dims(fn, "q_pos", qpos, nd == 1 ? "(N,)" : "(B, N)", nd, nd == 1 ? d1 : d2) < 0) goto fail;
            p.q_pos = PyArray_DATA(qpos);
            p.q_pos_bstride = nd == 1 ? 0 : N;
        } else if (PyErr_Occurred()) goto fail;
        if ((kvpos = lk_index_in(kvpos_o, fn, "kv_pos"))) {
            const int nd = PyArray_NDIM(kvpos) == 1 ? 1 : 2;
            npy_intp d1[1] = {M}, d2[2] = {B, M};
            if (lk_check_dims(fn, "kv_pos", kvpos, nd == 1 ? "(M,)" : "(B, M)", nd, nd == 1 ? d1 : d2) < 0) goto fail;
            p.kv_pos = PyArray_DATA(kvpos);
            p.kv_pos_bstride = nd == 1 ? 0 : M;
        } else if (PyErr_Occurred()) goto fail;
    }
    if ((lens = lk_index_in(lens_o, fn, "kv_lens"))) {
        npy_intp d1[1] = {B};
        if (lk_check_dims(fn, "kv_lens", lens, "(B,)", 1, d1) < 0) goto fail;
        if (lk_check_range(fn, "kv_lens", lens, 0, M) < 0) goto fail;
        p.kv_lens = PyArray_DATA(lens);
    } else if (PyErr_Occurred()) goto fail;

    lk_status st;
    Py_BEGIN_ALLOW_THREADS
    st = decode ? lk_tpa_decode_cpu(&p) : lk_tpa_attention_cpu(&p);
    Py_END_ALLOW_THREADS
    if (lk_raise_status(st, fn) < 0) goto fail;
    result = Py_NewRef(Py_None);
fail:
    for (int k = 0; k < 6; k++) Py_XDECREF(x[k]);
    Py_XDECREF(out); Py_XDECREF(lse); Py_XDECREF(qpos); Py_XDECREF(kvpos); Py_XDECREF(lens);
    return result;
}

/* _core.tpa_default_splits(queries, M): the cache split the kernels use at the current thread count. */
static PyObject *py_tpa_default_splits(PyObject *self, PyObject *args) {
    long long queries, M;
    if (!PyArg_ParseTuple(args, "LL", &queries, &M)) return NULL;
    return PyLong_FromLongLong((long long)lk_tpa_default_splits(queries, M, lk_get_num_threads()));
}

PyMethodDef lk_tpa_methods[] = {
    {"tpa_materialize", py_tpa_materialize, METH_VARARGS, "TPA factor materialization (see lmkern.tpa.materialize)"},
    {"tpa_attention", py_tpa_attention, METH_VARARGS, "TPA attention / decode kernel (see lmkern.tpa)"},
    {"tpa_default_splits", py_tpa_default_splits, METH_VARARGS, "cache splits per query at this thread count"},
    {NULL, NULL, 0, NULL},
};
