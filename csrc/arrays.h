/* The one place for argument checks and error messages of the _core bindings.
 *
 * The Python layer (lmkern._dispatch) validates user input first and produces the SPEC's messages
 * with shape letters; these helpers are the guard that keeps a direct or mistaken call to _core from
 * ever reading or writing outside an array.  Every helper sets a Python exception and returns
 * NULL / -1 on failure. */
#ifndef LMKERN_CSRC_ARRAYS_H
#define LMKERN_CSRC_ARRAYS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#ifndef NO_IMPORT_ARRAY
#define NO_IMPORT_ARRAY
#endif
#define PY_ARRAY_UNIQUE_SYMBOL lmkern_ARRAY_API
#include <numpy/arrayobject.h>

#include "lmkern/common.h"

/* NPY_FLOAT64 when obj is a float64 array, else NPY_FLOAT32 (the kernel dtype for obj). */
int lk_float_typenum(PyObject *obj);
/* C-contiguous, aligned float32/float64 view of obj (a copy only when needed). */
PyArrayObject *lk_float_in(PyObject *obj, int typenum, const char *fn, const char *arg);
/* As lk_float_in for any dtype (uint8 codes, int64 indices, ...), no casting of floats. */
PyArrayObject *lk_typed_in(PyObject *obj, int typenum, const char *fn, const char *arg);
/* int64 C-contiguous view of an integer array; None gives NULL with no error set. */
PyArrayObject *lk_index_in(PyObject *obj, const char *fn, const char *arg);
/* out arrays: must be writable, C-contiguous, of typenum and the given shape. */
PyArrayObject *lk_out(PyObject *obj, int typenum, const char *fn, const char *arg, int ndim, const npy_intp *dims);

/* Checks a's rank and dims (dims[i] < 0 matches anything). letters names the axes, e.g.
 * "(B, N, Hq, D)", and appears in the message. */
int lk_check_dims(const char *fn, const char *arg, PyArrayObject *a, const char *letters, int ndim,
                  const npy_intp *dims);
/* Every element of the int64 array in [lo, hi]. */
int lk_check_range(const char *fn, const char *arg, PyArrayObject *a, int64_t lo, int64_t hi);

lk_dtype lk_dtype_of(PyArrayObject *a);
/* Element strides of the first `n` axes. */
void lk_elem_strides(PyArrayObject *a, int n, int64_t *out);
/* Raise the Python exception matching a kernel status; returns -1 (0 for LK_OK). */
int lk_raise_status(lk_status st, const char *fn);

/* Method tables of each binding file, added to the module in module.c. */
extern PyMethodDef lk_attention_methods[];
extern PyMethodDef lk_tpa_methods[];
extern PyMethodDef lk_mor_methods[];
extern PyMethodDef lk_kv_methods[];
extern PyMethodDef lk_parscale_methods[];
extern PyMethodDef lk_bench_methods[];
#endif
