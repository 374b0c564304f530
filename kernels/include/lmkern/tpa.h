/* lmkern.tpa kernels: params structs and declarations. */
#ifndef LMKERN_TPA_H
#define LMKERN_TPA_H

#include "lmkern/common.h"

#ifdef __cplusplus
extern "C" {
#endif

#ifdef __cplusplus
}
#endif
#endif
