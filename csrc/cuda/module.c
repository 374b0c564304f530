/* lmkern._cuda: the CUDA face of lmkern (PEP 489 multi-phase init).
 *
 * Functions take raw device pointers as Python ints, sizes, a dtype name, a device id and a stream
 * handle (an int: cudaStream_t; 0 is the legacy default stream).  The Python layer (lmkern.cuda) has
 * checked shapes, dtypes and devices; the checks here are the guard on sizes and argument sanity
 * (device pointers themselves cannot be checked from the host).
 *
 * Importing this module never touches the driver: the CUDA runtime is linked statically and first
 * used by device_count(), which returns 0 when no driver or no GPU is present. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <cuda_runtime_api.h>
#include <string.h>

#include "bindings.h"
#include "dlpack.h"

/* ---- devices ------------------------------------------------------------------------------------ */

static PyObject *py_device_count(PyObject *self, PyObject *unused) {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        cudaGetLastError(); /* no driver / no device: not an error here */
        n = 0;
    }
    return PyLong_FromLong(n);
}

static PyObject *py_device_properties(PyObject *self, PyObject *arg) {
    int dev = (int)PyLong_AsLong(arg);
    if (dev == -1 && PyErr_Occurred()) return NULL;
    struct cudaDeviceProp prop;
    cudaError_t err = cudaGetDeviceProperties(&prop, dev);
    if (err != cudaSuccess) return lk_cu_raise_cuda("device_properties", err);
    int sms = 0, major = 0, minor = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    return Py_BuildValue("{s:s,s:i,s:i,s:i,s:K,s:i}", "name", prop.name, "major", major, "minor", minor,
                         "multiprocessors", sms, "total_memory", (unsigned long long)prop.totalGlobalMem, "device", dev);
}

static PyObject *py_versions(PyObject *self, PyObject *unused) {
    int rt = 0, drv = 0;
    if (cudaRuntimeGetVersion(&rt) != cudaSuccess) rt = 0;
    if (cudaDriverGetVersion(&drv) != cudaSuccess) drv = 0;
    cudaGetLastError();
    return Py_BuildValue("{s:i,s:i,s:i}", "runtime", rt, "driver", drv, "compiled", CUDART_VERSION);
}

static PyObject *py_current_device(PyObject *self, PyObject *unused) {
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return lk_cu_raise_cuda("current_device", err);
    return PyLong_FromLong(dev);
}

/* pointer_device(ptr) -> the device id owning a device pointer (cudaPointerGetAttributes). */
static PyObject *py_pointer_device(PyObject *self, PyObject *arg) {
    void *ptr;
    if (!lk_cu_ptr_arg(arg, &ptr)) return NULL;
    struct cudaPointerAttributes attr;
    cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
    if (err != cudaSuccess) return lk_cu_raise_cuda("pointer_device", err);
    return PyLong_FromLong(attr.device);
}

/* ---- memory (for lmkern.cuda.DeviceArray) -------------------------------------------------------- */

static PyObject *py_malloc(PyObject *self, PyObject *args) {
    Py_ssize_t nbytes;
    int device;
    if (!PyArg_ParseTuple(args, "ni", &nbytes, &device)) return NULL;
    if (nbytes < 0) {
        PyErr_SetString(PyExc_ValueError, "malloc: nbytes must be >= 0");
        return NULL;
    }
    void *ptr = NULL;
    lk_cu_device_guard g;
    cudaError_t err;
    Py_BEGIN_ALLOW_THREADS
    err = lk_cu_guard_enter(&g, device);
    if (err == cudaSuccess) err = cudaMalloc(&ptr, nbytes > 0 ? (size_t)nbytes : 1);
    lk_cu_guard_exit(&g);
    Py_END_ALLOW_THREADS
    if (err != cudaSuccess) return lk_cu_raise_cuda("malloc", err);
    return PyLong_FromVoidPtr(ptr);
}

static PyObject *py_free(PyObject *self, PyObject *args) {
    PyObject *ptr_o;
    int device;
    void *ptr;
    if (!PyArg_ParseTuple(args, "Oi", &ptr_o, &device)) return NULL;
    if (!lk_cu_ptr_arg(ptr_o, &ptr)) return NULL;
    lk_cu_device_guard g;
    cudaError_t err;
    Py_BEGIN_ALLOW_THREADS
    err = lk_cu_guard_enter(&g, device);
    if (err == cudaSuccess) err = cudaFree(ptr);
    lk_cu_guard_exit(&g);
    Py_END_ALLOW_THREADS
    if (err != cudaSuccess) return lk_cu_raise_cuda("free", err);
    Py_RETURN_NONE;
}

/* memcpy_htod(dst, host_buffer, device, stream=0): copy of a C-contiguous host buffer, ordered on
 * `stream` (cudaMemcpyAsync: a pageable buffer is staged before the call returns, so the caller may
 * drop it; the device copy lands in stream order, before any later work on that stream). */
static PyObject *py_memcpy_htod(PyObject *self, PyObject *args) {
    PyObject *dst_o, *src_o;
    int device;
    void *dst, *stream = NULL;
    if (!PyArg_ParseTuple(args, "OOi|O&", &dst_o, &src_o, &device, lk_cu_ptr_arg, &stream)) return NULL;
    if (!lk_cu_ptr_arg(dst_o, &dst)) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(src_o, &view, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    lk_cu_device_guard g;
    cudaError_t err = cudaSuccess;
    Py_BEGIN_ALLOW_THREADS
    if (view.len > 0) {
        err = lk_cu_guard_enter(&g, device);
        if (err == cudaSuccess)
            err = cudaMemcpyAsync(dst, view.buf, (size_t)view.len, cudaMemcpyHostToDevice, (cudaStream_t)stream);
        lk_cu_guard_exit(&g);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (err != cudaSuccess) return lk_cu_raise_cuda("memcpy_htod", err);
    Py_RETURN_NONE;
}

/* memcpy_dtoh(host_buffer, src, device): synchronous copy into a writable C-contiguous host buffer. */
static PyObject *py_memcpy_dtoh(PyObject *self, PyObject *args) {
    PyObject *dst_o, *src_o;
    int device;
    void *src;
    if (!PyArg_ParseTuple(args, "OOi", &dst_o, &src_o, &device)) return NULL;
    if (!lk_cu_ptr_arg(src_o, &src)) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(dst_o, &view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) return NULL;
    lk_cu_device_guard g;
    cudaError_t err = cudaSuccess;
    Py_BEGIN_ALLOW_THREADS
    if (view.len > 0) {
        err = lk_cu_guard_enter(&g, device);
        if (err == cudaSuccess) err = cudaMemcpy(view.buf, src, (size_t)view.len, cudaMemcpyDeviceToHost);
        lk_cu_guard_exit(&g);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (err != cudaSuccess) return lk_cu_raise_cuda("memcpy_dtoh", err);
    Py_RETURN_NONE;
}

/* memcpy_dtod(dst, src, nbytes, device, stream): asynchronous on `stream`. */
static PyObject *py_memcpy_dtod(PyObject *self, PyObject *args) {
    PyObject *dst_o, *src_o, *stream_o;
    Py_ssize_t nbytes;
    int device;
    void *dst, *src, *stream;
    if (!PyArg_ParseTuple(args, "OOniO", &dst_o, &src_o, &nbytes, &device, &stream_o)) return NULL;
    if (!lk_cu_ptr_arg(dst_o, &dst) || !lk_cu_ptr_arg(src_o, &src) || !lk_cu_ptr_arg(stream_o, &stream)) return NULL;
    if (nbytes <= 0) Py_RETURN_NONE;
    lk_cu_device_guard g;
    cudaError_t err;
    Py_BEGIN_ALLOW_THREADS
    err = lk_cu_guard_enter(&g, device);
    if (err == cudaSuccess) err = cudaMemcpyAsync(dst, src, (size_t)nbytes, cudaMemcpyDeviceToDevice, (cudaStream_t)stream);
    lk_cu_guard_exit(&g);
    Py_END_ALLOW_THREADS
    if (err != cudaSuccess) return lk_cu_raise_cuda("memcpy_dtod", err);
    Py_RETURN_NONE;
}

static PyObject *py_synchronize(PyObject *self, PyObject *args) {
    int device;
    PyObject *stream_o = Py_None;
    void *stream = NULL;
    if (!PyArg_ParseTuple(args, "i|O", &device, &stream_o)) return NULL;
    if (!lk_cu_ptr_arg(stream_o, &stream)) return NULL;
    lk_cu_device_guard g;
    cudaError_t err;
    Py_BEGIN_ALLOW_THREADS
    err = lk_cu_guard_enter(&g, device);
    if (err == cudaSuccess) err = stream_o == Py_None ? cudaDeviceSynchronize() : cudaStreamSynchronize((cudaStream_t)stream);
    lk_cu_guard_exit(&g);
    Py_END_ALLOW_THREADS
    if (err != cudaSuccess) return lk_cu_raise_cuda("synchronize", err);
    Py_RETURN_NONE;
}

/* stream_wait(consumer, producer, device): `consumer` waits for the work queued so far on `producer`
 * (an event recorded on producer; no host synchronization).  Used for __cuda_array_interface__'s
 * "stream" entry. */
static PyObject *py_stream_wait(PyObject *self, PyObject *args) {
    PyObject *c_o, *p_o;
    int device;
    void *consumer, *producer;
    if (!PyArg_ParseTuple(args, "OOi", &c_o, &p_o, &device)) return NULL;
    if (!lk_cu_ptr_arg(c_o, &consumer) || !lk_cu_ptr_arg(p_o, &producer)) return NULL;
    if (consumer == producer) Py_RETURN_NONE;
    lk_cu_device_guard g;
    cudaError_t err;
    Py_BEGIN_ALLOW_THREADS
    err = lk_cu_guard_enter(&g, device);
    cudaEvent_t ev = NULL;
    if (err == cudaSuccess) err = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    if (err == cudaSuccess) err = cudaEventRecord(ev, (cudaStream_t)producer);
    if (err == cudaSuccess) err = cudaStreamWaitEvent((cudaStream_t)consumer, ev, 0);
    if (ev) cudaEventDestroy(ev);
    lk_cu_guard_exit(&g);
    Py_END_ALLOW_THREADS
    if (err != cudaSuccess) return lk_cu_raise_cuda("stream_wait", err);
    Py_RETURN_NONE;
}

/* ---- attention ------------------------------------------------------------------------------------ */

static const char *FN_ATTN = "cuda.attention";

static int fill_attention(PyObject *args, PyObject *kwargs, lk_attention_params *p, int *device, void **stream,
                          int *num_splits, void **scratch, int *num_sms) {
    static char *kwlist[] = {"device", "stream", "dtype", "B", "N", "M", "Hq", "Hkv", "D", "E", "q", "q_stride", "k",
                             "k_stride", "v", "v_stride", "out", "out_stride", "lse", "q_pos", "q_pos_bstride",
                             "kv_pos", "kv_pos_bstride", "kv_lens", "causal", "scale", "prefix_k", "prefix_v",
                             "prefix_len", "prefix_rows", "num_splits", "scratch", "num_sms", NULL};
    const char *dtype = "float32";
    long long B = 0, N = 0, M = 0, Hq = 0, Hkv = 0, D = 0, E = 0, qpb = 0, kvpb = 0, L = 0, prows = 1;
    void *q = NULL, *k = NULL, *v = NULL, *out = NULL, *lse = NULL, *qpos = NULL, *kvpos = NULL, *lens = NULL,
         *pk = NULL, *pv = NULL;
    int causal = 0;
    double scale = 1.0;
    *num_splits = 1;
    *scratch = NULL;
    *stream = NULL;
    memset(p, 0, sizeof *p);
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iO&sLLLLLLLO&O&O&O&O&O&O&O&O&O&LO&LO&pdO&O&LLiO&i", kwlist, device,
                                     lk_cu_ptr_arg, stream, &dtype, &B, &N, &M, &Hq, &Hkv, &D, &E, lk_cu_ptr_arg, &q, lk_cu_strides3,
                                     p->q_stride, lk_cu_ptr_arg, &k, lk_cu_strides3, p->k_stride, lk_cu_ptr_arg, &v, lk_cu_strides3, p->v_stride,
                                     lk_cu_ptr_arg, &out, lk_cu_strides3, p->out_stride, lk_cu_ptr_arg, &lse, lk_cu_ptr_arg, &qpos, &qpb,
                                     lk_cu_ptr_arg, &kvpos, &kvpb, lk_cu_ptr_arg, &lens, &causal, &scale, lk_cu_ptr_arg, &pk, lk_cu_ptr_arg,
                                     &pv, &L, &prows, num_splits, lk_cu_ptr_arg, scratch, num_sms))
        return -1;
    if (lk_cu_parse_dtype(FN_ATTN, dtype, &p->dtype) < 0) return -1;
    if (B < 0 || N < 0 || M < 0 || Hq < 0 || Hkv < 0 || D < 0 || E < 0 || L < 0 || prows < 1 || qpb < 0 || kvpb < 0) {
        PyErr_Format(PyExc_ValueError, "%s: negative size", FN_ATTN);
        return -1;
    }
    if (Hkv == 0 ? Hq != 0 : Hq % Hkv != 0) {
        PyErr_Format(PyExc_ValueError, "%s: Hq = %lld must be a multiple of Hkv = %lld", FN_ATTN, Hq, Hkv);
        return -1;
    }
    if (D > LK_CUDA_ATTN_MAX_HEAD_DIM || E > LK_CUDA_ATTN_MAX_HEAD_DIM) {
        PyErr_Format(PyExc_ValueError, "%s: head dimensions D = %lld and E = %lld must be <= %d on the GPU", FN_ATTN, D, E,
                     LK_CUDA_ATTN_MAX_HEAD_DIM);
        return -1;
    }
    /* a pointer may be NULL only when its array has no elements */
    const int rows = B * N * Hq > 0;
    if (rows && ((D > 0 && !q) || (E > 0 && !out) || (M * Hkv * D > 0 && !k) || (M * Hkv * E > 0 && !v) ||
                 (L * Hkv * D > 0 && !pk) || (L * Hkv * E > 0 && !pv))) {
        PyErr_Format(PyExc_ValueError, "%s: null device pointer", FN_ATTN);
        return -1;
    }
    if (L > 0 && B % prows != 0) {
        PyErr_Format(PyExc_ValueError, "%s: prefix_rows = %lld must divide B = %lld", FN_ATTN, prows, B);
        return -1;
    }
    if (*num_splits < 1 || *num_splits > 1024) {
        PyErr_Format(PyExc_ValueError, "%s: num_splits must be in [1, 1024]", FN_ATTN);
        return -1;
    }
    p->B = B; p->N = N; p->M = M; p->Hq = Hq; p->Hkv = Hkv; p->D = D; p->E = E;
    p->q = q; p->k = k; p->v = v; p->out = out; p->lse = lse;
    p->q_pos = qpos; p->q_pos_bstride = qpb; p->kv_pos = kvpos; p->kv_pos_bstride = kvpb; p->kv_lens = lens;
    p->causal = causal; p->scale = scale;
    p->prefix_k = pk; p->prefix_v = pv; p->prefix_len = L; p->prefix_rows = prows;
    return 0;
}

/* attention_plan(**same keywords as attention, num_sms=...) -> (num_splits, scratch_floats) */
static PyObject *py_attention_plan(PyObject *self, PyObject *args, PyObject *kwargs) {
    lk_attention_params p;
    int device = 0, splits, sms = 0;
    void *stream, *scratch;
    if (fill_attention(args, kwargs, &p, &device, &stream, &splits, &scratch, &sms) < 0) return NULL;
    sms = lk_cu_num_sms(device, sms);
    splits = lk_attention_cuda_splits(&p, sms);
    return Py_BuildValue("(iL)", splits, (long long)lk_attention_cuda_scratch_floats(&p, splits));
}

static PyObject *py_attention(PyObject *self, PyObject *args, PyObject *kwargs) {
    lk_attention_params p;
    int device = 0, splits, sms = 0;
    void *stream, *scratch;
    if (fill_attention(args, kwargs, &p, &device, &stream, &splits, &scratch, &sms) < 0) return NULL;
    if (splits > 1 && !scratch) {
        PyErr_Format(PyExc_ValueError, "%s: num_splits > 1 needs scratch", FN_ATTN);
        return NULL;
    }
    LK_CU_LAUNCH(FN_ATTN, device, lk_attention_cuda(&p, splits, (float *)scratch, (lk_stream)stream));
    Py_RETURN_NONE;
}

/* ---- rope ------------------------------------------------------------------------------------------ */

static PyObject *py_rope(PyObject *self, PyObject *args, PyObject *kwargs) {
    static const char *fn = "cuda.rope";
    static char *kwlist[] = {"device", "stream", "dtype", "B", "T", "G", "D", "x", "x_stride", "positions",
                             "pos_bstride", "rotary_dim", "base", "interleaved", "inverse", NULL};
    int device = 0, interleaved = 0, inverse = 0;
    void *stream = NULL, *x = NULL, *pos = NULL;
    const char *dtype = "float32";
    long long B = 0, T = 0, G = 0, D = 0, pb = 0, r = 0;
    int64_t xs[3] = {0, 0, 0};
    double base = 10000.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iO&sLLLLO&O&O&LLdpp", kwlist, &device, lk_cu_ptr_arg, &stream, &dtype, &B,
                                     &T, &G, &D, lk_cu_ptr_arg, &x, lk_cu_strides3, xs, lk_cu_ptr_arg, &pos, &pb, &r, &base, &interleaved,
                                     &inverse))
        return NULL;
    lk_rope_params p;
    memset(&p, 0, sizeof p);
    if (lk_cu_parse_dtype(fn, dtype, &p.dtype) < 0) return NULL;
    if (B < 0 || T < 0 || G < 0 || D < 0 || pb < 0 || r < 0 || r > D || r % 2) {
        PyErr_Format(PyExc_ValueError, "%s: bad sizes (rotary_dim must be even and in [0, D])", fn);
        return NULL;
    }
    if (!(base > 0)) {
        char num[32];   /* PyErr_Format has no %g (Python 3.12 raises SystemError on it) */
        snprintf(num, sizeof num, "%g", base);
        PyErr_Format(PyExc_ValueError, "%s: base must be > 0; got %s", fn, num);
        return NULL;
    }
    if (B * T * G * r > 0 && (!x || !pos)) {
        PyErr_Format(PyExc_ValueError, "%s: null device pointer", fn);
        return NULL;
    }
    p.B = B; p.T = T; p.G = G; p.D = D; p.x = x; p.positions = pos; p.pos_bstride = pb;
    p.rotary_dim = r; p.base = base; p.interleaved = interleaved; p.inverse = inverse;
    LK_CU_LAUNCH(fn, device, lk_rope_cuda(&p, xs, (lk_stream)stream));
    Py_RETURN_NONE;
}

/* ---- module --------------------------------------------------------------------------------------- */

static PyMethodDef lk_cuda_core_methods[] = {
    {"device_count", py_device_count, METH_NOARGS, "device_count() -> int: visible GPUs (0 without a driver)."},
    {"device_properties", py_device_properties, METH_O, "device_properties(i) -> dict(name, major, minor, ...)."},
    {"versions", py_versions, METH_NOARGS, "versions() -> dict(runtime, driver, compiled)."},
    {"current_device", py_current_device, METH_NOARGS, "current_device() -> int"},
    {"pointer_device", py_pointer_device, METH_O, "pointer_device(ptr) -> device id of a device pointer."},
    {"malloc", py_malloc, METH_VARARGS, "malloc(nbytes, device) -> ptr"},
    {"free", py_free, METH_VARARGS, "free(ptr, device)"},
    {"memcpy_htod", py_memcpy_htod, METH_VARARGS, "memcpy_htod(dst_ptr, host_buffer, device, stream=0): ordered on stream."},
    {"memcpy_dtoh", py_memcpy_dtoh, METH_VARARGS, "memcpy_dtoh(host_buffer, src_ptr, device): synchronous."},
    {"memcpy_dtod", py_memcpy_dtod, METH_VARARGS, "memcpy_dtod(dst, src, nbytes, device, stream): asynchronous."},
    {"synchronize", py_synchronize, METH_VARARGS, "synchronize(device[, stream])"},
    {"stream_wait", py_stream_wait, METH_VARARGS, "stream_wait(consumer, producer, device)"},
    {"dlpack_info", (PyCFunction)(void (*)(void))lk_py_dlpack_info, METH_VARARGS | METH_KEYWORDS,
     "dlpack_info(capsule, require_cuda=True) -> dict(ptr, shape, strides, dtype, device_type, device_id, readonly)"},
    {"dlpack_capsule", lk_py_dlpack_capsule, METH_VARARGS,
     "dlpack_capsule(owner, ptr, shape, dtype, device_id) -> DLPack capsule keeping owner alive"},
    {"attention_plan", (PyCFunction)(void (*)(void))py_attention_plan, METH_VARARGS | METH_KEYWORDS,
     "attention_plan(**attention keywords, num_sms=0) -> (num_splits, scratch_floats)"},
    {"attention", (PyCFunction)(void (*)(void))py_attention, METH_VARARGS | METH_KEYWORDS,
     "attention(device=, stream=, dtype=, B=, N=, M=, Hq=, Hkv=, D=, E=, q=, q_stride=, ...): enqueue attention."},
    {"rope", (PyCFunction)(void (*)(void))py_rope, METH_VARARGS | METH_KEYWORDS,
     "rope(device=, stream=, dtype=, B=, T=, G=, D=, x=, x_stride=, positions=, ...): RoPE in place."},
    {NULL, NULL, 0, NULL},
};

static int lk_cuda_exec(PyObject *m) {
    PyMethodDef *tables[] = {lk_cuda_core_methods, lk_cuda_tpa_methods, lk_cuda_mor_methods, lk_cuda_kv_methods,
                             lk_cuda_kv_select_methods, lk_cuda_parscale_methods};
    for (size_t i = 0; i < sizeof tables / sizeof tables[0]; i++)
        if (PyModule_AddFunctions(m, tables[i]) < 0) return -1;
    if (PyModule_AddIntConstant(m, "max_head_dim", LK_CUDA_ATTN_MAX_HEAD_DIM) < 0) return -1;
    if (PyModule_AddIntConstant(m, "cudart_version", CUDART_VERSION) < 0) return -1;
    return 0;
}

static PyModuleDef_Slot lk_cuda_slots[] = {
    {Py_mod_exec, lk_cuda_exec},
    {0, NULL},
};

static struct PyModuleDef lk_cuda_module = {
    PyModuleDef_HEAD_INIT, "lmkern._cuda", "lmkern CUDA kernels (raw device pointers; see lmkern.cuda).", 0,
    NULL, lk_cuda_slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cuda(void) { return PyModuleDef_Init(&lk_cuda_module); }
