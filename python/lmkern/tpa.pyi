"""Type stub of lmkern.tpa (signatures for editors and notebooks; shapes and math are in the docstrings)."""
from typing import Any
from ._tpa_cache import TPACacheBase
from typing import Any as Incomplete

__all__ = ['materialize', 'attention', 'decode', 'KVCache']

def materialize(a, b, *, scale=None, out=None) -> Incomplete: ...
def attention(aq, bq, ak, bk, av, bv, *, causal: bool = False, scale=None, q_pos=None, kv_pos=None, kv_lens=None, return_lse: bool = False, out=None, _path: str = 'auto', _splits: int = 0) -> Incomplete: ...
def decode(aq, bq, ak, bk, av, bv, *, kv_lens=None, scale=None, return_lse: bool = False, out=None, _path: str = 'auto', _splits: int = 0) -> Incomplete: ...

class KVCache(TPACacheBase):
    __doc__: Incomplete
