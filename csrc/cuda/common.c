/* Shared helpers of the lmkern._cuda bindings: argument converters, dtype names, error mapping and
 * the device guard.  Declared in bindings.h; every csrc/cuda/<family>.c binding uses them. */
#include "bindings.h"

#include <string.h>

/* ---- shared helpers (declared in bindings.h) ---------------------------------------------------- */

PyObject *lk_cu_raise_cuda(const char *fn, cudaError_t err) {
    PyErr_Format(err == cudaErrorMemoryAllocation ? PyExc_MemoryError : PyExc_RuntimeError, "%s: CUDA error: %s", fn,
                 cudaGetErrorString(err));
    cudaGetLastError(); /* clear a sticky-free error so the next call starts clean */
    return NULL;
}

int lk_cu_raise_status(lk_status st, const char *fn) {
    switch (st) {
    case LK_OK: return 0;
    case LK_ERR_NOMEM: PyErr_Format(PyExc_MemoryError, "%s: out of memory", fn); break;
    case LK_ERR_VALUE: PyErr_Format(PyExc_ValueError, "%s: unsupported sizes or arguments for the CUDA kernel", fn); break;
    case LK_ERR_DTYPE: PyErr_Format(PyExc_TypeError, "%s: unsupported dtype for the CUDA kernel", fn); break;
    case LK_ERR_CUDA: PyErr_Format(PyExc_RuntimeError, "%s: CUDA error: %s", fn, lk_cuda_last_error()); break;
    }
    return -1;
}

int lk_cu_parse_dtype(const char *fn, const char *name, lk_dtype *out) {
    if (!strcmp(name, "float32")) *out = LK_F32;
    else if (!strcmp(name, "float16")) *out = LK_F16;
    else if (!strcmp(name, "bfloat16")) *out = LK_BF16;
    else {
        PyErr_Format(PyExc_TypeError, "%s: dtype %s is not supported on the GPU (float32, float16, bfloat16)", fn, name);
        return -1;
    }
    return 0;
}

static void *as_ptr(PyObject *o) {
    if (o == Py_None) return NULL;
    return PyLong_AsVoidPtr(o);
}

int lk_cu_ptr_arg(PyObject *o, void *addr) {
    void *p = as_ptr(o);
    if (!p && PyErr_Occurred()) return 0;
    *(void **)addr = p;
    return 1;
}

int lk_cu_strides3(PyObject *o, void *addr) {
    int64_t *s = (int64_t *)addr;
    PyObject *t = PySequence_Tuple(o);
    if (!t) return 0;
    if (PyTuple_GET_SIZE(t) != 3) {
        PyErr_SetString(PyExc_ValueError, "strides must have 3 entries (batch, token, head)");
        Py_DECREF(t);
        return 0;
    }
    for (int a = 0; a < 3; a++) {
        s[a] = PyLong_AsLongLong(PyTuple_GET_ITEM(t, a));
        if (s[a] == -1 && PyErr_Occurred()) {
            Py_DECREF(t);
            return 0;
        }
    }
    Py_DECREF(t);
    return 1;
}

/* Runs with `device` current, restoring the caller's current device afterwards (frameworks such as
 * PyTorch keep their own idea of the current device). */

cudaError_t lk_cu_guard_enter(lk_cu_device_guard *g, int device) {
    g->switched = 0;
    cudaError_t err = cudaGetDevice(&g->prev);
    if (err != cudaSuccess) return err;
    if (g->prev != device) {
        err = cudaSetDevice(device);
        if (err != cudaSuccess) return err;
        g->switched = 1;
    }
    (void)cudaGetLastError(); /* an earlier, unrelated non-sticky error must not be blamed on our launch */
    return cudaSuccess;
}

void lk_cu_guard_exit(lk_cu_device_guard *g) {
    if (g->switched) cudaSetDevice(g->prev);
}


int lk_cu_num_sms(int device, int given) {
    if (given > 0) return given;
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1) {
        (void)cudaGetLastError();
        sms = 1;
    }
    return sms;
}
