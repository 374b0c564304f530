/* lmkern._cuda bindings of lmkern.tpa (none yet): add PyMethodDef entries here; see bindings.h. */
#include "bindings.h"

PyMethodDef lk_cuda_tpa_methods[] = {
    {NULL, NULL, 0, NULL},
};
