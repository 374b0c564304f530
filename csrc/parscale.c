/* lmkern._core bindings for lmkern.parscale: validate, fill the params struct, release the GIL, call. */
#include "arrays.h"
#include "lmkern/parscale.h"

PyMethodDef lk_parscale_methods[] = {
    {NULL, NULL, 0, NULL},
};
