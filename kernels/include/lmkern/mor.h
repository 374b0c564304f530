/* lmkern.mor kernels: params structs and declarations. */
#ifndef LMKERN_MOR_H
#define LMKERN_MOR_H

#include "lmkern/common.h"

#ifdef __cplusplus
extern "C" {
#endif

#ifdef __cplusplus
}
#endif
#endif
