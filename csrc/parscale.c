/* lmkern._core bindings for lmkern.parscale: validate, fill the params struct, release the GIL, call.
 *
 * The Python layer (lmkern.parscale) has checked shapes with the SPEC's messages; the checks here
 * keep a direct call to _core from reading or writing outside an array.  prefix_attention goes
 * through _core.attention (csrc/attention.c). */
#include "arrays.h"
#include "lmkern/parscale.h"

static const char *FN_AGG = "parscale.aggregate";

/* Every binding takes an optional last argument `threads` (0, the default: lmkern's setting). */

/* _core.parscale_gather(h, u, P, interleaved[, threads]): h (P·R, Hd) -> u (R, P·Hd), u written. */
static PyObject *py_parscale_gather(PyObject *self, PyObject *args) {
    PyObject *h_o, *u_o;
    Py_ssize_t P;
    int interleaved, threads = 0;
    if (!PyArg_ParseTuple(args, "OOnp|i", &h_o, &u_o, &P, &interleaved, &threads)) return NULL;
    PyObject *result = NULL;
    PyArrayObject *h = NULL, *u = NULL;
    const int typenum = lk_float_typenum(h_o);
    if (!(h = lk_float_in(h_o, typenum, FN_AGG, "h"))) goto fail;
    npy_intp hd[2] = {-1, -1};
    if (lk_check_dims(FN_AGG, "h", h, "(P·R, Hd)", 2, hd) < 0) goto fail;
    if (P < 1 || PyArray_DIM(h, 0) % P) {
        PyErr_Format(PyExc_ValueError, "%s: h has %zd rows, not a multiple of P = %zd", FN_AGG,
                     (Py_ssize_t)PyArray_DIM(h, 0), P);
        goto fail;
    }
    const npy_intp R = PyArray_DIM(h, 0) / P, Hd = PyArray_DIM(h, 1);
    npy_intp ud[2] = {R, P * Hd};
    if (!(u = lk_out(u_o, typenum, FN_AGG, "u", 2, ud))) goto fail;
    lk_parscale_gather_params p = {0};
    p.dtype = lk_dtype_of(h);
    p.P = P; p.R = R; p.Hd = Hd;
    p.h = PyArray_DATA(h); p.u = PyArray_DATA(u);
    p.interleaved = interleaved;
    p.threads = threads;
    lk_status st;
    Py_BEGIN_ALLOW_THREADS
    st = lk_parscale_gather_cpu(&p);
    Py_END_ALLOW_THREADS
    if (lk_raise_status(st, FN_AGG) < 0) goto fail;
    result = Py_NewRef(Py_None);
fail:
    Py_XDECREF(h); Py_XDECREF(u);
    return result;
}

/* _core.parscale_bias_silu_(x, bias[, threads]): x (Hh, R) = silu(x + bias[:, None]) in place; bias (Hh,) or None. */
static PyObject *py_parscale_bias_silu_(PyObject *self, PyObject *args) {
    PyObject *x_o, *b_o;
    int threads = 0;
    if (!PyArg_ParseTuple(args, "OO|i", &x_o, &b_o, &threads)) return NULL;
    PyObject *result = NULL;
    PyArrayObject *x = NULL, *b = NULL;
    const int typenum = lk_float_typenum(x_o);
    npy_intp xd[2] = {-1, -1};
    if (!(x = lk_out(x_o, typenum, FN_AGG, "x", 2, xd))) goto fail;
    const npy_intp Hh = PyArray_DIM(x, 0), R = PyArray_DIM(x, 1);
    if (b_o != Py_None) {
        npy_intp bd[1] = {Hh};
        if (!(b = lk_float_in(b_o, typenum, FN_AGG, "b1"))) goto fail;
        if (lk_check_dims(FN_AGG, "b1", b, "(Hh,)", 1, bd) < 0) goto fail;
    }
    lk_parscale_bias_silu_params p = {0};
    p.dtype = lk_dtype_of(x);
    p.Hh = Hh; p.R = R;
    p.x = PyArray_DATA(x);
    p.bias = b ? PyArray_DATA(b) : NULL;
    p.threads = threads;
    lk_status st;
    Py_BEGIN_ALLOW_THREADS
    st = lk_parscale_bias_silu_cpu(&p);
    Py_END_ALLOW_THREADS
    if (lk_raise_status(st, FN_AGG) < 0) goto fail;
    result = Py_NewRef(Py_None);
fail:
    Py_XDECREF(x); Py_XDECREF(b);
    return result;
}

/* _core.parscale_mix(h, z, b2, y, weights, P, smoothing[, threads]): h (P·R, Hd), z (P, R), b2 (P,) or None,
 * y (R, Hd) written, weights (R, P) float32 or None written. */
static PyObject *py_parscale_mix(PyObject *self, PyObject *args) {
    PyObject *h_o, *z_o, *b2_o, *y_o, *w_o;
    Py_ssize_t P;
    double smoothing;
    int threads = 0;
    if (!PyArg_ParseTuple(args, "OOOOOnd|i", &h_o, &z_o, &b2_o, &y_o, &w_o, &P, &smoothing, &threads)) return NULL;
    PyObject *result = NULL;
    PyArrayObject *h = NULL, *z = NULL, *b2 = NULL, *y = NULL, *w = NULL;
    const int typenum = lk_float_typenum(h_o);
    if (!(h = lk_float_in(h_o, typenum, FN_AGG, "h"))) goto fail;
    npy_intp hd[2] = {-1, -1};
    if (lk_check_dims(FN_AGG, "h", h, "(P·R, Hd)", 2, hd) < 0) goto fail;
    if (P < 1 || PyArray_DIM(h, 0) % P) {
        PyErr_Format(PyExc_ValueError, "%s: h has %zd rows, not a multiple of P = %zd", FN_AGG,
                     (Py_ssize_t)PyArray_DIM(h, 0), P);
        goto fail;
    }
    if (!(smoothing >= 0.0 && smoothing <= 1.0)) {
        char num[32];   /* PyErr_Format has no %g (Python 3.12 raises SystemError on it) */
        snprintf(num, sizeof num, "%g", smoothing);
        PyErr_Format(PyExc_ValueError, "%s: smoothing must be in [0, 1]; got %s", FN_AGG, num);
        goto fail;
    }
    const npy_intp R = PyArray_DIM(h, 0) / P, Hd = PyArray_DIM(h, 1);
    npy_intp zd[2] = {P, R}, wd[2] = {R, P}, pd[1] = {P}, yd[2] = {R, Hd};
    if (!(z = lk_float_in(z_o, typenum, FN_AGG, "z"))) goto fail;
    if (lk_check_dims(FN_AGG, "z", z, "(P, R)", 2, zd) < 0) goto fail;
    if (b2_o != Py_None) {
        if (!(b2 = lk_float_in(b2_o, typenum, FN_AGG, "b2"))) goto fail;
        if (lk_check_dims(FN_AGG, "b2", b2, "(P,)", 1, pd) < 0) goto fail;
    }
    if (!(y = lk_out(y_o, typenum, FN_AGG, "out", 2, yd))) goto fail;
    if (w_o != Py_None && !(w = lk_out(w_o, NPY_FLOAT32, FN_AGG, "weights", 2, wd))) goto fail;
    lk_parscale_mix_params p = {0};
    p.dtype = lk_dtype_of(h);
    p.P = P; p.R = R; p.Hd = Hd;
    p.h = PyArray_DATA(h); p.z = PyArray_DATA(z); p.b2 = b2 ? PyArray_DATA(b2) : NULL;
    p.smoothing = smoothing;
    p.y = PyArray_DATA(y);
    p.weights = w ? (float *)PyArray_DATA(w) : NULL;
    p.threads = threads;
    lk_status st;
    Py_BEGIN_ALLOW_THREADS
    st = lk_parscale_mix_cpu(&p);
    Py_END_ALLOW_THREADS
    if (lk_raise_status(st, FN_AGG) < 0) goto fail;
    result = Py_NewRef(Py_None);
fail:
    Py_XDECREF(h); Py_XDECREF(z); Py_XDECREF(b2); Py_XDECREF(y); Py_XDECREF(w);
    return result;
}

PyMethodDef lk_parscale_methods[] = {
    {"parscale_gather", py_parscale_gather, METH_VARARGS, "stream concatenation of h (see lmkern.parscale.aggregate)"},
    {"parscale_bias_silu_", py_parscale_bias_silu_, METH_VARARGS, "x = silu(x + bias) in place"},
    {"parscale_mix", py_parscale_mix, METH_VARARGS, "softmax over P + smoothing + weighted sum of the streams"},
    {NULL, NULL, 0, NULL},
};
