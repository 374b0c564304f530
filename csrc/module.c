/* lmkern._core: PEP 489 multi-phase init; the method tables of every binding file are added here. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL lmkern_ARRAY_API
#include <numpy/arrayobject.h>
#include <omp.h>

#include "arrays.h"
#include "lmkern/simd.h"

#ifndef LMKERN_CFLAGS
#define LMKERN_CFLAGS ""
#endif

#define LK_MAX_THREADS 65536 /* more is a typo, not a machine (and would overflow int team sizes) */

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg) {
    int overflow = 0;
    long long n = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (overflow || n < 1 || n > LK_MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "set_num_threads: n must be in [1, %d]; got %S", LK_MAX_THREADS, arg);
        return NULL;
    }
    lk_set_num_threads((int)n);
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *unused) {
    return PyLong_FromLong(lk_get_num_threads());
}

static PyObject *py_set_simd(PyObject *self, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    int was = lk_simd_enabled();
    lk_set_simd_enabled(on);
    return PyBool_FromLong(was);
}

static PyMethodDef lk_module_methods[] = {
    {"set_num_threads", py_set_num_threads, METH_O, "set_num_threads(n): threads used by every kernel."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int"},
    {"_set_simd", py_set_simd, METH_O, "_set_simd(on) -> previous: False forces the generic kernels (tests)."},
    {NULL, NULL, 0, NULL},
};

static int lk_exec(PyObject *m) {
    if (PyArray_ImportNumPyAPI() < 0) return -1;
    PyMethodDef *tables[] = {lk_module_methods, lk_attention_methods, lk_tpa_methods, lk_mor_methods,
                             lk_kv_methods, lk_parscale_methods, lk_bench_methods};
    for (size_t i = 0; i < sizeof tables / sizeof tables[0]; i++)
        if (PyModule_AddFunctions(m, tables[i]) < 0) return -1;
    if (PyModule_AddStringConstant(m, "simd", LK_SIMD_NAME) < 0) return -1;
    if (PyModule_AddStringConstant(m, "cflags", LMKERN_CFLAGS) < 0) return -1;
#if defined(__clang__)
    const char *compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
    const char *compiler = "gcc " __VERSION__;
#else
    const char *compiler = "unknown";
#endif
    if (PyModule_AddStringConstant(m, "compiler", compiler) < 0) return -1;
    if (PyModule_AddIntConstant(m, "openmp", _OPENMP) < 0) return -1;
    if (PyModule_AddIntConstant(m, "native", LMKERN_NATIVE) < 0) return -1;
    return 0;
}

static PyModuleDef_Slot lk_slots[] = {
    {Py_mod_exec, lk_exec},
    {0, NULL},
};

static struct PyModuleDef lk_module = {
    PyModuleDef_HEAD_INIT, "lmkern._core", "lmkern CPU kernels (C11 + OpenMP + SIMD).", 0, NULL, lk_slots,
    NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&lk_module); }
