/* lmkern._core bindings for lmkern.mor: validate, fill the params struct, release the GIL, call.
 *
 * The Python layer (lmkern.mor) has produced the SPEC's messages already; the checks here keep a
 * direct or mistaken call from reading or writing outside an array.  Outputs are allocated by the
 * caller (C-contiguous, of the kernel dtype) and passed in. */
#include "arrays.h"
#include "lmkern/mor.h"


/* _core.mor_router(h, wt, z, activation, alpha, temperature)
 * h (rows, Dm) and wt (C, Dm), or both None (z already holds h @ w); z (rows, C) is written. */
static PyObject *py_mor_router(PyObject *self, PyObject *args) {
    static const char *fn = "mor.router_scores";
    PyObject *h_o, *wt_o, *z_o;
    int activation;
    double alpha, temperature;
    if (!PyArg_ParseTuple(args, "OOOidd", &h_o, &wt_o, &z_o, &activation, &alpha, &temperature)) return NULL;
    PyObject *result = NULL;
    PyArrayObject *h = NULL, *wt = NULL, *z = NULL;
    const int typenum = lk_float_typenum(z_o);
    npy_intp zd[2] = {-1, -1};
    if (!(z = lk_out(z_o, typenum, fn, "z", 2, zd))) goto fail;
    const npy_intp rows = PyArray_DIM(z, 0), C = PyArray_DIM(z, 1);
    if (activation < LK_MOR_ACT_NONE || activation > LK_MOR_ACT_SOFTMAX) {
        PyErr_Format(PyExc_ValueError, "%s: unknown activation code %d", fn, activation);
        goto fail;
    }
    lk_mor_router_params p = {0};
    p.dtype = typenum == NPY_FLOAT64 ? LK_F64 : LK_F32;
    p.rows = rows; p.C = C; p.z = PyArray_DATA(z);
    p.activation = activation; p.alpha = alpha; p.temperature = temperature;
    if (h_o != Py_None) {
        if (!(h = lk_float_in(h_o, typenum, fn, "h")) || !(wt = lk_float_in(wt_o, typenum, fn, "w"))) goto fail;
        npy_intp hd[2] = {rows, -1};
        if (lk_check_dims(fn, "h", h, "(rows, Dm)", 2, hd) < 0) goto fail;
        npy_intp wd[2] = {C, PyArray_DIM(h, 1)};
        if (lk_check_dims(fn, "w", wt, "(C, Dm)", 2, wd) < 0) goto fail;
        p.Dm = PyArray_DIM(h, 1); p.h = PyArray_DATA(h); p.wt = PyArray_DATA(wt);
    }
    lk_status st;
    Py_BEGIN_ALLOW_THREADS
    st = lk_mor_router_cpu(&p);
    Py_END_ALLOW_THREADS
    if (lk_raise_status(st, fn) < 0) goto fail;
    result = Py_NewRef(Py_None);
fail:
    Py_XDECREF(h); Py_XDECREF(wt); Py_XDECREF(z);
    return result;
}

/* _core.mor_topk(scores, k, candidates, idx, gate): scores (B, n), candidates (B, n) int64 or None,
 * idx (B, k) int64 and gate (B, k) written. */
static PyObject *py_mor_topk(PyObject *self, PyObject *args) {
    static const char *fn = "mor.expert_choice";
    PyObject *s_o, *cand_o, *idx_o, *gate_o;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "OnOOO", &s_o, &k, &cand_o, &idx_o, &gate_o)) return NULL;
    PyObject *result = NULL;
    PyArrayObject *s = NULL, *cand = NULL, *idx = NULL, *gate = NULL;
    const int typenum = lk_float_typenum(s_o);
    if (!(s = lk_float_in(s_o, typenum, fn, "scores"))) goto fail;
    npy_intp sd[2] = {-1, -1};
    if (lk_check_dims(fn, "scores", s, "(B, n)", 2, sd) < 0) goto fail;
    const npy_intp B = PyArray_DIM(s, 0), n = PyArray_DIM(s, 1);
    if (k < 0 || k > n) {
        PyErr_Format(PyExc_ValueError, "%s: k must be in [0, n = %zd]; got %zd", fn, (Py_ssize_t)n, k);
        goto fail;
    }
    if ((cand = lk_index_in(cand_o, fn, "candidates"))) {
        npy_intp cd[2] = {B, n};
        if (lk_check_dims(fn, "candidates", cand, "(B, n)", 2, cd) < 0) goto fail;
    } else if (PyErr_Occurred()) goto fail;
    npy_intp od[2] = {B, k};
    if (!(idx = lk_out(idx_o, NPY_INT64, fn, "idx", 2, od))) goto fail;
    if (!(gate = lk_out(gate_o, typenum, fn, "gate", 2, od))) goto fail;
    lk_mor_topk_params p = {0};
    p.dtype = typenum == NPY_FLOAT64 ? LK_F64 : LK_F32;
    p.B = B; p.n = n; p.k = k;
    p.scores = PyArray_DATA(s);
    p.candidates = cand ? PyArray_DATA(cand) : NULL;
    p.idx = PyArray_DATA(idx); p.gate = PyArray_DATA(gate);
    lk_status st;
    Py_BEGIN_ALLOW_THREADS
    st = lk_mor_topk_cpu(&p);
    Py_END_ALLOW_THREADS
    if (lk_raise_status(st, fn) < 0) goto fail;
    result = Py_NewRef(Py_None);
fail:
    Py_XDECREF(s); Py_XDECREF(cand); Py_XDECREF(idx); Py_XDECREF(gate);
    return result;
}

/* _core.mor_token_choice(probs, bias, depth, gate): probs (rows, C), bias (C,) or None,
 * depth (rows,) int64 and gate (rows,) written. */
static PyObject *py_mor_token_choice(PyObject *self, PyObject *args) {
    static const char *fn = "mor.token_choice";
    PyObject *p_o, *bias_o, *depth_o, *gate_o;
    if (!PyArg_ParseTuple(args, "OOOO", &p_o, &bias_o, &depth_o, &gate_o)) return NULL;
    PyObject *result = NULL;
    PyArrayObject *probs = NULL, *bias = NULL, *depth = NULL, *gate = NULL;
    const int typenum = lk_float_typenum(p_o);
    if (!(probs = lk_float_in(p_o, typenum, fn, "probs"))) goto fail;
    npy_intp pd[2] = {-1, -1};
    if (lk_check_dims(fn, "probs", probs, "(rows, C)", 2, pd) < 0) goto fail;
    const npy_intp rows = PyArray_DIM(probs, 0), C = PyArray_DIM(probs, 1);
    if (C == 0 && rows > 0) {
        PyErr_Format(PyExc_ValueError, "%s: probs needs at least one choice (C >= 1)", fn);
        goto fail;
    }
    if (bias_o != Py_None) {
        if (!(bias = lk_float_in(bias_o, typenum, fn, "bias"))) goto fail;
        npy_intp bd[1] = {C};
        if (lk_check_dims(fn, "bias", bias, "(C,)", 1, bd) < 0) goto fail;
    }
    npy_intp od[1] = {rows};
    if (!(depth = lk_out(depth_o, NPY_INT64, fn, "depth", 1, od))) goto fail;
    if (!(gate = lk_out(gate_o, typenum, fn, "gate", 1, od))) goto fail;
    lk_mor_token_choice_params p = {0};
    p.dtype = typenum == NPY_FLOAT64 ? LK_F64 : LK_F32;
    p.rows = rows; p.C = C;
    p.probs = PyArray_DATA(probs); p.bias = bias ? PyArray_DATA(bias) : NULL;
    p.depth = PyArray_DATA(depth); p.gate = PyArray_DATA(gate);
    lk_status st;
    Py_BEGIN_ALLOW_THREADS
    st = lk_mor_token_choice_cpu(&p);
    Py_END_ALLOW_THREADS
    if (lk_raise_status(st, fn) < 0) goto fail;
    result = Py_NewRef(Py_None);
fail:
    Py_XDECREF(probs); Py_XDECREF(bias); Py_XDECREF(depth); Py_XDECREF(gate);
    return result;
}

/* _core.mor_gather(h, idx, out): h (B, T, Dm), idx (B, k) in [0, T), out (B, k, Dm) written. */
static PyObject *py_mor_gather(PyObject *self, PyObject *args) {
    static const char *fn = "mor.gather";
    PyObject *h_o, *idx_o, *out_o;
    if (!PyArg_ParseTuple(args, "OOO", &h_o, &idx_o, &out_o)) return NULL;
    PyObject *result = NULL;
    PyArrayObject *h = NULL, *idx = NULL, *out = NULL;
    const int typenum = lk_float_typenum(h_o);
    if (!(h = lk_float_in(h_o, typenum, fn, "h"))) goto fail;
    npy_intp hd[3] = {-1, -1, -1};
    if (lk_check_dims(fn, "h", h, "(B, T, Dm)", 3, hd) < 0) goto fail;
    const npy_intp B = PyArray_DIM(h, 0), T = PyArray_DIM(h, 1), Dm = PyArray_DIM(h, 2);
    if (!(idx = lk_index_in(idx_o, fn, "idx"))) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s: idx is required", fn);
        goto fail;
    }
    npy_intp id[2] = {B, -1};
    if (lk_check_dims(fn, "idx", idx, "(B, k)", 2, id) < 0) goto fail;
    if (lk_check_range(fn, "idx", idx, 0, (int64_t)T - 1) < 0) goto fail;
    const npy_intp k = PyArray_DIM(idx, 1);
    npy_intp od[3] = {B, k, Dm};
    if (!(out = lk_out(out_o, typenum, fn, "out", 3, od))) goto fail;
    lk_mor_gather_params p = {0};
    p.dtype = typenum == NPY_FLOAT64 ? LK_F64 : LK_F32;
    p.B = B; p.T = T; p.k = k; p.Dm = Dm;
    p.h = PyArray_DATA(h); p.idx = PyArray_DATA(idx); p.out = PyArray_DATA(out);
    lk_status st;
    Py_BEGIN_ALLOW_THREADS
    st = lk_mor_gather_cpu(&p);
    Py_END_ALLOW_THREADS
    if (lk_raise_status(st, fn) < 0) goto fail;
    result = Py_NewRef(Py_None);
fail:
    Py_XDECREF(h); Py_XDECREF(idx); Py_XDECREF(out);
    return result;
}

/* _core.mor_scatter(h, idx, y, gate, out): out = h with out[b, idx[b,j]] += gate[b,j] y[b,j];
 * h None: in place on out.  out (B, T, Dm) C-contiguous; y (B, k, Dm); gate (B, k) or None. */
static PyObject *py_mor_scatter(PyObject *self, PyObject *args) {
    static const char *fn = "mor.scatter_residual";
    PyObject *h_o, *idx_o, *y_o, *gate_o, *out_o;
    if (!PyArg_ParseTuple(args, "OOOOO", &h_o, &idx_o, &y_o, &gate_o, &out_o)) return NULL;
    PyObject *result = NULL;
    PyArrayObject *h = NULL, *idx = NULL, *y = NULL, *gate = NULL, *out = NULL;
    const int typenum = lk_float_typenum(out_o);
    npy_intp hd[3] = {-1, -1, -1};
    if (!(out = lk_out(out_o, typenum, fn, "out", 3, hd))) goto fail;
    const npy_intp B = PyArray_DIM(out, 0), T = PyArray_DIM(out, 1), Dm = PyArray_DIM(out, 2);
    if (h_o != Py_None) {
        if (!(h = lk_float_in(h_o, typenum, fn, "h"))) goto fail;
        npy_intp d[3] = {B, T, Dm};
        if (lk_check_dims(fn, "h", h, "(B, T, Dm)", 3, d) < 0) goto fail;
    }
    if (!(idx = lk_index_in(idx_o, fn, "idx"))) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s: idx is required", fn);
        goto fail;
    }
    npy_intp id[2] = {B, -1};
    if (lk_check_dims(fn, "idx", idx, "(B, k)", 2, id) < 0) goto fail;
    if (lk_check_range(fn, "idx", idx, 0, (int64_t)T - 1) < 0) goto fail;
    const npy_intp k = PyArray_DIM(idx, 1);
    if (!(y = lk_float_in(y_o, typenum, fn, "y"))) goto fail;
    npy_intp yd[3] = {B, k, Dm};
    if (lk_check_dims(fn, "y", y, "(B, k, Dm)", 3, yd) < 0) goto fail;
    if (gate_o != Py_None) {
        if (!(gate = lk_float_in(gate_o, typenum, fn, "gate"))) goto fail;
        npy_intp gd[2] = {B, k};
        if (lk_check_dims(fn, "gate", gate, "(B, k)", 2, gd) < 0) goto fail;
    }
    lk_mor_scatter_params p = {0};
    p.dtype = typenum == NPY_FLOAT64 ? LK_F64 : LK_F32;
    p.B = B; p.T = T; p.k = k; p.Dm = Dm;
    p.h = h ? PyArray_DATA(h) : NULL;
    p.idx = PyArray_DATA(idx); p.y = PyArray_DATA(y);
    p.gate = gate ? PyArray_DATA(gate) : NULL;
    p.out = PyArray_DATA(out);
    if (h && p.h == p.out) p.h = NULL; /* out is h itself: in place */
    lk_status st;
    Py_BEGIN_ALLOW_THREADS
    st = lk_mor_scatter_cpu(&p);
    Py_END_ALLOW_THREADS
    if (lk_raise_status(st, fn) < 0) goto fail;
    result = Py_NewRef(Py_None);
fail:
    Py_XDECREF(h); Py_XDECREF(idx); Py_XDECREF(y); Py_XDECREF(gate); Py_XDECREF(out);
    return result;
}

/* _core.mor_loss(kind, x, depth, target, eligible) -> float.  x (rows, C) float32/float64
 * (bce: (rows, 1)); depth (rows,) int64 (balance) or None; target (rows,) float64 (bce) or None;
 * eligible (rows,) uint8/bool (bce) or None. */
static PyObject *py_mor_loss(PyObject *self, PyObject *args) {
    static const char *fn = "mor.loss";
    int kind;
    PyObject *x_o, *depth_o, *target_o, *elig_o;
    if (!PyArg_ParseTuple(args, "iOOOO", &kind, &x_o, &depth_o, &target_o, &elig_o)) return NULL;
    PyObject *result = NULL;
    PyArrayObject *x = NULL, *depth = NULL, *target = NULL, *elig = NULL;
    const int typenum = lk_float_typenum(x_o);
    if (kind < LK_MOR_LOSS_BALANCE || kind > LK_MOR_LOSS_BCE) {
        PyErr_Format(PyExc_ValueError, "%s: unknown loss kind %d", fn, kind);
        return NULL;
    }
    if (!(x = lk_float_in(x_o, typenum, fn, "x"))) goto fail;
    npy_intp xd[2] = {-1, kind == LK_MOR_LOSS_BCE ? 1 : -1};
    if (lk_check_dims(fn, "x", x, "(rows, C)", 2, xd) < 0) goto fail;
    const npy_intp rows = PyArray_DIM(x, 0), C = PyArray_DIM(x, 1);
    npy_intp rd[1] = {rows};
    lk_mor_loss_params p = {0};
    if (kind == LK_MOR_LOSS_BALANCE) {
        if (!(depth = lk_index_in(depth_o, fn, "depth"))) {
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s: depth is required", fn);
            goto fail;
        }
        if (lk_check_dims(fn, "depth", depth, "(rows,)", 1, rd) < 0) goto fail;
        p.depth = PyArray_DATA(depth);
    }
    if (kind == LK_MOR_LOSS_BCE) {
        if (!(target = lk_typed_in(target_o, NPY_FLOAT64, fn, "target"))) goto fail;
        if (lk_check_dims(fn, "target", target, "(rows,)", 1, rd) < 0) goto fail;
        p.target = PyArray_DATA(target);
        if (elig_o != Py_None) {
            if (!(elig = lk_typed_in(elig_o, NPY_BOOL, fn, "eligible"))) goto fail;
            if (lk_check_dims(fn, "eligible", elig, "(rows,)", 1, rd) < 0) goto fail;
            p.eligible = PyArray_DATA(elig);
        }
    }
    p.dtype = typenum == NPY_FLOAT64 ? LK_F64 : LK_F32;
    p.kind = kind; p.rows = rows; p.C = C; p.x = PyArray_DATA(x);
    lk_status st;
    Py_BEGIN_ALLOW_THREADS
    st = lk_mor_loss_cpu(&p);
    Py_END_ALLOW_THREADS
    if (lk_raise_status(st, fn) < 0) goto fail;
    result = PyFloat_FromDouble(p.result);
fail:
    Py_XDECREF(x); Py_XDECREF(depth); Py_XDECREF(target); Py_XDECREF(elig);
    return result;
}

PyMethodDef lk_mor_methods[] = {
    {"mor_loss", py_mor_loss, METH_VARARGS, "router losses kernel (see lmkern.mor.balance_loss, z_loss, router_bce)"},
    {"mor_router", py_mor_router, METH_VARARGS, "router scores kernel (see lmkern.mor.router_scores)"},
    {"mor_topk", py_mor_topk, METH_VARARGS, "expert-choice top-k kernel (see lmkern.mor.expert_choice)"},
    {"mor_token_choice", py_mor_token_choice, METH_VARARGS, "token-choice kernel (see lmkern.mor.token_choice)"},
    {"mor_gather", py_mor_gather, METH_VARARGS, "gather kernel (see lmkern.mor.gather)"},
    {"mor_scatter", py_mor_scatter, METH_VARARGS, "gated residual scatter kernel (see lmkern.mor.scatter_residual)"},
    {NULL, NULL, 0, NULL},
};
