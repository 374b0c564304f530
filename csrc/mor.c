/* lmkern._core bindings for lmkern.mor: validate, fill the params struct, release the GIL, call. */
#include "arrays.h"
#include "lmkern/mor.h"

PyMethodDef lk_mor_methods[] = {
    {NULL, NULL, 0, NULL},
};
