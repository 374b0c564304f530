/* lmkern._cuda bindings of lmkern.parscale (none yet): add PyMethodDef entries here; see bindings.h. */
#include "bindings.h"

PyMethodDef lk_cuda_parscale_methods[] = {
    {NULL, NULL, 0, NULL},
};
