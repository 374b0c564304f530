#include "arrays.h"

#include <stdio.h>
#include <string.h>

static int lk_is_float_type(int t) { return t == NPY_FLOAT32 || t == NPY_FLOAT64 || t == NPY_FLOAT16; }

int lk_float_typenum(PyObject *obj) {
    return PyArray_Check(obj) && PyArray_TYPE((PyArrayObject *)obj) == NPY_FLOAT64 ? NPY_FLOAT64 : NPY_FLOAT32;
}

PyArrayObject *lk_float_in(PyObject *obj, int typenum, const char *fn, const char *arg) {
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_O(obj);
    if (!a) return NULL;
    if (!lk_is_float_type(PyArray_TYPE(a))) {
        PyErr_Format(PyExc_TypeError, "%s: %s has dtype %s; expected float32 or float64", fn, arg,
                     PyArray_DESCR(a)->typeobj->tp_name);
        Py_DECREF(a);
        return NULL;
    }
    PyArrayObject *c = (PyArrayObject *)PyArray_FROM_OTF((PyObject *)a, typenum, NPY_ARRAY_IN_ARRAY);
    Py_DECREF(a);
    return c;
}

PyArrayObject *lk_typed_in(PyObject *obj, int typenum, const char *fn, const char *arg) {
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_O(obj);
    if (!a) return NULL;
    if (PyArray_TYPE(a) != typenum) {
        PyArray_Descr *want = PyArray_DescrFromType(typenum);
        PyErr_Format(PyExc_TypeError, "%s: %s has dtype %s; expected %s", fn, arg,
                     PyArray_DESCR(a)->typeobj->tp_name, want->typeobj->tp_name);
        Py_DECREF(want);
        Py_DECREF(a);
        return NULL;
    }
    PyArrayObject *c = (PyArrayObject *)PyArray_FROM_OTF((PyObject *)a, typenum, NPY_ARRAY_IN_ARRAY);
    Py_DECREF(a);
    return c;
}

PyArrayObject *lk_index_in(PyObject *obj, const char *fn, const char *arg) {
    if (obj == NULL || obj == Py_None) return NULL;
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_O(obj);
    if (!a) return NULL;
    if (!PyArray_ISINTEGER(a)) {
        PyErr_Format(PyExc_TypeError, "%s: %s has dtype %s; expected an integer dtype", fn, arg,
                     PyArray_DESCR(a)->typeobj->tp_name);
        Py_DECREF(a);
        return NULL;
    }
    PyArrayObject *c = (PyArrayObject *)PyArray_FROM_OTF((PyObject *)a, NPY_INT64, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    Py_DECREF(a);
    return c;
}

static void lk_format_shape(char *buf, size_t n, int ndim, const npy_intp *dims) {
    size_t off = (size_t)snprintf(buf, n, "(");
    for (int i = 0; i < ndim && off < n; i++)
        off += (size_t)snprintf(buf + off, n - off, i ? ", %lld" : "%lld", (long long)dims[i]);
    if (off < n) snprintf(buf + off, n - off, ndim == 1 ? ",)" : ")");
}

int lk_check_dims(const char *fn, const char *arg, PyArrayObject *a, const char *letters, int ndim,
                  const npy_intp *dims) {
    int ok = PyArray_NDIM(a) == ndim;
    for (int i = 0; ok && i < ndim; i++)
        if (dims[i] >= 0 && PyArray_DIM(a, i) != dims[i]) ok = 0;
    if (ok) return 0;
    char got[256], want[256];
    npy_intp wanted[NPY_MAXDIMS];
    for (int i = 0; i < ndim; i++)
        wanted[i] = dims[i] >= 0 ? dims[i] : (i < PyArray_NDIM(a) ? PyArray_DIM(a, i) : -1);
    lk_format_shape(got, sizeof got, PyArray_NDIM(a), PyArray_DIMS(a));
    lk_format_shape(want, sizeof want, ndim, wanted);
    PyErr_Format(PyExc_ValueError, "%s: %s has shape %s; expected %s = %s", fn, arg, got, letters, want);
    return -1;
}

int lk_check_range(const char *fn, const char *arg, PyArrayObject *a, int64_t lo, int64_t hi) {
    const int64_t *v = (const int64_t *)PyArray_DATA(a);
    npy_intp n = PyArray_SIZE(a);
    for (npy_intp i = 0; i < n; i++) {
        if (v[i] < lo || v[i] > hi) {
            PyErr_Format(PyExc_ValueError, "%s: %s holds %lld at flat index %lld; expected values in [%lld, %lld]",
                         fn, arg, (long long)v[i], (long long)i, (long long)lo, (long long)hi);
            return -1;
        }
    }
    return 0;
}

PyArrayObject *lk_out(PyObject *obj, int typenum, const char *fn, const char *arg, int ndim, const npy_intp *dims) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be a numpy.ndarray", fn, arg);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != typenum || !PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISWRITEABLE(a) || !PyArray_ISALIGNED(a)) {
        PyArray_Descr *want = PyArray_DescrFromType(typenum);
        PyErr_Format(PyExc_TypeError, "%s: %s must be a writable C-contiguous %s array", fn, arg, want->typeobj->tp_name);
        Py_DECREF(want);
        return NULL;
    }
    if (lk_check_dims(fn, arg, a, "the result shape", ndim, dims) < 0) return NULL;
    Py_INCREF(a);
    return a;
}

lk_dtype lk_dtype_of(PyArrayObject *a) { return PyArray_TYPE(a) == NPY_FLOAT64 ? LK_F64 : LK_F32; }

void lk_elem_strides(PyArrayObject *a, int n, int64_t *out) {
    for (int i = 0; i < n; i++) out[i] = (int64_t)(PyArray_STRIDE(a, i) / PyArray_ITEMSIZE(a));
}

int lk_raise_status(lk_status st, const char *fn) {
    switch (st) {
    case LK_OK: return 0;
    case LK_ERR_NOMEM: PyErr_Format(PyExc_MemoryError, "%s: out of memory", fn); break;
    case LK_ERR_VALUE: PyErr_Format(PyExc_ValueError, "%s: invalid argument", fn); break;
    case LK_ERR_DTYPE: PyErr_Format(PyExc_TypeError, "%s: unsupported dtype", fn); break;
    default: PyErr_Format(PyExc_RuntimeError, "%s: kernel failed (status %d)", fn, (int)st); break;
    }
    return -1;
}
