/* lmkern._cuda bindings of lmkern.mor (none yet): add PyMethodDef entries here; see bindings.h. */
#include "bindings.h"

PyMethodDef lk_cuda_mor_methods[] = {
    {NULL, NULL, 0, NULL},
};
