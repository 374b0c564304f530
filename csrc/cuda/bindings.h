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
 *     LK_CU_LAUNCH(fn, device, lk_<op>_cuda(&p, (lk_stream)stream));   (GIL released, device restored)
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

/* `given` when > 0 (tests pin it), else the multiprocessor count of `device` (1 if it cannot be read):
 * what the split planners (attention, tpa.decode, attention_mass, ...) size their grids for. */
int lk_cu_num_sms(int device, int given);

/* Makes `device` current for a launch and restores the caller's device after (call without the GIL). */
typedef struct {
    int prev;
    int switched;
} lk_cu_device_guard;
cudaError_t lk_cu_guard_enter(lk_cu_device_guard *g, int device);
void lk_cu_guard_exit(lk_cu_device_guard *g);

/* The launch of every kernel binding: runs CALL (an lk_status expression) on `DEVICE` without the GIL,
 * restores the caller's device, and returns NULL from the binding with the mapped exception on a CUDA
 * error or a failing status.  Use inside a function returning PyObject *. */
#define LK_CU_LAUNCH(FN, DEVICE, CALL)                                  \
    do {                                                                \
        lk_cu_device_guard g_;                                          \
        cudaError_t err_;                                               \
        lk_status st_ = LK_OK;                                          \
        Py_BEGIN_ALLOW_THREADS                                          \
        err_ = lk_cu_guard_enter(&g_, (DEVICE));                        \
        if (err_ == cudaSuccess) st_ = (CALL);                          \
        lk_cu_guard_exit(&g_);                                          \
        Py_END_ALLOW_THREADS                                            \
        if (err_ != cudaSuccess) return lk_cu_raise_cuda((FN), err_);   \
        if (lk_cu_raise_status(st_, (FN)) < 0) return NULL;             \
    } while (0)

/* Method tables: core (module.c) and one per family (csrc/cuda/<family>.c). */
extern PyMethodDef lk_cuda_tpa_methods[];
extern PyMethodDef lk_cuda_mor_methods[];
extern PyMethodDef lk_cuda_kv_methods[];
extern PyMethodDef lk_cuda_kv_select_methods[]; /* attention_mass, pool1d, keep_topk, compact */
extern PyMethodDef lk_cuda_parscale_methods[];

#endif
