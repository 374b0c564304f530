"""lmkern: C/CUDA kernels for cheaper language models, used like NumPy.

Families: :mod:`lmkern.tpa` (Tensor Product Attention), :mod:`lmkern.mor` (Mixture-of-Recursions),
:mod:`lmkern.kv` (KV-cache compression), :mod:`lmkern.parscale` (parallel streams).  Core:
:func:`attention`, :func:`rope`, :func:`rope_`, :class:`KVCache`.  NumPy twins of everything live in
:mod:`lmkern.reference`.
"""
__version__ = "0.1.0"

import os as _os

# Decision: OpenMP worker threads sleep between kernels instead of spinning (unless the user set a
# policy).  lmkern kernels alternate with NumPy/BLAS calls in user code; spinning workers steal the
# cores BLAS needs (measured: the demo's MHA decode at 100 tokens/s spinning vs 690 passive on 2
# cores).  libgomp reads this when it loads, so it has no effect if OpenMP was loaded earlier.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import _core  # noqa: E402
from ._attention import attention, rope, rope_, KVCache
from ._config import show_config, set_num_threads, get_num_threads
from . import reference, tpa, mor, kv, parscale, cuda  # noqa: E402

__all__ = [
    "attention", "rope", "rope_", "KVCache", "show_config", "set_num_threads", "get_num_threads",
    "tpa", "mor", "kv", "parscale", "cuda", "reference", "__version__",
]
