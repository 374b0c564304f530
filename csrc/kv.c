/* lmkern._core bindings for lmkern.kv: validate, fill the params struct, release the GIL, call. */
#include "arrays.h"
#include "lmkern/kv.h"

PyMethodDef lk_kv_methods[] = {
    {NULL, NULL, 0, NULL},
};
