/* lmkern.parscale kernels: params structs and declarations. */
#ifndef LMKERN_PARSCALE_H
#define LMKERN_PARSCALE_H

#include "lmkern/common.h"

#ifdef __cplusplus
extern "C" {
#endif

#ifdef __cplusplus
}
#endif
#endif
