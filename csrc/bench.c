/* _core bindings of the roofline micro-benchmarks (used by benchmarks/_harness.py). */
#include "arrays.h"

double lk_peak_fma(int64_t iters);
double lk_read_sum(const float *buf, int64_t n);

static PyObject *py_peak_fma(PyObject *self, PyObject *arg) {
    long long iters = PyLong_AsLongLong(arg);
    if (iters == -1 && PyErr_Occurred()) return NULL;
    double flops;
    Py_BEGIN_ALLOW_THREADS
    flops = lk_peak_fma(iters);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(flops);
}

static PyObject *py_read_sum(PyObject *self, PyObject *arg) {
    PyArrayObject *a = lk_typed_in(arg, NPY_FLOAT32, "_read_sum", "buf");
    if (!a) return NULL;
    double s;
    const float *data = (const float *)PyArray_DATA(a);
    int64_t n = PyArray_SIZE(a);
    Py_BEGIN_ALLOW_THREADS
    s = lk_read_sum(data, n);
    Py_END_ALLOW_THREADS
    Py_DECREF(a);
    return PyFloat_FromDouble(s);
}

PyMethodDef lk_bench_methods[] = {
    {"_peak_fma", py_peak_fma, METH_O, "_peak_fma(iters) -> FLOPs done by an FMA loop on all threads"},
    {"_read_sum", py_read_sum, METH_O, "_read_sum(float32 array) -> sum, reading it on all threads"},
    {NULL, NULL, 0, NULL},
};
