/* tpa.decode (SPEC 2.4): one new query per row against the factor cache.
 *
 * The FlashTPA engine of tpa_attention.c with N = 1 and every cached token j < kv_lens[b]
 * admissible (the query's own factors are already in the cache).  Per block of cached tokens:
 * bk . bq products shared by all heads -> mix with aq -> multiply by ak -> online softmax -> fold av
 * into the probabilities -> multiply by bv; each cached factor is read once, K and V are never formed,
 * and a long cache is split across threads (lk_tpa_default_splits) with partials in the input
 * precision (float32 for float32) merged by the max-stabilized lk_softmax_combine. */
#include "lmkern/tpa.h"

lk_status lk_tpa_decode_cpu(const lk_tpa_attention_params *p) {
    lk_tpa_attention_params d = *p;
    d.N = 1;
    d.q_pos = NULL;
    d.kv_pos = NULL;
    d.causal = 0;
    return lk_tpa_attention_cpu(&d);
}
