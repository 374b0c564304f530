/* The one place for argument handling of the lmkern._cuda bindings (the CUDA twin of csrc/arrays.h).
 *
 * A binding takes keyword arguments: `device` (int), `stream` (int cudaStream_t handle, 0 = legacy
 * default), `dtype` (a name: "float32", "float16", "bfloat16"), sizes, device pointers as ints (None
 * for NULL) and strides as 3-tuples; the Python layer (lmkern.cuda) has checked shapes, dtypes and
 * devices already.  Pattern (see py_attention in module.c):
 *
 *     if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|iO&s...", kwlist, &device, lk_cu_ptr_arg, &stream, ...))
 *         return NULL;
 *     ...size checks -> ValueError...
 *     lk_cu_device_guard g; cudaError_t err; lk_status st = LK_OK;
 *     Py_BEGIN_ALLOW_THREADS
 *     err = lk_cu_guard_enter(&g, device);
 *     if (err == cudaSuccess) st = lk_<op>_cuda(&p, (lk_stream)stream);
 *     lk_cu_guard_exit(&g);
 *     Py_END_ALLOW_THREADS
 *     if (err != cudaSuccess) return lk_cu_raise_cuda(fn, err);
 *     if (lk_cu_raise_status(st, fn) < 0) return NULL;
 *
 * Each family fills its method table in csrc/cuda/<family>.c; module.c adds every table. */
#ifndef LMKERN_CSRC_CUDA_BINDINGS_H
#define LMKERN_CSRC_CUDA_BINDINGS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <cuda_runtime_api.h>

#include "lmkern/cuda.h"

/* Sets MemoryError (allocation failures) or RuntimeError with the CUDA error string; returns NULL. */
PyObject *lk_cu_raise_cuda(const char *fn, cudaError_t err);
/* Sets the exception matching a kernel status (LK_ERR_CUDA: the launch error string); -1, or 0 for LK_OK. */
int lk_cu_raise_status(lk_status st, const char *fn);
/* "float32" / "float16" / "bfloat16" -> lk_dtype; TypeError otherwise. */
int lk_cu_parse_dtype(const char *fn, const char *name, lk_dtype *out);
/* O& converters: an int (or None -> NULL) into a void *; a 3-sequence of ints into int64_t[3]. */
int lk_cu_ptr_arg(PyObject *o, void *addr);
int lk_cu_strides3(PyObject *o, void *addr);

/* Makes `device` current for a launch and restores the caller's device after (call without the GIL). */
typedef struct {
    int prev;
    int switched;
} lk_cu_device_guard;
cudaError_t lk_cu_guard_enter(lk_cu_device_guard *g, int device);
void lk_cu_guard_exit(lk_cu_device_guard *g);

/* Method tables: core (module.c) and one per family (csrc/cuda/<family>.c). */
extern PyMethodDef lk_cuda_tpa_methods[];
extern PyMethodDef lk_cuda_mor_methods[];
extern PyMethodDef lk_cuda_kv_methods[];
extern PyMethodDef lk_cuda_kv_select_methods[]; /* attention_mass, pool1d, keep_topk, compact */
extern PyMethodDef lk_cuda_parscale_methods[];

#endif
