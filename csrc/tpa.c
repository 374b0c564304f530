/* lmkern._core bindings for lmkern.tpa: validate, fill the params struct, release the GIL, call. */
#include "arrays.h"
#include "lmkern/tpa.h"

PyMethodDef lk_tpa_methods[] = {
    {NULL, NULL, 0, NULL},
};
