/* DLPack consumer (read a capsule's tensor description) and producer (capsules over DeviceArray memory). */
#include "dlpack.h"

#include <stdlib.h>
#include <string.h>

static const char *dl_dtype_name(lk_DLDataType t) {
    if (t.lanes != 1) return NULL;
    switch (t.code) {
    case LK_DL_FLOAT:
        return t.bits == 32 ? "float32" : t.bits == 16 ? "float16" : t.bits == 64 ? "float64" : NULL;
    case LK_DL_BFLOAT:
        return t.bits == 16 ? "bfloat16" : NULL;
    case LK_DL_INT:
        return t.bits == 64 ? "int64" : t.bits == 32 ? "int32" : t.bits == 16 ? "int16" : t.bits == 8 ? "int8" : NULL;
    case LK_DL_UINT:
        return t.bits == 8 ? "uint8" : t.bits == 16 ? "uint16" : t.bits == 32 ? "uint32" : t.bits == 64 ? "uint64" : NULL;
    default:
        return NULL;
    }
}

static const char *dl_device_name(int32_t type) {
    switch (type) {
    case LK_DL_CPU: return "the CPU";
    case LK_DL_CUDA: return "CUDA";
    case LK_DL_CUDA_HOST: return "CUDA pinned host memory";
    case LK_DL_CUDA_MANAGED: return "CUDA managed memory";
    default: return "a non-CUDA device";
    }
}

PyObject *lk_py_dlpack_info(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"capsule", "require_cuda", NULL};
    PyObject *cap;
    int require_cuda = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|p", kwlist, &cap, &require_cuda)) return NULL;
    if (!PyCapsule_CheckExact(cap)) {
        PyErr_Format(PyExc_TypeError, "dlpack: expected a DLPack capsule (from __dlpack__()); got %s",
                     Py_TYPE(cap)->tp_name);
        return NULL;
    }
    const lk_DLTensor *t = NULL;
    int readonly = 0;
    if (PyCapsule_IsValid(cap, "dltensor")) {
        lk_DLManagedTensor *mt = (lk_DLManagedTensor *)PyCapsule_GetPointer(cap, "dltensor");
        if (!mt) return NULL;
        t = &mt->dl_tensor;
    } else if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        lk_DLManagedTensorVersioned *mt = (lk_DLManagedTensorVersioned *)PyCapsule_GetPointer(cap, "dltensor_versioned");
        if (!mt) return NULL;
        if (mt->version.major != 1) {
            PyErr_Format(PyExc_ValueError, "dlpack: unsupported DLPack ABI version %u.%u (expected 1.x)",
                         (unsigned)mt->version.major, (unsigned)mt->version.minor);
            return NULL;
        }
        t = &mt->dl_tensor;
        readonly = (int)(mt->flags & 1u); /* DLPACK_FLAG_BITMASK_READ_ONLY */
    } else {
        const char *name = PyCapsule_GetName(cap);
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "dlpack: capsule named '%s' is not an unconsumed DLPack tensor "
                     "(expected 'dltensor'; a capsule can be consumed only once)", name ? name : "(null)");
        return NULL;
    }
    const int32_t dev = t->device.device_type;
    if (require_cuda && dev != LK_DL_CUDA && dev != LK_DL_CUDA_MANAGED) {
        PyErr_Format(PyExc_ValueError, "dlpack: the tensor is on %s (DLPack device type %d); lmkern.cuda needs "
                     "an array on a CUDA device (device type 2) - pass CPU arrays to the lmkern functions directly",
                     dl_device_name(dev), (int)dev);
        return NULL;
    }
    const char *dtype = dl_dtype_name(t->dtype);
    if (!dtype) {
        PyErr_Format(PyExc_TypeError, "dlpack: unsupported dtype (code %d, %d bits, %d lanes)", (int)t->dtype.code,
                     (int)t->dtype.bits, (int)t->dtype.lanes);
        return NULL;
    }
    if (t->ndim < 0 || (t->ndim > 0 && !t->shape)) {
        PyErr_SetString(PyExc_ValueError, "dlpack: malformed tensor (negative ndim or no shape)");
        return NULL;
    }
    PyObject *shape = PyTuple_New(t->ndim), *strides = NULL, *res = NULL;
    if (!shape) return NULL;
    for (int32_t a = 0; a < t->ndim; a++) {
        PyObject *v = PyLong_FromLongLong(t->shape[a]);
        if (!v) goto fail;
        PyTuple_SET_ITEM(shape, a, v);
    }
    if (t->strides) {
        if (!(strides = PyTuple_New(t->ndim))) goto fail;
        for (int32_t a = 0; a < t->ndim; a++) {
            PyObject *v = PyLong_FromLongLong(t->strides[a]);
            if (!v) goto fail;
            PyTuple_SET_ITEM(strides, a, v);
        }
    } else {
        Py_INCREF(Py_None);
        strides = Py_None;
    }
    res = Py_BuildValue("{s:N,s:O,s:O,s:s,s:i,s:i,s:O}", "ptr",
                        PyLong_FromUnsignedLongLong((unsigned long long)((uintptr_t)t->data + t->byte_offset)), "shape",
                        shape, "strides", strides, "dtype", dtype, "device_type", (int)dev, "device_id",
                        (int)t->device.device_id, "readonly", readonly ? Py_True : Py_False);
fail:
    Py_XDECREF(shape);
    Py_XDECREF(strides);
    return res;
}

/* ---- producer ---------------------------------------------------------------------------------- */

typedef struct {
    lk_DLManagedTensor managed;
    PyObject *owner;
    int64_t shape[];  /* ndim entries */
} lk_dl_holder;

static void lk_dl_deleter(lk_DLManagedTensor *self) {
    if (!self) return;
    lk_dl_holder *h = (lk_dl_holder *)self;  /* managed is the first member */
    /* consumers may call the deleter from any thread, with or without the GIL */
    if (Py_IsInitialized()) {
        PyGILState_STATE st = PyGILState_Ensure();
        Py_XDECREF(h->owner);
        PyGILState_Release(st);
    }
    free(h);
}

static void lk_dl_capsule_destructor(PyObject *cap) {
    /* only an unconsumed capsule still owns its tensor (consumers rename it "used_dltensor") */
    if (!PyCapsule_IsValid(cap, "dltensor")) return;
    lk_DLManagedTensor *mt = (lk_DLManagedTensor *)PyCapsule_GetPointer(cap, "dltensor");
    if (mt && mt->deleter) mt->deleter(mt);
}

PyObject *lk_py_dlpack_capsule(PyObject *self, PyObject *args) {
    PyObject *owner, *ptr_o, *shape_o;
    const char *dtype;
    int device_id;
    if (!PyArg_ParseTuple(args, "OOOsi", &owner, &ptr_o, &shape_o, &dtype, &device_id)) return NULL;
    lk_DLDataType dt = {LK_DL_FLOAT, 32, 1};
    if (!strcmp(dtype, "float32")) dt.bits = 32;
    else if (!strcmp(dtype, "float16")) dt.bits = 16;
    else if (!strcmp(dtype, "float64")) dt.bits = 64;
    else if (!strcmp(dtype, "bfloat16")) { dt.code = LK_DL_BFLOAT; dt.bits = 16; }
    else if (!strcmp(dtype, "int64")) { dt.code = LK_DL_INT; dt.bits = 64; }
    else if (!strcmp(dtype, "int32")) { dt.code = LK_DL_INT; dt.bits = 32; }
    else {
        PyErr_Format(PyExc_TypeError, "dlpack_capsule: unsupported dtype %s", dtype);
        return NULL;
    }
    void *ptr = PyLong_AsVoidPtr(ptr_o);
    if (!ptr && PyErr_Occurred()) return NULL;
    PyObject *shape = PySequence_Tuple(shape_o);
    if (!shape) return NULL;
    const Py_ssize_t ndim = PyTuple_GET_SIZE(shape);
    lk_dl_holder *h = (lk_dl_holder *)calloc(1, sizeof(lk_dl_holder) + sizeof(int64_t) * (size_t)(ndim > 0 ? ndim : 1));
    if (!h) {
        Py_DECREF(shape);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t a = 0; a < ndim; a++) {
        h->shape[a] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, a));
        if (h->shape[a] == -1 && PyErr_Occurred()) {
            Py_DECREF(shape);
            free(h);
            return NULL;
        }
    }
    Py_DECREF(shape);
    h->managed.dl_tensor.data = ptr;
    h->managed.dl_tensor.device.device_type = LK_DL_CUDA;
    h->managed.dl_tensor.device.device_id = device_id;
    h->managed.dl_tensor.ndim = (int32_t)ndim;
    h->managed.dl_tensor.dtype = dt;
    h->managed.dl_tensor.shape = h->shape;
    h->managed.dl_tensor.strides = NULL; /* C-contiguous */
    h->managed.dl_tensor.byte_offset = 0;
    h->managed.manager_ctx = owner;
    h->managed.deleter = lk_dl_deleter;
    Py_INCREF(owner);
    h->owner = owner;
    PyObject *cap = PyCapsule_New(&h->managed, "dltensor", lk_dl_capsule_destructor);
    if (!cap) {
        Py_DECREF(h->owner);
        free(h);
    }
    return cap;
}
