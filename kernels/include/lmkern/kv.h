/* lmkern.kv kernels: params structs and declarations. */
#ifndef LMKERN_KV_H
#define LMKERN_KV_H

#include "lmkern/common.h"

#ifdef __cplusplus
extern "C" {
#endif

#ifdef __cplusplus
}
#endif
#endif
