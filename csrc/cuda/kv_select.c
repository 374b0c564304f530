/* lmkern._cuda bindings of lmkern.kv scoring and eviction (attention_mass, pool1d, keep_topk, compact);
 * quantization and the quantized cache are in kv.c.  See bindings.h. */
#include "bindings.h"

PyMethodDef lk_cuda_kv_select_methods[] = {
    {NULL, NULL, 0, NULL},
};
