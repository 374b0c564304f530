/* lmkern._cuda bindings of lmkern.kv (none yet): add PyMethodDef entries here; see bindings.h. */
#include "bindings.h"

PyMethodDef lk_cuda_kv_methods[] = {
    {NULL, NULL, 0, NULL},
};
