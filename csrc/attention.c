/* _core bindings for lmkern.attention (with the ParScale prefix) and lmkern.rope. */
#include "arrays.h"
#include "lmkern/attention.h"

static const char *FN_ATTN = "attention";

/* _core.attention(q, k, v, out, lse, q_pos, kv_pos, kv_lens, causal, scale, prefix_k, prefix_v, prefix_rows)
 * q, k, v, out, lse, prefix_k/v: float32 or float64 (one dtype); out (B,N,Hq,E) and lse (B,N,Hq) or
 * None are written.  Index arrays may be None.  The Python layer has checked shapes already; the
 * checks here guard memory safety. */
static PyObject *py_attention(PyObject *self, PyObject *args) {
    PyObject *q_o, *k_o, *v_o, *out_o, *lse_o, *qpos_o, *kvpos_o, *lens_o, *pk_o, *pv_o;
    int causal;
    double scale;
    Py_ssize_t prefix_rows;
    if (!PyArg_ParseTuple(args, "OOOOOOOOpdOOn", &q_o, &k_o, &v_o, &out_o, &lse_o, &qpos_o, &kvpos_o,
                          &lens_o, &causal, &scale, &pk_o, &pv_o, &prefix_rows))
        return NULL;
    PyObject *result = NULL;
    PyArrayObject *q = NULL, *k = NULL, *v = NULL, *out = NULL, *lse = NULL, *qpos = NULL, *kvpos = NULL,
                  *lens = NULL, *pk = NULL, *pv = NULL;
    const int typenum = lk_float_typenum(q_o);
    if (!(q = lk_float_in(q_o, typenum, FN_ATTN, "q"))) goto fail;
    k = lk_float_in(k_o, typenum, FN_ATTN, "k");
    v = lk_float_in(v_o, typenum, FN_ATTN, "v");
    if (!k || !v) goto fail;
    if (PyArray_NDIM(q) != 4 || PyArray_NDIM(k) != 4 || PyArray_NDIM(v) != 4) {
        PyErr_Format(PyExc_ValueError, "%s: q, k and v must be 4-D (B, T, H, D)", FN_ATTN);
        goto fail;
    }
    const npy_intp B = PyArray_DIM(q, 0), N = PyArray_DIM(q, 1), Hq = PyArray_DIM(q, 2), D = PyArray_DIM(q, 3);
    const npy_intp M = PyArray_DIM(k, 1), Hkv = PyArray_DIM(k, 2), E = PyArray_DIM(v, 3);
    npy_intp kd[4] = {B, -1, -1, D}, vd[4] = {B, M, Hkv, -1};
    if (lk_check_dims(FN_ATTN, "k", k, "(B, M, Hkv, D)", 4, kd) < 0) goto fail;
    if (lk_check_dims(FN_ATTN, "v", v, "(B, M, Hkv, E)", 4, vd) < 0) goto fail;
    if (Hkv == 0 ? Hq != 0 : Hq % Hkv != 0) {
        PyErr_Format(PyExc_ValueError, "%s: q has %zd heads and k has %zd; Hq must be a multiple of Hkv", FN_ATTN,
                     (Py_ssize_t)Hq, (Py_ssize_t)Hkv);
        goto fail;
    }
    npy_intp od[4] = {B, N, Hq, E}, ld[3] = {B, N, Hq};
    if (!(out = lk_out(out_o, typenum, FN_ATTN, "out", 4, od))) goto fail;
    if (lse_o != Py_None && !(lse = lk_out(lse_o, typenum, FN_ATTN, "lse", 3, ld))) goto fail;

    lk_attention_params p = {0};
    p.dtype = typenum == NPY_FLOAT64 ? LK_F64 : LK_F32;
    p.B = B; p.N = N; p.M = M; p.Hq = Hq; p.Hkv = Hkv; p.D = D; p.E = E;
    p.q = PyArray_DATA(q); p.k = PyArray_DATA(k); p.v = PyArray_DATA(v); p.out = PyArray_DATA(out);
    p.lse = lse ? PyArray_DATA(lse) : NULL;
    lk_elem_strides(q, 3, p.q_stride); lk_elem_strides(k, 3, p.k_stride);
    lk_elem_strides(v, 3, p.v_stride); lk_elem_strides(out, 3, p.out_stride);
    p.causal = causal;
    p.scale = scale;

    if ((qpos = lk_index_in(qpos_o, FN_ATTN, "q_pos"))) {
        npy_intp d1[1] = {N}, d2[2] = {B, N};
        if (lk_check_dims(FN_ATTN, "q_pos", qpos, PyArray_NDIM(qpos) == 1 ? "(N,)" : "(B, N)", PyArray_NDIM(qpos) == 1 ? 1 : 2,
                          PyArray_NDIM(qpos) == 1 ? d1 : d2) < 0) goto fail;
        p.q_pos = PyArray_DATA(qpos);
        p.q_pos_bstride = PyArray_NDIM(qpos) == 1 ? 0 : N;
    } else if (PyErr_Occurred()) goto fail;
    if ((kvpos = lk_index_in(kvpos_o, FN_ATTN, "kv_pos"))) {
        npy_intp d1[1] = {M}, d2[2] = {B, M};
        if (lk_check_dims(FN_ATTN, "kv_pos", kvpos, PyArray_NDIM(kvpos) == 1 ? "(M,)" : "(B, M)", PyArray_NDIM(kvpos) == 1 ? 1 : 2,
                          PyArray_NDIM(kvpos) == 1 ? d1 : d2) < 0) goto fail;
        p.kv_pos = PyArray_DATA(kvpos);
        p.kv_pos_bstride = PyArray_NDIM(kvpos) == 1 ? 0 : M;
    } else if (PyErr_Occurred()) goto fail;
    if ((lens = lk_index_in(lens_o, FN_ATTN, "kv_lens"))) {
        npy_intp d1[1] = {B};
        if (lk_check_dims(FN_ATTN, "kv_lens", lens, "(B,)", 1, d1) < 0) goto fail;
        if (lk_check_range(FN_ATTN, "kv_lens", lens, 0, M) < 0) goto fail;
        p.kv_lens = PyArray_DATA(lens);
    } else if (PyErr_Occurred()) goto fail;

    if (pk_o != Py_None) {
        if (!(pk = lk_float_in(pk_o, typenum, FN_ATTN, "prefix_k")) || !(pv = lk_float_in(pv_o, typenum, FN_ATTN, "prefix_v")))
            goto fail;
        if (PyArray_NDIM(pk) != 4 || prefix_rows < 1 || B % prefix_rows != 0) {
            PyErr_Format(PyExc_ValueError, "%s: prefix_k must be 4-D and prefix_rows must divide the batch", FN_ATTN);
            goto fail;
        }
        const npy_intp P = B / prefix_rows, L = PyArray_DIM(pk, 1);
        npy_intp pkd[4] = {P, L, Hkv, D}, pvd[4] = {P, L, Hkv, E};
        if (lk_check_dims(FN_ATTN, "prefix_k", pk, "(P, L, Hkv, D)", 4, pkd) < 0) goto fail;
        if (lk_check_dims(FN_ATTN, "prefix_v", pv, "(P, L, Hkv, E)", 4, pvd) < 0) goto fail;
        if (L > 0) {
            p.prefix_k = PyArray_DATA(pk); p.prefix_v = PyArray_DATA(pv);
            p.prefix_len = L; p.prefix_rows = prefix_rows;
        }
    }

    lk_status st;
    Py_BEGIN_ALLOW_THREADS
    st = lk_attention_cpu(&p);
    Py_END_ALLOW_THREADS
    if (lk_raise_status(st, FN_ATTN) < 0) goto fail;
    result = Py_NewRef(Py_None);
fail:
    Py_XDECREF(q); Py_XDECREF(k); Py_XDECREF(v); Py_XDECREF(out); Py_XDECREF(lse);
    Py_XDECREF(qpos); Py_XDECREF(kvpos); Py_XDECREF(lens); Py_XDECREF(pk); Py_XDECREF(pv);
    return result;
}

/* _core.rope_(x, positions, base, rotary_dim, interleaved, inverse): rotates the contiguous
 * float32/float64 array x (B, T, G, D) in place. */
static PyObject *py_rope_(PyObject *self, PyObject *args) {
    static const char *fn = "rope";
    PyObject *x_o, *pos_o;
    double base;
    Py_ssize_t rotary_dim;
    int interleaved, inverse;
    if (!PyArg_ParseTuple(args, "OOdnpp", &x_o, &pos_o, &base, &rotary_dim, &interleaved, &inverse)) return NULL;
    PyObject *result = NULL;
    PyArrayObject *pos = NULL;
    if (!PyArray_Check(x_o) || PyArray_NDIM((PyArrayObject *)x_o) != 4) {
        PyErr_Format(PyExc_ValueError, "%s: x must be a 4-D (B, T, G, D) ndarray", fn);
        return NULL;
    }
    PyArrayObject *x = (PyArrayObject *)x_o;
    npy_intp xd[4] = {-1, -1, -1, -1};
    if (!(x = lk_out(x_o, PyArray_TYPE(x) == NPY_FLOAT64 ? NPY_FLOAT64 : NPY_FLOAT32, fn, "x", 4, xd))) return NULL;
    const npy_intp B = PyArray_DIM(x, 0), T = PyArray_DIM(x, 1), D = PyArray_DIM(x, 3);
    if (rotary_dim < 0 || rotary_dim > D || rotary_dim % 2) {
        PyErr_Format(PyExc_ValueError, "%s: rotary_dim must be even and in [0, D = %zd]; got %zd", fn, (Py_ssize_t)D, rotary_dim);
        goto fail;
    }
    if (!(pos = lk_index_in(pos_o, fn, "positions"))) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s: positions is required", fn);
        goto fail;
    }
    npy_intp d1[1] = {T}, d2[2] = {B, T};
    int nd = PyArray_NDIM(pos) == 1 ? 1 : 2;
    if (lk_check_dims(fn, "positions", pos, nd == 1 ? "(T,)" : "(B, T)", nd, nd == 1 ? d1 : d2) < 0) goto fail;
    lk_rope_params p = {0};
    p.dtype = lk_dtype_of(x);
    p.B = B; p.T = T; p.G = PyArray_DIM(x, 2); p.D = D;
    p.x = PyArray_DATA(x);
    p.positions = PyArray_DATA(pos);
    p.pos_bstride = nd == 1 ? 0 : T;
    p.rotary_dim = rotary_dim; p.base = base; p.interleaved = interleaved; p.inverse = inverse;
    lk_status st;
    Py_BEGIN_ALLOW_THREADS
    st = lk_rope_cpu(&p);
    Py_END_ALLOW_THREADS
    if (lk_raise_status(st, fn) < 0) goto fail;
    result = Py_NewRef(Py_None);
fail:
    Py_XDECREF(x); Py_XDECREF(pos);
    return result;
}

PyMethodDef lk_attention_methods[] = {
    {"attention", py_attention, METH_VARARGS, "attention kernel (see lmkern.attention)"},
    {"rope_", py_rope_, METH_VARARGS, "in-place RoPE kernel (see lmkern.rope_)"},
    {NULL, NULL, 0, NULL},
};
