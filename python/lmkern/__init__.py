"""lmkern: C/CUDA kernels for cheaper language models, used like NumPy.

Families: :mod:`lmkern.tpa` (Tensor Product Attention), :mod:`lmkern.mor` (Mixture-of-Recursions),
:mod:`lmkern.kv` (KV-cache compression), :mod:`lmkern.parscale` (parallel streams).  Core:
:func:`attention`, :func:`rope`, :func:`rope_`, :class:`KVCache`.  NumPy twins of everything live in
:mod:`lmkern.reference`.
"""
__version__ = "0.1.0"

from . import _core
from ._attention import attention, rope, rope_, KVCache
from ._config import show_config, set_num_threads, get_num_threads
from . import reference, tpa, mor, kv, parscale  # noqa: E402

__all__ = [
    "attention", "rope", "rope_", "KVCache", "show_config", "set_num_threads", "get_num_threads",
    "tpa", "mor", "kv", "parscale", "reference", "__version__",
]
