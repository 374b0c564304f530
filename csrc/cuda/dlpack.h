/* DLPack (https://dmlc.github.io/dlpack/latest/c_api.html): the ABI structs we read and produce,
 * written from the published specification (ABI version 1.x; the legacy unversioned
 * DLManagedTensor is what `__dlpack__()` returns when no max_version is asked for). */
#ifndef LMKERN_CSRC_CUDA_DLPACK_H
#define LMKERN_CSRC_CUDA_DLPACK_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

enum { LK_DL_CPU = 1, LK_DL_CUDA = 2, LK_DL_CUDA_HOST = 3, LK_DL_CUDA_MANAGED = 13 };
enum { LK_DL_INT = 0, LK_DL_UINT = 1, LK_DL_FLOAT = 2, LK_DL_BFLOAT = 4 };

typedef struct {
    int32_t device_type; /* DLDeviceType (an int-sized enum) */
    int32_t device_id;
} lk_DLDevice;

typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} lk_DLDataType;

typedef struct {
    void *data;
    lk_DLDevice device;
    int32_t ndim;
    lk_DLDataType dtype;
    int64_t *shape;
    int64_t *strides; /* in elements; NULL: C-contiguous */
    uint64_t byte_offset;
} lk_DLTensor;

typedef struct lk_DLManagedTensor {
    lk_DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct lk_DLManagedTensor *self);
} lk_DLManagedTensor;

typedef struct {
    uint32_t major;
    uint32_t minor;
} lk_DLPackVersion;

typedef struct lk_DLManagedTensorVersioned {
    lk_DLPackVersion version;
    void *manager_ctx;
    void (*deleter)(struct lk_DLManagedTensorVersioned *self);
    uint64_t flags;
    lk_DLTensor dl_tensor;
} lk_DLManagedTensorVersioned;

/* _cuda.dlpack_info(capsule, require_cuda=True) -> dict(ptr, shape, strides, dtype, device_type,
 * device_id, readonly).  Reads an unconsumed "dltensor" / "dltensor_versioned" capsule WITHOUT
 * consuming it: the capsule (kept alive by the caller for the duration of the call) still owns the
 * memory and its producer's destructor frees it.  dtype is "float32", "float16", "bfloat16",
 * "float64", "int64", ... */
PyObject *lk_py_dlpack_info(PyObject *self, PyObject *args, PyObject *kwargs);

/* _cuda.dlpack_capsule(owner, ptr, shape, dtype, device_id) -> a "dltensor" capsule over device memory
 * kept alive by a reference to `owner` until the consumer calls the deleter. */
PyObject *lk_py_dlpack_capsule(PyObject *self, PyObject *args);

#endif
